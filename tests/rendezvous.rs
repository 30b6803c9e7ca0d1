//! Rendezvous over real sockets and files: the stores, the store server under bad input, and
//! bootstrap with threads standing in for processes (host identity injected per thread).
//!
//! Loopback only; ports come from binding port 0. Timeouts are generous where a test must
//! succeed and short only where it must fail; nothing asserts how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::Duration;

use ferrocomm::Error;
use ferrocomm::rendezvous::protocol::{self, Request};
use ferrocomm::rendezvous::{
    Bootstrap, FileStore, InitOptions, JOB_KEY, PrefixStore, ServerConfig, Store, TcpStore,
    TcpStoreServer,
};

const LONG: Duration = Duration::from_secs(60);

fn loopback0() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn server() -> TcpStoreServer {
    TcpStoreServer::bind(loopback0()).unwrap()
}

fn client(server: &TcpStoreServer) -> TcpStore {
    TcpStore::connect(&server.local_addr().to_string(), LONG).unwrap()
}

/// A port nobody listens on right now (bind port 0, read it, close it).
fn free_port() -> u16 {
    TcpListener::bind(loopback0())
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// The Store contract, run against every implementation. `open` makes another handle on the
// same store (another client, or another open of the file), like another process would.
// ---------------------------------------------------------------------------------------

fn store_contract(open: &dyn Fn() -> Arc<dyn Store>) {
    let s = open();
    let other = open();
    let short = Duration::from_millis(100);

    // set / get / try_get, overwrite, empty and binary values.
    s.set("a", b"1").unwrap();
    assert_eq!(other.get("a", LONG).unwrap(), b"1");
    s.set("a", b"").unwrap();
    assert_eq!(other.try_get("a").unwrap(), Some(Vec::new()));
    let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    other.set("bin", &binary).unwrap();
    assert_eq!(s.get("bin", LONG).unwrap(), binary);
    assert_eq!(s.try_get("absent").unwrap(), None);

    // get of an absent key times out naming the key and the store.
    let e = s.get("never", short).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("\"never\"") && msg.contains(&s.describe()),
        "{msg}"
    );

    // get waits for a set from another handle, and from another thread of the same handle.
    let waiter = {
        let s = s.clone();
        thread::spawn(move || s.get("later", LONG))
    };
    other.set("later", b"v").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), b"v");
    let waiter = {
        let s = s.clone();
        thread::spawn(move || s.get("later2", LONG))
    };
    s.set("later2", b"w").unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), b"w");

    // add: counters are decimal i64 text; atomic across handles and threads.
    assert_eq!(s.add("c", 1).unwrap(), 1);
    assert_eq!(other.add("c", 5).unwrap(), 6);
    assert_eq!(s.add("c", -10).unwrap(), -4);
    assert_eq!(other.get("c", LONG).unwrap(), b"-4");
    assert!(matches!(
        s.add("bin", 1),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        s.add("c", i64::MIN),
        Err(Error::InvalidArgument { .. })
    ));
    let seen: Vec<i64> = (0..4)
        .map(|i| {
            let h = if i % 2 == 0 { s.clone() } else { other.clone() };
            thread::spawn(move || (0..25).map(|_| h.add("n", 1).unwrap()).collect::<Vec<_>>())
        })
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(
        seen.iter().copied().collect::<BTreeSet<_>>(),
        (1..=100).collect()
    );

    // compare_set.
    assert_eq!(s.compare_set("cas", None, b"x").unwrap(), b"x");
    assert_eq!(other.compare_set("cas", None, b"y").unwrap(), b"x");
    assert_eq!(other.compare_set("cas", Some(b"z"), b"y").unwrap(), b"x");
    assert_eq!(other.compare_set("cas", Some(b"x"), b"y").unwrap(), b"y");
    assert_eq!(s.get("cas", LONG).unwrap(), b"y");
    assert_eq!(s.compare_set("cas-absent", Some(b"x"), b"y").unwrap(), b"");
    assert_eq!(s.try_get("cas-absent").unwrap(), None);

    // wait / check.
    let waiter = {
        let s = s.clone();
        thread::spawn(move || s.wait(&["w1", "w2", "a"], LONG))
    };
    other.set("w2", b"").unwrap();
    other.set("w1", b"").unwrap();
    waiter.join().unwrap().unwrap();
    s.wait(&[], short).unwrap();
    let e = s
        .wait(&["w1", "missing-1", "missing-2"], short)
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        e.is_timeout() && msg.contains("missing-1") && msg.contains("missing-2"),
        "{msg}"
    );
    assert!(
        !msg.contains("\"w1\""),
        "only the missing keys are named: {msg}"
    );
    assert_eq!(
        s.check(&["w1", "nope", "a"]).unwrap(),
        vec![true, false, true]
    );
    assert_eq!(s.check(&[]).unwrap(), Vec::<bool>::new());

    // delete.
    assert!(other.delete("w1").unwrap());
    assert!(!other.delete("w1").unwrap());
    assert_eq!(s.try_get("w1").unwrap(), None);
    assert!(s.get("w1", short).unwrap_err().is_timeout());

    // Over-long keys are refused before anything is sent or written.
    let long = "k".repeat(protocol::MAX_KEY_LEN + 1);
    assert!(matches!(
        s.set(&long, b""),
        Err(Error::InvalidArgument { .. })
    ));

    // Prefix isolation.
    let pa = PrefixStore::new("job/a", s.clone());
    let pb = PrefixStore::new("job/b", other.clone());
    pa.set("k", b"from a").unwrap();
    assert_eq!(pb.try_get("k").unwrap(), None);
    assert_eq!(pa.get("k", LONG).unwrap(), b"from a");
    assert_eq!(other.try_get("job/a/k").unwrap(), Some(b"from a".to_vec()));
    assert_eq!(pb.add("k", 2).unwrap(), 2);
    assert_eq!(pa.get("k", LONG).unwrap(), b"from a");
    let msg = pb.wait(&["k", "gone"], short).unwrap_err().to_string();
    assert!(
        msg.contains("\"gone\"") && !msg.contains("job/b/"),
        "prefix stripped: {msg}"
    );
}

