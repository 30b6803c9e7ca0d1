//! Prints the alpha-beta cost of every all_reduce algorithm for a number of ranks and a
//! message size, from the algorithms' own schedules (no data moves, any number of ranks).
//!
//! ```text
//! cargo run --release --example cost_model -- 4096 64M
//! ```
//!
//! Optional third to fifth arguments: alpha (µs per message), bandwidth (GB/s), reduction
//! speed (GB/s); defaults 15, 2 and 10, the model of the automatic choice.

use ferrocomm::collective::Algorithm;
use ferrocomm::collective::cost::{Model, cost};

fn parse_size(v: &str) -> Option<usize> {
    let (d, m) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 1 << 10),
        'm' | 'M' => (&v[..v.len() - 1], 1 << 20),
        'g' | 'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    d.parse::<usize>().ok()?.checked_mul(m)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.into());
    let (Ok(p), Some(n)) = (arg(0, "64").parse::<usize>(), parse_size(&arg(1, "64M"))) else {
        eprintln!("usage: cost_model RANKS BYTES [ALPHA_US GBPS REDUCE_GBPS]");
        std::process::exit(2);
    };
    let num = |i: usize, d: &str| arg(i, d).parse::<f64>().unwrap_or(0.0);
    let m = Model {
        alpha: num(2, "15") * 1e-6,
        beta: 1.0 / (num(3, "2") * 1e9),
        gamma: 1.0 / (num(4, "10") * 1e9),
    };
    println!(
        "all_reduce of {n} bytes on {p} ranks (alpha {:.1} us, beta 1/{:.1} GB/s)",
        m.alpha * 1e6,
        1e-9 / m.beta
    );
    println!(
        "{:>6} {:>7} {:>16} {:>16} {:>12}",
        "algo", "rounds", "critical bytes", "max sent/rank", "model time"
    );
    for a in [
        Algorithm::AllReduceRing,
        Algorithm::AllReduceHalvingDoubling,
        Algorithm::AllReduceRecursiveDoubling,
    ] {
        match cost(a, p, n, 1) {
            Ok(c) => println!(
                "{:>6} {:>7} {:>16} {:>16} {:>10.3}ms",
                a.name(),
                c.rounds,
                c.critical_bytes,
                c.max_sent,
                c.time(&m) * 1e3
            ),
            Err(e) => println!("{:>6} {e}", a.name()),
        }
    }
    let auto = ferrocomm::collective::select::choose_all_reduce(p, n, n);
    println!("automatic choice: {}", auto.name());
}
