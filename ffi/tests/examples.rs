//! The C ABI from the outside: the examples of `ffi/examples` compiled with the system's
//! `cc`/`c++` against the built `libferrocomm.so` (and `.a`), run as 3 ranks under
//! `ferrorun` with their output checked (`allreduce.c`, `allreduce.cpp` and `allreduce.py`
//! check every collective's result themselves, `ddp.c` that its replicas stay identical);
//! three of them under valgrind; the Python module's tests and example; and `scripts/install` into a temporary prefix, then building against
//! the installed files with and without pkg-config.
//!
//! The tests build the library and `ferrorun` in their own profile first (a no-op when they
//! are up to date); `FERROCOMM_FERRORUN` names another launcher. Tools that are missing (valgrind,
//! python3 with numpy, pkg-config) make a test print that it skipped, or fail under
//! `FERROCOMM_REQUIRE_ALL=1` (CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{build_once, profile_dir, root, run_within, skip};

/// Upper bound of any one command; far above what any needs (valgrind included).
const LIMIT: Duration = Duration::from_secs(300);

/// The directory holding the built C library.
fn lib_dir() -> PathBuf {
    build_once();
    let dir = profile_dir();
    for f in ["libferrocomm.so", "libferrocomm.a"] {
        assert!(
            dir.join(f).exists(),
            "{} is missing after the build",
            dir.join(f).display()
        );
    }
    dir
}

/// The `ferrorun` launcher: `FERROCOMM_FERRORUN`, else the one built in this profile.
fn ferrorun() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROCOMM_FERRORUN") {
        return PathBuf::from(p);
    }
    build_once();
    let p = profile_dir().join("ferrorun");
    assert!(p.exists(), "{} is missing after the build", p.display());
    p
}

fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to completion within [`LIMIT`]; kills it and fails the test when it hangs.
fn run(cmd: Command) -> Output {
    run_within(cmd, LIMIT)
}

/// Runs `cmd` and returns its stdout; fails the test with both streams unless it succeeded.
fn run_ok(cmd: Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "{shown} failed with {}\nstdout:\n{so}\nstderr:\n{se}",
        out.status
    );
    so
}

/// Compiles `ffi/examples/<src>` with `compiler` and `link` flags into `dir`.
fn compile(compiler: &str, src: &str, dir: &Path, link: &[String]) -> PathBuf {
    let exe = dir.join(src.replace('.', "_"));
    let std = if compiler == "c++" {
        "-std=c++20"
    } else {
        "-std=c11"
    };
    let mut cmd = Command::new(compiler);
    cmd.args([std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-O1"])
        .arg("-I")
        .arg(root().join("ffi/include"))
        .arg(root().join("ffi/examples").join(src))
        .arg("-o")
        .arg(&exe)
        .args(link);
    run_ok(cmd);
    exe
}

/// Linking against the shared library in the build directory (found at run time by rpath).
fn shared_link() -> Vec<String> {
    let d = lib_dir().display().to_string();
    vec![
        format!("-L{d}"),
        "-lferrocomm".into(),
        format!("-Wl,-rpath,{d}"),
    ]
}

/// `ferrorun --nproc-per-node n -- program args...`.
fn launch(n: usize, program: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut cmd = Command::new(ferrorun());
    cmd.arg("--nproc-per-node")
        .arg(n.to_string())
        .arg("--")
        .args(program.iter().map(|p| p.as_ref()));
    cmd
}

fn lines_with(out: &str, needle: &str) -> usize {
    out.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn c_examples_run_as_three_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let hello = compile("cc", "hello.c", dir.path(), &shared_link());
    let out = run_ok(launch(3, &[&hello]));
    for r in 0..3 {
        assert_eq!(
            lines_with(&out, &format!("hello from rank {r} of 3 (local rank ")),
            1,
            "{out}"
        );
    }
    assert!(
        out.contains("token went around 3 ranks and came back as 3 (expected 3): ok"),
        "{out}"
    );

    let ring = compile("cc", "ring.c", dir.path(), &shared_link());
    let out = run_ok(launch(3, &[&ring, &"5000"]));
    for r in 0..3 {
        assert!(
            out.contains(&format!("rank {r}: sum of 3 ranks' 5000 doubles: ok")),
            "{out}"
        );
    }

    // Collectives, results checked by the program: 100000 floats take the large-message
    // algorithms, 3 ranks the non-power-of-two paths.
    let allreduce = compile("cc", "allreduce.c", dir.path(), &shared_link());
    for n in ["100000", "5"] {
        let out = run_ok(launch(3, &[&allreduce, &n]));
        for r in 0..3 {
            assert!(
                out.contains(&format!("rank {r} of 3: collectives on {n} floats: ok")),
                "{out}"
            );
        }
    }
}

/// `ddp.c`: broadcast_parameters, a reducer with several buckets, gradient accumulation and
/// SGD on 3 ranks; the program checks that the loss fell and that every rank ends with the
/// same parameters (a checksum's min and max over the ranks), and the test compares the
/// printed parameters and checksums of the ranks too.
#[test]
fn c_ddp_example_trains_identical_replicas() {
    let dir = tempfile::tempdir().unwrap();
    let ddp = compile("cc", "ddp.c", dir.path(), &shared_link());
    let out = run_ok(launch(3, &[&ddp, &"100"]));
    let mut tails = Vec::new();
    for r in 0..3 {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("rank {r} of 3: loss ")))
            .unwrap_or_else(|| panic!("no line of rank {r}: {out}"));
        assert!(line.ends_with(": ok"), "{out}");
        // What follows the losses (which differ: each rank has its own data): the final
        // parameters and the checksum.
        let (_, tail) = line.split_once("after 100 steps").expect("the step count");
        tails.push(tail.to_string());
    }
    assert!(tails.iter().all(|t| *t == tails[0]), "{out}");
}

