//! Loading a kernel and handing it what its boot protocol promises: PVH `hvm_start_info` for
//! an ELF with a PVH entry note, Linux `boot_params` for a bzImage or a plain ELF vmlinux.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use guest_memory::GuestMemoryMmap;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{self, MemoryKind};

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BZIMAGE_HDR_OFFSET: u64 = 0x202;
const BOOT_FLAG: u16 = 0xaa55;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Alignment Linux assumes when the kernel image did not tell us one (plain ELF vmlinux).
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;
const PVH_MAGIC: u32 = 0x336e_c578;
const E820_MAX_ENTRIES: usize = 128;
/// 64-bit entry point of a bzImage, relative to where its protected-mode part is loaded.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read: {0}")]
    Read(#[source] std::io::Error),
    #[error("the image is neither an ELF nor a bzImage")]
    UnknownFormat,
    #[error("cannot load the image: {0}")]
    Load(#[source] linux_loader::loader::Error),
    #[error("the image ({kernel} bytes) does not fit in guest memory below 3 GiB ({ram} bytes)")]
    KernelTooBig { kernel: u64, ram: u64 },
    #[error("the command line is {0} bytes; at most {max} fit", max = layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("the initramfs ({size} bytes) does not fit in guest memory above the kernel")]
    InitramfsTooBig { size: u64 },
    #[error("cannot read the initramfs: {0}")]
    InitramfsRead(#[source] std::io::Error),
    #[error("cannot write boot data into guest memory: {0}")]
    Memory(String),
}

pub type Result<T> = std::result::Result<T, BootError>;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 32-bit protected mode, `ebx` = `hvm_start_info`.
    Pvh,
    /// 64-bit long mode, `rsi` = `boot_params`.
    Linux64,
}

#[derive(Clone, Copy, Debug)]
pub struct EntryPoint {
    pub addr: GuestAddress,
    pub protocol: BootProtocol,
}

/// What loading the kernel produced, before the boot data is written.
pub struct LoadedKernel {
    pub entry: EntryPoint,
    kernel_end: u64,
    setup_header: Option<setup_header>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn detect(kernel: &mut File) -> Result<Format> {
    let mut magic = [0u8; 4];
    kernel.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    if kernel.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC {
        return Ok(Format::Elf);
    }
    kernel
        .seek(SeekFrom::Start(BZIMAGE_HDR_OFFSET))
        .map_err(BootError::Read)?;
    if kernel.read_exact(&mut magic).is_ok() && u32::from_le_bytes(magic) == BZIMAGE_HDR_MAGIC {
        return Ok(Format::BzImage);
    }
    Err(BootError::UnknownFormat)
}

fn low_ram_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .filter(|&end| end <= layout::MEM_32BIT_RESERVED_START.0)
        .max()
        .unwrap_or(0)
}

/// Loads the kernel into guest memory and works out its entry point.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel> {
    let format = detect(kernel)?;
    let size = kernel.metadata().map_err(BootError::Read)?.len();
    let ram = low_ram_end(mem);
    if size > ram.saturating_sub(layout::HIGH_RAM_START.0) {
        return Err(BootError::KernelTooBig { kernel: size, ram });
    }
    let start = Some(layout::HIGH_RAM_START);
    let too_big = |e| match e {
        linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::ReadKernelImage
            | linux_loader::loader::elf::Error::InvalidProgramHeaderAddress,
        )
        | linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
        ) => BootError::KernelTooBig { kernel: size, ram },
        e => BootError::Load(e),
    };
    match format {
        Format::Elf => {
            let r = Elf::load(mem, None, kernel, start).map_err(too_big)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint {
                    addr,
                    protocol: BootProtocol::Pvh,
                },
                _ => EntryPoint {
                    addr: GuestAddress(elf_entry(kernel)?),
                    protocol: BootProtocol::Linux64,
                },
            };
            Ok(LoadedKernel {
                entry,
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
        Format::BzImage => {
            let r = BzImage::load(mem, None, kernel, start).map_err(too_big)?;
            Ok(LoadedKernel {
                entry: EntryPoint {
                    addr: r.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                    protocol: BootProtocol::Linux64,
                },
                kernel_end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}

fn elf_entry(kernel: &mut File) -> Result<u64> {
    // e_entry of an ELF64 header.
    let mut b = [0u8; 8];
    kernel
        .seek(SeekFrom::Start(0x18))
        .map_err(BootError::Read)?;
    kernel.read_exact(&mut b).map_err(BootError::Read)?;
    Ok(u64::from_le_bytes(b))
}

/// Where the initramfs went.
#[derive(Clone, Copy, Debug)]
struct Initramfs {
    addr: GuestAddress,
    size: u64,
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    file: &mut File,
) -> Result<Initramfs> {
    let size = file.metadata().map_err(BootError::InitramfsRead)?.len();
    let mut top = low_ram_end(mem);
    if let Some(hdr) = kernel.setup_header {
        // The kernel says how high it can reach an initrd.
        let max = u64::from(hdr.initrd_addr_max);
        if max != 0 {
            top = top.min(max + 1);
        }
    }
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel.kernel_end && a >= layout::HIGH_RAM_START.0)
        .ok_or(BootError::InitramfsTooBig { size })?;
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::InitramfsRead)?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
        .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok(Initramfs {
        addr: GuestAddress(addr),
        size,
    })
}

/// Writes the command line, the initramfs and the protocol's boot data.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    ram_size: u64,
    cmdline: &str,
    initramfs: Option<&mut File>,
    rsdp: Option<GuestAddress>,
) -> Result<()> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, layout::CMDLINE_START)
        .map_err(|e| BootError::Memory(e.to_string()))?;

    let initramfs = initramfs
        .map(|f| load_initramfs(mem, kernel, f))
        .transpose()?;
    let map = layout::memory_map(ram_size);
    match kernel.entry.protocol {
        BootProtocol::Pvh => write_pvh(mem, &map, bytes.len(), initramfs, rsdp),
        BootProtocol::Linux64 => write_boot_params(mem, kernel, &map, bytes.len(), initramfs, rsdp),
    }
}

