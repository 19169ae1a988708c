//! Gives libhlfs.so a soname, so programs link against the ABI version
//! (libhlfs.so.0) rather than the file they were built with.
fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libhlfs.so.0");
}
