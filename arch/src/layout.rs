//! Guest physical memory layout of the x86-64 platform. `docs/platform.md` describes it for
//! guest authors; the two must change together.

use vm_memory::GuestAddress;

/// Boot GDT used for the 64-bit entry.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (one entry: the initramfs).
pub const MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map entries.
pub const MEMMAP_START: GuestAddress = GuestAddress(0x6100);
/// Linux `boot_params` ("zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Boot page tables: PML4, PDPT, PD.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the EBDA / legacy reserved range.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// ACPI RSDP; the other tables follow it.
pub const RSDP_POINTER: GuestAddress = GuestAddress(0xe0000);
/// SMBIOS: the 3.0 (64-bit) entry point here, its structure table right after it, all below
/// `SMBIOS_END`. 0xf0000 is the start of the range the SMBIOS specification has guests search
/// (and where firmware for the original, e.g. its edk2 `CloudHv` platform, reads it).
pub const SMBIOS_START: GuestAddress = GuestAddress(0xf_0000);
pub const SMBIOS_END: GuestAddress = GuestAddress(0x10_0000);
/// End of the part of the legacy reserved range where the ACPI tables live (the VM generation
/// ID, then SMBIOS, follow). The largest tables (254 vCPUs with PCI) take about 17 KiB of the
/// 60 KiB from `RSDP_POINTER`.
pub const ACPI_END: GuestAddress = VMGENID_START;
/// The VM generation ID: 16 bytes the VMM rewrites with a fresh random value at boot and after
/// every restore (`devices::vmgenid`), announced by bit 1 of the GED. The DSDT's `\_SB_.VGEN`
/// gives the guest this address (`ADDR`). It lies in the legacy reserved range (reserved in the
/// memory map, so the guest never allocates it) in a page of its own between the ACPI tables
/// and SMBIOS, and guest RAM backs it. 8-byte aligned and within one page, as Microsoft's
/// generation ID specification asks.
pub const VMGENID_START: GuestAddress = GuestAddress(0xe_f000);
pub const VMGENID_SIZE: u64 = 16;
/// First byte of RAM above the legacy area; kernels load here.
pub const HIGH_RAM_START: GuestAddress = GuestAddress(0x10_0000);

/// The 32-bit device hole: no RAM between these addresses.
pub const MEM_32BIT_RESERVED_START: GuestAddress = GuestAddress(0xc000_0000);
pub const MEM_32BIT_RESERVED_SIZE: u64 = 0x4000_0000;
/// 32-bit PCI MMIO window.
pub const MEM_32BIT_DEVICES_START: GuestAddress = MEM_32BIT_RESERVED_START;
pub const MEM_32BIT_DEVICES_SIZE: u64 = 0x2800_0000;
/// PCI ECAM (MMCONFIG) for segment 0.
pub const PCI_MMCONFIG_START: GuestAddress = GuestAddress(0xe800_0000);
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
/// PCI configuration mechanism #1: address port 0xcf8, data ports 0xcfc-0xcff.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// I/O port window described to the guest for PCI (no I/O BARs are allocated yet).
pub const PCI_IO_WINDOW: (u16, u16) = (0x1000, 0xf000);
/// Most bytes of the 64-bit PCI MMIO window (it starts at the first GiB boundary above RAM).
pub const MEM_64BIT_DEVICES_MAX_SIZE: u64 = 64 << 30;

/// Where the memory that can be hot-plugged lies, for a guest with `ram_size` bytes of RAM:
/// `hotplug_size` bytes from the first GiB boundary above RAM and 4 GiB. Not in the memory
/// map the guest boots with: the hotplug device (virtio-mem) describes it.
pub fn hotplug_region(ram_size: u64, hotplug_size: u64) -> Option<(GuestAddress, u64)> {
    if hotplug_size == 0 {
        return None;
    }
    let ram_end = ram_regions(ram_size)
        .last()
        .map_or(0, |&(start, size)| start.0 + size)
        .max(RAM_64BIT_START.0);
    let start = ram_end.checked_add((1 << 30) - 1)? & !((1 << 30) - 1);
    Some((GuestAddress(start), hotplug_size))
}

/// Every region of guest memory: RAM ([`ram_regions`]), then the hotplug region.
pub fn memory_regions(ram_size: u64, hotplug_size: u64) -> Vec<(GuestAddress, u64)> {
    let mut r = ram_regions(ram_size);
    r.extend(hotplug_region(ram_size, hotplug_size));
    r
}