fn write_pvh(
    mem: &GuestMemoryMmap,
    map: &[layout::MemoryMapEntry],
    _cmdline_len: usize,
    initramfs: Option<Initramfs>,
    rsdp: Option<GuestAddress>,
) -> Result<()> {
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START.0,
        memmap_paddr: layout::MEMMAP_START.0,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.map_or(0, |a| a.0),
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.code(),
            reserved: 0,
        })
        .collect();
    if initramfs.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = layout::MODLIST_START.0;
    }
    let mut params = BootParams::new(&info, layout::PVH_INFO_START);
    params.set_sections(&entries, layout::MEMMAP_START);
    if let Some(i) = initramfs {
        let module = hvm_modlist_entry {
            paddr: i.addr.0,
            size: i.size,
            ..Default::default()
        };
        params.set_modules(&[module], layout::MODLIST_START);
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
        .map_err(|e| BootError::Memory(e.to_string()))
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    map: &[layout::MemoryMapEntry],
    cmdline_len: usize,
    initramfs: Option<Initramfs>,
    rsdp: Option<GuestAddress>,
) -> Result<()> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = BZIMAGE_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(i) = initramfs {
        params.hdr.ramdisk_image = i.addr.0 as u32;
        params.hdr.ramdisk_size = i.size as u32;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }
    if map.len() > E820_MAX_ENTRIES {
        return Err(BootError::Memory("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: match e.kind {
                MemoryKind::Ram => 1,
                MemoryKind::Reserved => 2,
            },
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_slice(params.as_slice(), layout::ZERO_PAGE_START)
        .map_err(|e| BootError::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        let regions: Vec<_> = layout::ram_regions(size)
            .into_iter()
            .map(|(a, l)| (a, l as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&regions).unwrap()
    }

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = vmm_temp_file();
        f.write_all(bytes).unwrap();
        f
    }

    fn vmm_temp_file() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "arch-boot-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn rejects_unknown_formats() {
        let mut f = temp_file(&[0x55u8; 4096]);
        assert!(matches!(
            load_kernel(&mem(64 << 20), &mut f),
            Err(BootError::UnknownFormat)
        ));
        let mut empty = temp_file(&[]);
        assert!(matches!(
            load_kernel(&mem(64 << 20), &mut empty),
            Err(BootError::UnknownFormat)
        ));
    }

    #[test]
    fn rejects_kernels_bigger_than_ram() {
        let mut img = vec![0u8; 3 << 20];
        img[..4].copy_from_slice(&ELF_MAGIC);
        let mut f = temp_file(&img);
        assert!(matches!(
            load_kernel(&mem(2 << 20), &mut f),
            Err(BootError::KernelTooBig { .. })
        ));
    }

    #[test]
    fn pvh_start_info_describes_memory_cmdline_and_module() {
        let m = mem(256 << 20);
        let kernel = LoadedKernel {
            entry: EntryPoint {
                addr: GuestAddress(0x100000),
                protocol: BootProtocol::Pvh,
            },
            kernel_end: 0x200000,
            setup_header: None,
        };
        let mut initrd = temp_file(b"initramfs!");
        configure_boot(
            &m,
            &kernel,
            256 << 20,
            "console=ttyS0 test=boot",
            Some(&mut initrd),
            Some(layout::RSDP_POINTER),
        )
        .unwrap();
        let info: hvm_start_info = m.read_obj(layout::PVH_INFO_START).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        assert_eq!(info.rsdp_paddr, layout::RSDP_POINTER.0);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(module.size, 10);
        assert_eq!(module.paddr % PAGE_SIZE, 0);
        let mut data = [0u8; 10];
        m.read_slice(&mut data, GuestAddress(module.paddr)).unwrap();
        assert_eq!(&data, b"initramfs!");
        let mut ram = 0;
        for i in 0..info.memmap_entries as u64 {
            let e: hvm_memmap_table_entry = m
                .read_obj(GuestAddress(info.memmap_paddr + i * 24))
                .unwrap();
            if e.type_ == 1 {
                ram += e.size;
            }
        }
        assert_eq!(ram, (256 << 20) - (0x100000 - 0x9fc00));
        let mut cmdline = [0u8; 24];
        m.read_slice(&mut cmdline, layout::CMDLINE_START).unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 test=boot\0");
    }

    #[test]
    fn boot_params_for_plain_elf() {
        let m = mem(5 << 30);
        let kernel = LoadedKernel {
            entry: EntryPoint {
                addr: GuestAddress(0x100200),
                protocol: BootProtocol::Linux64,
            },
            kernel_end: 0x200000,
            setup_header: None,
        };
        configure_boot(&m, &kernel, 5 << 30, "x", None, Some(layout::RSDP_POINTER)).unwrap();
        let p: boot_params = m.read_obj(layout::ZERO_PAGE_START).unwrap();
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START.0 as u32);
        assert_eq!({ p.acpi_rsdp_addr }, layout::RSDP_POINTER.0);
        assert_eq!(p.e820_entries, 4);
        assert_eq!({ p.e820_table[3].addr }, 1 << 32);
        assert_eq!({ p.e820_table[3].size }, 2 << 30);
    }

    #[test]
    fn cmdline_limits_and_initramfs_too_big() {
        let m = mem(8 << 20);
        let kernel = LoadedKernel {
            entry: EntryPoint {
                addr: GuestAddress(0x100000),
                protocol: BootProtocol::Pvh,
            },
            kernel_end: 0x400000,
            setup_header: None,
        };
        let long = "a".repeat(layout::CMDLINE_MAX_SIZE);
        assert!(matches!(
            configure_boot(&m, &kernel, 8 << 20, &long, None, None),
            Err(BootError::CmdlineTooLong(_))
        ));
        let mut big = temp_file(&vec![1u8; 6 << 20]);
        assert!(matches!(
            configure_boot(&m, &kernel, 8 << 20, "", Some(&mut big), None),
            Err(BootError::InitramfsTooBig { .. })
        ));
    }
}