#[test]
fn tcp_store_keeps_the_store_contract() {
    let srv = server();
    let addr = srv.local_addr().to_string();
    store_contract(&|| Arc::new(TcpStore::connect(&addr, LONG).unwrap()));
    assert_eq!(client(&srv).describe(), format!("tcp://{addr}"));
}

#[test]
fn file_store_keeps_the_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    store_contract(&|| Arc::new(FileStore::open(&path).unwrap()));
}

// ---------------------------------------------------------------------------------------
// The TCP store server under bad input.
// ---------------------------------------------------------------------------------------

/// Reads until the server closes the connection; true if it did within a minute.
fn server_closes(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn server_survives_garbage_truncation_and_oversized_lengths() {
    let srv = server();
    let good = client(&srv);
    good.set("alive", b"1").unwrap();

    // Garbage: an HTTP request.
    let mut g = TcpStream::connect(srv.local_addr()).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: store\r\n\r\nmore garbage here")
        .unwrap();
    assert!(server_closes(g));
    assert_eq!(good.get("alive", LONG).unwrap(), b"1");

    // A truncated frame: half a header, then end of stream.
    let frame = protocol::encode_request(&Request::Set {
        key: "k".into(),
        value: b"v".to_vec(),
    })
    .unwrap();
    let mut t = TcpStream::connect(srv.local_addr()).unwrap();
    t.write_all(&frame[..10]).unwrap();
    t.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(server_closes(t));
    // A truncated body.
    let mut t = TcpStream::connect(srv.local_addr()).unwrap();
    t.write_all(&frame[..frame.len() - 1]).unwrap();
    t.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(server_closes(t));
    assert_eq!(
        good.try_get("k").unwrap(),
        None,
        "a truncated set must not apply"
    );

    // An oversized length: refused from the header, nothing allocated or awaited.
    let mut header = frame[..protocol::REQUEST_HEADER_LEN].to_vec();
    header[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut o = TcpStream::connect(srv.local_addr()).unwrap();
    o.write_all(&header).unwrap();
    assert!(server_closes(o));

    // A valid request after garbage on another connection still works, and so does a raw
    // valid frame.
    good.set("still", b"here").unwrap();
    let mut r = TcpStream::connect(srv.local_addr()).unwrap();
    r.write_all(&frame).unwrap();
    let mut reply = [0u8; protocol::RESPONSE_HEADER_LEN];
    r.read_exact(&mut reply).unwrap();
    assert_eq!(
        protocol::decode_response(&reply).unwrap().0,
        protocol::Response::Ok(Vec::new())
    );
    assert_eq!(good.get("k", LONG).unwrap(), b"v");
}

#[test]
fn server_closes_a_client_stalled_inside_a_frame() {
    let srv = TcpStoreServer::bind_with(
        loopback0(),
        ServerConfig {
            frame_timeout: Duration::from_millis(200),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let good = client(&srv);
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.write_all(&[0x51, 0x53]).unwrap();
    good.set("x", b"y").unwrap();
    assert!(server_closes(s));
    assert_eq!(good.get("x", LONG).unwrap(), b"y");
}

#[test]
fn server_refuses_clients_over_its_limit() {
    let srv = TcpStoreServer::bind_with(
        loopback0(),
        ServerConfig {
            max_clients: 1,
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let first = client(&srv);
    first.set("k", b"v").unwrap();
    let extra = TcpStream::connect(srv.local_addr()).unwrap();
    assert!(server_closes(extra));
    assert_eq!(first.get("k", LONG).unwrap(), b"v");
    // A client over the limit learns why (when the refusal arrives before the reset).
    let second = client(&srv);
    match second.set("k", b"w") {
        Err(Error::Io { context, .. }) => {
            assert!(
                context.contains("its limit")
                    || context.contains("connection failed")
                    || context.contains("closed the connection"),
                "{context}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(first.get("k", LONG).unwrap(), b"v");
}

#[test]
fn dropping_the_server_releases_waiting_clients() {
    let srv = server();
    let c = client(&srv);
    let started = Arc::new(Barrier::new(2));
    let waiter = {
        let started = started.clone();
        thread::spawn(move || {
            started.wait();
            c.get("never", Duration::from_secs(3600))
        })
    };
    started.wait();
    drop(srv);
    // Either the server answered "shutting down" or the connection was closed: an error
    // other than the hour-long timeout, as soon as the server is gone.
    let e = waiter.join().unwrap().unwrap_err();
    assert!(!e.is_timeout(), "{e:?}");
}

#[test]
fn client_waits_for_a_server_that_starts_later() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let late = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        TcpStoreServer::bind(format!("127.0.0.1:{port}").parse().unwrap()).unwrap()
    });
    let c = TcpStore::connect_with(&addr, LONG, Duration::from_millis(50)).unwrap();
    let _srv = late.join().unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k", LONG).unwrap(), b"v");
}

#[test]
fn client_gives_up_naming_the_address() {
    let addr = format!("127.0.0.1:{}", free_port());
    let e = TcpStore::connect(&addr, Duration::from_millis(300)).unwrap_err();
    assert!(e.is_timeout(), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&addr) && msg.contains("FERROCOMM_TIMEOUT"),
        "{msg}"
    );
    assert!(matches!(
        TcpStore::connect("no-port", LONG),
        Err(Error::InvalidArgument { .. })
    ));
}

// ---------------------------------------------------------------------------------------
// The file store across processes and with damaged files.
// ---------------------------------------------------------------------------------------

const CHILD_ENV: &str = "FERROCOMM_TEST_FILE_STORE_CHILD";

#[test]
fn file_store_counts_across_processes() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        // The child: add 100 times, then leave.
        let s = FileStore::open(path).unwrap();
        for _ in 0..100 {
            s.add("n", 1).unwrap();
        }
        s.set("child-done", b"").unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let s = FileStore::open(&path).unwrap();
    let child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "file_store_counts_across_processes",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        s.add("n", 1).unwrap();
    }
    s.wait(&["child-done"], LONG).unwrap();
    let status = { child }.wait().unwrap();
    assert!(status.success());
    assert_eq!(s.get("n", LONG).unwrap(), b"200");
}

#[test]
fn file_store_drops_a_torn_record_and_refuses_a_foreign_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let s = FileStore::open(&path).unwrap();
    s.set("a", b"1").unwrap();
    // A writer that died in the middle of a record.
    let whole = std::fs::read(&path).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&whole[..whole.len() - 1]).unwrap();
    drop(f);
    let fresh = FileStore::open(&path).unwrap();
    assert_eq!(fresh.get("a", LONG).unwrap(), b"1");
    fresh.set("b", b"2").unwrap();
    assert_eq!(s.get("b", LONG).unwrap(), b"2");
    assert_eq!(
        FileStore::open(&path).unwrap().try_get("a").unwrap(),
        Some(b"1".to_vec())
    );

    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"this is not a ferrocomm store, just some text").unwrap();
    let e = FileStore::open(&foreign).unwrap_err();
    assert!(matches!(e, Error::PeerMisbehaved { .. }), "{e:?}");
    let e = FileStore::open(dir.path().join("no-such-dir").join("x")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// Bootstrap: threads stand in for processes.
// ---------------------------------------------------------------------------------------

fn addrs(tag: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("tcp".to_owned(), tag.to_owned())])
}

