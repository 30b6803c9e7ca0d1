//! PyTorch `TCPStore` compatibility: torch's own client against ferrocomm's store server,
//! ferrocomm's [`TorchStore`] client against torch's server, `init_process_group("gloo")`
//! under `ferrorun`, ferrocomm's `hello` under `torchrun`, and a fuzz loop over the torch
//! query decoder.
//!
//! The torch tests need a Python with torch: `<checkout>/.venv/bin/python` (made by
//! `scripts/setup`), else `FERROCOMM_TORCH_PYTHON`. Without one they print why and pass,
//! unless `FERROCOMM_REQUIRE_ALL=1`, which turns the skip into a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrocomm::auth::Secret;
use ferrocomm::rendezvous::torch_wire::{self, Query, VALIDATION_MAGIC};
use ferrocomm::rendezvous::{ServerConfig, Store, TcpStore, TcpStoreServer, TorchStore};

const LONG: Duration = Duration::from_secs(60);

fn torch_python() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let candidates = [
        Some(venv),
        std::env::var_os("FERROCOMM_TORCH_PYTHON").map(PathBuf::from),
    ];
    for p in candidates.into_iter().flatten() {
        let ok = Command::new(&p)
            .args(["-c", "import torch.distributed"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(p);
        }
    }
    None
}

/// The torch Python, or `None` after printing why the test is skipped (a failure under
/// `FERROCOMM_REQUIRE_ALL=1`).
fn python_or_skip(test: &str) -> Option<PathBuf> {
    let p = torch_python();
    if p.is_none() {
        let why = format!(
            "{test}: skipped: no Python with torch (looked for {}/.venv/bin/python and \
             FERROCOMM_TORCH_PYTHON; run scripts/setup or set FERROCOMM_TORCH_PYTHON)",
            env!("CARGO_MANIFEST_DIR")
        );
        assert!(
            std::env::var("FERROCOMM_REQUIRE_ALL").as_deref() != Ok("1"),
            "{why} and FERROCOMM_REQUIRE_ALL=1"
        );
        eprintln!("{why}");
    }
    p
}

