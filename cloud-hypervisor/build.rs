//! Lays out the release VMM's code so that what a boot and the API run sits together at the
//! start of `.text` (`symbol-order.txt`, made by `scripts/symbol-order`). The kernel maps a
//! binary's file pages in large runs around each page fault, so code spread over the whole
//! binary makes nearly all of it resident; grouped, about a third is (docs/architecture.md,
//! "Start-up and footprint"). Names missing from a build (the list went stale) are skipped.
//!
//! It also packs the binary's relative relocations (`-z pack-relative-relocs`, DT_RELR): the
//! static start-up reads every relocation once, and 4,500 of them took 27 pages (108 KiB) of
//! the read-only segment; packed, they take 2 KiB. Only where the C library that is linked in
//! applies them (glibc 2.36 and later); an older one would start with its pointers unrelocated.

use std::path::Path;
use std::process::Command;

fn main() {
    let list = Path::new(env!("CARGO_MANIFEST_DIR")).join("symbol-order.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("PROFILE").as_deref() != Ok("release") || !list.exists() {
        return;
    }
    // The option is lld's: rustc links x86_64 Linux targets with its own lld from 1.90 on.
    let target = std::env::var("TARGET").unwrap_or_default();
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let minor = version(&rustc, "--version").map(|(_, minor)| minor);
    if target != "x86_64-unknown-linux-gnu" || minor.is_none_or(|m| m < 90) {
        println!("cargo:warning=code layout by symbol-order.txt skipped (needs rustc >= 1.90 linking with lld)");
        return;
    }
    println!(
        "cargo:rustc-link-arg-bin=cloud-hypervisor=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    println!("cargo:rustc-link-arg-bin=cloud-hypervisor=-Wl,--no-warn-symbol-ordering");
    if glibc_applies_relr() {
        println!("cargo:rustc-link-arg-bin=cloud-hypervisor=-Wl,-z,pack-relative-relocs");
    } else {
        println!("cargo:warning=relative relocations left unpacked (needs glibc >= 2.36)");
    }
}

/// Whether the C library is glibc 2.36 or later, whose static start-up applies DT_RELR.
fn glibc_applies_relr() -> bool {
    version("getconf", "GNU_LIBC_VERSION").is_some_and(|v| v >= (2, 36))
}

/// The major and minor version `program arg` prints as its second word ("rustc 1.91.0 ...",
/// "glibc 2.36"); None if it cannot be run or says something else.
fn version(program: &str, arg: &str) -> Option<(u32, u32)> {
    let out = Command::new(program).arg(arg).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut numbers = text.split_whitespace().nth(1)?.split('.');
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}
