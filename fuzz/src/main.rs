//! One libFuzzer binary for every target; `FUZZ_TARGET` picks the target (`scripts/fuzz`
//! runs each in turn). Built on stable Rust: libFuzzer comes from `libfuzzer-sys`, coverage
//! from LLVM's SanitizerCoverage pass enabled with stable `-C` flags (see `scripts/fuzz` and
//! docs/security.md).
//!
//! `FUZZ_LIST=1` lists the targets (name, largest input) and exits.
//! `FUZZ_WRITE_SEEDS=DIR` writes the seeds the targets generate (requests, rings, states built
//! by the real code) to `DIR/TARGET/` instead of fuzzing.

#![no_main]

mod api_bodies;
mod config;
mod mem;
mod pci;
mod platform;
mod state;
mod virtio;
mod virtio_targets;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// A target: its name, what runs one input, the largest input worth trying, its generated
/// seeds (targets without them have seeds made by other tools in `fuzz/corpus/`).
struct Target {
    name: &'static str,
    run: fn(&[u8]),
    max_len: usize,
    seeds: Option<fn() -> Vec<Vec<u8>>>,
}

macro_rules! virtio_target {
    ($name:literal) => {
        Target {
            name: $name,
            run: |d| virtio_targets::device($name, d),
            max_len: 32768,
            seeds: Some(|| virtio_targets::seeds($name)),
        }
    };
}

const TARGETS: &[Target] = &[
    Target {
        name: "qcow2",
        run: block::fuzz::fuzz_qcow2,
        max_len: 65536,
        seeds: None,
    },
    Target {
        name: "vhdx",
        run: block::fuzz::fuzz_vhdx,
        max_len: 32768,
        seeds: None,
    },
    Target {
        name: "vhd",
        run: block::fuzz::fuzz_vhd,
        max_len: 8192,
        seeds: None,
    },
    Target {
        name: "vmdk_descriptor",
        run: vmdk_descriptor,
        max_len: 4096,
        seeds: Some(vmdk_seeds),
    },
    Target {
        name: "api_requests",
        run: api::fuzz::fuzz_requests,
        max_len: 16384,
        seeds: Some(api_bodies::request_seeds),
    },
    Target {
        name: "api_bodies",
        run: api_bodies::bodies,
        max_len: 8192,
        seeds: Some(api_bodies::seeds),
    },
    Target {
        name: "config_options",
        run: config::options,
        max_len: 1024,
        seeds: Some(config::seeds),
    },
    virtio_target!("virtio_blk"),
    virtio_target!("virtio_net"),
    virtio_target!("virtio_console"),
    virtio_target!("virtio_rng"),
    virtio_target!("virtio_vsock"),
    virtio_target!("virtio_balloon"),
    virtio_target!("virtio_mem"),
    virtio_target!("virtio_pmem"),
    virtio_target!("virtio_watchdog"),
    virtio_target!("virtio_rtc"),
    virtio_target!("virtio_iommu"),
    Target {
        name: "pci",
        run: pci::segment,
        max_len: 16384,
        seeds: Some(pci::seeds),
    },
    Target {
        name: "platform_io",
        run: platform::ports,
        max_len: 4096,
        seeds: Some(platform::seeds),
    },
    Target {
        name: "state_json",
        run: state::state_json,
        max_len: 65536,
        seeds: Some(state::state_seeds),
    },
    Target {
        name: "migration",
        run: state::migration,
        max_len: 65536,
        seeds: Some(state::migration_seeds),
    },
    Target {
        name: "migration_faults",
        run: state::migration_faults,
        max_len: 4096,
        seeds: Some(state::migration_faults_seeds),
    },
];

/// A flat VMDK's descriptor, as opening one reads it: what it accepts adds up within 2^64
/// bytes and names no file outside its folder.
fn vmdk_descriptor(data: &[u8]) {
    if let Ok(extents) = block::vmdk::parse_descriptor(data) {
        let total = extents
            .iter()
            .try_fold(0u64, |t, e| t.checked_add(e.sectors.checked_mul(512)?));
        assert!(total.is_some(), "{extents:?}");
    }
}

fn vmdk_seeds() -> Vec<Vec<u8>> {
    [
        "# Disk DescriptorFile\nversion=1\nCID=52b4a1c2\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\n# Extent description\nRW 8192 FLAT \"d-flat.vmdk\" 0\n\n\
         # The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n",
        "# Disk DescriptorFile\ncreateType=\"twoGbMaxExtentFlat\"\n\
         RW 4194304 FLAT \"big-f001.vmdk\" 0\nRW 4194304 FLAT \"big-f002.vmdk\" 0\n\
         RDONLY 2048 VMFS \"o.vmdk\" 16\nRW 100 ZERO\nNOACCESS 8 FLAT \"x\"\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

static RUN: OnceLock<fn(&[u8])> = OnceLock::new();

fn write_seeds(dir: &str) -> std::io::Result<()> {
    for t in TARGETS {
        let Some(seeds) = t.seeds else { continue };
        let d = std::path::Path::new(dir).join(t.name);
        std::fs::create_dir_all(&d)?;
        for (i, s) in seeds().iter().enumerate() {
            assert!(s.len() <= t.max_len, "{}: seed {i} is over max_len", t.name);
            std::fs::write(d.join(format!("seed-{i}")), s)?;
        }
    }
    Ok(())
}

fn init() {
    if let Ok(dir) = std::env::var("FUZZ_WRITE_SEEDS") {
        if let Err(e) = write_seeds(&dir) {
            eprintln!("ch-fuzz: writing seeds to {dir}: {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    if std::env::var_os("FUZZ_LIST").is_some() {
        for t in TARGETS {
            println!("{} {}", t.name, t.max_len);
        }
        std::process::exit(0);
    }
    let name = std::env::var("FUZZ_TARGET").unwrap_or_default();
    match TARGETS.iter().find(|t| t.name == name) {
        Some(t) => {
            let _ = RUN.set(t.run);
        }
        None => {
            let names: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
            eprintln!(
                "ch-fuzz: set FUZZ_TARGET to one of: {} (got '{name}')",
                names.join(" ")
            );
            std::process::exit(2);
        }
    }
}

/// Open descriptors now (`/proc/self/fd` entries).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A target that leaks descriptors (a reference cycle holding eventfds, a file never closed)
/// fails as itself, with the input that showed it, not minutes later as "too many open files":
/// every `FD_CHECK_EVERY` inputs the count is compared with the one after the first round.
const FD_CHECK_EVERY: u64 = 4096;
const FD_SLACK: usize = 64;

fn check_fds() {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    static RUNS: AtomicU64 = AtomicU64::new(0);
    static BASE: AtomicUsize = AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    if !n.is_multiple_of(FD_CHECK_EVERY) {
        return;
    }
    let now = open_fds();
    let base = BASE.load(Ordering::Relaxed);
    if base == 0 {
        BASE.store(now, Ordering::Relaxed);
    } else if now > base + FD_SLACK {
        panic!("ch-fuzz: the target leaks file descriptors: {now} open after {n} inputs, {base} after {FD_CHECK_EVERY}");
    }
}

fuzz_target!(init: init(), |data: &[u8]| {
    if let Some(run) = RUN.get() {
        run(data);
        check_fds();
    }
});
