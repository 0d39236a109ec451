use super::*;
use crate::acpi;
use vm_memory::GuestMemoryMmap;

/// One structure read back: type, handle, formatted section, strings.
#[derive(Debug)]
struct Structure {
    kind: u8,
    handle: u16,
    formatted: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    /// The string a formatted-section byte at `off` refers to (index 0: none).
    fn string(&self, off: usize) -> Option<&str> {
        match self.formatted[off] {
            0 => None,
            i => Some(self.strings[usize::from(i) - 1].as_str()),
        }
    }
}

/// Finds the entry point at `SMBIOS_START` as a guest would, checks it, and walks the table.
fn parse(mem: &GuestMemoryMmap) -> Vec<Structure> {
    let mut ep = [0u8; ENTRY_POINT_LEN];
    mem.read_slice(&mut ep, layout::SMBIOS_START).unwrap();
    assert_eq!(&ep[0..5], b"_SM3_");
    let len = usize::from(ep[6]);
    assert_eq!(len, 0x18, "entry point length");
    assert_eq!(
        ep[..len].iter().fold(0u8, |s, &b| s.wrapping_add(b)),
        0,
        "entry point checksum"
    );
    assert_eq!((ep[7], ep[8], ep[9]), (3, 2, 0), "SMBIOS 3.2.0");
    assert_eq!(ep[10], 1, "entry point revision: 3.0 format");
    assert_eq!(ep[11], 0, "reserved");
    let max = u32::from_le_bytes(ep[12..16].try_into().unwrap()) as usize;
    let addr = u64::from_le_bytes(ep[16..24].try_into().unwrap());
    assert_eq!(addr, layout::SMBIOS_START.0 + 0x18, "table right after it");
    assert!(addr + max as u64 <= layout::SMBIOS_END.0);
    let mut table = vec![0u8; max];
    mem.read_slice(&mut table, GuestAddress(addr)).unwrap();

    let mut out = Vec::new();
    let mut at = 0;
    loop {
        assert!(at + 4 <= max, "structure header at {at} beyond {max}");
        let (kind, flen) = (table[at], usize::from(table[at + 1]));
        assert!(flen >= 4 && at + flen <= max, "type {kind} length {flen}");
        let handle = u16::from_le_bytes([table[at + 2], table[at + 3]]);
        let formatted = table[at..at + flen].to_vec();
        // The string set: NUL-terminated strings, then a NUL; "\0\0" when empty.
        let mut p = at + flen;
        let mut strings = Vec::new();
        if table[p] == 0 {
            assert_eq!(
                table[p + 1],
                0,
                "type {kind}: empty string set needs two NULs"
            );
            p += 2;
        } else {
            while table[p] != 0 {
                let end = p + table[p..].iter().position(|&b| b == 0).unwrap();
                strings.push(String::from_utf8(table[p..end].to_vec()).unwrap());
                p = end + 1;
            }
            p += 1;
        }
        out.push(Structure {
            kind,
            handle,
            formatted,
            strings,
        });
        at = p;
        if kind == TYPE_END_OF_TABLE {
            break;
        }
    }
    assert_eq!(at, max, "the table ends with the End of Table structure");
    out
}

fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
}

#[test]
fn default_tables_carry_the_originals_identity() {
    let mem = guest_memory();
    let size = setup_smbios(&mem, &SmbiosConfig::default()).unwrap();
    let s = parse(&mem);
    assert_eq!(
        size,
        ENTRY_POINT_LEN as u64 + build_table(&SmbiosConfig::default()).unwrap().len() as u64
    );
    let kinds: Vec<(u8, u16)> = s.iter().map(|s| (s.kind, s.handle)).collect();
    assert_eq!(kinds, [(0, 1), (1, 2), (127, 3)]);

    let bios = &s[0];
    assert_eq!(bios.formatted.len(), 0x14);
    assert_eq!(bios.string(4), Some("cloud-hypervisor"), "vendor");
    assert_eq!(bios.string(5), Some("0"), "version");
    assert_eq!(bios.string(8), None, "release date");
    let characteristics = u64::from_le_bytes(bios.formatted[10..18].try_into().unwrap());
    assert_eq!(characteristics, 1 << 7, "PCI supported");
    assert_eq!(bios.formatted[19], 1 << 4, "virtual machine");

    let sys = &s[1];
    assert_eq!(sys.formatted.len(), 0x1b);
    assert_eq!(sys.string(4), Some("Cloud Hypervisor"), "manufacturer");
    assert_eq!(sys.string(5), Some("cloud-hypervisor"), "product");
    for (off, what) in [(6, "version"), (7, "serial"), (25, "sku"), (26, "family")] {
        assert_eq!(sys.string(off), None, "{what}");
    }
    assert_eq!(&sys.formatted[8..24], &[0u8; 16], "nil UUID");
    assert_eq!(sys.formatted[24], 2, "wake-up type");
    assert_eq!(sys.strings.len(), 2);

    assert_eq!(s[2].formatted.len(), 4);
    assert!(s[2].strings.is_empty());
}

