//! What the launchers of one job say to each other through the store.
//!
//! Keys (all under `ferrorun/`, so they never meet the ranks' own keys):
//!
//! | key | written by | value |
//! |---|---|---|
//! | `ferrorun/job_id` | node 0, first | the job id (16 hex digits) |
//! | `ferrorun/node/R/claims` | node R (`add`) | counter; above 1 means two launchers claim node rank R |
//! | `ferrorun/node/R` | node R | `"NPROC NNODES"`: its number of ranks and the `--nnodes` it was given |
//! | `ferrorun/failed` | the first node that fails (`compare_set`) | `"NODE CODE MESSAGE"` |
//! | `ferrorun/node/R/heartbeat` | node R > 0, every second while it runs (`add`) | counter |
//! | `ferrorun/node/R/done` | node R, when its ranks have ended | its exit code |
//!
//! plus [`JOB_KEY`] = `job_id=ID world_size=N`, which the ranks' own rendezvous checks.
//! Rank offsets follow node order: node R's ranks start at the sum of the rank counts of
//! nodes 0..R, so nodes may run different numbers of ranks.
//!
//! After the ranks, node 0 keeps the store up until every other node has written its
//! `done` key (the ranks of slower nodes may still be using the store), or has stopped
//! sending heartbeats for [`HEARTBEAT_TIMEOUT`] (its launcher is gone, and with it its
//! ranks: they die with their launcher).

use std::collections::HashMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::sys::Waker;
use crate::error::{Error, Result};
use crate::rendezvous::{JOB_KEY, Store};

const JOB_ID_KEY: &str = "ferrorun/job_id";
const FAILED_KEY: &str = "ferrorun/failed";
/// How often launchers poll the store for a failure elsewhere (and send heartbeats).
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long node 0 waits for a heartbeat of a node that has not finished before it gives up
/// on that node.
pub(crate) const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(30);

fn node_key(node: usize) -> String {
    format!("ferrorun/node/{node}")
}
fn claims_key(node: usize) -> String {
    format!("ferrorun/node/{node}/claims")
}
fn heartbeat_key(node: usize) -> String {
    format!("ferrorun/node/{node}/heartbeat")
}
fn done_key(node: usize) -> String {
    format!("ferrorun/node/{node}/done")
}

