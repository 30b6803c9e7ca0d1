//! Authentication and resource limits of the store and the TCP transport.
//!
//! Every connection of a job with a secret must pass the HMAC challenge-response of
//! `ferrocomm::auth` before any other byte is trusted: a client with the wrong secret, with
//! none, or replaying a recorded handshake is refused (and the job goes on); a half-open
//! handshake is dropped after the deadline; the store caps its connections. Everything runs
//! on loopback, in this process, with bounded waits.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use ferrocomm::auth::{self, Channel, ClientHandshake, Secret};
use ferrocomm::rendezvous::protocol::{self, Request};
use ferrocomm::rendezvous::{InitOptions, PeerInfo, ServerConfig, Store, TcpStore, TcpStoreServer};
use ferrocomm::wire::{HELLO_LEN, Hello, HelloKind, job_hash};
use ferrocomm::{Error, Source, Tag};

const LONG: Duration = Duration::from_secs(20);

fn secret(s: &str) -> Secret {
    Secret::new(s).unwrap()
}

fn server(secret: Option<Secret>) -> TcpStoreServer {
    TcpStoreServer::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            secret,
            ..ServerConfig::default()
        },
    )
    .unwrap()
}

fn client(srv: &TcpStoreServer, secret: Option<Secret>) -> ferrocomm::Result<TcpStore> {
    TcpStore::connect_secure(&srv.local_addr().to_string(), LONG, LONG, secret)
}

/// Reads until the other side closes (or `limit` passes); returns everything read.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> Vec<u8> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

fn assert_auth_failure(e: &Error) {
    let text = e.to_string();
    assert!(
        text.contains("authentication failed") && text.contains("FERROCOMM_SECRET"),
        "{text}"
    );
}

#[test]
fn store_with_the_right_secret_works() {
    let srv = server(Some(secret("s3cret")));
    let c = client(&srv, Some(secret("s3cret"))).unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k", LONG).unwrap(), b"v");
    // More pooled connections authenticate too.
    std::thread::scope(|s| {
        for i in 0..4 {
            let c = &c;
            s.spawn(move || assert!(c.add("n", i).unwrap() >= i));
        }
    });
}

#[test]
fn store_refuses_a_wrong_secret() {
    let srv = server(Some(secret("right")));
    let e = client(&srv, Some(secret("wrong"))).unwrap_err();
    assert!(matches!(e, Error::JobMismatch { .. }), "{e}");
    assert_auth_failure(&e);
}

#[test]
fn store_refuses_a_client_without_secret() {
    let srv = server(Some(secret("right")));
    let c = client(&srv, None).unwrap();
    let e = c.set("k", b"v").unwrap_err();
    assert_auth_failure(&e);
    // Nothing was written.
    let ok = client(&srv, Some(secret("right"))).unwrap();
    assert_eq!(ok.try_get("k").unwrap(), None);
}

#[test]
fn store_without_secret_tells_a_client_with_one() {
    let srv = server(None);
    let e = client(&srv, Some(secret("mine"))).unwrap_err();
    assert_auth_failure(&e);
    assert!(e.to_string().contains("no job secret"), "{e}");
}

/// Forwards one connection from `listener` to `to`, recording what the client sent.
fn recording_proxy(listener: TcpListener, to: SocketAddr) -> Arc<Mutex<Vec<u8>>> {
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        let (mut from_client, _) = listener.accept().unwrap();
        let mut to_server = TcpStream::connect(to).unwrap();
        let (mut c2, mut s2) = (
            from_client.try_clone().unwrap(),
            to_server.try_clone().unwrap(),
        );
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
        });
        let mut buf = [0u8; 4096];
        loop {
            match from_client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rec.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to_server.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_server.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    });
    recorded
}

#[test]
fn store_refuses_a_replayed_handshake() {
    let key = secret("replay-me");
    let srv = server(Some(key.clone()));
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let recorded = recording_proxy(proxy, srv.local_addr());
    {
        let c = TcpStore::connect_secure(&proxy_addr.to_string(), LONG, LONG, Some(key.clone()))
            .unwrap();
        c.set("k", b"evil").unwrap();
        c.delete("k").unwrap();
    }
    let deadline = Instant::now() + LONG;
    let bytes = loop {
        let b = recorded.lock().unwrap().clone();
        // init + proof + set + delete
        if b.len() >= auth::INIT_LEN + auth::PROOF_LEN + 2 * protocol::REQUEST_HEADER_LEN {
            break b;
        }
        assert!(Instant::now() < deadline, "the proxy recorded too little");
        std::thread::sleep(Duration::from_millis(10));
    };
    let honest = client(&srv, Some(key)).unwrap();
    honest.set("k", b"original").unwrap();
    let mut replay = TcpStream::connect(srv.local_addr()).unwrap();
    replay.write_all(&bytes).unwrap();
    let answer = read_to_close(&mut replay, LONG);
    // A fresh challenge, then the connection closes: no reply to the replayed requests.
    assert_eq!(answer.len(), auth::CHALLENGE_LEN, "{answer:?}");
    assert_eq!(honest.get("k", LONG).unwrap(), b"original");
}