#[test]
fn static_library_links_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    // The libraries rustc says a static Rust library needs (as in ferrocomm.pc's
    // Libs.private).
    let link: Vec<String> = [lib_dir().join("libferrocomm.a").display().to_string()]
        .into_iter()
        .chain(
            [
                "-lgcc_s",
                "-lutil",
                "-lrt",
                "-lpthread",
                "-lm",
                "-ldl",
                "-lc",
            ]
            .map(String::from),
        )
        .collect();
    let hello = compile("cc", "hello.c", dir.path(), &link);
    let ldd = run_ok({
        let mut c = Command::new("ldd");
        c.arg(&hello);
        c
    });
    assert!(!ldd.contains("libferrocomm"), "statically linked: {ldd}");
    let out = run_ok(launch(3, &[&hello]));
    assert!(out.contains("came back as 3 (expected 3): ok"), "{out}");
}

#[test]
fn cpp_wrapper_example_runs_as_three_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let shards = compile("c++", "shards.cpp", dir.path(), &shared_link());
    let out = run_ok(launch(3, &[&shards]));
    assert!(
        out.contains("3 shards of 1000 cover the data set exactly once: ok"),
        "{out}"
    );
    assert_eq!(lines_with(&out, ": ring ok"), 3, "{out}");

    let coll = compile("c++", "allreduce.cpp", dir.path(), &shared_link());
    let out = run_ok(launch(3, &[&coll]));
    for r in 0..3 {
        assert!(
            out.contains(&format!("rank {r} of 3: C++ collectives: ok")),
            "{out}"
        );
    }
}