#[test]
fn configured_identity_chassis_and_oem_strings() {
    let mem = guest_memory();
    let cfg = SmbiosConfig {
        system: SmbiosSystem {
            manufacturer: Some("ACME".into()),
            product_name: None,
            version: Some("v1".into()),
            serial_number: Some("SN42".into()),
            uuid: Some([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff,
            ]),
            sku_number: None,
            family: Some("fam".into()),
        },
        chassis_asset_tag: Some("rack1".into()),
        oem_strings: vec!["o1".into(), "o2".into()],
    };
    setup_smbios(&mem, &cfg).unwrap();
    let s = parse(&mem);
    let kinds: Vec<(u8, u16)> = s.iter().map(|s| (s.kind, s.handle)).collect();
    assert_eq!(kinds, [(0, 1), (1, 2), (3, 3), (11, 4), (127, 5)]);

    let sys = &s[1];
    assert_eq!(sys.string(4), Some("ACME"));
    assert_eq!(sys.string(5), Some("cloud-hypervisor"), "default product");
    assert_eq!(sys.string(6), Some("v1"));
    assert_eq!(sys.string(7), Some("SN42"));
    assert_eq!(sys.string(25), None, "sku");
    assert_eq!(sys.string(26), Some("fam"));
    // 00112233-4455-6677-8899-aabbccddeeff, the first three fields little endian.
    assert_eq!(
        &sys.formatted[8..24],
        &[
            0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ]
    );

    let ch = &s[2];
    assert_eq!(ch.formatted.len(), 0x15);
    assert_eq!(ch.string(4), None, "chassis manufacturer");
    assert_eq!(ch.string(8), Some("rack1"), "asset tag");
    assert_eq!(ch.formatted[5], 2, "chassis type unknown");

    let oem = &s[3];
    assert_eq!(oem.formatted[4], 2, "count");
    assert_eq!(oem.strings, ["o1", "o2"]);
}

#[test]
fn bad_strings_and_oversized_tables_are_refused() {
    let mem = guest_memory();
    for bad in ["", "a\0b"] {
        let cfg = SmbiosConfig {
            oem_strings: vec![bad.into()],
            ..Default::default()
        };
        assert!(matches!(setup_smbios(&mem, &cfg), Err(Error::BadString(_))));
    }
    let many = SmbiosConfig {
        oem_strings: vec!["x".into(); 256],
        ..Default::default()
    };
    assert!(matches!(build_table(&many), Err(Error::TooManyStrings)));
    let huge = SmbiosConfig {
        oem_strings: vec!["x".repeat(70_000)],
        ..Default::default()
    };
    assert!(matches!(
        setup_smbios(&mem, &huge),
        Err(Error::TooLarge {
            limit: 0x10_0000,
            ..
        })
    ));
    // Guest memory that ends before the SMBIOS range.
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0xf_0000)]).unwrap();
    assert!(matches!(
        setup_smbios(&small, &SmbiosConfig::default()),
        Err(Error::GuestMemory(_))
    ));
}

#[test]
fn smbios_lies_in_reserved_memory_apart_from_the_acpi_tables() {
    // Reserved in the memory map, for every RAM size.
    for size in [64u64 << 20, 5 << 30] {
        assert!(layout::memory_map(size).iter().any(|e| {
            e.kind == layout::MemoryKind::Reserved
                && e.addr <= layout::SMBIOS_START.0
                && e.addr + e.size >= layout::SMBIOS_END.0
        }));
    }
    // The largest ACPI tables and SMBIOS written into one memory: each reads back intact.
    let mem = guest_memory();
    let largest = acpi::AcpiConfig {
        boot_vcpus: acpi::MAX_VCPUS,
        max_vcpus: acpi::MAX_VCPUS,
        topology: None,
        serial: true,
        pci: vec![acpi::PciHost::segment0(
            (
                layout::MEM_32BIT_DEVICES_START.0,
                layout::MEM_32BIT_DEVICES_SIZE,
            ),
            Some((1 << 40, 1 << 38)),
        )],
        memory_slots: 16,
        tpm: true,
        numa: Vec::new(),
        viot: None,
    };
    acpi::create_acpi_tables(&mem, &largest).unwrap();
    setup_smbios(&mem, &SmbiosConfig::default()).unwrap();
    let acpi_len: usize = acpi::build_tables(&largest)
        .unwrap()
        .iter()
        .map(|(_, b)| b.len().next_multiple_of(16))
        .sum();
    assert!(layout::RSDP_POINTER.0 + acpi_len as u64 <= layout::SMBIOS_START.0);
    let xsdt_addr = {
        let mut b = [0u8; 8];
        mem.read_slice(&mut b, GuestAddress(layout::RSDP_POINTER.0 + 24))
            .unwrap();
        u64::from_le_bytes(b)
    };
    let xsdt = acpi::build_tables(&largest)
        .unwrap()
        .into_iter()
        .find(|(sig, _)| sig == b"XSDT")
        .unwrap()
        .1;
    let mut back = vec![0u8; xsdt.len()];
    mem.read_slice(&mut back, GuestAddress(xsdt_addr)).unwrap();
    assert_eq!(back, xsdt, "the XSDT (the last ACPI table) is intact");
    parse(&mem);
}