/// Makes a new random job id: 16 lowercase hex digits.
pub(crate) fn new_job_id() -> Result<String> {
    let id = getrandom::u64().map_err(|e| {
        Error::io(
            "ferrorun: cannot get random bytes for the job id",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(format!("{id:016x}"))
}

/// Where this node's ranks sit in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodePlan {
    /// The job id every rank gets as `FERROCOMM_JOB_ID`.
    pub job_id: String,
    /// Total number of ranks over all nodes.
    pub world_size: usize,
    /// Global rank of this node's local rank 0.
    pub rank_offset: usize,
}

/// The result of [`agree`]: a plan, or the signal that interrupted the wait.
pub(crate) enum Agreement {
    Plan(NodePlan),
    Interrupted(i32),
}

/// Publishes this node and waits for every node of the job, then computes this node's
/// place. Node 0 must have called [`publish_job_id`] first. `interrupted` is called about
/// once a second and stops the wait when it returns a signal.
pub(crate) fn agree(
    store: &dyn Store,
    nnodes: usize,
    node_rank: usize,
    nproc: usize,
    timeout: Duration,
    log_interval: Duration,
    mut interrupted: impl FnMut() -> Option<i32>,
) -> Result<Agreement> {
    let claims = store.add(&claims_key(node_rank), 1)?;
    if claims > 1 {
        return Err(Error::config(
            "--node-rank",
            node_rank.to_string(),
            format!(
                "another launcher already joined the job at {} as node {node_rank}; give every \
                 node a different --node-rank in 0..{nnodes}",
                store.describe()
            ),
        ));
    }
    store.set(&node_key(node_rank), format!("{nproc} {nnodes}").as_bytes())?;

    let keys: Vec<String> = (0..nnodes).map(node_key).collect();
    let start = Instant::now();
    let deadline = start + timeout;
    let mut next_log = start + log_interval;
    let mut nprocs: Vec<Option<usize>> = vec![None; nnodes];
    loop {
        if let Some(sig) = interrupted() {
            return Ok(Agreement::Interrupted(sig));
        }
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let present = store.check(&refs)?;
        // Read each node's entry once, as soon as it is there, so that a node started with
        // another --nnodes is reported at once rather than after the timeout.
        for (node, _) in present.iter().enumerate().filter(|(_, p)| **p) {
            if nprocs[node].is_none() {
                let raw = store.get(&keys[node], timeout)?;
                nprocs[node] = Some(parse_node_entry(store, node, &raw, nnodes)?);
            }
        }
        let missing: Vec<usize> = (0..nnodes).filter(|&n| nprocs[n].is_none()).collect();
        if missing.is_empty() {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::Timeout {
                op: "ferrorun node rendezvous".into(),
                waited: now - start,
                detail: format!(
                    "node(s) {missing:?} of {nnodes} never joined the store at {}; start \
                     `ferrorun --nnodes {nnodes} --node-rank R` on each of them with the same \
                     --master-addr/--master-port, or raise FERROCOMM_TIMEOUT (seconds)",
                    store.describe()
                ),
            });
        }
        if now >= next_log {
            tracing::warn!(
                "waiting for node(s) {missing:?} of {nnodes} to join the store at {} ({:.0?} \
                 so far, giving up after {:.0?})",
                store.describe(),
                now - start,
                timeout
            );
            next_log = now + log_interval;
        }
        let missing_keys: Vec<&str> = missing.iter().map(|&n| keys[n].as_str()).collect();
        let step = POLL_INTERVAL.min(deadline - now);
        match store.wait(&missing_keys, step) {
            Ok(()) => {}
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e),
        }
    }

    let nprocs: Vec<usize> = nprocs.into_iter().map(|n| n.unwrap_or(0)).collect();
    let world_size = nprocs.iter().sum();
    let rank_offset = nprocs[..node_rank].iter().sum();
    let job_id = String::from_utf8_lossy(&store.get(JOB_ID_KEY, timeout)?).into_owned();
    let plan = NodePlan {
        job_id,
        world_size,
        rank_offset,
    };
    if node_rank == 0 {
        let want = job_key_value(&plan.job_id, plan.world_size);
        let got = store.compare_set(JOB_KEY, None, want.as_bytes())?;
        if got != want.as_bytes() {
            return Err(Error::JobMismatch {
                store: store.describe(),
                detail: format!(
                    "{JOB_KEY} is already {:?}, expected {want:?}: another job is using this \
                     store; give this job its own --master-port",
                    String::from_utf8_lossy(&got)
                ),
            });
        }
    }
    tracing::info!(
        "job {}: {world_size} ranks on {nnodes} node(s) (ranks per node {nprocs:?}); this \
         node runs ranks {}..{}",
        plan.job_id,
        rank_offset,
        rank_offset + nprocs[node_rank]
    );
    Ok(Agreement::Plan(plan))
}

/// The value of [`JOB_KEY`] for a job: the same text every rank's rendezvous writes there
/// with `compare_set` (`crate::rendezvous`'s job check), so ranks of this job match it and
/// processes of another job do not.
pub(crate) fn job_key_value(job_id: &str, world_size: usize) -> String {
    format!("job_id={job_id} world_size={world_size}")
}

/// Node 0 only: writes the job id before anything else, so that every node that sees node
/// 0's entry also finds the id.
pub(crate) fn publish_job_id(store: &dyn Store, job_id: &str) -> Result<()> {
    store.set(JOB_ID_KEY, job_id.as_bytes())
}

