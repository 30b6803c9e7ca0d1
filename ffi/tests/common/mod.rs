//! What the C ABI's integration tests share: where the repository and this profile's build
//! are, building the library and `ferrorun` once, running a command with a bound, and skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("ffi/ has a parent")
        .to_path_buf()
}

/// `target/<profile>`: where this test binary, `libferrocomm.so/.a` and `ferrorun` are.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("the test binary lives in target/<profile>/deps")
        .to_path_buf()
}

/// Builds (or checks up to date) the C library and `ferrorun` in this test's profile, once
/// per test binary: `cargo test` does not build a cdylib for integration tests, and a
/// library left from an earlier build would test old code.
pub fn build_once() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let profile = profile_dir();
        let name = profile
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_string();
        let mut cmd = Command::new(cargo);
        cmd.current_dir(root())
            .args(["build", "--quiet", "-p", "ferrocomm-ffi", "--lib"])
            .args(["-p", "ferrocomm", "--bin", "ferrorun"]);
        match name.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let out = run_within(cmd, Duration::from_secs(600));
        assert!(
            out.status.success(),
            "building the C library and ferrorun failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Whether a missing tool may skip a test (not under `FERROCOMM_REQUIRE_ALL=1`).
pub fn skip(what: &str) {
    if std::env::var("FERROCOMM_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("FERROCOMM_REQUIRE_ALL=1 but {what}; run scripts/setup");
    }
    eprintln!("SKIPPED: {what} (run scripts/setup)");
}

/// Runs `cmd` to completion within `limit`; kills it and fails the test when it hangs.
pub fn run_within(mut cmd: Command, limit: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap_or_else(|e| panic!("waiting for {shown}: {e}")),
        Err(_) => {
            // SIGTERM: ferrorun passes it to its ranks and stops them.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("{shown} hung for {limit:?}");
        }
    }
}
