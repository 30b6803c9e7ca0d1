//! Making the world communicator of a process: rendezvous, then transports.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use super::{CommConfig, Communicator, Group, Placement, Shared, ibverbs_setup};
use crate::config;
use crate::error::{Error, Result};
use crate::rendezvous::{Bootstrap, InitOptions, Plan};
use crate::transport::Transport;
use crate::transport::shm::{LocalPeer, ShmConfig, ShmSetup};
use crate::transport::tcp::{self, TcpConfig, TcpTransport};

/// Which transports a process may use, from `FERROCOMM_TRANSPORT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TransportChoice {
    /// The best per pair: shared memory between ranks of one host, verbs between hosts
    /// on one fabric, TCP otherwise.
    Auto,
    /// TCP for every pair.
    Tcp,
    /// Shared memory for every pair; fails when ranks are on several hosts.
    Shm,
    /// Verbs for every pair that has it, same-host pairs included (TCP for the rest).
    Ibverbs,
}

fn transport_choice(lookup: &dyn Fn(&str) -> Option<String>) -> Result<TransportChoice> {
    config::parse_var(
        lookup,
        "FERROCOMM_TRANSPORT",
        "one of: auto, tcp, shm, ibverbs",
        |v| match v.to_ascii_lowercase().as_str() {
            "auto" => Some(TransportChoice::Auto),
            "tcp" => Some(TransportChoice::Tcp),
            "shm" => Some(TransportChoice::Shm),
            "ibverbs" | "ib" | "verbs" => Some(TransportChoice::Ibverbs),
            _ => None,
        },
    )
    .map(|c| c.unwrap_or(TransportChoice::Auto))
}

/// Whether this rank offers shared memory to the ranks of its host (forcing TCP or verbs
/// makes every pair use that instead).
fn offers_shm(choice: TransportChoice) -> bool {
    matches!(choice, TransportChoice::Auto | TransportChoice::Shm)
}

