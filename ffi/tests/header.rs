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
