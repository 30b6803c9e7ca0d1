//! Multi-host: three "machines" as network namespaces on one host, the layout of a real
//! cluster, and two jobs at once on it.
//!
//! ```text
//!   node0 (198.18.0.1, master)   node1 (198.18.0.2)   node2 (198.18.0.3)
//!          eth0                        eth0                 eth0
//!           |                           |                    |
//!   +-------+---------------------------+--------------------+------+
//!   |  switch namespace: bridge br0 joining the veth peers          |
//!   +---------------------------------------------------------------+
//! ```
//!
//! One `ferrorun` per node and per job (`ip netns exec nodeI ferrorun --nnodes 3
//! --node-rank I --nproc-per-node 2 --master-addr 198.18.0.1 --master-port 5003|5004`), six
//! launchers and twelve ranks at once. Each rank checks what a cluster rank would: world 6,
//! local size 2 (host identity includes the network namespace), node index = its node, a
//! TCP transport listening on its own node's address (the interface towards the master),
//! and a token and 1 MiB passed around the whole ring.
//!
//! Everything lives in namespaces named after this process (nothing is added to the host's
//! own network), deleted when the test ends, even when it fails. Creating namespaces needs
//! root (CAP_SYS_ADMIN) and iproute2 (`scripts/setup` installs it): without them the test
//! prints why it skipped, or fails when FERROCOMM_REQUIRE_ALL=1 (CI).

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use std::time::{Duration, Instant};

use common::{Proc, clean_env, count, num, require_all, self_as_rank, unix_ms};

#[test]
fn rank_entry_point() {
    common::rank_main()
}

/// The namespaces of one test run; deleted on drop.
struct Cluster {
    /// The switch's namespace (its port `pI` leads to node I).
    switch: String,
    /// Node i's namespace.
    nodes: Vec<String>,
    /// Every namespace created so far (the switch and the nodes), for the clean-up.
    created: Vec<String>,
    /// One cluster at a time: the tests of this file run in parallel threads, and three
    /// jobs of several ranks each at once would only compete for the 2 cores.
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// Held by the live cluster.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// Numbers the clusters of this process, so their namespace names never collide.
static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `ip ARGS`; `Err` with its stderr when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2; scripts/setup installs it): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes namespaces left by runs of this test that were killed before their clean-up
/// (named `fci<pid>...` after a process that no longer exists).
fn delete_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("fci") else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

impl Cluster {
    /// Creates the switch and `n` node namespaces; node i has 198.18.0.(i+1)/24 on `eth0`.
    fn create(n: usize) -> Result<Cluster, String> {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        delete_stale();
        let k = CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("fci{}c{k}", std::process::id());
        let mut cluster = Cluster {
            switch: String::new(),
            nodes: Vec::new(),
            created: Vec::new(),
            _serial: serial,
        };
        // Every namespace is recorded as soon as it exists: an error half-way drops
        // `cluster`, which deletes what was made.
        let sw = format!("{tag}sw");
        ip(&["netns", "add", &sw])?;
        cluster.created.push(sw.clone());
        cluster.switch = sw.clone();
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{tag}n{i}");
            ip(&["netns", "add", &ns])?;
            cluster.created.push(ns.clone());
            cluster.nodes.push(ns.clone());
            let port = format!("p{i}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            let addr = format!("198.18.0.{}/24", i + 1);
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(cluster)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces and their veth peers.
        for ns in &self.created {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("netns test: cleaning up: {e}");
            }
        }
    }
}

/// `ip netns exec NS ferrorun ...` for node `node` of the job on master port `port`.
fn launcher(ns: &str, node: usize, port: u16) -> Proc {
    let mut cmd = Command::new("ip");
    clean_env(&mut cmd);
    let (node_s, port_s) = (node.to_string(), port.to_string());
    cmd.args(["netns", "exec", ns, common::FERRORUN])
        .args([
            "--nnodes",
            "3",
            "--node-rank",
            &node_s,
            "--nproc-per-node",
            "2",
            "--master-addr",
            "198.18.0.1",
            "--master-port",
            &port_s,
            "--",
        ])
        .args(self_as_rank())
        .env(common::ROLE, "ring");
    Proc::start(&format!("job {port}, node {node}"), cmd)
}