fn parse_node_entry(store: &dyn Store, node: usize, raw: &[u8], nnodes: usize) -> Result<usize> {
    let text = String::from_utf8_lossy(raw);
    let mut it = text.split_whitespace().map(str::parse::<usize>);
    match (it.next(), it.next()) {
        (Some(Ok(nproc)), Some(Ok(their_nnodes))) if their_nnodes == nnodes => Ok(nproc),
        (Some(Ok(_)), Some(Ok(their_nnodes))) => Err(Error::config(
            "--nnodes",
            nnodes.to_string(),
            format!(
                "node {node} was started with --nnodes {their_nnodes}; every node of a job \
                 needs the same --nnodes"
            ),
        )),
        _ => Err(Error::misbehaved(
            store.describe(),
            format!("entry of node {node} is {text:?}, expected \"NPROC NNODES\""),
        )),
    }
}

/// A failure that another node published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFailure {
    /// The node whose launcher published it.
    pub node: usize,
    /// The exit status that node's launcher reports.
    pub code: i32,
    /// What happened there, e.g. `rank 3 (local rank 1, pid 4242) exited with status 1`.
    pub message: String,
}

#[derive(Default)]
struct LinkState {
    /// The job's first failure, published by another node.
    remote_failure: Option<RemoteFailure>,
    /// A node that node 0 gave up on (no heartbeat) after its own ranks had ended.
    lost_node: Option<RemoteFailure>,
    finished: bool,
}

enum LinkCmd {
    Fail { code: i32, message: String },
    Done { code: i32 },
}

/// A background thread that keeps this launcher in touch with the others while the ranks
/// run: it publishes a local failure, notices a failure elsewhere, sends heartbeats, and at
/// the end says this node is done (and, on node 0, waits for the others). Store calls never
/// run on the supervising thread, so a slow store never delays signal handling.
pub(crate) struct Link {
    tx: mpsc::Sender<LinkCmd>,
    state: Arc<Mutex<LinkState>>,
    _thread: JoinHandle<()>,
}

impl Link {
    /// Starts the thread. `waker` wakes the supervising thread whenever
    /// [`Link::remote_failure`] or [`Link::finished`] changes.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        nnodes: usize,
        node_rank: usize,
        waker: Waker,
    ) -> Result<Link> {
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(LinkState::default()));
        let worker = LinkWorker {
            store,
            nnodes,
            node_rank,
            waker,
            state: state.clone(),
            store_error_logged: false,
            heartbeats: HashMap::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ferrorun-link".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| Error::io("ferrorun: cannot start the store thread", e))?;
        Ok(Link {
            tx,
            state,
            _thread: thread,
        })
    }

    /// Publishes that this node failed, unless another node did first.
    pub(crate) fn fail(&self, code: i32, message: String) {
        let _ = self.tx.send(LinkCmd::Fail { code, message });
    }

    /// Says that this node's ranks have ended with exit code `code`.
    pub(crate) fn done(&self, code: i32) {
        let _ = self.tx.send(LinkCmd::Done { code });
    }

    /// The job's first failure, when it happened on another node: it was published in the
    /// store before this node's (if this node published one at all).
    pub(crate) fn remote_failure(&self) -> Option<RemoteFailure> {
        lock(&self.state).remote_failure.clone()
    }

    /// Node 0: a node whose launcher stopped sending heartbeats before it said it was done.
    pub(crate) fn lost_node(&self) -> Option<RemoteFailure> {
        lock(&self.state).lost_node.clone()
    }

    /// True once the end of the job has been published and, on node 0, every other node is
    /// done (or gone).
    pub(crate) fn finished(&self) -> bool {
        lock(&self.state).finished
    }
}

fn lock(state: &Mutex<LinkState>) -> std::sync::MutexGuard<'_, LinkState> {
    // The state is plain data, always consistent: a panic elsewhere does not poison it.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

struct LinkWorker {
    store: Arc<dyn Store>,
    nnodes: usize,
    node_rank: usize,
    waker: Waker,
    state: Arc<Mutex<LinkState>>,
    store_error_logged: bool,
    /// Node 0, after its ranks ended: last heartbeat value seen per node and when it changed.
    heartbeats: HashMap<usize, (Option<Vec<u8>>, Instant)>,
}

