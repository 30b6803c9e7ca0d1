//! The verbs part of making the world communicator: whether to use it, publishing the
//! port before the join, and connecting the queue pairs through the store after it. Kept
//! apart from `world.rs` so that transport selection there stays a few lines.
//!
//! Store keys (under the job's prefix): `ibverbs/qp/<rank>` holds one
//! [`QpInfo`](crate::transport::ibverbs::proto::QpInfo) line per verbs peer of `<rank>`;
//! `ibverbs/ready/<rank>` is set once all of its queue pairs are ready to receive.
//!
//! Liveness: each rank also publishes a TCP listener (`"ibverbs-watch"`), and every pair
//! of verbs peers keeps one idle TCP connection (the higher rank connects, says its rank
//! and the job's hash). A process that dies has its connection closed by its kernel, so
//! its peers fail their operations with it at once (see `IbvTransport::watch`).

use crate::error::{Error, Result};
use crate::rendezvous::{Bootstrap, PeerInfo};
use crate::transport::Transport;
use crate::transport::ibverbs::proto::{IbConfig, PortInfo};

/// The key of a rank's port in its published addresses.
pub(super) const ADDR_KEY: &str = "ibverbs";
/// Starts a rank's queue pair entry when it could not make its transport (the reason follows).
#[cfg_attr(not(feature = "ibverbs"), allow(dead_code))]
const FAILED: &str = "failed: ";
/// The key of its liveness listener.
#[cfg_attr(not(feature = "ibverbs"), allow(dead_code))]
const WATCH_KEY: &str = "ibverbs-watch";

/// A device opened before the join, and the settings to use it with.
pub(super) struct Prepared {
    #[cfg(feature = "ibverbs")]
    dev: crate::transport::ibverbs::IbDevice,
    #[cfg(feature = "ibverbs")]
    watch: std::net::TcpListener,
    info: PortInfo,
    #[cfg_attr(not(feature = "ibverbs"), allow(dead_code))]
    cfg: IbConfig,
}

impl Prepared {
    /// Adds what peers need to this rank's published addresses.
    pub(super) fn publish(&self, addrs: &mut std::collections::BTreeMap<String, String>) {
        addrs.insert(ADDR_KEY.to_string(), self.info.encode());
        #[cfg(feature = "ibverbs")]
        if let Ok(a) = self.watch.local_addr() {
            addrs.insert(WATCH_KEY.to_string(), a.to_string());
        }
    }
}

/// Before the join: opens the verbs device when verbs may be used (`allowed`), or must be
/// (`forced`, where its absence is an error). `None` (logged) when it cannot be used.
///
/// `ip` is where the liveness listener binds (the address of the TCP transport).
pub(super) fn prepare(
    allowed: bool,
    forced: bool,
    ip: std::net::IpAddr,
) -> Result<Option<Prepared>> {
    if !allowed && !forced {
        return Ok(None);
    }
    #[cfg(not(feature = "ibverbs"))]
    {
        let _ = ip;
        if forced {
            return Err(Error::config(
                "FERROCOMM_TRANSPORT",
                "ibverbs",
                "this build of ferrocomm has no verbs transport: rebuild with \
                 `--features ibverbs` (needs libibverbs-dev), or choose auto or tcp",
            ));
        }
        tracing::debug!("verbs transport not built in (cargo feature `ibverbs`); using TCP");
        Ok(None)
    }
    #[cfg(feature = "ibverbs")]
    {
        let cfg = IbConfig::from_env()?;
        match crate::transport::ibverbs::open_device(&cfg, forced)? {
            Ok(dev) => {
                let info = dev.port_info().clone();
                tracing::debug!(port = %info.encode(), "verbs device opened");
                let watch = std::net::TcpListener::bind((ip, 0)).map_err(|e| {
                    Error::io(format!("binding the verbs liveness listener on {ip}"), e)
                })?;
                Ok(Some(Prepared {
                    dev,
                    watch,
                    info,
                    cfg,
                }))
            }
            Err(why) if forced => Err(Error::config(
                "FERROCOMM_TRANSPORT",
                "ibverbs",
                format!(
                    "the verbs transport was forced but cannot be used: {why} (check \
                     FERROCOMM_IB_DEVICE, FERROCOMM_IB_GID_INDEX and `ibv_devinfo`)"
                ),
            )),
            Err(why) => {
                tracing::info!("verbs transport not used: {why}; using TCP");
                Ok(None)
            }
        }
    }
}