/// Joins in a thread with `opts` resolved against an empty environment.
fn spawn_join(opts: InitOptions, tag: String) -> thread::JoinHandle<ferrocomm::Result<Bootstrap>> {
    thread::spawn(move || opts.resolve_with(&|_| None)?.join(addrs(&tag)))
}

fn external(srv: &TcpStoreServer, world: usize) -> InitOptions {
    InitOptions::new()
        .init_method(&format!("tcp://{}", srv.local_addr()))
        .world_size(world)
        .store_external(true)
        .timeout(LONG)
        .log_interval(Duration::from_millis(200))
}

fn check_consistent(boots: &[Bootstrap]) {
    let world = boots.len();
    let ranks: BTreeSet<usize> = boots.iter().map(|b| b.rank).collect();
    assert_eq!(ranks, (0..world).collect(), "every rank exactly once");
    for b in boots {
        assert_eq!(b.world_size, world);
        assert_eq!(
            b.peers, boots[0].peers,
            "every rank sees the same peer table"
        );
        assert_eq!(b.me().rank, b.rank);
    }
}

#[test]
fn uneven_nodes_get_ranks_in_node_order() {
    let srv = server();
    // Node 0 runs 2 processes, node 1 runs 3. Host ids sort the other way round, so the node
    // rank is what orders them.
    let plan: Vec<(usize, &str)> = vec![
        (1, "aa-node1"),
        (0, "zz-node0"),
        (1, "aa-node1"),
        (1, "aa-node1"),
        (0, "zz-node0"),
    ];
    let threads: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(i, &(node, host))| {
            spawn_join(
                external(&srv, 5).node_rank(node).host_id(host),
                format!("proc-{i}"),
            )
        })
        .collect();
    let boots: Vec<Bootstrap> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    check_consistent(&boots);
    for (b, &(node, host)) in boots.iter().zip(&plan) {
        assert_eq!(b.peers[b.rank].host_id, host);
        if node == 0 {
            assert!(b.rank < 2, "node 0 first: {b:?}");
            assert_eq!((b.local_size, b.node_index), (2, 0));
            assert_eq!(b.local_rank, b.rank);
        } else {
            assert!(b.rank >= 2, "{b:?}");
            assert_eq!((b.local_size, b.node_index), (3, 1));
            assert_eq!(b.local_rank, b.rank - 2);
        }
        assert!(!b.hosts_store());
    }
    // The transport addresses went through unchanged.
    let tags: BTreeSet<&str> = boots[0]
        .peers
        .iter()
        .map(|p| p.addrs["tcp"].as_str())
        .collect();
    assert_eq!(tags.len(), 5);
}

