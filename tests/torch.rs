//! The PyTorch backend (torch/, package `ferrocomm_torch`): runs its pytest suite with the
//! checkout's virtual environment (`.venv`, made by `scripts/setup`), against the C library
//! of this build (target/release/libferrocomm.so).
//!
//! The suite starts 1 to 4 ranks by hand (tcp://, env://, file://) and under torchrun, and
//! compares every operation and data type with a reference and with gloo, DDP training with
//! gloo's, and checks that a dead rank gives an exception naming it. Without the venv or the
//! library the test prints that it skipped; under `FERROCOMM_REQUIRE_ALL=1` that is a
//! failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Prints that the test skipped, or fails under `FERROCOMM_REQUIRE_ALL=1`.
fn skip(why: &str) {
    if std::env::var("FERROCOMM_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("FERROCOMM_REQUIRE_ALL=1 but {why}; run scripts/setup");
    }
    eprintln!("skipped: {why}; run scripts/setup to make .venv with torch");
}

fn python(venv: &Path) -> PathBuf {
    venv.join("bin/python")
}

#[test]
fn torch_backend_pytest_suite() {
    let venv = root().join(".venv");
    let py = python(&venv);
    if !py.exists() {
        return skip(&format!("{} does not exist", py.display()));
    }
    let import = Command::new(&py)
        .args(["-c", "import torch, pytest, ferrocomm_torch"])
        .env("FERROCOMM_LIB", "/nonexistent-only-importing-torch")
        .output();
    match import {
        // ferrocomm_torch fails to import without the library: only torch and pytest
        // decide whether the venv is usable.
        Ok(o)
            if o.status.success()
                || String::from_utf8_lossy(&o.stderr).contains("libferrocomm") => {}
        Ok(o) => {
            return skip(&format!(
                "the venv lacks torch or pytest: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ));
        }
        Err(e) => return skip(&format!("cannot run {}: {e}", py.display())),
    }
    let lib = root().join("target/release/libferrocomm.so");
    if !lib.exists() {
        return skip(&format!(
            "{} is not built (cargo build --release -p ferrocomm-ffi)",
            lib.display()
        ));
    }
    let status = Command::new(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root().join("torch/tests"))
        .env("FERROCOMM_LIB", &lib)
        .current_dir(root())
        .status()
        .expect("run pytest");
    assert!(
        status.success(),
        "the torch backend's pytest suite failed: {status}"
    );
}
