//! Bad input from the network against real processes: strangers, other jobs and impostors
//! on a rank's TCP transport port, and garbage on the store port of a running job. The
//! jobs run on one host, so the transport tests force TCP (`FERROCOMM_TRANSPORT=tcp`).
//!
//! What must hold: the rank (or the store) logs and closes the offending connection, keeps
//! serving everyone else, never panics and never allocates what a length field claims;
//! the job's own traffic (1 MiB messages, every word checked) is undisturbed.
//!
//! A connection whose hello is valid for the job (right job id and world size) and names
//! a rank that has not connected yet *is* that rank as far as the receiver can tell, unless
//! the job has a secret (see the authentication tests). If it then breaks the protocol, the
//! receiver closes that rank's connection and fails every operation with it (`PeerLost`,
//! "broke the protocol: ..."), logging the address the bytes came from; other pairs go on.
//! A hello naming a rank that is already connected is refused. The test
//! `an_impostor_breaks_only_the_pair_it_claims` pins both down.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Proc, count, ferrorun, free_port, num, records};
use ferrocomm::auth::{self, Channel, ClientHandshake, Secret};
use ferrocomm::rendezvous::protocol::{self, Request};
use ferrocomm::rendezvous::{Store, TcpStore};
use ferrocomm::wire::{Envelope, FrameHeader, FrameKind, HELLO_LEN, Hello, HelloKind, job_hash};

#[test]
fn rank_entry_point() {
    common::rank_main()
}

/// How long a process gets to close a connection it should close. The transport's
/// handshake deadline is 10 s; this is far above it.
const CLOSE_WITHIN: Duration = Duration::from_secs(40);

fn hello(job: &str, world: u32, rank: u32) -> Vec<u8> {
    Hello {
        kind: HelloKind::Request,
        job: job_hash(job),
        world,
        rank,
        nonce: 0,
    }
    .encode()
    .to_vec()
}

fn header(kind: FrameKind, len: u64, id: u64) -> Vec<u8> {
    FrameHeader {
        kind,
        len,
        id,
        env: Envelope::default(),
    }
    .encode()
    .to_vec()
}

/// The job secret these tests give `ferrorun`: the impostors below know it (insiders), so
/// what they test is what a rank does with bad bytes *after* authentication. Strangers
/// without it are covered by tests/security.rs (and the garbage cases here).
const SECRET: &str = "bad-input-test-secret";

/// Runs the client's side of the authentication handshake on `s` with [`SECRET`].
fn authenticate(s: &mut TcpStream, channel: Channel) {
    let (hs, init) =
        ClientHandshake::start(&Secret::new(SECRET).expect("secret"), channel).expect("handshake");
    s.write_all(&init).expect("send init");
    let mut challenge = [0u8; auth::CHALLENGE_LEN];
    s.set_read_timeout(Some(CLOSE_WITHIN)).expect("timeout");
    s.read_exact(&mut challenge).expect("challenge");
    s.write_all(&hs.answer(&challenge).expect("the job's challenge verifies"))
        .expect("send proof");
}

/// Connects to `addr` and writes `bytes` (a refused write is fine: the other side may
/// already have closed). Bytes that start with a whole transport hello are sent by an
/// insider: the connection authenticates with [`SECRET`] first.
fn connect_and_send(addr: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    if bytes.len() >= HELLO_LEN && Hello::decode(bytes).is_ok() {
        authenticate(&mut s, Channel::Transport);
    }
    if !bytes.is_empty() {
        let _ = s.write_all(bytes);
    }
    s
}

/// Waits (up to `deadline`) for the other side to close `s`: end of stream or a reset.
fn closed_by_peer(s: &mut TcpStream, deadline: Instant) -> Result<(), String> {
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("still open".into());
        }
        s.set_read_timeout(Some(left))
            .map_err(|e| format!("set_read_timeout: {e}"))?;
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("still open".into());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read failed: {e}")),
        }
    }
}

fn assert_closed(what: &str, s: &mut TcpStream) {
    if let Err(e) = closed_by_peer(s, Instant::now() + CLOSE_WITHIN) {
        panic!("{what}: the connection was not closed within {CLOSE_WITHIN:?}: {e}");
    }
}