#[test]
fn store_drops_a_half_open_handshake_after_the_deadline() {
    let srv = TcpStoreServer::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            secret: Some(secret("k")),
            handshake_timeout: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let start = Instant::now();
    let mut silent = TcpStream::connect(srv.local_addr()).unwrap();
    assert!(read_to_close(&mut silent, LONG).is_empty());
    assert!(start.elapsed() < LONG, "not dropped");
    // Trickling the handshake does not stretch the deadline.
    let start = Instant::now();
    let mut slow = TcpStream::connect(srv.local_addr()).unwrap();
    let (_, init) = ClientHandshake::start(&secret("k"), Channel::Store).unwrap();
    for b in &init[..10] {
        if slow.write_all(std::slice::from_ref(b)).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = read_to_close(&mut slow, LONG);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // The server still serves.
    client(&srv, Some(secret("k")))
        .unwrap()
        .set("a", b"b")
        .unwrap();
}

#[test]
fn store_caps_connections_and_refuses_huge_lengths() {
    let srv = TcpStoreServer::bind_with(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig {
            max_clients: 2,
            ..ServerConfig::default()
        },
    )
    .unwrap();
    let a = client(&srv, None).unwrap();
    let b = client(&srv, None).unwrap();
    a.set("x", b"1").unwrap();
    b.set("y", b"2").unwrap();
    let c = client(&srv, None).unwrap();
    let e = c.set("z", b"3").unwrap_err().to_string();
    assert!(e.contains("limit"), "{e}");
    drop((a, b, c));
    // A header claiming a 4 GiB key: closed before anything is allocated.
    let deadline = Instant::now() + LONG;
    let mut s = loop {
        let mut s = TcpStream::connect(srv.local_addr()).unwrap();
        let mut h = protocol::encode_request(&Request::TryGet { key: "k".into() }).unwrap();
        h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&h[..protocol::REQUEST_HEADER_LEN]).unwrap();
        // The previous clients' threads may still count against the cap for a moment.
        let got = read_to_close(&mut s, LONG);
        if got.is_empty() {
            break s;
        }
        assert!(Instant::now() < deadline, "still refused: {got:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = s.write_all(b"more");
    assert_eq!(
        client(&srv, None).unwrap().try_get("x").unwrap(),
        Some(b"1".to_vec())
    );
}

/// A two-rank job of threads over TCP with `secret`; `attack` runs, given rank 1's
/// transport address, while rank 1 waits in a receive (so its transport makes progress:
/// it accepts and judges the attacker's connections); then rank 0 sends and both pass a
/// barrier.
fn job_under_attack(key: &str, attack: impl FnOnce(SocketAddr, &Secret)) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let key = secret(key);
    let url = format!("tcp://127.0.0.1:{port}");
    let gate = Arc::new(Barrier::new(3));
    let done = Arc::new(Barrier::new(2));
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            let (url, key, gate, done) = (url.clone(), key.clone(), gate.clone(), done.clone());
            std::thread::spawn(move || -> ferrocomm::Result<()> {
                let comm = InitOptions::new()
                    .init_method(&url)
                    .rank(r)
                    .world_size(2)
                    .job_id("security")
                    // Two "hosts", so the pair talks over TCP (the port under attack),
                    // not shared memory.
                    .host_id(&format!("security-host-{r}"))
                    .timeout(LONG)
                    .secret(key)
                    .init()?;
                gate.wait();
                let mut got = [0u64; 4];
                if r == 0 {
                    done.wait();
                    comm.send(&[7u64, 8, 9, 10], 1, 3)?;
                } else {
                    comm.recv(&mut got, Source::Rank(0), Tag::Value(3))?;
                    assert_eq!(got, [7, 8, 9, 10]);
                }
                comm.barrier()
            })
        })
        .collect();
    gate.wait();
    let store =
        TcpStore::connect_secure(&format!("127.0.0.1:{port}"), LONG, LONG, Some(key.clone()))
            .unwrap();
    let raw = store.get("job/security/peers", LONG).unwrap();
    let peers: Vec<PeerInfo> = serde_json::from_slice(&raw).unwrap();
    let addr: SocketAddr = peers[1].addrs["tcp"].parse().unwrap();
    attack(addr, &key);
    done.wait();
    for r in ranks {
        r.join().unwrap().unwrap();
    }
}

