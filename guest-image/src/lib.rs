//! Builds the freestanding test guest (`test-guest/`, see docs/test-guest.md) and
//! packages it three ways for the VMM's integration tests:
//!
//! * `elf_pvh`: the linked ELF, with the `XEN_ELFNOTE_PHYS32_ENTRY` note (PVH boot),
//! * `elf_linux`: the same ELF with the note removed (Linux 64-bit boot at `e_entry`),
//! * `bzimage`: a Linux boot-protocol image whose protected-mode part is the flat
//!   image loaded at 0x100000 (64-bit entry at load address + 0x200).
//!
//! `build()` runs `cargo build --release` in `test-guest/` (its own target dir, so
//! cargo's lock serialises concurrent calls from parallel tests) and rewrites the
//! packaged files atomically (temp file + rename), only when their content changed.

mod elf;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Address the guest is linked and loaded at.
pub const LOAD_ADDRESS: u64 = 0x10_0000;
/// The Linux 64-bit entry point (load address + 0x200), also the ELF `e_entry`.
pub const ENTRY64: u64 = LOAD_ADDRESS + 0x200;

/// Paths of the packaged test guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifacts {
    pub elf_pvh: PathBuf,
    pub elf_linux: PathBuf,
    pub bzimage: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot run {cargo:?}: {source}")]
    CargoSpawn {
        cargo: OsString,
        #[source]
        source: std::io::Error,
    },
    #[error("building the test guest failed ({status}):\n{stderr}")]
    CargoFailed {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("test guest ELF: {0}")]
    BadElf(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The `test-guest/` source directory.
pub fn test_guest_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../test-guest");
    fs::canonicalize(&dir).unwrap_or(dir)
}

/// Where the packaged images are written.
pub fn output_dir() -> PathBuf {
    test_guest_dir().join("target/guest-image")
}

fn cargo_command() -> OsString {
    std::env::var_os("CARGO")
        .unwrap_or_else(|| OsString::from(option_env!("CARGO").unwrap_or("cargo")))
}