/// The TCP addresses and the job id the ranks of a running job printed.
fn addrs_and_job(out: &str, n: usize) -> (Vec<SocketAddr>, String) {
    let info = records(out, "INFO");
    assert_eq!(info.len(), n, "{out}");
    let mut addrs = vec![None; n];
    for r in &info {
        let a: SocketAddr = r["tcp"]
            .parse()
            .unwrap_or_else(|_| panic!("rank printed no TCP address: {r:?}"));
        addrs[num(r, "rank")] = Some(a);
    }
    let addrs = addrs
        .into_iter()
        .map(|a| a.expect("every rank printed"))
        .collect();
    (addrs, info[0]["job"].clone())
}

#[test]
fn strangers_on_a_transport_port_are_refused_and_the_job_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = dir.path().join("stop");
    let mut job = Proc::start(
        "ferrorun",
        ferrorun(
            &["--nproc-per-node", "3", "--tag-output"],
            "loop",
            &[
                (common::STOP_FILE, stop.to_str().expect("utf-8 path")),
                ("FERROCOMM_SECRET", SECRET),
                // One host: force TCP, whose port is under test (auto would use shm).
                ("FERROCOMM_TRANSPORT", "tcp"),
            ],
        ),
    );
    job.wait_for("3 ranks looping", |o| count(o, "LOOPING") == 3);
    let (addrs, job_id) = addrs_and_job(&job.stdout(), 3);
    // Rank 1 is the target: it receives from ranks 0 and 2 (the loop and the barrier), so
    // both already have their connection to it.
    let victim = addrs[1];

    // Connections that say nothing, or half a hello: dropped at the handshake deadline.
    let mut silent: Vec<(String, TcpStream)> = (0..100)
        .map(|i| {
            (
                format!("silent connection {i}"),
                connect_and_send(victim, &[]),
            )
        })
        .collect();
    silent.push((
        "half a hello, then silence".into(),
        connect_and_send(victim, &hello(&job_id, 3, 0)[..10]),
    ));

    let mut http = b"GET / HTTP/1.1\r\nHost: ferrocomm\r\n\r\n".to_vec();
    http.extend((0..200u32).map(|i| (i * 7919 % 251) as u8));
    let other_job = [
        hello(&format!("not-{job_id}"), 3, 0),
        header(FrameKind::Eager, 8, 0),
        vec![1; 8],
    ]
    .concat();
    let absurd_rts = header(FrameKind::Rts, u64::MAX, 1);
    let half_header = header(FrameKind::Eager, 100, 0)[..20].to_vec();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage (an HTTP request)", http, false),
        ("a hello of another job, then a frame", other_job, false),
        ("a hello with world size 4", hello(&job_id, 4, 0), false),
        ("a hello claiming rank 9 of 3", hello(&job_id, 3, 9), false),
        (
            "a hello claiming the victim's own rank",
            hello(&job_id, 3, 1),
            false,
        ),
        (
            "a hello of connected rank 0, then an absurd length",
            [hello(&job_id, 3, 0), absurd_rts].concat(),
            false,
        ),
        (
            "a hello of connected rank 2, then a truncated frame",
            [hello(&job_id, 3, 2), half_header].concat(),
            true,
        ),
        (
            "half a hello, then the end",
            hello(&job_id, 3, 0)[..12].to_vec(),
            true,
        ),
    ];
    for (what, bytes, end) in cases {
        let mut s = connect_and_send(victim, &bytes);
        if end {
            let _ = s.shutdown(Shutdown::Write);
        }
        assert_closed(what, &mut s);
    }
    for (what, s) in silent.iter_mut() {
        assert_closed(what, s);
    }

    std::fs::write(&stop, b"").expect("stop file");
    let f = job.finish();
    assert_eq!(f.code(), Some(0), "the job completes: {f:?}");
    let done = f.records("LOOPDONE");
    assert_eq!(done.len(), 3, "{f:?}");
    assert!(
        done.iter()
            .all(|r| num(r, "rounds") == num(&done[0], "rounds")),
        "{f:?}"
    );
    assert_eq!(f.records("FINISHED").len(), 3, "{f:?}");
    let refusals: Vec<&str> = f
        .stderr
        .lines()
        .filter(|l| l.starts_with("[rank 1]") && l.contains("refused a transport connection"))
        .collect();
    for why in [
        "it did not authenticate",
        "it belongs to another job",
        "it has world size 4, this job 3",
        "it claims rank 9",
        "it claims rank 1",
        "rank 0 is already connected",
        "rank 2 is already connected",
        "closed during the handshake",
        "handshake not completed within",
    ] {
        assert!(
            refusals.iter().any(|l| l.contains(why)),
            "rank 1 logged a refusal saying {why:?}: {f:?}"
        );
    }
    assert!(
        refusals
            .iter()
            .filter(|l| l.contains("handshake not completed within"))
            .count()
            >= 101,
        "every silent connection was dropped: {f:?}"
    );
    assert!(!f.stderr.contains("panicked"), "{f:?}");
}