/// Runs `script` with `args`, failing the test (with its output) if it does not print `OK`
/// and exit 0 within `limit`.
fn run_python(python: &Path, script: &str, args: &[String], limit: Duration) {
    let mut child = Command::new(python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python");
    let status = wait_limited(&mut child, limit);
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(
        status.is_some_and(|s| s.success()) && out.contains("OK"),
        "python failed ({status:?}):\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

fn wait_limited(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return Some(s);
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn server(config: ServerConfig) -> TcpStoreServer {
    TcpStoreServer::bind_with("127.0.0.1:0".parse().unwrap(), config).unwrap()
}

/// Every query torch's client sends, against ferrocomm's server.
const TORCH_CLIENT_SCRIPT: &str = r#"
import sys, threading, time
from datetime import timedelta
import torch.distributed as dist
port = int(sys.argv[1])
def client(t=10):
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=t))
s = client()
s.set("k", "v1")
assert s.get("k") == b"v1"
assert s.add("n", 5) == 5 and s.add("n", -2) == 3 and s.get("n") == b"3"
assert s.compare_set("c", "", "first") == b"first"
assert s.compare_set("c", "wrong", "x") == b"first"
assert s.compare_set("c", "first", "second") == b"second"
assert s.compare_set("absent", "exp", "x") == b"exp"
assert s.check(["k", "n"]) and not s.check(["k", "missing"])
assert s.num_keys() == 3, s.num_keys()
assert s.delete_key("k") and not s.delete_key("k")
s.append("a", "xy"); s.append("a", "z")
assert s.get("a") == b"xyz"
s.multi_set(["m1", "m2"], ["1", "22"])
assert s.multi_get(["m1", "m2", "a"]) == [b"1", b"22", b"xyz"]
assert sorted(s.list_keys()) == ["a", "c", "m1", "m2", "n"], s.list_keys()
# ferrocomm's own keys are not visible to torch clients.
assert not s.check(["ferrocomm-key"])
# A wait that completes: another client sets the key later.
def later():
    time.sleep(0.3); client().set("late", "1")
th = threading.Thread(target=later); th.start()
s.wait(["late", "a"], timedelta(seconds=30)); th.join()
# A wait that times out, then the connection still works.
t0 = time.time()
try:
    s.wait(["never"], timedelta(seconds=0.5)); raise SystemExit("wait did not time out")
except dist.DistStoreError as e:
    assert "timeout" in str(e).lower(), e
assert time.time() - t0 < 20
# get of a missing key times out too.
try:
    client(1).get("never"); raise SystemExit("get did not time out")
except dist.DistStoreError:
    pass
assert s.get("a") == b"xyz"
# Queues.
s.queue_push("q", "one"); s.queue_push("q", "two")
assert s.queue_len("q") == 2
assert s.queue_pop("q") == b"one" and s.queue_pop("q") == b"two"
assert s.queue_len("q") == 0
# Many clients at once.
N = 16
def worker(i):
    c = client(); c.add("count", 1); c.set(f"w{i}", str(i)); c.wait([f"w{j}" for j in range(N)])
ts = [threading.Thread(target=worker, args=(i,)) for i in range(N)]
[t.start() for t in ts]; [t.join(timeout=60) for t in ts]
assert s.get("count") == str(N).encode(), s.get("count")
# Barrier: three clients, released together; then a barrier that times out.
ts = [threading.Thread(target=lambda: client().barrier("bar", 3, timedelta(seconds=30))) for _ in range(3)]
[t.start() for t in ts]; [t.join(timeout=60) for t in ts]
assert not any(t.is_alive() for t in ts)
try:
    s.barrier("bar2", 2, timedelta(seconds=0.5)); raise SystemExit("barrier did not time out")
except dist.DistStoreError:
    pass
assert s.get("a") == b"xyz"
# The prefixed view init_process_group uses.
p = dist.PrefixStore("default_pg", s); p.set("x", "y"); assert s.get("default_pg/x") == b"y"
print("OK")
"#;

#[test]
fn torch_client_every_query_against_ferrocomm_server() {
    let Some(py) = python_or_skip("torch_client_every_query_against_ferrocomm_server") else {
        return;
    };
    let srv = server(ServerConfig::default());
    // A ferrocomm client's key, which torch clients must not see.
    let fc = TcpStore::connect(&srv.local_addr().to_string(), LONG).unwrap();
    fc.set("ferrocomm-key", b"1").unwrap();
    fc.set("/ferrocomm-key", b"1").unwrap();
    run_python(
        &py,
        TORCH_CLIENT_SCRIPT,
        &[srv.local_addr().port().to_string()],
        Duration::from_secs(120),
    );
    // And torch's keys are not visible to ferrocomm's clients.
    assert_eq!(fc.try_get("/k").unwrap(), None);
    assert_eq!(fc.try_get("k").unwrap(), None);
}

const TORCH_PING_SCRIPT: &str = r#"
import sys
from datetime import timedelta
import torch.distributed as dist
try:
    s = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False, timeout=timedelta(seconds=2))
    s.set("k", "v")
    assert s.get("k") == b"v"
    print("SERVED")
except Exception as e:
    print("REFUSED", e)
print("OK")
"#;

fn torch_outcome(py: &Path, port: u16) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(TORCH_PING_SCRIPT)
        .arg(port.to_string())
        .stderr(Stdio::null())
        .output()
        .expect("python");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn with_a_secret_torch_clients_are_refused_unless_allowed() {
    let Some(py) = python_or_skip("with_a_secret_torch_clients_are_refused_unless_allowed") else {
        return;
    };
    let secret = Secret::new("sesame").unwrap();
    let strict = server(ServerConfig {
        secret: Some(secret.clone()),
        ..ServerConfig::default()
    });
    let got = torch_outcome(&py, strict.local_addr().port());
    assert!(got.contains("REFUSED"), "{got}");
    // ferrocomm's authenticated clients are still served.
    let fc = TcpStore::connect_secure(
        &strict.local_addr().to_string(),
        LONG,
        LONG,
        Some(secret.clone()),
    )
    .unwrap();
    fc.set("a", b"1").unwrap();
    assert_eq!(fc.get("a", LONG).unwrap(), b"1");

    let open = server(ServerConfig {
        secret: Some(secret),
        allow_torch: true,
        ..ServerConfig::default()
    });
    let got = torch_outcome(&py, open.local_addr().port());
    assert!(got.contains("SERVED"), "{got}");
}

/// A raw torch-protocol connection to `srv`, validated.
fn raw_torch(srv: &TcpStoreServer) -> TcpStream {
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut hello = torch_wire::encode_query(&Query::Validate(VALIDATION_MAGIC));
    hello.extend(torch_wire::encode_query(&Query::Ping(7)));
    s.write_all(&hello).unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 7);
    s
}