#[test]
fn without_node_ranks_hosts_get_contiguous_ranks() {
    let srv = server();
    let hosts = ["h-b", "h-a", "h-b", "h-a", "h-b"];
    let threads: Vec<_> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| spawn_join(external(&srv, 5).host_id(h), format!("p{i}")))
        .collect();
    let boots: Vec<Bootstrap> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    check_consistent(&boots);
    let by_rank: Vec<&str> = boots[0].peers.iter().map(|p| p.host_id.as_str()).collect();
    assert_eq!(by_rank, ["h-a", "h-a", "h-b", "h-b", "h-b"]);
}

#[test]
fn env_ranks_with_rank_0_hosting_the_store() {
    let port = free_port().to_string();
    let threads: Vec<_> = (0..3)
        .map(|r| {
            let port = port.clone();
            thread::spawn(move || {
                let rank = r.to_string();
                let env = move |k: &str| {
                    Some(match k {
                        "MASTER_ADDR" => "127.0.0.1".to_owned(),
                        "MASTER_PORT" => port.clone(),
                        "RANK" | "LOCAL_RANK" => rank.clone(),
                        "WORLD_SIZE" | "LOCAL_WORLD_SIZE" => "3".to_owned(),
                        "FERROCOMM_TIMEOUT" => "60".to_owned(),
                        "FERROCOMM_JOB_ID" => "envjob".to_owned(),
                        _ => return None,
                    })
                };
                InitOptions::new()
                    .resolve_with(&env)?
                    .join(addrs(&format!("r{r}")))
            })
        })
        .collect();
    let boots: Vec<Bootstrap> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    check_consistent(&boots);
    for (r, b) in boots.iter().enumerate() {
        assert_eq!(b.rank, r);
        assert_eq!(b.hosts_store(), r == 0);
        // All on this machine: local ranks follow ranks.
        assert_eq!((b.local_rank, b.local_size, b.node_index), (r, 3, 0));
        assert_eq!(b.job_id, "envjob");
    }
    // The job store works after bootstrap, and is prefixed by the job.
    boots[1].store.set("after", b"x").unwrap();
    assert_eq!(boots[2].store.get("after", LONG).unwrap(), b"x");
    let raw = TcpStore::connect(&format!("127.0.0.1:{port}"), LONG).unwrap();
    assert_eq!(
        raw.try_get("job/envjob/after").unwrap(),
        Some(b"x".to_vec())
    );
}