/// The 64-bit PCI MMIO window `(start, size)` for a guest with `ram_size` bytes of RAM and
/// `hotplug_size` more that can be hot-plugged, and `phys_bits` of guest physical address
/// space; `None` if nothing fits.
pub fn mmio64_window(ram_size: u64, hotplug_size: u64, phys_bits: u8) -> Option<(u64, u64)> {
    let ram_end = match hotplug_region(ram_size, hotplug_size) {
        Some((start, size)) => start.0.checked_add(size)?,
        None => ram_regions(ram_size)
            .get(1)
            .map_or(RAM_64BIT_START.0, |&(start, size)| start.0 + size),
    };
    let start = ram_end.checked_add((1 << 30) - 1)? & !((1 << 30) - 1);
    let limit = 1u64.checked_shl(u32::from(phys_bits))?;
    let size = limit.checked_sub(start)?.min(MEM_64BIT_DEVICES_MAX_SIZE);
    (size > 0).then_some((start, size))
}

/// The PCI hotplug controller's registers (`devices::pci_hotplug`, the DSDT's `\_SB_.PHPR`),
/// between the ECAM range and the IOAPIC.
pub const PCI_HOTPLUG_START: GuestAddress = GuestAddress(0xfea0_0000);
pub const PCI_HOTPLUG_SIZE: u64 = 0x10;
/// The CPU hotplug controller's registers (`devices::cpu_hotplug`, the DSDT's `\_SB_.PRES`).
pub const CPU_HOTPLUG_START: GuestAddress = GuestAddress(0xfea0_1000);
pub const CPU_HOTPLUG_SIZE: u64 = 0xc;
/// The memory hotplug controller's registers (`devices::memory_hotplug`, the DSDT's
/// `\_SB_.MHPC`).
pub const MEMORY_HOTPLUG_START: GuestAddress = GuestAddress(0xfea0_2000);
pub const MEMORY_HOTPLUG_SIZE: u64 = 0x18;

/// The TPM's CRB interface (`devices::tpm`, the DSDT's `\_SB_.TPM2` and the `TPM2` table), at
/// the address the TCG PC Client platform profile fixes for locality 0, as the original.
pub const TPM_START: GuestAddress = GuestAddress(0xfed4_0000);
pub const TPM_SIZE: u64 = 0x1000;

/// IOAPIC and local APIC MMIO.
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
/// RAM beyond what fits below the hole continues here.
pub const RAM_64BIT_START: GuestAddress = GuestAddress(0x1_0000_0000);

/// I/O ports of the platform devices.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u64 = 0x60;
pub const CMOS_PORT: u64 = 0x70;
/// ACPI hardware-reduced sleep control/status and reset register (the original's
/// `CLOUDHV_ACPI_SHUTDOWN_IO_ADDRESS`, which its edk2 firmware uses directly).
pub const ACPI_SLEEP_PORT: u64 = 0x600;
/// Value the guest writes to `ACPI_SLEEP_PORT` (the FADT reset value) to reset.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The ACPI PM timer (4 bytes, a 32-bit counter at 3.579545 MHz): the original's
/// `CLOUDHV_ACPI_TIMER_IO_ADDRESS`, which its edk2 firmware reads directly for its delays.
pub const PM_TIMER_PORT: u64 = 0x608;
pub const PM_TIMER_LEN: u64 = 4;
/// The Generic Event Device's event register (1 byte) and its IOAPIC pin. Clear of the
/// original's ACPI ports (0x600-0x611: sleep/reset, PM timer, and the PM1a blocks it
/// publishes for nested Hyper-V), so its firmware and guests find only what they expect there.
pub const GED_PORT: u64 = 0x620;
pub const GED_IRQ: u32 = 5;

/// SLP_TYP of the S5 (soft-off) state, as named by `\_S5_` in the DSDT.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;

/// Where the guest RAM of `size` bytes lives: below the hole, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MEM_32BIT_RESERVED_START.0);
    let mut regions = vec![(GuestAddress(0), low)];
    if size > low {
        regions.push((RAM_64BIT_START, size - low));
    }
    regions
}

/// One entry of the guest's memory map (e820 or PVH).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
}

impl MemoryKind {
    /// The e820 / PVH type code.
    pub fn code(self) -> u32 {
        match self {
            MemoryKind::Ram => 1,
            MemoryKind::Reserved => 2,
        }
    }
}