#[test]
fn torch_connections_obey_the_frame_timeout_and_reject_garbage() {
    let srv = server(ServerConfig {
        frame_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    // A query that stops half-way is closed after the frame timeout.
    let mut s = raw_torch(&srv);
    let q = torch_wire::encode_query(&Query::Set {
        key: "k".into(),
        value: b"value".to_vec(),
    });
    s.write_all(&q[..q.len() - 2]).unwrap();
    let start = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "connection not closed");
    assert!(start.elapsed() < Duration::from_secs(30));
    // An oversized length is refused before its bytes arrive.
    let mut s = raw_torch(&srv);
    let mut big = vec![torch_wire::QueryType::Set as u8];
    big.extend_from_slice(&u64::MAX.to_le_bytes());
    s.write_all(&big).unwrap();
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "connection not closed");
    // A wrong validation magic is refused.
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(&torch_wire::encode_query(&Query::Validate(1)))
        .unwrap();
    s.write_all(&torch_wire::encode_query(&Query::Ping(1)))
        .unwrap();
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "connection not closed");
    // An idle torch client between queries stays connected and is served.
    let mut s = raw_torch(&srv);
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(&torch_wire::encode_query(&Query::GetNumKeys))
        .unwrap();
    let mut n = [0u8; 8];
    s.read_exact(&mut n).unwrap();
    assert_eq!(i64::from_le_bytes(n), 0);
}

#[test]
fn torch_wait_is_woken_by_ferrocomm_shutdown_and_cancel() {
    let srv = server(ServerConfig::default());
    let mut s = raw_torch(&srv);
    // Wait, cancel: exactly one WAIT_CANCELED byte comes back.
    s.write_all(&torch_wire::encode_query(&Query::Wait(vec!["x".into()])))
        .unwrap();
    s.write_all(&torch_wire::encode_query(&Query::CancelWait))
        .unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], torch_wire::WAIT_CANCELED);
    // Wait, then set from another torch client: STOP_WAITING.
    s.write_all(&torch_wire::encode_query(&Query::Wait(vec!["x".into()])))
        .unwrap();
    let mut other = raw_torch(&srv);
    other
        .write_all(&torch_wire::encode_query(&Query::Set {
            key: "x".into(),
            value: b"1".to_vec(),
        }))
        .unwrap();
    s.read_exact(&mut b).unwrap();
    assert_eq!(b[0], torch_wire::STOP_WAITING);
    // A wait pending at shutdown ends with the connection closed, promptly.
    s.write_all(&torch_wire::encode_query(&Query::Wait(vec!["y".into()])))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    drop(srv);
    assert!(start.elapsed() < Duration::from_secs(10));
    assert_eq!(s.read(&mut b).unwrap_or(0), 0);
}

/// Hosts a torch TCPStore server and prints its port; exits when stdin closes, after
/// checking what the Rust side wrote.
const TORCH_SERVER_SCRIPT: &str = r#"
import sys
from datetime import timedelta
import torch.distributed as dist
s = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
print(s.port, flush=True)
sys.stdin.readline()
# torch's client prefixes every key with "/": "from-rust" is "/from-rust" on the wire.
assert s.get("from-rust") == b"hello", s.get("from-rust")
assert s.get("late") == b"1"
print("OK", flush=True)
"#;

