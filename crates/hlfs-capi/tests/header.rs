//! include/hlfs.h is what cbindgen makes of src/lib.rs, so the header in
//! the repo never drifts from the library. HLFS_WRITE_HEADER=1 writes it.

use std::path::Path;

#[test]
fn the_header_is_what_cbindgen_makes_of_the_library() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut made = Vec::new();
    cbindgen::generate(dir)
        .expect("cbindgen reads the crate")
        .write(&mut made);
    let path = dir.join("include/hlfs.h");
    if std::env::var_os("HLFS_WRITE_HEADER").is_some() {
        std::fs::write(&path, &made).unwrap();
    }
    let kept = std::fs::read(&path).unwrap_or_default();
    assert!(
        kept == made,
        "{} is out of date: run HLFS_WRITE_HEADER=1 cargo test -p hlfs-capi --test header",
        path.display()
    );
}
