//! Store load: many concurrent clients doing set/get/add/wait on one `TcpStoreServer`,
//! every value checked; prints the operations per second.
//!
//! ```text
//! cargo run --release --example store_load -- 64 2000
//! ```
//! Arguments: clients (default 64) and rounds per client (default 1,000). In each round a
//! client sets its own key for the round, adds 1 to a shared counter, waits for the key of
//! the next client for the same round and gets it (4 operations; the wait blocks until that
//! client gets there, so the clients advance together). At the end the counter must equal
//! clients × rounds.

use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ferrocomm::rendezvous::{Store, TcpStore, TcpStoreServer};

fn main() -> ExitCode {
    ferrocomm::init_logging();
    let mut args = std::env::args().skip(1);
    let clients = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    let rounds = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    match run(clients, rounds) {
        Ok(r) => {
            println!("{r}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("store_load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a load run measured.
pub struct Report {
    /// Concurrent clients (one connection and one thread each).
    pub clients: usize,
    /// Rounds per client.
    pub rounds: usize,
    /// Operations done, all clients together.
    pub ops: u64,
    /// From the moment every client was connected to the last one's end.
    pub elapsed: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "STORE clients={} rounds={} ops={} secs={secs:.2} ops_per_sec={:.0}",
            self.clients,
            self.rounds,
            self.ops,
            self.ops as f64 / secs.max(1e-9)
        )
    }
}

/// Generous bound for any one operation (a wait included).
const OP_LIMIT: Duration = Duration::from_secs(60);

/// Starts a server on 127.0.0.1, runs `clients` clients of `rounds` rounds each (see the
/// module documentation) and checks every value and the final counter.
pub fn run(clients: usize, rounds: usize) -> Result<Report, String> {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let server = TcpStoreServer::bind(any).map_err(|e| e.to_string())?;
    let addr = server.local_addr().to_string();
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, start) = (addr.clone(), Arc::clone(&start));
            std::thread::spawn(move || -> Result<u64, String> {
                let store = TcpStore::connect(&addr, OP_LIMIT);
                start.wait();
                let store = store.map_err(|e| format!("client {c}: {e}"))?;
                client(&store, c, clients, rounds).map_err(|e| format!("client {c}: {e}"))
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    let mut ops = 0;
    let mut first_err = None;
    for th in threads {
        match th.join() {
            Ok(Ok(n)) => ops += n,
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert_with(|| "a client thread panicked".into());
            }
        }
    }
    let elapsed = t.elapsed();
    if let Some(e) = first_err {
        return Err(e);
    }
    let store = TcpStore::connect(&addr, OP_LIMIT).map_err(|e| e.to_string())?;
    let total = store.add("counter", 0).map_err(|e| e.to_string())?;
    let want = (clients * rounds) as i64;
    if total != want {
        return Err(format!("the counter is {total}, expected {want}"));
    }
    Ok(Report {
        clients,
        rounds,
        ops,
        elapsed,
    })
}

/// One client's rounds; returns the operations done.
fn client(store: &TcpStore, c: usize, clients: usize, rounds: usize) -> Result<u64, String> {
    let next = (c + 1) % clients;
    let value = |who: usize, r: usize| format!("client {who} round {r}").into_bytes();
    let mut ops = 0;
    for r in 0..rounds {
        let theirs = format!("k/{next}/{r}");
        let got = (|| {
            store.set(&format!("k/{c}/{r}"), &value(c, r))?;
            store.add("counter", 1)?;
            store.wait(&[theirs.as_str()], OP_LIMIT)?;
            store.get(&theirs, OP_LIMIT)
        })()
        .map_err(|e| format!("round {r}: {e}"))?;
        ops += 4;
        if got != value(next, r) {
            return Err(format!(
                "{theirs} holds {:?}, expected {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&value(next, r))
            ));
        }
    }
    Ok(ops)
}