/// The ranks this rank reaches through shared memory (itself included), from the
/// published host identities, or an error when `FERROCOMM_TRANSPORT=shm` cannot be obeyed.
fn shm_peers(boot: &Bootstrap, choice: TransportChoice) -> Result<Vec<LocalPeer>> {
    if !offers_shm(choice) {
        return Ok(Vec::new());
    }
    let me = boot.me();
    let mut local = Vec::new();
    for p in &boot.peers {
        let same_host = p.host_id == me.host_id;
        match (p.addrs.get("shm"), same_host) {
            (Some(name), true) => local.push(LocalPeer {
                rank: p.rank,
                pid: p.pid,
                segment: name.clone(),
            }),
            _ if choice == TransportChoice::Shm => {
                return Err(Error::config(
                    "FERROCOMM_TRANSPORT",
                    "shm",
                    format!(
                        "rank {} ({}) cannot be reached through shared memory from rank {} \
                         ({}): {}; use auto (shared memory within a host, TCP between hosts)",
                        p.rank,
                        p.hostname,
                        boot.rank,
                        me.hostname,
                        if same_host {
                            "it did not offer shared memory (FERROCOMM_TRANSPORT differs there?)"
                        } else {
                            "it is on another host"
                        }
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(local)
}

/// The address this rank's TCP listener binds to: [`InitOptions::bind_addr`] or
/// `FERROCOMM_SOCKET_IFADDR` if set, else the interface that routes to the master (loopback
/// for a loopback master), else (file://) the address of the hostname. Never the wildcard
/// address unless the user names it.
fn listen_ip(plan: &Plan) -> Result<IpAddr> {
    if let Some(ip) = plan.bind_addr {
        return Ok(ip);
    }
    if let Some(master) = plan.master_ip() {
        return tcp::local_ip_towards(master);
    }
    let host = crate::rendezvous::hostname();
    let resolved: Vec<SocketAddr> = (host.as_str(), 0)
        .to_socket_addrs()
        .map(|a| a.collect())
        .unwrap_or_default();
    Ok(resolved
        .iter()
        .map(SocketAddr::ip)
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .unwrap_or(IpAddr::from([127, 0, 0, 1])))
}

impl InitOptions {
    /// Joins the job these options describe and returns the world communicator.
    ///
    /// Resolves the init method and ranks (see [`InitOptions::resolve`]), meets the other
    /// ranks at the store, connects the transports and passes a barrier, so that when it
    /// returns every rank of the world is reachable.
    pub fn init(&self) -> Result<Communicator> {
        self.init_via(None)
    }

    /// Joins the job through `store`, a store made elsewhere (PyTorch hands each process
    /// group a c10d store), and returns its communicator: as [`init`](Self::init), except
    /// that no store is opened or hosted. The rank and world size must be given (option or
    /// environment); the init method only picks the interface the TCP transport listens
    /// on (`tcp://` or `env://` towards the master, `file://` the hostname's address).
    pub fn init_with_store(
        &self,
        store: Arc<dyn crate::rendezvous::Store>,
    ) -> Result<Communicator> {
        self.init_via(Some(store))
    }

    fn init_via(&self, store: Option<Arc<dyn crate::rendezvous::Store>>) -> Result<Communicator> {
        // A peer's closed socket must be an error naming it, not SIGPIPE killing this
        // process (C programs keep the default disposition).
        crate::sys::signal::ignore_sigpipe_if_default();
        let lookup = &config::process_env;
        let plan = self.resolve()?;
        let choice = transport_choice(lookup)?;
        // Every setting is checked before joining: a malformed one fails this process at
        // once, instead of after the other ranks have waited for it in the rendezvous (or
        // in the first barrier, where they would see it as a lost peer).
        let mut tcp_cfg = TcpConfig::from_env()?;
        tcp_cfg.secret = plan.secret.clone();
        CommConfig::from_env(1)?;
        let ip = listen_ip(&plan)?;
        let listener = tcp::bind(ip).map_err(|e| match plan.bind_addr {
            // The address came from the user: say which setting to fix.
            Some(v) => Error::config(
                match lookup("FERROCOMM_SOCKET_IFADDR") {
                    Some(s) if !s.trim().is_empty() => "FERROCOMM_SOCKET_IFADDR",
                    _ => "InitOptions::bind_addr",
                },
                v.to_string(),
                format!("cannot listen on it (is it an address of this host?): {e}"),
            ),
            None => e,
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the TCP listener's address", e))?;
        let mut addrs = BTreeMap::new();
        addrs.insert("tcp".to_string(), addr.to_string());
        let shm_cfg = ShmConfig::from_env()?;
        if offers_shm(choice) {
            addrs.insert("shm".to_string(), ShmSetup::name_for(&plan.job_id));
        }
        let verbs = ibverbs_setup::prepare(
            choice == TransportChoice::Auto,
            choice == TransportChoice::Ibverbs,
            ip,
        )?;
        if let Some(v) = &verbs {
            v.publish(&mut addrs);
        }
        let mut boot = match store {
            Some(s) => plan.join_with_store(s, addrs)?,
            None => plan.join(addrs)?,
        };
        tracing::debug!(rank = boot.rank, world = boot.world_size, ?choice, %addr, "joined the job");
        // Armed until every rank is reachable: dropping it (an error below) tells the others
        // at once that this rank left during init.
        let will = boot.take_will();
        let (transports, route) = match connect(&boot, choice, shm_cfg, verbs, listener, tcp_cfg) {
            Ok(v) => v,
            Err(e) => {
                boot.abandon(&e);
                return Err(e);
            }
        };
        let rank = boot.rank;
        let comm = world_from(boot, transports, route)?;
        if let Some(w) = will {
            crate::rendezvous::finish_will(rank, w);
        }
        Ok(comm)
    }
}

/// A rank's transports and the route (transport index) of every rank.
type Connected = (Vec<Box<dyn Transport>>, Vec<u8>);

/// Connects this rank's transports to every peer of `boot`: shared memory, verbs, TCP.
/// Returns them with the route (transport index) of every rank.
fn connect(
    boot: &Bootstrap,
    choice: TransportChoice,
    shm_cfg: ShmConfig,
    verbs: Option<ibverbs_setup::Prepared>,
    listener: std::net::TcpListener,
    tcp_cfg: TcpConfig,
) -> Result<Connected> {
    let deadline = std::time::Instant::now() + boot.timeout;
    let local = shm_peers(boot, choice)?;
    // u8::MAX: not routed yet (and "self" for this rank, see Engine::new).
    let mut route = vec![u8::MAX; boot.world_size];
    let mut transports: Vec<Box<dyn Transport>> = Vec::new();
    if local.len() > 1 {
        let setup = ShmSetup::create(boot.rank, boot.world_size, local, shm_cfg)?;
        let t = setup.connect(deadline)?;
        t.wait_attached(deadline)?;
        for &p in t.peers() {
            route[p] = transports.len() as u8;
        }
        transports.push(Box::new(t));
    }
    if let Some((ib, peers)) = ibverbs_setup::connect(verbs, boot)? {
        // Verbs pairs are on different hosts (or forced verbs and offered no shared
        // memory), so none of them is routed yet.
        for (r, _) in peers.iter().enumerate().filter(|(_, v)| **v) {
            route[r] = transports.len() as u8;
        }
        transports.push(ib);
    }
    let remote: Vec<usize> = (0..boot.world_size)
        .filter(|&r| r != boot.rank && route[r] == u8::MAX)
        .collect();
    if remote.is_empty() {
        tracing::debug!(
            rank = boot.rank,
            "every peer is reached through shared memory or verbs: no TCP transport"
        );
        return Ok((transports, route));
    }
    let peers = boot
        .peers
        .iter()
        .map(|p| {
            p.addrs
                .get("tcp")
                .map(|a| {
                    a.parse::<SocketAddr>().map_err(|_| {
                        Error::misbehaved(
                            format!("rank {}", p.rank),
                            format!("published an unreadable TCP address {a:?}"),
                        )
                    })
                })
                .transpose()
        })
        .collect::<Result<Vec<_>>>()?;
    let tcp = TcpTransport::new(
        boot.rank,
        boot.world_size,
        crate::wire::job_hash(&boot.job_id),
        listener,
        peers,
        tcp_cfg,
    )?;
    for r in remote {
        route[r] = transports.len() as u8;
    }
    transports.push(Box::new(tcp));
    Ok((transports, route))
}

fn world_from(
    boot: Bootstrap,
    transports: Vec<Box<dyn Transport>>,
    route: Vec<u8>,
) -> Result<Communicator> {
    let cfg = CommConfig::from_env(boot.local_size)?;
    let placement = Placement {
        local_rank: boot.local_rank,
        local_size: boot.local_size,
        node_index: boot.node_index,
        hostname: boot.me().hostname.clone(),
    };
    let (rank, world) = (boot.rank, boot.world_size);
    let shared = Shared::new(
        rank,
        world,
        transports,
        route,
        cfg,
        placement,
        vec![Box::new(boot)],
    );
    let comm =
        Communicator::from_shared(shared, 0, Arc::new(Group::new((0..world).collect(), world)));
    // Every rank reachable before anyone goes on; also keeps the store's host alive until
    // every rank has finished reading from it.
    comm.barrier().map_err(|e| match e {
        Error::Timeout { op, waited, detail } => Error::Timeout {
            op: format!("connecting the transports ({op})"),
            waited,
            detail,
        },
        other => other,
    })?;
    Ok(comm)
}

/// Joins the job described by the environment (`FERROCOMM_INIT_METHOD`, else `env://`
/// with torchrun's, Slurm's or Open MPI's variables) and returns the world communicator.
/// The same as `InitOptions::new().init()`.
pub fn init() -> Result<Communicator> {
    InitOptions::new().init()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transport_choice_parses() {
        let env =
            |v: &'static str| move |k: &str| (k == "FERROCOMM_TRANSPORT").then(|| v.to_string());
        assert_eq!(transport_choice(&env("tcp")).unwrap(), TransportChoice::Tcp);
        assert_eq!(
            transport_choice(&env("AUTO")).unwrap(),
            TransportChoice::Auto
        );
        assert_eq!(
            transport_choice(&env("ibverbs")).unwrap(),
            TransportChoice::Ibverbs
        );
        assert_eq!(transport_choice(&|_| None).unwrap(), TransportChoice::Auto);
        assert_eq!(transport_choice(&env("shm")).unwrap(), TransportChoice::Shm);
        let err = transport_choice(&env("carrier-pigeon"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("FERROCOMM_TRANSPORT") && err.contains("tcp"),
            "{err}"
        );
    }
}