fn hello(rank: u32) -> [u8; HELLO_LEN] {
    Hello {
        kind: HelloKind::Request,
        job: job_hash("security"),
        world: 2,
        rank,
        nonce: 0,
    }
    .encode()
}

#[test]
fn transport_refuses_wrong_secret_no_secret_and_replay() {
    job_under_attack("transport-key", |addr, key| {
        // No secret: a plain hello gets the "authentication required" notice, then EOF.
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&hello(0)).unwrap();
        let got = read_to_close(&mut s, LONG);
        assert_eq!(
            auth::refusal_of(&got),
            Some(auth::AuthError::PeerRequiresSecret),
            "{got:?}"
        );

        // Wrong secret: the rank's challenge does not verify; a made-up proof is refused.
        let mut s = TcpStream::connect(addr).unwrap();
        let (hs, init) = ClientHandshake::start(&secret("guess"), Channel::Transport).unwrap();
        s.write_all(&init).unwrap();
        let mut challenge = [0u8; auth::CHALLENGE_LEN];
        s.read_exact(&mut challenge).unwrap();
        assert_eq!(hs.answer(&challenge), Err(auth::AuthError::WrongProof));
        let mut fake = [0u8; auth::PROOF_LEN];
        fake[..8].copy_from_slice(&init[..8]);
        fake[5] = 5;
        s.write_all(&fake).unwrap();
        s.write_all(&hello(0)).unwrap();
        assert!(read_to_close(&mut s, LONG).is_empty());

        // Replay: record a real handshake made with the secret (as rank 0, which is
        // connected already, so the rank refuses it after authentication), then send the
        // same bytes on a new connection: a fresh challenge, then EOF.
        let mut s = TcpStream::connect(addr).unwrap();
        let (hs, init) = ClientHandshake::start(key, Channel::Transport).unwrap();
        s.write_all(&init).unwrap();
        s.read_exact(&mut challenge).unwrap();
        let proof = hs.answer(&challenge).unwrap();
        let recorded = [&init[..], &proof[..], &hello(0)[..]].concat();
        s.write_all(&recorded[auth::INIT_LEN..]).unwrap();
        drop(s);
        let mut r = TcpStream::connect(addr).unwrap();
        r.write_all(&recorded).unwrap();
        let got = read_to_close(&mut r, LONG);
        assert_eq!(got.len(), auth::CHALLENGE_LEN, "{got:?}");
    });
}

#[test]
fn a_rank_with_another_secret_cannot_join() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let ranks: Vec<_> = [("a", 0), ("b", 1)]
        .into_iter()
        .map(|(k, r)| {
            let url = url.clone();
            std::thread::spawn(move || {
                InitOptions::new()
                    .init_method(&url)
                    .rank(r)
                    .world_size(2)
                    .timeout(Duration::from_secs(5))
                    .secret(secret(k))
                    .init()
                    .map(|_| ())
            })
        })
        .collect();
    let results: Vec<_> = ranks.into_iter().map(|r| r.join().unwrap()).collect();
    let e = results[1].as_ref().unwrap_err();
    assert_auth_failure(e);
    assert!(results[0].is_err());
}

// ---------------------------------------------------------------------------------------
// Limits without a secret (issue 13, item 8), and what the store and the transport log.
// ---------------------------------------------------------------------------------------

/// Everything logged at WARN or above by any thread of this test binary since the first
/// call (the store and the transport log from their own threads).
fn global_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        #[derive(Clone)]
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
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Buf(buf.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        buf
    })
    .clone()
}

/// The logged lines that contain `needle`.
fn logged_lines(logs: &Mutex<Vec<u8>>, needle: &str) -> Vec<String> {
    String::from_utf8_lossy(&logs.lock().unwrap())
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

/// Whether the other side closes `s` within `limit` (EOF or reset), reading and dropping
/// whatever it sends first.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn server_without_secret(tune: impl FnOnce(&mut ServerConfig)) -> TcpStoreServer {
    let mut cfg = ServerConfig::default();
    tune(&mut cfg);
    TcpStoreServer::bind_with("127.0.0.1:0".parse().unwrap(), cfg).unwrap()
}

