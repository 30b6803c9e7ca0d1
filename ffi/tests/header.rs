//! The committed header is exactly what the pinned cbindgen generates from the sources.
//!
//! `FERROCOMM_BLESS=1 cargo test -p ferrocomm-ffi --test header` rewrites it.

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = dir.join("include/ferrocomm.h");
    if std::env::var_os("FERROCOMM_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &fresh).expect("write the header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    if committed != fresh {
        let (a, b) = (
            String::from_utf8_lossy(&committed),
            String::from_utf8_lossy(&fresh),
        );
        let line = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or_else(|| a.lines().count().min(b.lines().count()));
        panic!(
            "ffi/include/ferrocomm.h is out of date (first difference at line {}):\n\
             committed: {:?}\ngenerated: {:?}\n\
             regenerate with: FERROCOMM_BLESS=1 cargo test -p ferrocomm-ffi --test header",
            line + 1,
            a.lines().nth(line),
            b.lines().nth(line)
        );
    }
}

/// Compiles `src` (C or C++ per `compiler`) against the committed header with `flags`,
/// syntax only; returns whether it compiled and the compiler's messages. `None` when the
/// compiler is missing (the test then prints that it skipped, or fails under
/// `FERROCOMM_REQUIRE_ALL=1`).
fn compile(compiler: &str, ext: &str, src: &str, flags: &[&str]) -> Option<(bool, String)> {
    use std::process::Command;
    if Command::new(compiler).arg("--version").output().is_err() {
        if std::env::var("FERROCOMM_REQUIRE_ALL").is_ok_and(|v| v == "1") {
            panic!("FERROCOMM_REQUIRE_ALL=1 but {compiler} is missing");
        }
        eprintln!("SKIPPED: {compiler} is not installed");
        return None;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join(format!("t.{ext}"));
    std::fs::write(&file, src).expect("write the source");
    let out = Command::new(compiler)
        .args(flags)
        .args(["-fsyntax-only", "-I"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("include"))
        .arg(&file)
        .output()
        .expect("run the compiler");
    let msg = String::from_utf8_lossy(&out.stderr).into_owned();
    Some((out.status.success(), msg))
}

/// A program that uses the three enumerations in their places.
const RIGHT: &str = r#"
#include <ferrocomm.h>
int f(ferrocomm_comm_t *c, float *x, size_t n) {
    ferrocomm_dtype d = FERROCOMM_F32;
    ferrocomm_op o = FERROCOMM_SUM;
    ferrocomm_result r = ferrocomm_allreduce(c, FERROCOMM_IN_PLACE, x, n, d, o);
    if (r != FERROCOMM_OK) return (int)r;
    return (int)ferrocomm_allreduce(c, FERROCOMM_IN_PLACE, x, n, FERROCOMM_F32, FERROCOMM_MAX);
}
"#;

/// The header compiles without a warning as C99, C11 and C17 (with `-Wc++-compat`: no name
/// is both a typedef and a tag) and as C++11 and C++20; before C99 it stops with an error
/// that says what it needs.
#[test]
fn header_is_clean_c99_and_cxx11() {
    let strict = ["-Wall", "-Wextra", "-pedantic", "-Werror"];
    for std in ["-std=c99", "-std=c11", "-std=c17"] {
        let flags: Vec<&str> = [std, "-Wc++-compat"]
            .iter()
            .chain(&strict)
            .copied()
            .collect();
        let Some((ok, msg)) = compile("cc", "c", RIGHT, &flags) else {
            return;
        };
        assert!(ok, "{std}: {msg}");
    }
    for std in ["-std=c++11", "-std=c++20"] {
        let flags: Vec<&str> = [std].iter().chain(&strict).copied().collect();
        let Some((ok, msg)) = compile("c++", "cpp", RIGHT, &flags) else {
            return;
        };
        assert!(ok, "{std}: {msg}");
    }
    let Some((ok, msg)) = compile("cc", "c", RIGHT, &["-std=c89"]) else {
        return;
    };
    assert!(
        !ok && msg.contains("ferrocomm.h needs C99 or later"),
        "{msg}"
    );
}

/// Swapping the data type and the operation does not compile in C++ (distinct enumeration
/// types), nor does passing a plain integer; in C, where both are integers, the library
/// refuses the call at run time (the unit test `swapped_dtype_and_op_are_refused`).
#[test]
fn swapped_dtype_and_op_do_not_compile_in_cxx() {
    for (what, call) in [
        ("swapped", "FERROCOMM_SUM, FERROCOMM_F32"),
        ("an integer as the dtype", "10u, FERROCOMM_SUM"),
        ("an integer as the op", "FERROCOMM_F32, 0u"),
    ] {
        let src = format!(
            "#include <ferrocomm.h>\n\
             int f(ferrocomm_comm_t *c, float *x, size_t n) {{\n\
             return (int)ferrocomm_allreduce(c, FERROCOMM_IN_PLACE, x, n, {call});\n}}\n"
        );
        let Some((ok, msg)) = compile("c++", "cpp", &src, &["-std=c++17"]) else {
            return;
        };
        assert!(!ok, "{what} compiled in C++:\n{src}");
        assert!(
            msg.contains("ferrocomm_dtype") || msg.contains("ferrocomm_op"),
            "{msg}"
        );
    }
}