#[test]
fn unassigned_processes_elect_a_store_host_and_get_ranks() {
    let port = free_port();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let opts = InitOptions::new()
                .init_method(&format!("tcp://127.0.0.1:{port}"))
                .world_size(3)
                .timeout(LONG);
            spawn_join(opts, format!("p{i}"))
        })
        .collect();
    let boots: Vec<Bootstrap> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    check_consistent(&boots);
    assert_eq!(boots.iter().filter(|b| b.hosts_store()).count(), 1);
}

#[test]
fn file_init_method_bootstraps() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("file://{}", dir.path().join("rdv").display());
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let opts = InitOptions::new()
                .init_method(&url)
                .world_size(3)
                .timeout(LONG);
            spawn_join(opts, format!("p{i}"))
        })
        .collect();
    let boots: Vec<Bootstrap> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    check_consistent(&boots);
    assert!(boots[0].store.describe().starts_with("file://"));
}

/// Collects log lines written on the current thread while `f` runs.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, logs)
}

#[test]
fn a_missing_rank_is_named_in_logs_and_in_the_timeout() {
    let srv = server();
    let addr = srv.local_addr().to_string();
    let threads: Vec<_> = (0..2)
        .map(|r| {
            let opts = external(&srv, 3)
                .rank(r)
                .timeout(Duration::from_secs(3))
                .log_interval(Duration::from_millis(100));
            thread::spawn(move || {
                with_logs(|| opts.resolve_with(&|_| None).unwrap().join(addrs("x")))
            })
        })
        .collect();
    for t in threads {
        let (res, logs) = t.join().unwrap();
        let e = res.unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("missing ranks: 2 (2 of 3 have joined)"),
            "{msg}"
        );
        assert!(
            msg.contains(&addr) && msg.contains("FERROCOMM_TIMEOUT"),
            "{msg}"
        );
        assert!(
            logs.contains("WARN") && logs.contains("missing ranks: 2"),
            "{logs}"
        );
    }
}

#[test]
fn missing_processes_without_ranks_are_counted() {
    let srv = server();
    let threads: Vec<_> = (0..2)
        .map(|i| {
            spawn_join(
                external(&srv, 3).timeout(Duration::from_secs(2)),
                format!("p{i}"),
            )
        })
        .collect();
    for t in threads {
        let e = t.join().unwrap().unwrap_err();
        assert!(e.is_timeout(), "{e:?}");
        assert!(
            e.to_string().contains("2 of 3 processes have joined"),
            "{e}"
        );
    }
}