impl LinkWorker {
    fn run(mut self, rx: mpsc::Receiver<LinkCmd>) {
        let mut ended = false;
        loop {
            match rx.recv_timeout(POLL_INTERVAL) {
                Ok(LinkCmd::Fail { code, message }) => {
                    let value = format!("{} {code} {message}", self.node_rank);
                    let r = self.store.compare_set(FAILED_KEY, None, value.as_bytes());
                    // Another node's failure already there: it is the job's first.
                    if let Some(first) = self.note(r)
                        && first != value.as_bytes()
                    {
                        self.record_failure(&first);
                    }
                }
                Ok(LinkCmd::Done { code }) => {
                    let r = self
                        .store
                        .set(&done_key(self.node_rank), code.to_string().as_bytes());
                    self.note(r);
                    ended = true;
                    if self.node_rank != 0 {
                        self.finish();
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if !ended && self.node_rank != 0 {
                let r = self.store.add(&heartbeat_key(self.node_rank), 1);
                self.note(r);
            }
            self.poll_failure();
            if ended && self.others_done() {
                self.finish();
                return;
            }
        }
    }

    fn finish(&self) {
        lock(&self.state).finished = true;
        self.waker.wake();
    }

    /// Logs the first store error; later ones are expected to repeat it.
    fn note<T>(&mut self, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                if !self.store_error_logged {
                    self.store_error_logged = true;
                    tracing::warn!(
                        "ferrorun: lost contact with the store ({e}); failures on other nodes \
                         will not stop this node's ranks"
                    );
                }
                None
            }
        }
    }

    fn poll_failure(&mut self) {
        if lock(&self.state).remote_failure.is_some() {
            return;
        }
        let r = self.store.try_get(FAILED_KEY);
        if let Some(Some(raw)) = self.note(r) {
            self.record_failure(&raw);
        }
    }

    /// Records the failure published under [`FAILED_KEY`] unless it is this node's own.
    fn record_failure(&mut self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let mut parts = text.splitn(3, ' ');
        let node = parts.next().and_then(|s| s.parse().ok());
        let code = parts.next().and_then(|s| s.parse().ok());
        let message = parts.next().unwrap_or("").to_string();
        let (Some(node), Some(code)) = (node, code) else {
            tracing::warn!("ferrorun: malformed {FAILED_KEY} in the store: {text:?}");
            return;
        };
        if node == self.node_rank {
            return;
        }
        lock(&self.state).remote_failure = Some(RemoteFailure {
            node,
            code,
            message,
        });
        self.waker.wake();
    }

    /// Node 0: true when every other node is done or its launcher has gone quiet.
    fn others_done(&mut self) -> bool {
        let pending: Vec<usize> = (1..self.nnodes)
            .filter(|n| !self.heartbeats.get(n).is_some_and(|(v, _)| v.is_none()))
            .collect();
        let keys: Vec<String> = pending.iter().map(|&n| done_key(n)).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let r = self.store.check(&refs);
        let Some(done) = self.note(r) else {
            // Our own store failing: nothing left to wait for.
            return true;
        };
        let mut all = true;
        let now = Instant::now();
        for (&node, is_done) in pending.iter().zip(done) {
            if is_done {
                // Marked finished: a `None` heartbeat value means "done".
                self.heartbeats.insert(node, (None, now));
                continue;
            }
            let r = self.store.try_get(&heartbeat_key(node));
            let beat = self.note(r).flatten().unwrap_or_default();
            let entry = self
                .heartbeats
                .entry(node)
                .or_insert_with(|| (Some(beat.clone()), now));
            if entry.0.as_deref() != Some(beat.as_slice()) {
                *entry = (Some(beat), now);
            }
            if now - entry.1 >= HEARTBEAT_TIMEOUT {
                tracing::error!(
                    "ferrorun: node {node} has sent no heartbeat for {:.0?}; giving up on it",
                    HEARTBEAT_TIMEOUT
                );
                self.heartbeats.insert(node, (None, now));
                let mut state = lock(&self.state);
                if state.lost_node.is_none() {
                    state.lost_node = Some(RemoteFailure {
                        node,
                        code: 1,
                        message: "its launcher stopped responding".into(),
                    });
                }
                continue;
            }
            all = false;
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::rendezvous::{InitOptions, TcpStore, TcpStoreServer};

    const T: Duration = Duration::from_secs(20);

    fn server() -> (TcpStoreServer, String) {
        let server = TcpStoreServer::bind("127.0.0.1:0".parse().expect("address")).expect("bind");
        let addr = server.local_addr().to_string();
        (server, addr)
    }

    fn client(addr: &str) -> TcpStore {
        TcpStore::connect(addr, T).expect("connect")
    }

    fn plan_of(a: Agreement) -> NodePlan {
        match a {
            Agreement::Plan(p) => p,
            Agreement::Interrupted(s) => panic!("interrupted by {s}"),
        }
    }

    #[test]
    fn uneven_nodes_get_ranks_in_node_order() {
        let (_server, addr) = server();
        let node0 = client(&addr);
        publish_job_id(&node0, "00000000000000aa").expect("job id");
        let addr1 = addr.clone();
        let node1 = std::thread::spawn(move || agree(&client(&addr1), 3, 1, 3, T, T, || None));
        let addr2 = addr.clone();
        let node2 = std::thread::spawn(move || agree(&client(&addr2), 3, 2, 1, T, T, || None));
        let p0 = plan_of(agree(&node0, 3, 0, 2, T, T, || None).expect("node 0"));
        let p1 = plan_of(node1.join().expect("thread").expect("node 1"));
        let p2 = plan_of(node2.join().expect("thread").expect("node 2"));
        assert_eq!((p0.rank_offset, p1.rank_offset, p2.rank_offset), (0, 2, 5));
        for p in [&p0, &p1, &p2] {
            assert_eq!(p.world_size, 6);
            assert_eq!(p.job_id, "00000000000000aa");
        }
    }

    #[test]
    fn ranks_accept_the_job_key_the_launcher_writes() {
        let (_server, addr) = server();
        let store = client(&addr);
        publish_job_id(&store, &new_job_id().expect("random")).expect("job id");
        let plan = plan_of(agree(&store, 1, 0, 1, T, T, || None).expect("agree"));
        let rank = |job_id: &str, world_size: usize| {
            InitOptions::new()
                .init_method(&format!("tcp://{addr}"))
                .rank(0)
                .world_size(world_size)
                .job_id(job_id)
                .store_external(true)
                .timeout(T)
                .resolve_with(&|_| None)
                .and_then(|p| p.join(BTreeMap::new()))
        };
        let other = rank("some-other-job", 1).expect_err("a process of another job");
        assert!(matches!(other, Error::JobMismatch { .. }), "{other:?}");
        let bigger = rank(&plan.job_id, 2).expect_err("another world size");
        assert!(matches!(bigger, Error::JobMismatch { .. }), "{bigger:?}");
        let boot = rank(&plan.job_id, 1).expect("a rank of this job joins");
        assert_eq!((boot.rank, boot.world_size), (0, 1));
    }

    #[test]
    fn refuses_a_node_rank_twice_and_disagreeing_nnodes() {
        let (_server, addr) = server();
        let store = client(&addr);
        publish_job_id(&store, "00000000000000bb").expect("job id");
        let t = Duration::from_millis(300);
        // Node 1 waits for node 0, which never comes: a timeout naming it.
        let e = agree(&store, 2, 1, 1, t, t, || None)
            .err()
            .expect("times out");
        assert!(e.is_timeout() && e.to_string().contains("[0]"), "{e}");
        let e = agree(&store, 2, 1, 1, t, t, || None)
            .err()
            .expect("claimed twice");
        assert!(
            matches!(e, Error::Config { .. }) && e.to_string().contains("node 1"),
            "{e}"
        );
        let e = agree(&store, 3, 0, 1, t, t, || None)
            .err()
            .expect("other --nnodes");
        assert!(e.to_string().contains("--nnodes 2"), "{e}");
    }

    #[test]
    fn a_signal_interrupts_the_wait() {
        let (_server, addr) = server();
        let store = client(&addr);
        let r = agree(&store, 2, 1, 1, T, T, || Some(2)).expect("no error");
        assert!(matches!(r, Agreement::Interrupted(2)));
    }
}
