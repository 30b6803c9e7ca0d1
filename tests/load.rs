//! Load and soak, short versions of the benchmark runs (the long runs and their numbers are
//! in docs/LOAD.md): correctness and bounded completion only, no timing asserted.
//!
//! - `soak_of_random_collectives_under_ferrorun`: `examples/soak.rs` (compiled into this
//!   test) on 4 ranks under `ferrorun`: 2,000 collectives of random kinds, sizes, element
//!   types, operations and roots, every result checked; zero mismatches on every rank.
//! - `store_under_64_concurrent_clients`: `examples/store_load.rs` (compiled into this
//!   test): 64 client threads doing set/get/add/wait against one `TcpStoreServer`; every
//!   value read back is the one written, the shared counter ends at the number of adds.
//! - `thirty_two_ranks_on_one_host`: 32 ranks under one `ferrorun` on this (small,
//!   oversubscribed) host: init, barrier and an all_reduce (checked) complete within 120 s.

mod common;

#[path = "../examples/soak.rs"]
#[allow(dead_code)]
mod soak;

#[path = "../examples/store_load.rs"]
#[allow(dead_code)]
mod store_load;

use std::time::{Duration, Instant};

use common::{Proc, count, ferrorun, free_port, records};

/// Calls per rank in the soak test.
const SOAK_CALLS: &str = "2000";
/// `FERROCOMM_ITEST_SOAK_CALLS`: collectives of the `soak` role.
const SOAK_CALLS_VAR: &str = "FERROCOMM_ITEST_SOAK_CALLS";

#[test]
fn rank_entry_point() {
    match std::env::var(common::ROLE).as_deref() {
        Ok("soak") => soak_rank(),
        Ok("wide") => wide_rank(),
        _ => common::rank_main(),
    }
}

/// The `soak` role: `soak::soak` with the calls of `FERROCOMM_ITEST_SOAK_CALLS`, its
/// summary on stdout (`SOAK ...`), exit 0 only without errors or mismatches.
fn soak_rank() {
    ferrocomm::init_logging();
    let n = std::env::var(SOAK_CALLS_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let code = match ferrocomm::init()
        .map_err(|e| e.to_string())
        .and_then(|c| soak::soak(&c, n, 0x50a7))
    {
        Ok(s) => {
            println!("{s}");
            i32::from(s.mismatches != 0)
        }
        Err(e) => {
            eprintln!("RANKERR {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The `wide` role: init (timed), barrier, an all_reduce of the ranks' numbers (checked);
/// prints `WIDE rank=R init_ms=T`.
fn wide_rank() {
    ferrocomm::init_logging();
    let t = Instant::now();
    let r = (|| -> Result<(), String> {
        let c = ferrocomm::init().map_err(|e| e.to_string())?;
        let init_ms = t.elapsed().as_millis();
        c.barrier().map_err(|e| e.to_string())?;
        let mut v = [c.rank() as u64, 1];
        c.all_reduce(&mut v, ferrocomm::ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        let n = c.size() as u64;
        if v != [n * (n - 1) / 2, n] {
            return Err(format!(
                "all_reduce gave {v:?}, expected [{}, {n}]",
                n * (n - 1) / 2
            ));
        }
        println!("WIDE rank={} init_ms={init_ms}", c.rank());
        Ok(())
    })();
    if let Err(e) = &r {
        eprintln!("RANKERR {e}");
    }
    std::process::exit(i32::from(r.is_err()));
}

#[test]
fn soak_of_random_collectives_under_ferrorun() {
    let port = free_port().to_string();
    let p = Proc::start(
        "soak",
        ferrorun(
            &[
                "--nproc-per-node",
                "4",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
            ],
            "soak",
            &[(SOAK_CALLS_VAR, SOAK_CALLS)],
        ),
    );
    let f = p.finish_within(Duration::from_secs(240));
    assert_eq!(f.code(), Some(0), "{f:?}");
    let out = f.records("SOAK");
    assert_eq!(out.len(), 4, "every rank reports: {f:?}");
    for r in &out {
        assert_eq!(r["calls"], SOAK_CALLS, "{f:?}");
        assert_eq!(r["mismatches"], "0", "{f:?}");
        eprintln!(
            "soak rank {}: {} calls, {} elements checked, RSS {} -> {} KiB",
            r["rank"], r["calls"], r["elements"], r["rss_start_kib"], r["rss_end_kib"]
        );
    }
}

#[test]
fn store_under_64_concurrent_clients() {
    let t = Instant::now();
    let report = store_load::run(64, 200).unwrap_or_else(|e| panic!("store load: {e}"));
    let t = t.elapsed();
    assert_eq!(report.clients, 64);
    assert!(t < Duration::from_secs(120), "took {t:?}");
    eprintln!("{report}");
}

#[test]
fn thirty_two_ranks_on_one_host() {
    let port = free_port().to_string();
    let p = Proc::start(
        "32 ranks",
        ferrorun(
            &[
                "--nproc-per-node",
                "32",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                &port,
            ],
            "wide",
            &[],
        ),
    );
    let f = p.finish_within(Duration::from_secs(120));
    assert_eq!(f.code(), Some(0), "{f:?}");
    assert_eq!(count(&f.stdout, "WIDE"), 32, "every rank is through: {f:?}");
    let init: Vec<usize> = records(&f.stdout, "WIDE")
        .iter()
        .map(|r| common::num(r, "init_ms"))
        .collect();
    eprintln!(
        "32 ranks: init took {} ms at most, {} ms at least; the whole job {:.1?}",
        init.iter().max().unwrap_or(&0),
        init.iter().min().unwrap_or(&0),
        f.elapsed
    );
}