/// Whether `a` and `b` talk over verbs: both published a port, on the same fabric, and
/// they are on different hosts or both forced verbs. Symmetric, so both ends agree.
pub(super) fn pair_uses_verbs(a: &PeerInfo, b: &PeerInfo) -> bool {
    let port = |p: &PeerInfo| p.addrs.get(ADDR_KEY).and_then(|s| PortInfo::decode(s));
    let (Some(pa), Some(pb)) = (port(a), port(b)) else {
        return false;
    };
    pa.same_fabric(&pb) && (a.host_id != b.host_id || (pa.forced && pb.forced))
}

/// For each rank, whether this rank (`me`) reaches it over verbs.
pub(super) fn verbs_peers(me: usize, peers: &[PeerInfo]) -> Vec<bool> {
    peers
        .iter()
        .enumerate()
        .map(|(r, p)| r != me && pair_uses_verbs(&peers[me], p))
        .collect()
}

/// A connected verbs transport and, per rank, whether it reaches that rank.
pub(super) type Connected = (Box<dyn Transport>, Vec<bool>);

/// After the join: the verbs transport connected to every peer that uses it, and which
/// peers those are; `None` when no peer does.
pub(super) fn connect(prep: Option<Prepared>, boot: &Bootstrap) -> Result<Option<Connected>> {
    let Some(prep) = prep else {
        return Ok(None);
    };
    let use_verbs = verbs_peers(boot.rank, &boot.peers);
    if prep.info.forced {
        let others: Vec<usize> = (0..boot.world_size)
            .filter(|&r| r != boot.rank && !use_verbs[r])
            .collect();
        if !others.is_empty() {
            tracing::warn!(
                "FERROCOMM_TRANSPORT=ibverbs, but ranks {others:?} did not publish a verbs port \
                 on this fabric or did not force verbs too: they are reached over TCP"
            );
        }
    }
    if !use_verbs.iter().any(|&u| u) {
        return Ok(None);
    }
    #[cfg(not(feature = "ibverbs"))]
    {
        Err(Error::config(
            "FERROCOMM_TRANSPORT",
            "ibverbs",
            "this build has no verbs transport",
        ))
    }
    #[cfg(feature = "ibverbs")]
    {
        use crate::transport::ibverbs::IbvTransport;
        use crate::transport::ibverbs::proto::QpInfo;
        let rank = boot.rank;
        let mut t = match IbvTransport::new(prep.dev, rank, &use_verbs, prep.cfg) {
            Ok(t) => t,
            Err(e) => {
                // Tell the peers at once rather than let them wait for the timeout.
                let _ = boot.store.set(
                    &format!("ibverbs/qp/{rank}"),
                    format!("{FAILED}{e}").as_bytes(),
                );
                return Err(e);
            }
        };
        let (_, qps) = t.local_info();
        let text: Vec<String> = qps.iter().map(QpInfo::encode).collect();
        boot.store
            .set(&format!("ibverbs/qp/{rank}"), text.join("\n").as_bytes())?;
        let peers = t.peers();
        for &peer in &peers {
            let bad = |why: String| Error::misbehaved(format!("rank {peer}"), why);
            let raw = boot
                .store
                .get(&format!("ibverbs/qp/{peer}"), boot.timeout)?;
            let text = String::from_utf8_lossy(&raw);
            if let Some(why) = text.strip_prefix(FAILED) {
                return Err(Error::PeerLost {
                    rank,
                    peer,
                    op: "connecting the verbs transport".into(),
                    detail: format!("it could not set up its verbs transport: {why}"),
                });
            }
            let qp = text
                .lines()
                .filter_map(QpInfo::decode)
                .find(|q| q.peer as usize == rank)
                .ok_or_else(|| {
                    bad(format!(
                        "published no verbs queue pair for rank {rank} (its entry: {text:?})"
                    ))
                })?;
            let port = boot.peers[peer]
                .addrs
                .get(ADDR_KEY)
                .and_then(|s| PortInfo::decode(s))
                .ok_or_else(|| bad("published no readable verbs port".into()))?;
            t.connect(peer, &port, &qp)?;
        }
        watch_peers(&mut t, &prep.watch, boot, &peers)?;
        boot.store.set(&format!("ibverbs/ready/{rank}"), b"1")?;
        let keys: Vec<String> = peers.iter().map(|p| format!("ibverbs/ready/{p}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        boot.store.wait(&refs, boot.timeout)?;
        tracing::debug!(rank, ?peers, "verbs queue pairs connected");
        Ok(Some((Box::new(t), use_verbs)))
    }
}

/// Opens the liveness connections: to lower ranks by connecting, from higher ranks by
/// accepting (each says its rank and the job's hash first).
#[cfg(feature = "ibverbs")]
fn watch_peers(
    t: &mut crate::transport::ibverbs::IbvTransport,
    listener: &std::net::TcpListener,
    boot: &Bootstrap,
    peers: &[usize],
) -> Result<()> {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let rank = boot.rank;
    let job = crate::wire::job_hash(&boot.job_id);
    let deadline = Instant::now() + boot.timeout;
    for &peer in peers.iter().filter(|&&p| p < rank) {
        let addr: std::net::SocketAddr = boot.peers[peer]
            .addrs
            .get(WATCH_KEY)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| {
                Error::misbehaved(
                    format!("rank {peer}"),
                    "published no verbs liveness address",
                )
            })?;
        let mut s = std::net::TcpStream::connect_timeout(&addr, boot.timeout).map_err(|e| {
            Error::io(
                format!("rank {rank}: connecting to rank {peer}'s liveness listener {addr}"),
                e,
            )
        })?;
        let mut hello = [0u8; 12];
        hello[..4].copy_from_slice(&(rank as u32).to_le_bytes());
        hello[4..].copy_from_slice(&job.to_le_bytes());
        s.write_all(&hello)
            .map_err(|e| Error::io(format!("greeting rank {peer}'s liveness listener"), e))?;
        t.watch(peer, s)?;
    }
    let mut missing: Vec<usize> = peers.iter().copied().filter(|&p| p > rank).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("making the liveness listener non-blocking", e))?;
    while !missing.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                op: format!("verbs liveness connections of rank {rank}"),
                waited: boot.timeout,
                detail: format!("ranks {missing:?} never connected"),
            });
        }
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(Error::io("accepting a liveness connection", e)),
        };
        let mut hello = [0u8; 12];
        let ok = s.set_nonblocking(false).is_ok()
            && s.set_read_timeout(Some(Duration::from_secs(10))).is_ok()
            && s.read_exact(&mut hello).is_ok();
        let from = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]) as usize;
        let mut h = [0u8; 8];
        h.copy_from_slice(&hello[4..]);
        if !ok || u64::from_le_bytes(h) != job || !missing.contains(&from) {
            tracing::debug!("refused a liveness connection (not a peer of this job)");
            continue;
        }
        missing.retain(|&p| p != from);
        t.watch(from, s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::ibverbs::proto::LinkLayer;
    use std::collections::BTreeMap;

    fn peer(rank: usize, host: &str, port: Option<(u8, bool)>) -> PeerInfo {
        let mut addrs = BTreeMap::new();
        if let Some((prefix, forced)) = port {
            let mut gid = [0u8; 16];
            gid[0] = prefix;
            gid[15] = rank as u8;
            let p = PortInfo {
                device: "mlx5_0".into(),
                port: 1,
                lid: 1 + rank as u16,
                gid,
                gid_index: 0,
                mtu: 5,
                link: LinkLayer::Infiniband,
                forced,
            };
            addrs.insert(ADDR_KEY.to_string(), p.encode());
        }
        PeerInfo {
            rank,
            host_id: host.into(),
            hostname: host.into(),
            pid: 1,
            addrs,
        }
    }

    #[test]
    fn verbs_between_hosts_on_one_fabric_only() {
        let peers = vec![
            peer(0, "a", Some((0xfe, false))),
            peer(1, "a", Some((0xfe, false))), // same host: not verbs (shm/TCP)
            peer(2, "b", Some((0xfe, false))), // other host, same fabric
            peer(3, "c", Some((0x01, false))), // other fabric
            peer(4, "d", None),                // no device
        ];
        assert_eq!(
            verbs_peers(0, &peers),
            vec![false, false, true, false, false]
        );
        // Symmetric: every rank agrees on every pair.
        for a in 0..peers.len() {
            for b in 0..peers.len() {
                assert_eq!(
                    verbs_peers(a, &peers)[b],
                    verbs_peers(b, &peers)[a],
                    "{a} {b}"
                );
            }
        }
    }

    #[test]
    fn forcing_covers_same_host_pairs_when_both_force() {
        let peers = vec![
            peer(0, "a", Some((0xfe, true))),
            peer(1, "a", Some((0xfe, true))),
            peer(2, "a", Some((0xfe, false))),
        ];
        assert_eq!(verbs_peers(0, &peers), vec![false, true, false]);
        assert_eq!(verbs_peers(2, &peers), vec![false, false, false]);
    }

    #[test]
    fn without_the_feature_forcing_is_a_clear_error() {
        if cfg!(feature = "ibverbs") {
            return;
        }
        let err = prepare(false, true, [127, 0, 0, 1].into())
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("--features ibverbs"), "{err}");
        assert!(
            prepare(true, false, [127, 0, 0, 1].into())
                .unwrap()
                .is_none()
        );
    }
}