#[test]
fn a_store_of_another_job_is_refused_at_once() {
    let srv = server();
    let raw = client(&srv);
    let first = spawn_join(external(&srv, 2).rank(0), "a0".into());
    raw.wait(&[JOB_KEY], LONG).unwrap();

    // Another world size: refused at once, naming both jobs and the store.
    let e = external(&srv, 3)
        .rank(1)
        .resolve_with(&|_| None)
        .unwrap()
        .join(addrs("b"))
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::JobMismatch { .. }), "{e:?}");
    assert!(
        msg.contains("world_size=3") && msg.contains("world_size=2"),
        "{msg}"
    );
    assert!(
        msg.contains(&srv.local_addr().to_string()) && msg.contains("MASTER_PORT"),
        "{msg}"
    );
    // Another job id: the same.
    let e = external(&srv, 2)
        .rank(1)
        .job_id("other")
        .resolve_with(&|_| None)
        .unwrap()
        .join(addrs("b"))
        .unwrap_err();
    assert!(matches!(e, Error::JobMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("job_id=other"), "{e}");

    // The real rank 1 still completes the job.
    let second = external(&srv, 2)
        .rank(1)
        .resolve_with(&|_| None)
        .unwrap()
        .join(addrs("a1"))
        .unwrap();
    let first = first.join().unwrap().unwrap();
    check_consistent(&[first, second]);
}

#[test]
fn a_rank_claimed_twice_is_refused() {
    let srv = server();
    let raw = client(&srv);
    let first = spawn_join(external(&srv, 2).rank(0), "a0".into());
    raw.wait(&["job/default/claim/0"], LONG).unwrap();
    let e = external(&srv, 2)
        .rank(0)
        .resolve_with(&|_| None)
        .unwrap()
        .join(addrs("dup"))
        .unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert!(e.to_string().contains("claimed twice"), "{e}");
    let second = spawn_join(external(&srv, 2).rank(1), "a1".into());
    check_consistent(&[
        first.join().unwrap().unwrap(),
        second.join().unwrap().unwrap(),
    ]);
}