#[test]
fn store_without_secret_drops_idle_strangers_and_trickled_requests() {
    let srv = server_without_secret(|c| {
        c.handshake_timeout = Duration::from_millis(300);
        c.frame_timeout = Duration::from_secs(1);
    });
    // A connection that never sends a request is dropped (it used to be kept forever, one
    // server thread each).
    let mut idle = TcpStream::connect(srv.local_addr()).unwrap();
    assert!(closed_within(&mut idle, LONG), "an idle stranger is kept");

    // A client that completed a request may idle, but a request trickled one byte every
    // 100 ms is dropped once the whole frame has taken more than the frame timeout (each
    // byte used to restart the clock, so it stayed open indefinitely).
    let mut slow = TcpStream::connect(srv.local_addr()).unwrap();
    let set = protocol::encode_request(&Request::Set {
        key: "k".into(),
        value: b"v".to_vec(),
    })
    .unwrap();
    slow.write_all(&set).unwrap();
    let mut reply = [0u8; protocol::RESPONSE_HEADER_LEN];
    slow.read_exact(&mut reply).unwrap();
    std::thread::sleep(Duration::from_millis(600)); // idle after a request: allowed
    let frame = protocol::encode_request(&Request::TryGet { key: "k".into() }).unwrap();
    let mut dropped = false;
    for b in &frame {
        if slow.write_all(std::slice::from_ref(b)).is_err()
            || closed_within(&mut slow, Duration::from_millis(100))
        {
            dropped = true;
            break;
        }
    }
    assert!(
        dropped || closed_within(&mut slow, Duration::from_millis(100)),
        "a request trickled over {} bytes was served",
        frame.len()
    );
    // The store still serves.
    let c = client(&srv, None).unwrap();
    assert_eq!(c.get("k", LONG).unwrap(), b"v");
}

#[test]
fn store_caps_connections_without_a_request_per_client() {
    let srv = server_without_secret(|c| {
        c.max_pending_per_client = 3;
        c.handshake_timeout = LONG;
    });
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(srv.local_addr()).unwrap())
        .collect();
    // The fourth silent connection from this address is refused, saying why.
    let mut extra = TcpStream::connect(srv.local_addr()).unwrap();
    let got = read_to_close(&mut extra, LONG);
    let (resp, _) = protocol::decode_response(&got).expect("a refusal");
    match resp {
        protocol::Response::Refused(m) => {
            assert!(m.contains("FERROCOMM_STORE_MAX_PENDING"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Once they are gone, clients are served again.
    drop(idle);
    let deadline = Instant::now() + LONG;
    loop {
        match client(&srv, None).and_then(|c| c.set("k", b"v")) {
            Ok(()) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "still refused: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn store_refusals_are_logged_at_a_bounded_rate() {
    let logs = global_logs();
    let srv = server_without_secret(|_| {});
    let addr = srv.local_addr().to_string();
    const BAD: usize = 120;
    for _ in 0..BAD {
        let mut s = TcpStream::connect(srv.local_addr()).unwrap();
        s.write_all(&[0xEE; protocol::REQUEST_HEADER_LEN]).unwrap();
        assert!(
            closed_within(&mut s, LONG),
            "garbage is answered by a close"
        );
    }
    // The store still serves, and stopping it sums up what was not logged.
    client(&srv, None).unwrap().set("k", b"v").unwrap();
    drop(srv);
    let lines = logged_lines(&logs, &format!("store server {addr}"));
    assert!(
        lines.len() <= (ferrocomm::rendezvous::tcp_store::LOG_BURST as usize) + 3,
        "{} lines for {BAD} bad connections:\n{}",
        lines.len(),
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("more refused or closed connections")),
        "no summary:\n{}",
        lines.join("\n")
    );
}

/// Closes `s` with a reset (SO_LINGER 0) instead of an orderly shutdown.
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `s` owns an open socket; the option value is a valid `linger` of the size
    // passed, read by the kernel during the call only.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
    drop(s);
}

#[test]
fn a_dial_dropped_during_the_transport_handshake_is_not_a_warning() {
    let logs = global_logs();
    let mut from = Vec::new();
    job_under_attack("crossing-key", |addr, _| {
        // What a crossing dial given up by its rank looks like to the acceptor: a
        // connection reset, or closed, before it said anything.
        let s = TcpStream::connect(addr).unwrap();
        from.push(s.local_addr().unwrap().to_string());
        reset(s);
        let s = TcpStream::connect(addr).unwrap();
        from.push(s.local_addr().unwrap().to_string());
        drop(s);
        // A stranger after them is still refused (so the rank has read its connections).
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&hello(0)).unwrap();
        assert!(!read_to_close(&mut s, LONG).is_empty());
    });
    for f in &from {
        let lines = logged_lines(&logs, f);
        assert!(
            lines.is_empty(),
            "warned about a dropped dial:\n{}",
            lines.join("\n")
        );
    }
}