#[test]
fn an_impostor_breaks_only_the_pair_it_claims() {
    // Nine ranks exchange with their ring neighbours (distance 1); the barrier of init
    // connects each rank with those at distance 1, 2 and 4 (mod 9: also 5, 7 and 8). So
    // ranks at distance 3 are not connected: an impostor can claim to be rank r+3 at rank r,
    // and the ring traffic does not involve that pair. After the loop, rank r sends a word
    // to rank r+3 (first thing): that fails. Impostors claiming a connected rank are refused.
    let dir = tempfile::tempdir().expect("tempdir");
    let stop = dir.path().join("stop");
    let mut job = Proc::start(
        "ferrorun",
        ferrorun(
            &[
                "--nproc-per-node",
                "9",
                "--tag-output",
                "--grace-period",
                "60",
            ],
            "loop",
            &[
                (common::STOP_FILE, stop.to_str().expect("utf-8 path")),
                ("FERROCOMM_SECRET", SECRET),
                ("FERROCOMM_TRANSPORT", "tcp"),
                (common::MSG_BYTES, "262144"),
                (common::FAR, "3"),
                // Ranks at distance 3 from a failed one wait on a pair that never
                // connected: they give up after this instead of the grace period.
                ("FERROCOMM_OP_TIMEOUT", "5"),
                // Each rank runs until it fails by itself: ferrorun's SIGTERM after the
                // first failure would hide what the others report.
                (common::IGNORE_SIGTERM, "1"),
            ],
        ),
    );
    job.wait_for("9 ranks looping", |o| count(o, "LOOPING") == 9);
    let (addrs, job_id) = addrs_and_job(&job.stdout(), 9);
    let eager_limit = 64 * 1024u64;
    let max_message = 1u64 << 42;

    // Rank 0, "from rank 3": an eager frame longer than the eager limit.
    let mut a = connect_and_send(
        addrs[0],
        &[hello(&job_id, 9, 3), header(FrameKind::Eager, 1 << 20, 0)].concat(),
    );
    let a_from = a.local_addr().expect("local address");
    // Rank 1, "from rank 4": an announcement of 2^60 bytes, above any message.
    let mut b = connect_and_send(
        addrs[1],
        &[hello(&job_id, 9, 4), header(FrameKind::Rts, 1 << 60, 1)].concat(),
    );
    // Rank 3, "from rank 4" (its ring neighbour, connected): refused, whatever follows.
    let mut c = connect_and_send(
        addrs[3],
        &[hello(&job_id, 9, 4), header(FrameKind::Rts, 1 << 41, 1)].concat(),
    );
    // Rank 5, "from rank 6" (connected): refused, a frame cut off in its header or not.
    let mut d = connect_and_send(
        addrs[5],
        &[
            hello(&job_id, 9, 6),
            header(FrameKind::Eager, 8, 0)[..20].to_vec(),
        ]
        .concat(),
    );
    assert_closed("the oversized eager frame", &mut a);
    assert_closed("the absurd announcement", &mut b);
    assert_closed("a second connection claiming rank 4", &mut c);
    assert_closed("a second connection claiming rank 6", &mut d);

    std::fs::write(&stop, b"").expect("stop file");
    let f = job.finish();
    // The loop (ring neighbours, 256 KiB messages, every word checked) was undisturbed.
    let done = f.records("LOOPDONE");
    assert_eq!(done.len(), 9, "every rank finished the loop: {f:?}");
    assert!(
        done.iter()
            .all(|r| num(r, "rounds") == num(&done[0], "rounds")),
        "{f:?}"
    );
    for r in &done {
        assert!(
            num(r, "hwm_kib") < 256 * 1024,
            "nothing near the announced lengths was allocated: {r:?}"
        );
    }
    // The end of the loop needs the pairs the impostors broke: the job fails, and says why.
    assert_ne!(f.code(), Some(0), "{f:?}");
    let line = |rank: usize, needle: &str| {
        f.stderr
            .lines()
            .find(|l| l.starts_with(&format!("[rank {rank}]")) && l.contains(needle))
            .unwrap_or_else(|| panic!("rank {rank} printed no {needle:?}: {f:?}"))
            .to_string()
    };
    let warned = line(0, "closing the connection of rank 3: it broke the protocol");
    assert!(
        warned.contains(&format!(
            "frame length {} exceeds the limit of {eager_limit} bytes",
            1 << 20
        )) && warned.contains(&a_from.to_string()),
        "rank 0 logged the violation and where it came from: {warned}"
    );
    let err0 = line(0, "RANKERR");
    assert!(
        err0.contains("rank 0: lost peer rank 3 during send")
            && err0.contains("broke the protocol: sent a bad frame header"),
        "{err0}"
    );
    line(1, "closing the connection of rank 4: it broke the protocol");
    let err1 = line(1, "RANKERR");
    assert!(
        err1.contains("rank 1: lost peer rank 4 during send")
            && err1.contains(&format!(
                "frame length {} exceeds the limit of {max_message} bytes",
                1u64 << 60
            )),
        "{err1}"
    );
    line(
        3,
        "refused a transport connection: rank 4 is already connected",
    );
    line(
        5,
        "refused a transport connection: rank 6 is already connected",
    );
    for mem in records(&f.stderr, "MEM") {
        assert!(num(&mem, "hwm_kib") < 256 * 1024, "{mem:?}");
    }
    assert!(!f.stderr.contains("panicked"), "{f:?}");
}