#[test]
fn two_jobs_on_three_namespace_nodes() {
    let cluster = match Cluster::create(3) {
        Ok(c) => c,
        Err(why) if require_all() => {
            panic!("cannot create network namespaces, and FERROCOMM_REQUIRE_ALL=1: {why}")
        }
        Err(why) => {
            // The partly created cluster was dropped (and deleted) on the way out.
            eprintln!(
                "SKIPPED two_jobs_on_three_namespace_nodes: cannot create network namespaces \
                 (needs root or CAP_SYS_ADMIN, and iproute2): {why}"
            );
            return;
        }
    };
    // Both jobs' launchers and ranks all run at once; node 0 hosts both stores.
    let jobs: Vec<(u16, Vec<Proc>)> = [5003u16, 5004]
        .into_iter()
        .map(|port| {
            let nodes = (0..3)
                .map(|i| launcher(&cluster.nodes[i], i, port))
                .collect();
            (port, nodes)
        })
        .collect();
    let mut job_ids = BTreeSet::new();
    for (port, nodes) in jobs {
        let finished = common::finish_all(nodes);
        for f in &finished {
            assert_eq!(f.code(), Some(0), "{f:?}");
        }
        let mut ranks = Vec::new();
        for (node, f) in finished.iter().enumerate() {
            let info = f.records("INFO");
            assert_eq!(info.len(), 2, "two ranks per node: {f:?}");
            for r in &info {
                let rank = num(r, "rank");
                ranks.push(rank);
                assert_eq!(num(r, "size"), 6, "{r:?}");
                assert_eq!(num(r, "local_size"), 2, "one host per namespace: {r:?}");
                assert_eq!(num(r, "local_rank"), rank - 2 * node, "{r:?}");
                assert_eq!(num(r, "node"), node, "node index: {r:?}");
                assert_eq!(num(r, "env_node_rank"), node, "{r:?}");
                let ip = r["tcp"].rsplit_once(':').map(|(ip, _)| ip);
                assert_eq!(
                    ip,
                    Some(format!("198.18.0.{}", node + 1).as_str()),
                    "the transport listens on the node's interface towards the master: {r:?}"
                );
                assert_eq!(r["job"], info[0]["job"], "{r:?}");
                job_ids.insert(r["job"].clone());
            }
            assert_eq!(f.records("RING").len(), 2, "{f:?}");
        }
        ranks.sort();
        assert_eq!(ranks, (0..6).collect::<Vec<_>>(), "job on port {port}");
        let token = finished[0]
            .records("RING")
            .iter()
            .find(|r| num(r, "rank") == 0)
            .map(|r| num(r, "token"));
        assert_eq!(
            token,
            Some(1000 + 15),
            "job on port {port}: the token crossed every node"
        );
    }
    assert_eq!(
        job_ids.len(),
        2,
        "two jobs, each with its own id: {job_ids:?}"
    );
}

/// The cluster of a test, or `None` (after printing why) when namespaces cannot be made
/// here and FERROCOMM_REQUIRE_ALL is not set.
fn cluster_or_skip(test: &str, n: usize) -> Option<Cluster> {
    match Cluster::create(n) {
        Ok(c) => Some(c),
        Err(why) if require_all() => {
            panic!("cannot create network namespaces, and FERROCOMM_REQUIRE_ALL=1: {why}")
        }
        Err(why) => {
            eprintln!(
                "SKIPPED {test}: cannot create network namespaces (needs root or \
                 CAP_SYS_ADMIN, and iproute2): {why}"
            );
            None
        }
    }
}

/// `ip netns exec NS ferrorun ...` for node `node` of a job of `nnodes` nodes with one rank
/// each, running `role` with `env`.
fn one_rank_node(
    ns: &str,
    node: usize,
    nnodes: usize,
    port: u16,
    role: &str,
    env: &[(&str, &str)],
) -> Proc {
    let mut cmd = Command::new("ip");
    clean_env(&mut cmd);
    let (node_s, nnodes_s, port_s) = (node.to_string(), nnodes.to_string(), port.to_string());
    cmd.args(["netns", "exec", ns, common::FERRORUN])
        .args([
            "--nnodes",
            &nnodes_s,
            "--node-rank",
            &node_s,
            "--nproc-per-node",
            "1",
            "--master-addr",
            "198.18.0.1",
            "--master-port",
            &port_s,
            "--grace-period",
            "60",
            "--",
        ])
        .args(self_as_rank())
        .env(common::ROLE, role)
        // Every rank reports its own view of the fault instead of being stopped by the
        // launchers when the first one fails.
        .env(common::IGNORE_SIGTERM, "1")
        .envs(env.iter().copied());
    Proc::start(&format!("node {node}"), cmd)
}