#[test]
fn two_jobs_on_two_ports_never_mix() {
    // Same job id, same host, both hosted by their rank 0: only the port differs.
    let ports = [free_port(), free_port()];
    let worlds = [2usize, 3];
    let mut threads = Vec::new();
    for job in 0..2 {
        for r in 0..worlds[job] {
            let opts = InitOptions::new()
                .init_method(&format!("tcp://127.0.0.1:{}", ports[job]))
                .world_size(worlds[job])
                .rank(r)
                .timeout(LONG);
            threads.push((job, spawn_join(opts, format!("job{job}"))));
        }
    }
    let mut boots: [Vec<Bootstrap>; 2] = [Vec::new(), Vec::new()];
    for (job, t) in threads {
        boots[job].push(t.join().unwrap().unwrap());
    }
    for (job, boots) in boots.iter().enumerate() {
        check_consistent(boots);
        for b in boots {
            assert!(
                b.peers
                    .iter()
                    .all(|p| p.addrs["tcp"] == format!("job{job}"))
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Init failures are noticed at once and explained (issue 13, items 6 and 9).
// ---------------------------------------------------------------------------------------

/// Runs `f` on a thread and returns its result, failing the test if it takes more than
/// `limit` (a hang, or a wait for a timeout far beyond it).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("no result within {limit:?}"))
}

/// Rank `rank` of a `tcp://127.0.0.1:PORT` job whose rank 0 hosts the store.
fn tcp_rank(port: u16, rank: usize, world: usize, timeout: Duration) -> InitOptions {
    InitOptions::new()
        .init_method(&format!("tcp://127.0.0.1:{port}"))
        .rank(rank)
        .world_size(world)
        .timeout(timeout)
        .log_interval(Duration::from_millis(200))
}

const NEVER: Duration = Duration::from_secs(600);

#[test]
fn a_second_rank_0_is_told_rank_0_is_claimed() {
    let port = free_port();
    let first = spawn_join(tcp_rank(port, 0, 2, LONG), "a0".into());
    let raw = TcpStore::connect(&format!("127.0.0.1:{port}"), LONG).unwrap();
    raw.wait(&["job/default/claim/0"], LONG).unwrap();
    // Another process started with RANK=0 for the same job: not "port in use".
    let e = within(LONG, move || {
        tcp_rank(port, 0, 2, NEVER)
            .resolve_with(&|_| None)
            .unwrap()
            .join(addrs("dup"))
    })
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    for w in [
        "rank 0 is claimed twice",
        "already holds rank 0",
        &format!("pid {}", std::process::id()),
        &format!("127.0.0.1:{port}"),
        "RANK",
    ] {
        assert!(msg.contains(w), "says {w:?}: {msg}");
    }
    assert!(!msg.contains("in use"), "{msg}");
    // The refused process does not disturb the job that holds rank 0.
    let second = spawn_join(tcp_rank(port, 1, 2, LONG), "a1".into());
    check_consistent(&[
        first.join().unwrap().unwrap(),
        second.join().unwrap().unwrap(),
    ]);
}

#[test]
fn an_unresolvable_master_fails_every_rank_at_once() {
    let port = free_port().to_string();
    for rank in ["0", "1"] {
        let port = port.clone();
        let e = within(LONG, move || {
            let env = move |k: &str| {
                Some(match k {
                    "MASTER_ADDR" => "no-such-host.invalid".to_owned(),
                    "MASTER_PORT" => port.clone(),
                    "RANK" => rank.to_owned(),
                    "WORLD_SIZE" => "2".to_owned(),
                    "FERROCOMM_TIMEOUT" => "600".to_owned(),
                    _ => return None,
                })
            };
            InitOptions::new().resolve_with(&env)?.join(addrs("x"))
        })
        .unwrap_err();
        match &e {
            Error::Config { name, value, .. } => {
                assert_eq!(
                    (name.as_str(), value.as_str()),
                    ("MASTER_ADDR", "no-such-host.invalid")
                )
            }
            other => panic!("rank {rank}: expected a Config error, got {other:?}"),
        }
        assert!(e.to_string().contains("resolve"), "{e}");
    }
}

#[test]
fn when_rank_0_gives_up_the_others_say_why() {
    let port = free_port();
    let r0 = spawn_join(tcp_rank(port, 0, 3, Duration::from_secs(3)), "a0".into());
    let r1 = spawn_join(tcp_rank(port, 1, 3, LONG), "a1".into());
    let e0 = r0.join().unwrap().unwrap_err();
    assert!(e0.is_timeout(), "{e0:?}");
    let e1 = within(LONG, move || r1.join().unwrap()).unwrap_err();
    let msg = e1.to_string();
    assert!(!msg.contains("failed to fill whole buffer"), "{msg}");
    assert!(
        msg.contains("gave up"),
        "says the store host gave up: {msg}"
    );
    assert!(
        msg.contains("missing ranks: 2") || msg.contains("closed the connection"),
        "says why, or that the store host closed the connection: {msg}"
    );
}

#[test]
fn a_rank_that_leaves_during_init_is_named_within_seconds() {
    // Rank 0 waits for ranks 1 and 2 (its timeout far away). Rank 1, "on another host",
    // registers and arms its last will as a real rank does, then its connection closes as
    // a dying process's would: rank 0 fails at once, naming it.
    let port = free_port();
    let r0 = spawn_join(tcp_rank(port, 0, 3, NEVER), "a0".into());
    let raw = TcpStore::connect(&format!("127.0.0.1:{port}"), LONG).unwrap();
    raw.wait(&[JOB_KEY], LONG).unwrap();
    raw.compare_set("job/default/claim/1", None, b"pid 4242 on elsewhere")
        .unwrap();
    let d = ferrocomm::rendezvous::Departure {
        rank: 1,
        pid: 4242,
        hostname: "elsewhere".into(),
        why: "its connection to the store closed".into(),
    };
    let will = raw
        .last_will(
            &format!("job/default/{}", ferrocomm::rendezvous::DEPARTED_KEY),
            &serde_json::to_vec(&d).unwrap(),
        )
        .unwrap();
    let peer = ferrocomm::rendezvous::PeerInfo {
        rank: 1,
        host_id: "elsewhere".into(),
        hostname: "elsewhere".into(),
        pid: 4242,
        addrs: addrs("a1"),
    };
    raw.set("job/default/peer/1", &serde_json::to_vec(&peer).unwrap())
        .unwrap();
    drop(will);
    let e = within(LONG, move || r0.join().unwrap()).unwrap_err();
    match &e {
        Error::PeerLost { rank, peer, .. } => assert_eq!((*rank, *peer), (0, 1), "{e}"),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(e.to_string().contains("pid 4242 on elsewhere"), "{e}");
}

#[test]
fn a_withdrawn_will_is_not_a_departure() {
    let srv = server();
    let c = client(&srv);
    c.last_will("gone", b"x").unwrap().disarm().unwrap();
    let armed = c.last_will("gone2", b"y").unwrap();
    // Another process' will on a key already set does not overwrite it.
    c.set("gone2", b"first").unwrap();
    drop(armed);
    let deadline = std::time::Instant::now() + LONG;
    while c.try_get("gone2").unwrap() != Some(b"first".to_vec()) {
        assert!(std::time::Instant::now() < deadline);
        thread::sleep(Duration::from_millis(10));
    }
    let third = c.last_will("gone3", b"z").unwrap();
    drop(third);
    assert_eq!(c.get("gone3", LONG).unwrap(), b"z");
    assert_eq!(
        c.try_get("gone").unwrap(),
        None,
        "the withdrawn will was carried out"
    );
    assert_eq!(c.try_get("gone2").unwrap(), Some(b"first".to_vec()));
}

/// Rank 0 of a two-rank job on one host whose rank 1 is played by this test through the
/// store: it publishes a shared-memory segment that never appears, under the pid of `pid`.
fn shm_job_with_a_fake_rank_1(
    timeout: Duration,
    pid: u32,
) -> (thread::JoinHandle<ferrocomm::Result<()>>, TcpStore) {
    let port = free_port();
    let host = format!("shm-fake-host-{port}");
    let h = host.clone();
    let r0 = thread::spawn(move || tcp_rank(port, 0, 2, timeout).host_id(&h).init().map(|_| ()));
    let raw = TcpStore::connect(&format!("127.0.0.1:{port}"), LONG).unwrap();
    raw.wait(&[JOB_KEY], LONG).unwrap();
    raw.compare_set("job/default/claim/1", None, b"fake rank 1")
        .unwrap();
    let peer = ferrocomm::rendezvous::PeerInfo {
        rank: 1,
        host_id: host,
        hostname: "fake".into(),
        pid,
        addrs: BTreeMap::from([
            (
                "shm".to_owned(),
                format!("/ferrocomm-never-created-{}-{port}", std::process::id()),
            ),
            ("tcp".to_owned(), "127.0.0.1:9".to_owned()),
        ]),
    };
    raw.set("job/default/peer/1", &serde_json::to_vec(&peer).unwrap())
        .unwrap();
    raw.wait(&["job/default/peers"], LONG).unwrap();
    (r0, raw)
}

#[test]
fn a_local_rank_that_dies_before_its_shared_memory_exists_is_named() {
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let pid = child.id();
    let (r0, _store) = shm_job_with_a_fake_rank_1(NEVER, pid);
    child.kill().unwrap();
    child.wait().unwrap();
    let e = within(LONG, move || r0.join().unwrap()).unwrap_err();
    match &e {
        Error::PeerLost { rank, peer, .. } => assert_eq!((*rank, *peer), (0, 1), "{e}"),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains(&format!("pid {pid}")), "{msg}");
}

#[test]
fn waiting_for_shared_memory_reports_how_long_it_waited() {
    // Rank 1's process lives but never creates its segment: a timeout that says how long.
    let mut child = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let (r0, _store) = shm_job_with_a_fake_rank_1(Duration::from_secs(2), child.id());
    let e = within(LONG, move || r0.join().unwrap()).unwrap_err();
    let _ = child.kill();
    let _ = child.wait();
    match &e {
        Error::Timeout { op, waited, .. } => {
            assert!(op.contains("shared-memory segment"), "{e}");
            assert!(*waited >= Duration::from_secs(1), "{e}");
        }
        other => panic!("expected a Timeout, got {other:?}"),
    }
    assert!(!e.to_string().contains("0.0ns"), "{e}");
}
