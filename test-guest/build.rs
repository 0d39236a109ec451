//! Passes the linker script to the link of the guest binary (absolute path, so the
//! link works whatever directory cargo is started from).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set by cargo");
    println!("cargo:rustc-link-arg-bins=-Wl,-T{dir}/link.ld");
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=src/monitor.S");
    println!("cargo:rerun-if-changed=build.rs");
}