/// Memcheck on three small runs: no invalid reads or writes, and no memory lost by the
/// library after `ferrocomm_finalize` ("definitely" or "possibly" lost). What the Rust
/// runtime keeps for the life of the process (the log subscriber, the handle table's
/// storage, thread-locals of the main thread) is still reachable, which memcheck does not
/// count as an error; the one suppression (`tests/valgrind.supp`) is the standard library's
/// handle of the calling thread, which memcheck sees only through an interior pointer
/// (rust-lang/rust#135608).
#[test]
fn valgrind_finds_no_bad_access_and_no_leak() {
    if !have("valgrind", "--version") {
        return skip("valgrind is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    for (src, args, expect) in [
        ("hello.c", vec![], "came back as 1 (expected 1): ok"),
        (
            "ring.c",
            vec!["100"],
            "rank 1: sum of 2 ranks' 100 doubles: ok",
        ),
        // Collectives, blocking and non-blocking (the worker thread and the copy back
        // into the caller's buffer), split, and the bucketed all_reduce.
        (
            "allreduce.c",
            vec!["1000"],
            "rank 1 of 2: collectives on 1000 floats: ok",
        ),
    ] {
        let exe = compile("cc", src, dir.path(), &shared_link());
        let mut cmd = Command::new(ferrorun());
        cmd.args(["--nproc-per-node", "2", "--", "valgrind", "-q"])
            .args([
                "--error-exitcode=99",
                "--leak-check=full",
                "--errors-for-leak-kinds=definite,possible",
                "--show-leak-kinds=definite,possible",
                "--track-origins=yes",
            ])
            .arg(format!(
                "--suppressions={}",
                root().join("ffi/tests/valgrind.supp").display()
            ))
            .arg(&exe)
            .args(&args)
            .env("FERROCOMM_SPIN_US", "0");
        let out = run(cmd);
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && so.contains(expect),
            "{src} under valgrind: {}\nstdout:\n{so}\nstderr:\n{se}",
            out.status
        );
        assert!(!se.contains("=="), "valgrind reported something:\n{se}");
    }
}

#[test]
fn python_module_tests_and_example() {
    if !have("python3", "--version") {
        return skip("python3 is not installed");
    }
    let numpy = Command::new("python3")
        .args(["-c", "import numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !numpy {
        return skip("numpy is not installed for python3");
    }
    let lib = lib_dir().join("libferrocomm.so");
    let mut unit = Command::new("python3");
    unit.arg(root().join("ffi/python/test_ferrocomm.py"))
        .env("FERROCOMM_LIB", &lib);
    let out = run(unit);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && se.contains("\nOK"), "{se}");

    let mut cmd = launch(3, &[&"python3", &root().join("ffi/examples/ring.py")]);
    cmd.env("FERROCOMM_LIB", &lib)
        .env("PYTHONPATH", root().join("ffi/python"));
    let out = run_ok(cmd);
    for (r, left) in [(0, 2), (1, 0), (2, 1)] {
        assert!(
            out.contains(&format!("rank {r} of 3: got rank {left}'s vector")),
            "{out}"
        );
    }

    let mut cmd = launch(3, &[&"python3", &root().join("ffi/examples/allreduce.py")]);
    cmd.env("FERROCOMM_LIB", &lib)
        .env("PYTHONPATH", root().join("ffi/python"));
    let out = run_ok(cmd);
    for r in 0..3 {
        assert!(
            out.contains(&format!("rank {r} of 3: Python collectives: ok")),
            "{out}"
        );
    }
}