/// The memory map a guest with `size` bytes of RAM is told about.
pub fn memory_map(size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START.0,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            addr: EBDA_START.0,
            size: HIGH_RAM_START.0 - EBDA_START.0,
            kind: MemoryKind::Reserved,
        },
    ];
    for (start, len) in ram_regions(size) {
        let start = start.0.max(HIGH_RAM_START.0);
        let end = if start == HIGH_RAM_START.0 {
            len
        } else {
            start + len
        };
        if end > start {
            map.push(MemoryMapEntry {
                addr: start,
                size: end - start,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotplug_region_sits_above_ram_and_4g_and_moves_the_pci_window() {
        assert_eq!(hotplug_region(256 << 20, 0), None);
        assert_eq!(
            hotplug_region(256 << 20, 1 << 30),
            Some((GuestAddress(4 << 30), 1 << 30))
        );
        // 5 GiB of RAM: 3 GiB low, 2 GiB from 4 GiB, so RAM ends at 6 GiB.
        assert_eq!(
            hotplug_region(5 << 30, 512 << 20),
            Some((GuestAddress(6 << 30), 512 << 20))
        );
        assert_eq!(
            memory_regions(5 << 30, 512 << 20).last(),
            Some(&(GuestAddress(6 << 30), 512 << 20))
        );
        assert_eq!(memory_regions(5 << 30, 0), ram_regions(5 << 30));
        assert_eq!(mmio64_window(256 << 20, 0, 46), Some((4 << 30, 64 << 30)));
        // The window starts at the GiB above the hotplug region.
        assert_eq!(
            mmio64_window(256 << 20, 3 << 29, 46),
            Some((6 << 30, 64 << 30))
        );
        assert_eq!(
            mmio64_window(256 << 20, 1 << 30, 33),
            Some((5 << 30, 3 << 30))
        );
        assert_eq!(mmio64_window(256 << 20, 1 << 30, 32), None);
    }

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_is_split_around_the_hole() {
        assert_eq!(
            ram_regions(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (RAM_64BIT_START, 2 << 30)]
        );
    }

    #[test]
    fn memory_map_covers_ram_minus_legacy_hole() {
        let map = memory_map(5 << 30);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - (HIGH_RAM_START.0 - EBDA_START.0));
        assert_eq!(map.last().unwrap().addr, RAM_64BIT_START.0);
    }

    #[test]
    fn vmgenid_lies_in_reserved_ram_between_the_acpi_tables_and_smbios() {
        let (start, end) = (VMGENID_START.0, VMGENID_START.0 + VMGENID_SIZE);
        assert_eq!(start, 0xef000);
        assert!(RSDP_POINTER.0 < ACPI_END.0 && ACPI_END.0 <= start);
        assert!(end <= SMBIOS_START.0);
        assert_eq!(start % 8, 0, "8-byte aligned");
        assert_eq!(start / 4096, (end - 1) / 4096, "within one page");
        for size in [64u64 << 20, 5 << 30] {
            // Backed by guest RAM (the first region starts at 0)...
            let (low, len) = ram_regions(size)[0];
            assert!(low.0 <= start && end <= low.0 + len);
            // ...and reserved in the memory map, so the guest leaves it alone.
            let map = memory_map(size);
            let covering: Vec<_> = map
                .iter()
                .filter(|e| e.addr < end && start < e.addr + e.size)
                .collect();
            assert_eq!(covering.len(), 1, "{map:#x?}");
            assert_eq!(covering[0].kind, MemoryKind::Reserved);
            assert!(covering[0].addr <= start && end <= covering[0].addr + covering[0].size);
        }
    }

    #[test]
    fn platform_ports_are_the_originals_and_do_not_overlap() {
        // Fixed by the original's edk2 firmware (CloudHv.h): shutdown at 0x600, PM timer at 0x608.
        assert_eq!(ACPI_SLEEP_PORT, 0x600);
        assert_eq!((PM_TIMER_PORT, PM_TIMER_LEN), (0x608, 4));
        // The GED lies outside every port the original uses for ACPI (0x600-0x611, its PM1a
        // blocks for nested Hyper-V included) and below the PCI I/O window.
        assert!(!(0x600..0x612).contains(&GED_PORT));
        assert!(GED_PORT < u64::from(PCI_IO_WINDOW.0));
        let mut ranges = [
            (I8042_PORT, 5),
            (CMOS_PORT, 2),
            (0x80, 1), // POST
            (COM1_PORT, 8),
            (ACPI_SLEEP_PORT, 1),
            (PM_TIMER_PORT, PM_TIMER_LEN),
            (GED_PORT, 1),
            (PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_SIZE),
        ];
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:#x?} overlaps {:#x?}",
                w[0],
                w[1]
            );
        }
    }
}
