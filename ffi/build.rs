//! Gives libferrocomm.so its SONAME on Linux: `libferrocomm.so.<ABI>`, so programs record
//! the ABI they were linked against and `scripts/install` can put the usual symlinks
//! (`libferrocomm.so -> libferrocomm.so.<ABI> -> libferrocomm.so.<version>`) beside it.
//!
//! `ABI` changes exactly when the C ABI changes incompatibly (a function's signature or
//! meaning, a value of ferrocomm_dtype/ferrocomm_op/ferrocomm_result, a structure's
//! layout); adding functions or values does not change it.

/// The ABI version in the SONAME; scripts/install reads it from here.
const ABI: &str = "0";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libferrocomm.so.{ABI}");
        build_tree_link();
    }
}

/// A program linked against the build tree (`-L target/release -lferrocomm -Wl,-rpath,...`,
/// as the README shows) asks the loader for the SONAME, `libferrocomm.so.<ABI>`: the
/// symlink `target/<profile>/libferrocomm.so.<ABI> -> libferrocomm.so` makes it find the
/// library built there. Best effort: a failure only warns.
#[cfg(not(unix))]
fn build_tree_link() {}

/// See above.
#[cfg(unix)]
fn build_tree_link() {
    // OUT_DIR is target/<profile>/build/ferrocomm-ffi-<hash>/out.
    let Some(out) = std::env::var_os("OUT_DIR") else {
        return;
    };
    let Some(profile) = std::path::Path::new(&out).ancestors().nth(3) else {
        return;
    };
    let link = profile.join(format!("libferrocomm.so.{ABI}"));
    if std::fs::symlink_metadata(&link).is_ok() {
        return;
    }
    if let Err(e) = std::os::unix::fs::symlink("libferrocomm.so", &link) {
        println!(
            "cargo:warning=cannot make {}: {e}; programs linked against the build tree will \
             not find the library",
            link.display()
        );
    }
}