/// `scripts/install` into a temporary prefix: the shared library under its version with the
/// SONAME symlinks, the static library, headers, pkg-config file, `ferrorun` in bin/ and
/// the Python module. Then a C program built with nothing but `pkg-config --cflags --libs`
/// runs under the installed `ferrorun` and loads the installed library (the .pc file's
/// rpath), and one built with plain flags works as the README shows.
#[test]
fn install_then_build_with_and_without_pkg_config() {
    let prefix = tempfile::tempdir().unwrap();
    let p = prefix.path();
    let mut install = Command::new(root().join("scripts/install"));
    install
        .arg(p)
        .env("FERROCOMM_NO_BUILD", "1")
        .env("FERROCOMM_LIB_DIR", lib_dir());
    run_ok(install);
    let version = env!("CARGO_PKG_VERSION");
    let real = format!("lib/libferrocomm.so.{version}");
    for f in [
        real.as_str(),
        "lib/libferrocomm.so.0",
        "lib/libferrocomm.so",
        "lib/libferrocomm.a",
        "include/ferrocomm.h",
        "include/ferrocomm.hpp",
        "lib/pkgconfig/ferrocomm.pc",
        "bin/ferrorun",
        "share/ferrocomm/python/ferrocomm.py",
    ] {
        assert!(p.join(f).exists(), "{f} not installed");
    }
    // The usual chain: libferrocomm.so -> libferrocomm.so.0 -> libferrocomm.so.VERSION.
    let link = |f: &str| std::fs::read_link(p.join("lib").join(f)).ok();
    assert_eq!(link("libferrocomm.so"), Some("libferrocomm.so.0".into()));
    assert_eq!(
        link("libferrocomm.so.0"),
        Some(format!("libferrocomm.so.{version}").into())
    );
    let dynamic = run_ok({
        let mut c = Command::new("readelf");
        c.arg("-d").arg(p.join(&real));
        c
    });
    assert!(
        dynamic.contains("Library soname: [libferrocomm.so.0]"),
        "{dynamic}"
    );
    let pc = std::fs::read_to_string(p.join("lib/pkgconfig/ferrocomm.pc")).unwrap();
    assert!(pc.contains(&format!("prefix={}", p.display())), "{pc}");
    assert!(pc.contains(&format!("Version: {version}")), "{pc}");
    let installed_ferrorun = p.join("bin/ferrorun");
    let under_installed = |exe: &Path| {
        let mut cmd = Command::new(&installed_ferrorun);
        cmd.args(["--nproc-per-node", "3", "--"])
            .arg(exe)
            .env_remove("LD_LIBRARY_PATH");
        cmd
    };

    let dir = tempfile::tempdir().unwrap();
    let lib = p.join("lib").display().to_string();
    // Plain flags, as the README shows for a prefix the compiler does not search.
    let plain = vec![
        format!("-L{lib}"),
        "-lferrocomm".to_string(),
        format!("-Wl,-rpath,{lib}"),
    ];
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c11", "-Wall", "-Werror", "-I"])
        .arg(p.join("include"))
        .arg(root().join("ffi/examples/hello.c"))
        .arg("-o")
        .arg(dir.path().join("hello_plain"))
        .args(&plain);
    run_ok(cmd);
    let out = run_ok(under_installed(&dir.path().join("hello_plain")));
    assert!(out.contains("(expected 3): ok"), "{out}");

    if !have("pkg-config", "--version") {
        return skip("pkg-config is not installed");
    }
    let mut flags = Command::new("pkg-config");
    flags
        .args(["--cflags", "--libs", "ferrocomm"])
        .env("PKG_CONFIG_PATH", p.join("lib/pkgconfig"));
    let flags = run_ok(flags);
    assert!(flags.contains("-lferrocomm"), "{flags}");
    assert!(flags.contains(&format!("-Wl,-rpath,{lib}")), "{flags}");
    // C with the pkg-config flags alone: the program finds the installed library at run
    // time, by its SONAME.
    let hello_pc = dir.path().join("hello_pc");
    let mut cmd = Command::new("cc");
    cmd.args(["-std=c99", "-Wall", "-Werror"])
        .arg(root().join("ffi/examples/hello.c"))
        .arg("-o")
        .arg(&hello_pc)
        .args(flags.split_whitespace());
    run_ok(cmd);
    let ldd = run_ok({
        let mut c = Command::new("ldd");
        c.arg(&hello_pc).env_remove("LD_LIBRARY_PATH");
        c
    });
    assert!(
        ldd.contains(&format!("libferrocomm.so.0 => {lib}/libferrocomm.so.0")),
        "{ldd}"
    );
    let out = run_ok(under_installed(&hello_pc));
    assert!(out.contains("(expected 3): ok"), "{out}");
    // C++ likewise.
    let mut cmd = Command::new("c++");
    cmd.args(["-std=c++20", "-Wall", "-Werror"])
        .arg(root().join("ffi/examples/shards.cpp"))
        .arg("-o")
        .arg(dir.path().join("shards_pc"))
        .args(flags.split_whitespace());
    run_ok(cmd);
    let out = run_ok(under_installed(&dir.path().join("shards_pc")));
    assert_eq!(lines_with(&out, ": ring ok"), 3, "{out}");
}