/// Reads one response header from the store; true if it came.
fn store_answers(s: &mut TcpStream) -> bool {
    let mut reply = [0u8; protocol::RESPONSE_HEADER_LEN];
    s.set_read_timeout(Some(CLOSE_WITHIN)).expect("timeout");
    s.read_exact(&mut reply).is_ok()
}

#[test]
fn garbage_on_the_store_port_does_not_stop_the_job() {
    // Node 0's launcher hosts the store; node 1 joins only after the garbage, so its
    // launcher and all five ranks meet through a store that has just seen it.
    let port = free_port();
    let node = |node: &str, nproc: &str| {
        let port = port.to_string();
        Proc::start(
            &format!("node {node}"),
            ferrorun(
                &[
                    "--nnodes",
                    "2",
                    "--node-rank",
                    node,
                    "--nproc-per-node",
                    nproc,
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    &port,
                ],
                "ring",
                &[("FERROCOMM_SECRET", SECRET)],
            ),
        )
    };
    let n0 = node("0", "2");
    let store: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + common::LIMIT;
    while TcpStream::connect(store).is_err() {
        assert!(Instant::now() < deadline, "node 0's store never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let set = protocol::encode_request(&Request::Set {
        key: "itest/key".into(),
        value: b"v".to_vec(),
    })
    .expect("encode");
    let mut oversized = set[..protocol::REQUEST_HEADER_LEN].to_vec();
    oversized[16..20].copy_from_slice(&u32::MAX.to_le_bytes());

    let mut garbage = connect_and_send(store, b"GET / HTTP/1.1\r\nHost: store\r\n\r\nmore");
    assert_closed("garbage", &mut garbage);
    let mut big = connect_and_send(store, &oversized);
    assert_closed("an oversized length", &mut big);
    let mut cut = connect_and_send(store, &set[..10]);
    let _ = cut.shutdown(Shutdown::Write);
    assert_closed("a truncated frame", &mut cut);
    // These two stay open while the job starts and runs.
    let stalled = connect_and_send(store, &set[..set.len() - 1]);
    let silent = connect_and_send(store, &[]);
    // A valid request without authentication: refused, with a reply that says so.
    let mut stranger = connect_and_send(store, &set);
    assert!(store_answers(&mut stranger), "the refusal is answered");
    assert_closed("a request without authentication", &mut stranger);
    // An authenticated raw request is served.
    let mut raw = connect_and_send(store, &[]);
    authenticate(&mut raw, Channel::Store);
    raw.write_all(&set).expect("send");
    assert!(store_answers(&mut raw), "a raw valid request is served");
    let client = TcpStore::connect_secure(
        &store.to_string(),
        Duration::from_secs(10),
        Duration::from_secs(10),
        Some(Secret::new(SECRET).expect("secret")),
    )
    .expect("client");
    assert_eq!(
        client
            .get("itest/key", Duration::from_secs(10))
            .expect("get"),
        b"v"
    );

    let n1 = node("1", "3");
    let (f0, f1) = (n0.finish(), n1.finish());
    assert_eq!((f0.code(), f1.code()), (Some(0), Some(0)), "{f0:?}{f1:?}");
    assert_eq!(f0.records("RING").len() + f1.records("RING").len(), 5);
    for r in f0.records("INFO").iter().chain(&f1.records("INFO")) {
        assert_eq!(num(r, "size"), 5, "{r:?}");
    }
    drop((stalled, silent));
}