#[test]
fn ferrocomm_client_against_torch_server() {
    let Some(py) = python_or_skip("ferrocomm_client_against_torch_server") else {
        return;
    };
    let mut child = Command::new(&py)
        .arg("-c")
        .arg(TORCH_SERVER_SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("the port");
    let addr = format!("127.0.0.1:{port}");
    let st = Arc::new(TorchStore::connect(&addr, LONG, LONG, LONG).unwrap());

    st.set("/from-rust", b"hello").unwrap();
    assert_eq!(st.get("/from-rust", LONG).unwrap(), b"hello");
    assert_eq!(st.try_get("/absent").unwrap(), None);
    assert_eq!(st.add("/n", 2).unwrap(), 2);
    assert_eq!(st.add("/n", 3).unwrap(), 5);
    assert_eq!(st.get("/n", LONG).unwrap(), b"5");
    // compare_set keeps ferrocomm's contract.
    assert_eq!(st.compare_set("/c", None, b"a").unwrap(), b"a");
    assert_eq!(st.compare_set("/c", Some(b"zz"), b"b").unwrap(), b"a");
    assert_eq!(st.compare_set("/c", Some(b"a"), b"b").unwrap(), b"b");
    assert_eq!(
        st.compare_set("/gone", Some(b"x"), b"y").unwrap(),
        Vec::<u8>::new()
    );
    assert_eq!(
        st.check(&["/c", "/absent", "/n"]).unwrap(),
        [true, false, true]
    );
    assert!(st.delete("/c").unwrap());
    assert!(!st.delete("/c").unwrap());
    // A wait that times out names the missing key, and the store stays usable.
    let err = st
        .wait(&["/n", "/never"], Duration::from_millis(300))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("/never"), "{err}");
    assert!(!err.to_string().contains("/n,"), "{err}");
    // A wait that completes when another thread sets the key, while this one waits.
    let st2 = st.clone();
    let t = std::thread::spawn(move || st2.get("/late", LONG));
    std::thread::sleep(Duration::from_millis(200));
    st.set("/late", b"1").unwrap();
    assert_eq!(t.join().unwrap().unwrap(), b"1");
    assert!(st.describe().contains(&addr));

    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let status = wait_limited(&mut child, LONG);
    assert!(
        status.is_some_and(|s| s.success()) && rest.contains("OK"),
        "{rest}"
    );
}

#[test]
fn ferrocomm_torch_client_against_ferrocomm_server() {
    // Both halves of this change together: no Python needed.
    let srv = server(ServerConfig::default());
    let st = TorchStore::connect(&srv.local_addr().to_string(), LONG, LONG, LONG).unwrap();
    st.set("k", b"v").unwrap();
    assert_eq!(st.get("k", LONG).unwrap(), b"v");
    assert_eq!(st.add("n", 4).unwrap(), 4);
    assert_eq!(st.compare_set("c", None, b"1").unwrap(), b"1");
    assert_eq!(st.compare_set("d", Some(b"1"), b"2").unwrap(), b"");
    let err = st.get("missing", Duration::from_millis(200)).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(st.check(&["k", "missing"]).unwrap(), [true, false]);
    assert!(st.delete("k").unwrap());
    // torch's `set` has no reply; a set the store never took must not look like success.
    drop(srv);
    let err = st.set("after", b"1").unwrap_err();
    assert!(err.to_string().contains("set"), "{err}");
}

const FERRORUN: &str = env!("CARGO_BIN_EXE_ferrorun");

/// An example binary next to ferrorun, or `None` after saying it is not built (a failure
/// under `FERROCOMM_REQUIRE_ALL=1`; scripts/test builds the examples).
fn example_or_skip(name: &str) -> Option<PathBuf> {
    let bin = Path::new(FERRORUN)
        .parent()
        .expect("ferrorun has a directory")
        .join("examples")
        .join(name);
    if bin.is_file() {
        return Some(bin);
    }
    assert!(
        std::env::var("FERROCOMM_REQUIRE_ALL").as_deref() != Ok("1"),
        "FERROCOMM_REQUIRE_ALL=1 but {} is not built (cargo build --examples)",
        bin.display()
    );
    eprintln!("SKIPPED: {} is not built", bin.display());
    None
}

