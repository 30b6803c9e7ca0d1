//! Collective argument agreement through the C ABI: a C program (`ffi/tests/c/mismatch.c`)
//! and the Python module (`ffi/python/test_mismatch.py`) run as 3 and 4 ranks under
//! `ferrorun`, over TCP and shared memory, with the ranks disagreeing about a root, a count
//! or the collective; every rank must report `FERROCOMM_ERR_COLLECTIVE_MISMATCH` naming
//! two ranks whose calls differ and both calls (never success, never a timeout: the
//! operation timeout is 30 minutes and each job is bounded).
//!
//! Builds the library and `ferrorun` in this test's profile first; a missing `cc` or
//! python3/numpy skips that part (fails under `FERROCOMM_REQUIRE_ALL=1`).

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{build_once, profile_dir, root, run_within, skip};

/// Upper bound of one command.
const LIMIT: Duration = Duration::from_secs(120);
/// `FERROCOMM_ERR_COLLECTIVE_MISMATCH`.
const MISMATCH: u32 = 9;

/// Runs `cmd` within [`LIMIT`]; fails the test when it hangs.
fn run(cmd: Command) -> Output {
    run_within(cmd, LIMIT)
}

/// The library and `ferrorun`, built in this profile: their directory.
fn built() -> PathBuf {
    build_once();
    profile_dir()
}

/// The two ranks an error names: "call #N: rank A called X(...) but rank B called Y(...)".
fn pair(msg: &str) -> Option<(usize, String, usize, String)> {
    let s = &msg[msg.find("call #")?..];
    let s = &s[s.find(": rank ")? + 7..];
    let side = |s: &str| -> Option<(usize, String, usize)> {
        let d = s.find(' ')?;
        let rank = s[..d].parse().ok()?;
        let rest = s[d..].strip_prefix(" called ")?;
        let end = rest.find(')')? + 1;
        Some((rank, rest[..end].to_string(), d + 8 + end))
    };
    let (a, ca, used) = side(s)?;
    let s = s[used..].strip_prefix(" but rank ")?;
    let (b, cb, _) = side(s)?;
    Some((a, ca, b, cb))
}

#[test]
fn c_ranks_that_disagree_all_get_collective_mismatch() {
    let cc = Command::new("cc")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !cc {
        return skip("cc is not installed");
    }
    let dir = built();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let exe = tmp.path().join("mismatch");
    let mut cmd = Command::new("cc");
    cmd.args([
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-O1",
    ])
    .arg("-I")
    .arg(root().join("ffi/include"))
    .arg(root().join("ffi/tests/c/mismatch.c"))
    .arg("-o")
    .arg(&exe)
    .arg(format!("-L{}", dir.display()))
    .arg("-lferrocomm")
    .arg(format!("-Wl,-rpath,{}", dir.display()));
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for transport in ["tcp", "shm"] {
        for case in ["broadcast_root", "reduce_root", "count", "kind"] {
            for n in [3usize, 4] {
                let mut cmd = Command::new(dir.join("ferrorun"));
                cmd.args(["--nproc-per-node", &n.to_string(), "--"])
                    .arg(&exe)
                    .arg(case)
                    .env("FERROCOMM_TRANSPORT", transport)
                    .env("FERROCOMM_OP_TIMEOUT", "1800");
                let out = run(cmd);
                let so = String::from_utf8_lossy(&out.stdout).into_owned();
                let what = format!("{transport} {case} {n} ranks:\n{so}");
                // Lines of different ranks may reach ferrorun's stdout glued together.
                let reports: Vec<&str> = so.split("CMM rank=").skip(1).map(str::trim).collect();
                assert_eq!(reports.len(), n, "{what}");
                for r in reports {
                    assert!(r.contains(&format!(" code={MISMATCH} ")), "{what}");
                    let (a, ca, b, cb) = pair(r).unwrap_or_else(|| panic!("no pair: {what}"));
                    assert!(a != b && a < n && b < n && ca != cb, "{what}");
                }
            }
        }
    }
}

#[test]
fn python_ranks_that_disagree_all_get_collective_mismatch() {
    let numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !numpy {
        return skip("python3 with numpy is not installed");
    }
    let dir = built();
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("ffi/python/test_mismatch.py"))
        .env("FERROCOMM_LIB", dir.join("libferrocomm.so"))
        .env("FERROCOMM_FERRORUN", dir.join("ferrorun"));
    let out = run(cmd);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && se.contains("\nOK"), "{se}");
}