/// The rank an error blames: "rank N is stuck" (a timeout) or "lost peer rank N".
fn blamed(err: &str) -> Option<usize> {
    let after = |pat: &str| -> Option<usize> {
        let (_, rest) = err.split_once(pat)?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    if let Some((head, _)) = err.split_once(" is stuck") {
        let n = head.rsplit_once("rank ")?.1;
        return n.parse().ok();
    }
    after("lost peer rank ")
}

/// Operation timeout of the link-cut test (seconds).
const CUT_TIMEOUT_S: u64 = 5;

/// Three nodes, one rank each, in an all_reduce/all_to_all loop; node 2's cable (its port
/// on the switch) is cut. Every rank fails within the operation timeout (plus the settling
/// and a generous margin for a loaded machine) with a timeout or a lost peer that names a
/// rank across the cut: ranks 0 and 1 name rank 2, rank 2 names rank 0 or 1.
#[test]
fn a_cut_link_is_named_within_the_timeout() {
    let Some(cluster) = cluster_or_skip("a_cut_link_is_named_within_the_timeout", 3) else {
        return;
    };
    let timeout = CUT_TIMEOUT_S.to_string();
    let env = [
        ("FERROCOMM_OP_TIMEOUT", timeout.as_str()),
        (common::MAX_SECS, "80"),
    ];
    let mut nodes: Vec<Proc> = (0..3)
        .map(|i| one_rank_node(&cluster.nodes[i], i, 3, 5005, "allreduce-loop", &env))
        .collect();
    for n in nodes.iter_mut() {
        n.wait_for("its rank looping", |o| count(o, "LOOPING") == 1);
    }
    std::thread::sleep(Duration::from_millis(u64::from(std::process::id() % 200)));
    let cut_at = unix_ms();
    ip(&["-n", &cluster.switch, "link", "set", "p2", "down"]).expect("cut node 2's link");
    let finished: Vec<_> = nodes
        .into_iter()
        .map(|p| p.finish_within(Duration::from_secs(60)))
        .collect();
    for (rank, f) in finished.iter().enumerate() {
        assert_ne!(f.code(), Some(0), "rank {rank} cannot finish: {f:?}");
        let err = f
            .stderr
            .lines()
            .find(|l| l.contains("RANKERR"))
            .unwrap_or_else(|| panic!("rank {rank} reports no error: {f:?}"));
        eprintln!("rank {rank}: {err}");
        assert!(
            err.contains("[Timeout {") || err.contains("[PeerLost {"),
            "rank {rank}: a timeout or a lost peer: {f:?}"
        );
        let who = blamed(err).unwrap_or_else(|| panic!("rank {rank} names nobody: {f:?}"));
        let across = if rank == 2 { who != 2 } else { who == 2 };
        assert!(
            across,
            "rank {rank} names rank {who}, not a rank across the cut: {f:?}"
        );
        let failed_at = f
            .records("FAILTIME")
            .first()
            .map(|r| num(r, "unix_ms") as u64)
            .or_else(|| {
                common::records(&f.stderr, "FAILTIME")
                    .first()
                    .map(|r| num(r, "unix_ms") as u64)
            })
            .unwrap_or_else(|| panic!("rank {rank}: no FAILTIME: {f:?}"));
        let took = Duration::from_millis(failed_at.saturating_sub(cut_at));
        // The timeout, then up to 1 s of settling; a generous margin above.
        assert!(
            took < Duration::from_secs(CUT_TIMEOUT_S + 15),
            "rank {rank} failed {took:?} after the cut (timeout {CUT_TIMEOUT_S} s): {f:?}"
        );
    }
}

/// Every link of a three-node cluster limited to 100 Mbit/s (tc tbf on the switch's
/// ports): 60 iterations of the all_reduce/all_to_all loop (up to 1 MiB, every word
/// checked by the ranks) finish on every rank.
#[test]
fn a_rate_limited_link_gives_correct_results() {
    let Some(cluster) = cluster_or_skip("a_rate_limited_link_gives_correct_results", 3) else {
        return;
    };
    for i in 0..3 {
        let port = format!("p{i}");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &cluster.switch,
                "tc",
                "qdisc",
                "add",
                "dev",
                &port,
            ])
            .args([
                "root", "tbf", "rate", "100mbit", "burst", "64kb", "latency", "100ms",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            other if require_all() => panic!("tc tbf on {port} failed: {other:?}"),
            other => {
                eprintln!(
                    "SKIPPED a_rate_limited_link_gives_correct_results: tc (iproute2) with \
                     tbf is not usable here: {other:?}"
                );
                return;
            }
        }
    }
    let env = [(common::ITERS, "60"), (common::MAX_SECS, "80")];
    let started = Instant::now();
    let nodes: Vec<Proc> = (0..3)
        .map(|i| one_rank_node(&cluster.nodes[i], i, 3, 5006, "allreduce-loop", &env))
        .collect();
    for (rank, f) in common::finish_all(nodes).iter().enumerate() {
        assert_eq!(f.code(), Some(0), "rank {rank}: {f:?}");
        assert_eq!(f.records("FINISHED").len(), 1, "rank {rank}: {f:?}");
    }
    eprintln!(
        "60 iterations over 100 Mbit/s links in {:.1?}",
        started.elapsed()
    );
}