/// Builds the test guest (incrementally) and returns the packaged artefacts.
pub fn build() -> Result<Artifacts, Error> {
    let dir = test_guest_dir();
    let cargo = cargo_command();
    // Run from test-guest/ so its .cargo/config.toml (target, linker flags) applies, and
    // drop what an outer cargo (e.g. `cargo test` of the workspace) may have exported.
    let out = Command::new(&cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(dir.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .output()
        .map_err(|source| Error::CargoSpawn {
            cargo: cargo.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::CargoFailed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let elf_path = dir.join("target/x86_64-unknown-linux-gnu/release/test-guest");
    let elf_bytes = fs::read(&elf_path).map_err(io_err(&elf_path))?;
    package(&elf_bytes, &output_dir())
}

/// Produces the three artefacts from the linked guest ELF into `out_dir`.
pub fn package(elf_bytes: &[u8], out_dir: &Path) -> Result<Artifacts, Error> {
    let parsed = elf::parse(elf_bytes)?;
    if parsed.entry != ENTRY64 {
        return Err(Error::BadElf(format!(
            "e_entry {:#x}, expected {ENTRY64:#x}",
            parsed.entry
        )));
    }
    if elf::find_pvh_note(elf_bytes, &parsed)?.is_none() {
        return Err(Error::BadElf(
            "no PVH (XEN_ELFNOTE_PHYS32_ENTRY) note".into(),
        ));
    }
    let linux_elf = elf::strip_pvh_note(elf_bytes)?;
    let bzimage = make_bzimage(elf_bytes)?;

    fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    let a = Artifacts {
        elf_pvh: out_dir.join("test-guest-pvh.elf"),
        elf_linux: out_dir.join("test-guest-linux.elf"),
        bzimage: out_dir.join("test-guest.bzImage"),
    };
    write_if_changed(&a.elf_pvh, elf_bytes)?;
    write_if_changed(&a.elf_linux, &linux_elf)?;
    write_if_changed(&a.bzimage, &bzimage)?;
    Ok(a)
}

/// Writes `data` to `path` via a temp file and rename, unless it already holds it.
fn write_if_changed(path: &Path, data: &[u8]) -> Result<(), Error> {
    if fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp.{}.{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, data).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io_err(path)(e)
    })
}

// Setup header (Documentation/arch/x86/boot.rst), offsets from the start of the file.
const SETUP_SECTS: u8 = 1;
const SETUP_SIZE: usize = (SETUP_SECTS as usize + 1) * 512;
const BOOT_PROTOCOL: u16 = 0x020c;
const LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Wraps the flat image in a Linux boot-protocol (bzImage) header. The payload is not
/// compressed: it is the image itself, loaded at `code32_start` = 0x100000 and
/// entered in 64-bit mode at +0x200. The 16-bit real-mode entry just halts.
pub fn make_bzimage(elf_bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let parsed = elf::parse(elf_bytes)?;
    let (base, flat, memsz) = elf::flat_image(elf_bytes, &parsed)?;
    if base != LOAD_ADDRESS {
        return Err(Error::BadElf(format!(
            "image starts at {base:#x}, expected {LOAD_ADDRESS:#x}"
        )));
    }
    let mut setup = vec![0u8; SETUP_SIZE];
    put(&mut setup, 0x1f1, &[SETUP_SECTS]);
    put(
        &mut setup,
        0x1f4,
        &(flat.len().div_ceil(16) as u32).to_le_bytes(),
    ); // syssize
    put(&mut setup, 0x1fa, &0xffffu16.to_le_bytes()); // vid_mode: normal
    put(&mut setup, 0x1fe, &0xaa55u16.to_le_bytes()); // boot_flag
                                                      // 0x200: jump over the header to the real-mode stub at 0x280 (cli; hlt; jmp).
    put(&mut setup, 0x200, &[0xeb, 0x7e]);
    put(&mut setup, 0x280, &[0xfa, 0xf4, 0xeb, 0xfd]);
    put(&mut setup, 0x202, b"HdrS");
    put(&mut setup, 0x206, &BOOT_PROTOCOL.to_le_bytes());
    put(&mut setup, 0x20c, &0x1000u16.to_le_bytes()); // start_sys_seg (obsolete)
    const VERSION_AT: usize = 0x300;
    put(&mut setup, VERSION_AT, b"test-guest\0");
    put(
        &mut setup,
        0x20e,
        &((VERSION_AT - 0x200) as u16).to_le_bytes(),
    ); // kernel_version
    put(&mut setup, 0x211, &[LOADED_HIGH]);
    put(&mut setup, 0x212, &0x8000u16.to_le_bytes()); // setup_move_size
    put(&mut setup, 0x214, &(LOAD_ADDRESS as u32).to_le_bytes()); // code32_start
    put(&mut setup, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut setup, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut setup, 0x234, &[0]); // relocatable_kernel: no
    put(&mut setup, 0x235, &[12]); // min_alignment (log2)
    put(&mut setup, 0x236, &XLF_KERNEL_64.to_le_bytes()); // xloadflags
    put(&mut setup, 0x238, &4095u32.to_le_bytes()); // cmdline_size
    put(&mut setup, 0x258, &LOAD_ADDRESS.to_le_bytes()); // pref_address
    let init_size = u32::try_from(memsz.next_multiple_of(4096))
        .map_err(|_| Error::BadElf("image too large".into()))?;
    put(&mut setup, 0x260, &init_size.to_le_bytes());
    let mut out = setup;
    out.extend_from_slice(&flat);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::bzimage::BzImage;
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    use linux_loader::loader::KernelLoader;
    use std::fs::File;
    use std::sync::OnceLock;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn artifacts() -> &'static Artifacts {
        static A: OnceLock<Artifacts> = OnceLock::new();
        A.get_or_init(|| build().expect("building the test guest"))
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    /// Address of a symbol in the guest ELF (the build keeps its symbol table).
    fn symbol(name: &str) -> u64 {
        let a = artifacts();
        let out = Command::new("nm").arg(&a.elf_pvh).output().expect("nm");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let mut it = l.split_whitespace();
                let (addr, _, sym) = (it.next()?, it.next()?, it.next()?);
                (sym == name).then(|| u64::from_str_radix(addr, 16).unwrap())
            })
            .unwrap_or_else(|| panic!("symbol {name} not found"))
    }

    #[test]
    fn bzimage_loads_at_1mib_with_expected_header() {
        let a = artifacts();
        let mem = memory();
        let mut f = File::open(&a.bzimage).unwrap();
        let r = BzImage::load(&mem, None, &mut f, Some(GuestAddress(LOAD_ADDRESS))).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(LOAD_ADDRESS));
        let h = r.setup_header.expect("bzImage has a setup header");
        let (header, version, loadflags, xloadflags) =
            (h.header, h.version, h.loadflags, h.xloadflags);
        let (code32, pref, boot_flag, setup_sects) =
            (h.code32_start, h.pref_address, h.boot_flag, h.setup_sects);
        assert_eq!(header, 0x5372_6448); // "HdrS"
        assert!(version >= 0x020c);
        assert_eq!(boot_flag, 0xaa55);
        assert_eq!(setup_sects, SETUP_SECTS);
        assert_ne!(loadflags & LOADED_HIGH, 0);
        assert_ne!(xloadflags & XLF_KERNEL_64, 0);
        assert_eq!(code32, LOAD_ADDRESS as u32);
        assert_eq!(pref, LOAD_ADDRESS);
        let init_size = h.init_size;
        assert!(u64::from(init_size) >= r.kernel_end - LOAD_ADDRESS);

        // The loaded bytes are exactly the ELF's loadable image.
        let elf_bytes = fs::read(&a.elf_pvh).unwrap();
        let (_, flat, _) = elf::flat_image(&elf_bytes, &elf::parse(&elf_bytes).unwrap()).unwrap();
        let mut loaded = vec![0u8; flat.len()];
        mem.read_slice(&mut loaded, GuestAddress(LOAD_ADDRESS))
            .unwrap();
        assert_eq!(loaded, flat);
        assert_eq!(symbol("linux_entry64"), ENTRY64);
        // The 64-bit entry starts with `cli`.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(ENTRY64)).unwrap(), 0xfa);
    }

    #[test]
    fn pvh_elf_has_pvh_entry() {
        let a = artifacts();
        let mem = memory();
        let mut f = File::open(&a.elf_pvh).unwrap();
        let r = Elf::load(&mem, None, &mut f, Some(GuestAddress(LOAD_ADDRESS))).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(ENTRY64));
        let entry = symbol("pvh_entry32");
        assert!((LOAD_ADDRESS..ENTRY64).contains(&entry));
        assert_eq!(
            r.pvh_boot_cap,
            PvhBootCapability::PvhEntryPresent(GuestAddress(entry))
        );
    }

    #[test]
    fn linux_elf_has_no_pvh_entry_and_same_image() {
        let a = artifacts();
        let mem = memory();
        let mut f = File::open(&a.elf_linux).unwrap();
        let r = Elf::load(&mem, None, &mut f, Some(GuestAddress(LOAD_ADDRESS))).unwrap();
        assert_eq!(r.kernel_load, GuestAddress(ENTRY64));
        assert_eq!(r.pvh_boot_cap, PvhBootCapability::PvhEntryNotPresent);

        let pvh_mem = memory();
        let mut f = File::open(&a.elf_pvh).unwrap();
        let r2 = Elf::load(&pvh_mem, None, &mut f, Some(GuestAddress(LOAD_ADDRESS))).unwrap();
        assert_eq!(r.kernel_end, r2.kernel_end);
        // Only the note's type differs between the two loaded images.
        let len = (r.kernel_end - LOAD_ADDRESS) as usize;
        let (mut x, mut y) = (vec![0u8; len], vec![0u8; len]);
        mem.read_slice(&mut x, GuestAddress(LOAD_ADDRESS)).unwrap();
        pvh_mem
            .read_slice(&mut y, GuestAddress(LOAD_ADDRESS))
            .unwrap();
        let diff: Vec<usize> = (0..len).filter(|&i| x[i] != y[i]).collect();
        assert!(
            diff.iter().all(|&i| (8..12).contains(&i)),
            "differences at {diff:?}"
        );
    }

    #[test]
    fn build_is_idempotent() {
        let a = artifacts();
        let before = fs::metadata(&a.bzimage).unwrap().modified().unwrap();
        let again = build().unwrap();
        assert_eq!(&again, a);
        assert_eq!(
            fs::metadata(&a.bzimage).unwrap().modified().unwrap(),
            before
        );
    }

    #[test]
    fn package_rejects_non_elf() {
        let dir = std::env::temp_dir().join(format!("guest-image-test-{}", std::process::id()));
        assert!(matches!(
            package(b"not an elf", &dir),
            Err(Error::BadElf(_))
        ));
    }
}