const TRAIN_SCRIPT: &str = r#"
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(r + 1)])
dist.all_reduce(t)
assert t.item() == w * (w + 1) / 2, t
# DDP (its store-based setup and bucket all-reduces) and a subgroup.
torch.manual_seed(r)
m = DDP(torch.nn.Linear(5, 1))
opt = torch.optim.Adam(m.parameters())
for _ in range(3):
    opt.zero_grad(); m(torch.randn(4, 5)).sum().backward(); opt.step()
p = m.module.weight.detach().clone()
ps = [torch.zeros_like(p) for _ in range(w)]
dist.all_gather(ps, p)
assert all(torch.equal(ps[0], x) for x in ps)
g = dist.new_group(list(range(w)))
dist.barrier(group=g)
dist.monitored_barrier(timeout=__import__("datetime").timedelta(seconds=60))
print(f"rank {r} of {w}: OK", flush=True)
dist.destroy_process_group()
"#;

#[test]
fn init_process_group_gloo_under_ferrorun() {
    let Some(py) = python_or_skip("init_process_group_gloo_under_ferrorun") else {
        return;
    };
    let mut child = Command::new(FERRORUN)
        .args(["--nproc-per-node", "2", "--"])
        .arg(&py)
        .args(["-c", TRAIN_SCRIPT])
        .env_remove("FERROCOMM_SECRET")
        .env_remove("FERROCOMM_STORE_ALLOW_TORCH")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_limited(&mut child, Duration::from_secs(180));
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(
        status.is_some_and(|s| s.success())
            && out.contains("rank 0 of 2: OK")
            && out.contains("rank 1 of 2: OK"),
        "{status:?}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

#[test]
fn hello_under_torchrun_joins_the_agent_store() {
    let Some(py) = python_or_skip("hello_under_torchrun_joins_the_agent_store") else {
        return;
    };
    let torchrun = py.with_file_name("torchrun");
    let Some(hello) = example_or_skip("hello") else {
        return;
    };
    // A free port for torchrun's store.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(&torchrun)
        .args(["--nproc-per-node", "2", "--master-addr", "127.0.0.1"])
        .arg(format!("--master-port={port}"))
        .arg("--no-python")
        .arg(&hello)
        .env_remove("FERROCOMM_STORE_EXTERNAL")
        .env_remove("FERROCOMM_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_limited(&mut child, Duration::from_secs(180));
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(
        status.is_some_and(|s| s.success())
            && out.contains("hello from rank 0 of 2")
            && out.contains("hello from rank 1 of 2"),
        "{status:?}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

/// xorshift64*.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn query_seeds() -> Vec<Vec<u8>> {
    [
        Query::Validate(VALIDATION_MAGIC),
        Query::Ping(77),
        Query::Set {
            key: "/k".into(),
            value: b"v".to_vec(),
        },
        Query::CompareSet {
            key: "c".into(),
            expected: Vec::new(),
            desired: b"d".to_vec(),
        },
        Query::Get("g".into()),
        Query::Add {
            key: "n".into(),
            delta: -5,
        },
        Query::Check(vec!["a".into(), "b".into()]),
        Query::Wait(vec!["w".into()]),
        Query::GetNumKeys,
        Query::DeleteKey("d".into()),
        Query::Append {
            key: "a".into(),
            value: b"xy".to_vec(),
        },
        Query::MultiGet(vec!["a".into(), "b".into()]),
        Query::MultiSet(vec![("a".into(), b"1".to_vec()), ("b".into(), Vec::new())]),
        Query::CancelWait,
        Query::QueuePush {
            key: "q".into(),
            value: b"i".to_vec(),
        },
        Query::QueuePop("q".into()),
        Query::QueueLen("q".into()),
        Query::ListKeys,
        Query::Barrier {
            key: "b".into(),
            world_size: 4,
        },
    ]
    .iter()
    .map(torch_wire::encode_query)
    .collect()
}

/// The torch query decoder never panics, and what it accepts re-encodes to the same bytes.
/// `FERROCOMM_FUZZ_SECS` (default 2) and `FERROCOMM_FUZZ_SEED` as in tests/fuzz.rs.
#[test]
fn fuzz_torch_query_decoder() {
    let secs: u64 = std::env::var("FERROCOMM_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .min(60);
    let seed: u64 = std::env::var("FERROCOMM_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("fuzz_torch_query_decoder: FERROCOMM_FUZZ_SEED={seed}");
    let corpus = query_seeds();
    let check = |b: &[u8]| {
        if let Ok(Some((q, used))) = torch_wire::decode_query(b) {
            assert!(used <= b.len());
            assert_eq!(
                torch_wire::encode_query(&q),
                &b[..used],
                "re-encoding differs for {q:?}"
            );
        }
    };
    for s in &corpus {
        check(s);
        for i in 0..s.len() {
            assert_eq!(torch_wire::decode_query(&s[..i]), Ok(None));
        }
    }
    let mut rng = Rng(seed);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0u64;
    while Instant::now() < end {
        for _ in 0..1000 {
            let mut b = corpus[rng.below(corpus.len())].clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(5) {
                    0 if !b.is_empty() => {
                        let i = rng.below(b.len());
                        b[i] ^= 1 << rng.below(8);
                    }
                    1 if !b.is_empty() => {
                        let i = rng.below(b.len());
                        b[i] = rng.next() as u8;
                    }
                    2 if b.len() >= 8 => {
                        let at = rng.below(b.len() - 7);
                        let v = [0u64, 1, 0xff, 1 << 32, u64::MAX, i64::MAX as u64][rng.below(6)];
                        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
                    }
                    3 => b.truncate(rng.below(b.len() + 1)),
                    _ => {
                        let other = &corpus[rng.below(corpus.len())];
                        b.extend_from_slice(&other[rng.below(other.len() + 1)..]);
                    }
                }
            }
            let r = std::panic::catch_unwind(|| check(&b));
            assert!(
                r.is_ok(),
                "decoder failed on {}",
                b.iter().map(|x| format!("{x:02x}")).collect::<String>()
            );
            n += 1;
        }
    }
    eprintln!("fuzz_torch_query_decoder: {n} inputs");
}

/// torchrun's own c10d rendezvous (compare_set, multi_get, wait, add...) against
/// ferrocomm's store as the rendezvous endpoint; its workers' env:// then use it too.
#[test]
fn torchrun_c10d_rendezvous_on_a_ferrocomm_store() {
    let Some(py) = python_or_skip("torchrun_c10d_rendezvous_on_a_ferrocomm_store") else {
        return;
    };
    let srv = server(ServerConfig::default());
    let torchrun = py.with_file_name("torchrun");
    let mut child = Command::new(&torchrun)
        .args(["--nnodes", "1", "--nproc-per-node", "2"])
        .args(["--rdzv-backend", "c10d", "--rdzv-id", "job1"])
        .arg(format!("--rdzv-endpoint={}", srv.local_addr()))
        .args(["--no-python"])
        .arg(&py)
        .args(["-c", TRAIN_SCRIPT])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_limited(&mut child, Duration::from_secs(180));
    let mut out = String::new();
    let mut err = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).ok();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(
        status.is_some_and(|s| s.success())
            && out.contains("rank 0 of 2: OK")
            && out.contains("rank 1 of 2: OK"),
        "{status:?}\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

#[test]
fn a_torch_connection_must_complete_its_first_query_by_the_handshake_deadline() {
    let srv = server(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    // Half a VALIDATE, then nothing: dropped at the deadline, though the frame timeout is 30 s.
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    s.write_all(&torch_wire::encode_query(&Query::Validate(VALIDATION_MAGIC))[..3])
        .unwrap();
    let start = Instant::now();
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap_or(0), 0, "connection not closed");
    assert!(start.elapsed() < Duration::from_secs(20));
    // A validated client is past the deadline and stays.
    let mut s = raw_torch(&srv);
    std::thread::sleep(Duration::from_millis(600));
    s.write_all(&torch_wire::encode_query(&Query::Ping(5)))
        .unwrap();
    let mut n = [0u8; 4];
    s.read_exact(&mut n).unwrap();
    assert_eq!(u32::from_le_bytes(n), 5);
}
