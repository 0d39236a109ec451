use super::*;
use vm_memory::GuestMemoryMmap;

fn cfg(boot: u32, max: u32) -> AcpiConfig {
    AcpiConfig {
        boot_vcpus: boot,
        max_vcpus: max,
        topology: None,
        serial: true,
        pci: vec![],
        memory_slots: 0,
        tpm: false,
        numa: Vec::new(),
        viot: None,
    }
}

fn pci_host() -> PciHost {
    PciHost::segment0(
        (
            layout::MEM_32BIT_DEVICES_START.0,
            layout::MEM_32BIT_DEVICES_SIZE,
        ),
        Some((1 << 40, 1 << 38)),
    )
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
}

fn table<'a>(tables: &'a [PlacedTable], sig: &[u8; 4]) -> &'a PlacedTable {
    tables
        .iter()
        .find(|t| &t.signature == sig)
        .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(sig)))
}

/// (type, bytes) of each MADT interrupt controller structure.
fn madt_structures(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 44;
    while off < madt.len() {
        let len = madt[off + 1] as usize;
        assert!(
            len >= 2 && off + len <= madt.len(),
            "bad MADT structure at {off}"
        );
        out.push((madt[off], madt[off..off + len].to_vec()));
        off += len;
    }
    out
}

/// (uid, apic id, flags) of every processor structure.
fn madt_cpus(madt: &[u8]) -> Vec<(u32, u32, u32)> {
    madt_structures(madt)
        .into_iter()
        .filter_map(|(ty, s)| match ty {
            MADT_LOCAL_APIC => Some((u32::from(s[2]), u32::from(s[3]), u32_at(&s, 4))),
            MADT_LOCAL_X2APIC => Some((u32_at(&s, 12), u32_at(&s, 4), u32_at(&s, 8))),
            _ => None,
        })
        .collect()
}

#[test]
fn every_table_has_a_valid_checksum_and_length() {
    for c in [
        cfg(1, 1),
        cfg(4, 8),
        AcpiConfig {
            pci: vec![pci_host()],
            ..cfg(2, 2)
        },
    ] {
        let tables = build_tables(&c).unwrap();
        for (sig, bytes) in &tables {
            if sig == b"RSDP" {
                assert_eq!(&bytes[..8], b"RSD PTR ");
                assert_eq!(bytes.len(), 36);
                assert_eq!(sum(&bytes[..20]), 0, "RSDP v1 checksum");
                assert_eq!(sum(bytes), 0, "RSDP extended checksum");
                assert_eq!(bytes[15], 2, "RSDP revision");
                assert_eq!(u32_at(bytes, 20), 36);
            } else {
                assert_eq!(&bytes[..4], sig);
                assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{sig:?} length");
                assert_eq!(sum(bytes), 0, "{sig:?} checksum");
                assert_eq!(&bytes[10..16], &OEM_ID);
                assert_eq!(&bytes[16..24], &OEM_TABLE_ID);
            }
        }
    }
}

#[test]
fn rsdp_points_to_xsdt_which_lists_every_other_table() {
    for (c, expected) in [
        (cfg(1, 1), vec![*b"FACP", *b"APIC"]),
        (
            AcpiConfig {
                pci: vec![pci_host()],
                ..cfg(1, 1)
            },
            vec![*b"FACP", *b"APIC", *b"MCFG"],
        ),
    ] {
        let tables = place_tables(&c).unwrap();
        assert_eq!(tables[0].addr, layout::RSDP_POINTER);
        let xsdt = table(&tables, b"XSDT");
        assert_eq!(u64_at(&tables[0].bytes, 24), xsdt.addr.0);
        let n = (xsdt.bytes.len() - HEADER_LEN) / 8;
        let listed: Vec<[u8; 4]> = (0..n)
            .map(|i| {
                let addr = u64_at(&xsdt.bytes, HEADER_LEN + 8 * i);
                let t = tables
                    .iter()
                    .find(|t| t.addr.0 == addr)
                    .unwrap_or_else(|| panic!("XSDT entry {addr:#x} points at no table"));
                t.signature
            })
            .collect();
        assert_eq!(listed, expected);
        // The DSDT is reached through the FADT instead.
        let fadt = table(&tables, b"FACP");
        assert_eq!(u64_at(&fadt.bytes, 140), table(&tables, b"DSDT").addr.0);
        assert_eq!(u32_at(&fadt.bytes, 40), 0, "no 32-bit DSDT pointer");
    }
}

#[test]
fn tables_do_not_overlap_and_fit_below_acpi_end() {
    let largest = AcpiConfig {
        pci: vec![pci_host()],
        memory_slots: 16,
        tpm: true,
        numa: Vec::new(),
        ..cfg(MAX_VCPUS, MAX_VCPUS)
    };
    let tables = place_tables(&largest).unwrap();
    let mut end = layout::RSDP_POINTER.0;
    for t in &tables {
        assert!(
            t.addr.0 >= end,
            "{:?} overlaps the previous table",
            t.signature
        );
        end = t.addr.0 + t.bytes.len() as u64;
    }
    assert!(end <= layout::ACPI_END.0, "tables end at {end:#x}");
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let tables = build_tables(&cfg(1, 1)).unwrap();
    let fadt = &tables.iter().find(|t| &t.0 == b"FACP").unwrap().1;
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "FADT major version");
    assert_eq!(fadt[131], 5, "FADT minor version");
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON (no fixed power button)");
    assert_ne!(flags & (1 << 8), 0, "TMR_VAL_EXT (32-bit PM timer)");
    let boot_arch = u16_at(fadt, 109);
    assert_eq!(
        boot_arch,
        (1 << 2) | (1 << 4),
        "no VGA, no ASPM, MSI ok, CMOS present"
    );
    let io8 = |off: usize| {
        (
            fadt[off],
            fadt[off + 1],
            fadt[off + 2],
            fadt[off + 3],
            u64_at(fadt, off + 4),
        )
    };
    let port = (1, 8, 0, 1, layout::ACPI_SLEEP_PORT);
    assert_eq!(io8(116), port, "RESET_REG");
    assert_eq!(fadt[128], layout::ACPI_RESET_VALUE, "RESET_VALUE");
    assert_eq!(io8(244), port, "SLEEP_CONTROL_REG");
    assert_eq!(io8(256), port, "SLEEP_STATUS_REG");
    assert_eq!(&fadt[268..276], &HYPERVISOR_VENDOR_ID);
    // The PM timer as the original publishes it (X_PM_TMR_BLK: SystemIO, 32 bits, dword
    // access), plus PM_TMR_BLK and PM_TMR_LEN = 4.
    assert_eq!(
        io8(208),
        (1, 32, 0, 3, layout::PM_TIMER_PORT),
        "X_PM_TMR_BLK"
    );
    assert_eq!(
        u64::from(u32_at(fadt, 76)),
        layout::PM_TIMER_PORT,
        "PM_TMR_BLK"
    );
    assert_eq!(fadt[91], 4, "PM_TMR_LEN");
    // No FACS, no SCI, no PM1 or GPE blocks.
    assert_eq!(u32_at(fadt, 36), 0);
    assert_eq!(u64_at(fadt, 132), 0);
    assert_eq!(u16_at(fadt, 46), 0);
    assert_eq!(u32_at(fadt, 56), 0);
    assert_eq!(u32_at(fadt, 64), 0);
    assert_eq!(u32_at(fadt, 80), 0);
    assert!(fadt[148..208].iter().all(|&b| b == 0), "X_PM1/PM2 blocks");
    assert!(fadt[220..244].iter().all(|&b| b == 0), "X_GPE blocks");
}

#[test]
fn madt_lists_every_possible_cpu_with_the_right_flags() {
    for (boot, max) in [(1, 1), (4, 8), (2, 254), (254, 254)] {
        let tables = build_tables(&cfg(boot, max)).unwrap();
        let madt = &tables.iter().find(|t| &t.0 == b"APIC").unwrap().1;
        assert_eq!(madt[8], MADT_REVISION);
        assert_eq!(u32_at(madt, 36), 0xfee0_0000, "local APIC address");
        assert_eq!(u32_at(madt, 40) & 1, 0, "PCAT_COMPAT off");
        let cpus = madt_cpus(madt);
        assert_eq!(cpus.len(), max as usize);
        for (i, &(uid, apic_id, flags)) in cpus.iter().enumerate() {
            let i = i as u32;
            assert_eq!((uid, apic_id), (i, i));
            let want = if i < boot { 1 } else { 2 };
            assert_eq!(flags, want, "cpu {i} flags");
        }
        let structures = madt_structures(madt);
        let ioapics: Vec<_> = structures.iter().filter(|s| s.0 == MADT_IO_APIC).collect();
        assert_eq!(ioapics.len(), 1);
        let io = &ioapics[0].1;
        assert_eq!((io[2], u32_at(io, 4), u32_at(io, 8)), (0, 0xfec0_0000, 0));
        let isos: Vec<_> = structures
            .iter()
            .filter(|s| s.0 == MADT_INTERRUPT_SOURCE_OVERRIDE)
            .map(|s| (s.1[2], s.1[3], u32_at(&s.1, 4)))
            .collect();
        assert_eq!(isos, vec![(0, 0, 2)], "ISA IRQ 0 -> GSI 2");
        let nmis: Vec<_> = structures
            .iter()
            .filter(|s| s.0 == MADT_LOCAL_APIC_NMI)
            .map(|s| s.1.clone())
            .collect();
        assert_eq!(
            nmis,
            vec![vec![4, 6, 0xff, 0, 0, 1]],
            "LINT1 NMI on all CPUs"
        );
    }
}

#[test]
fn madt_builder_switches_to_x2apic_entries_above_apic_id_254() {
    let madt = build_madt(3, 300);
    assert_eq!(sum(&madt), 0);
    let structures = madt_structures(&madt);
    let xapic = structures.iter().filter(|s| s.0 == MADT_LOCAL_APIC).count();
    let x2apic = structures
        .iter()
        .filter(|s| s.0 == MADT_LOCAL_X2APIC)
        .count();
    assert_eq!((xapic, x2apic), (255, 45));
    assert!(structures.iter().any(|s| s.0 == MADT_LOCAL_X2APIC_NMI));
    let cpus = madt_cpus(&madt);
    assert_eq!(cpus[299], (299, 299, MADT_CPU_ONLINE_CAPABLE));
    assert_eq!(cpus[2], (2, 2, MADT_CPU_ENABLED));
}

fn dsdt_of(c: &AcpiConfig) -> Vec<u8> {
    build_tables(c)
        .unwrap()
        .into_iter()
        .find(|t| &t.0 == b"DSDT")
        .unwrap()
        .1
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn dsdt_has_s5_cpus_and_com1() {
    let dsdt = dsdt_of(&cfg(2, 4));
    assert_eq!(dsdt[8], DSDT_REVISION);
    // NameOp \_S5_ PackageOp PkgLength(1 byte) NumElements=4, BytePrefix 5, Zero, Zero, Zero
    let s5 = [
        0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x07, 4, 0x0a, 5, 0, 0, 0,
    ];
    assert!(contains(&dsdt, &s5), "\\_S5_ package");
    for cpu in 0..4 {
        assert!(contains(&dsdt, cpu_device_name(cpu).as_bytes()));
    }
    assert!(!contains(&dsdt, cpu_device_name(4).as_bytes()));
    // Each CPU's _STA asks the hotplug controller: Return (CSTA (cpu)).
    let count = |n: &[u8]| dsdt.windows(n.len()).filter(|w| *w == n).count();
    for cpu in 0..4u8 {
        // The integer as AML encodes it: ZeroOp, OneOp, else BytePrefix.
        let arg = match cpu {
            0 => vec![0x00],
            1 => vec![0x01],
            n => vec![0x0a, n],
        };
        let sta = [&b"_STA\x00\xa4CSTA"[..], &arg].concat();
        assert_eq!(count(&sta), 1, "CPU {cpu}");
    }
    assert!(contains(&dsdt, b"ACPI0007"));
    assert!(contains(&dsdt, b"ACPI0010"));
    // EISAID("PNP0501") = 0x0105d041 and the COM1 I/O descriptor.
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
    assert!(contains(
        &dsdt,
        &[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]
    ));
    // Extended IRQ descriptor: consumer, edge, active high, exclusive, IRQ 4.
    assert!(contains(&dsdt, &[0x89, 0x06, 0x00, 0x03, 0x01, 4, 0, 0, 0]));
    // The CMOS RTC (PNP0B00) at 0x70-0x71.
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0b, 0x00]));
    assert!(contains(
        &dsdt,
        &[0x47, 0x01, 0x70, 0x00, 0x70, 0x00, 0x01, 0x02]
    ));
    // The power button (PNP0C0C = 0x0c0cd041).
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
    // No PCI host without PCI.
    assert!(!contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));

    let no_serial = dsdt_of(&AcpiConfig {
        serial: false,
        ..cfg(2, 4)
    });
    assert!(!contains(&no_serial, &[0x0c, 0x41, 0xd0, 0x05, 0x01]));
}

#[test]
fn pci_host_bridge_and_mcfg() {
    let pci = pci_host();
    let c = AcpiConfig {
        pci: vec![pci.clone()],
        ..cfg(1, 1)
    };
    let dsdt = dsdt_of(&c);
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]), "PNP0A08");
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]), "PNP0A03");
    assert!(contains(&dsdt, b"_SEG") && contains(&dsdt, b"_BBN"));
    // WordBusNumber 0..0: bus 0 only, as the original's.
    assert!(contains(
        &dsdt,
        &[0x88, 0x0d, 0x00, 0x02, 0x0c, 0x00, 0, 0, 0, 0, 0, 0]
    ));
    // Config I/O ports and the I/O window.
    assert!(contains(
        &dsdt,
        &[0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08]
    ));
    assert!(contains(
        &dsdt,
        &[0x88, 0x0d, 0x00, 0x01, 0x0c, 0x03, 0, 0, 0x00, 0x10, 0xff, 0xff]
    ));
    // DWordMemory 0xc0000000..0xe7ffffff
    let mut m32 = vec![0x87, 0x17, 0x00, 0x00, 0x0c, 0x01, 0, 0, 0, 0];
    m32.extend_from_slice(&0xc000_0000u32.to_le_bytes());
    m32.extend_from_slice(&0xe7ff_ffffu32.to_le_bytes());
    assert!(contains(&dsdt, &m32));
    // QWordMemory for the 64-bit window.
    let mut m64 = vec![0x8a, 0x2b, 0x00, 0x00, 0x0c, 0x01];
    m64.extend_from_slice(&0u64.to_le_bytes());
    m64.extend_from_slice(&(1u64 << 40).to_le_bytes());
    m64.extend_from_slice(&((1u64 << 40) + (1 << 38) - 1).to_le_bytes());
    assert!(contains(&dsdt, &m64));
    // Without a 64-bit window there is no QWordMemory at all.
    let no64 = dsdt_of(&AcpiConfig {
        pci: vec![PciHost {
            mmio64: None,
            ..pci.clone()
        }],
        ..cfg(1, 1)
    });
    assert!(!contains(&no64, &m64[..4]));
    assert!(contains(&no64, &m32));
    // ECAM reserved as a motherboard resource (PNP0C02) with Memory32Fixed.
    assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]));
    let mut ecam = vec![0x86, 0x09, 0x00, 0x01];
    ecam.extend_from_slice(&0xe800_0000u32.to_le_bytes());
    ecam.extend_from_slice(&0x0010_0000u32.to_le_bytes());
    assert!(contains(&dsdt, &ecam));

    let tables = build_tables(&c).unwrap();
    let mcfg = &tables.iter().find(|t| &t.0 == b"MCFG").unwrap().1;
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), pci.ecam_base);
    assert_eq!(u16_at(mcfg, 52), 0);
    assert_eq!((mcfg[54], mcfg[55]), (0, 0));
}

#[test]
fn each_segment_has_a_bridge_and_an_mcfg_entry() {
    let hosts: Vec<PciHost> = (0..3u16)
        .map(|s| PciHost {
            proximity: if s == 1 { 4 } else { 0 },
            ..PciHost::segment(s, (0xc000_0000 + (u64::from(s) << 26), 1 << 26), None)
        })
        .collect();
    let c = AcpiConfig {
        pci: hosts.clone(),
        ..cfg(1, 1)
    };
    let tables = build_tables(&c).unwrap();
    let mcfg = &tables.iter().find(|t| &t.0 == b"MCFG").unwrap().1;
    assert_eq!(mcfg.len(), 44 + 3 * 16);
    for (i, h) in hosts.iter().enumerate() {
        let entry = 44 + 16 * i;
        assert_eq!(u64_at(mcfg, entry), 0xe800_0000 + ((i as u64) << 20));
        assert_eq!(u16_at(mcfg, entry + 8), h.segment);
        assert_eq!((mcfg[entry + 10], mcfg[entry + 11]), (0, 0));
    }
    let dsdt = dsdt_of(&c);
    for name in [b"PC00", b"PC01", b"PC02"] {
        assert!(contains(&dsdt, name), "{}", String::from_utf8_lossy(name));
    }
    // Ports 0xcf8-0xcff and the I/O window belong to segment 0 only.
    let cfg_io = [0x47, 0x01, 0xf8, 0x0c, 0xf8, 0x0c, 0x01, 0x08];
    assert_eq!(dsdt.windows(8).filter(|w| *w == cfg_io).count(), 1);
    // A _PXM per bridge (as the original's): node 4 for segment 1, 0 for the others.
    assert_eq!(dsdt.windows(4).filter(|w| w == b"_PXM").count(), 3);
    assert_eq!(
        dsdt.windows(3)
            .filter(|w| **w == [0xa4, 0x0a, 0x04])
            .count(),
        1
    );
    // Two segments with one number, or overlapping ECAM, are refused.
    for bad in [
        vec![hosts[0].clone(), hosts[0].clone()],
        vec![
            hosts[0].clone(),
            PciHost {
                ecam_base: hosts[0].ecam_base,
                ..hosts[1].clone()
            },
        ],
    ] {
        let c = AcpiConfig {
            pci: bad,
            ..cfg(1, 1)
        };
        assert!(matches!(build_tables(&c), Err(Error::InvalidPci(_))));
    }
}

#[test]
fn bad_configs_are_rejected() {
    for (boot, max) in [(0, 1), (2, 1), (1, MAX_VCPUS + 1), (300, 300)] {
        assert!(
            matches!(
                build_tables(&cfg(boot, max)),
                Err(Error::InvalidVcpuCount { .. })
            ),
            "boot {boot} max {max}"
        );
    }
    let topo = AcpiConfig {
        topology: Some((2, 2, 1, 1)),
        ..cfg(4, 8)
    };
    assert!(matches!(
        build_tables(&topo),
        Err(Error::InvalidTopology(..))
    ));
    let topo = AcpiConfig {
        topology: Some((2, 2, 1, 2)),
        ..cfg(4, 8)
    };
    assert!(build_tables(&topo).is_ok());

    let bad_pci = [
        PciHost {
            bus_start: 3,
            bus_end: 2,
            ..pci_host()
        },
        PciHost {
            ecam_size: 1 << 19,
            ..pci_host()
        },
        PciHost {
            io: Some((0xf000, 0x2000)),
            ..pci_host()
        },
        PciHost {
            io: Some((0x1000, 0)),
            ..pci_host()
        },
        PciHost {
            mmio32: (0xf000_0000, 0x2000_0000),
            ..pci_host()
        },
        PciHost {
            mmio64: Some((u64::MAX, 2)),
            ..pci_host()
        },
    ];
    for pci in bad_pci {
        let c = AcpiConfig {
            pci: vec![pci.clone()],
            ..cfg(1, 1)
        };
        assert!(
            matches!(build_tables(&c), Err(Error::InvalidPci(_))),
            "{pci:?}"
        );
    }
}

#[test]
fn create_writes_the_tables_into_guest_memory() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let c = AcpiConfig {
        pci: vec![pci_host()],
        ..cfg(2, 4)
    };
    let rsdp = create_acpi_tables(&mem, &c).unwrap();
    assert_eq!(rsdp, layout::RSDP_POINTER);
    for t in place_tables(&c).unwrap() {
        let mut buf = vec![0u8; t.bytes.len()];
        mem.read_slice(&mut buf, t.addr).unwrap();
        assert_eq!(buf, t.bytes, "{:?}", t.signature);
    }
    let mut sig = [0u8; 8];
    mem.read_slice(&mut sig, rsdp).unwrap();
    assert_eq!(&sig, b"RSD PTR ");
}

#[test]
fn create_fails_without_memory_for_the_tables() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x9_0000)]).unwrap();
    assert!(matches!(
        create_acpi_tables(&mem, &cfg(1, 1)),
        Err(Error::GuestMemory(_))
    ));
}

#[test]
fn dsdt_has_a_generic_event_device_for_the_power_button() {
    let dsdt = dsdt_of(&cfg(1, 1));
    for needle in [
        &b"GED_"[..],
        b"ACPI0013",
        b"_EVT",
        b"GDST",
        b"GDAT",
        b"PWRB",
        // Notify(\_SB_.PWRB, 0x80): NotifyOp, root, dual name, the value as a byte.
        b"\x86\\\x2e_SB_PWRB\x0a\x80",
    ] {
        assert!(
            contains(&dsdt, needle),
            "{:?}",
            String::from_utf8_lossy(needle)
        );
    }
    // OperationRegion(GDST, SystemIO, GED_PORT, 1)
    let port = (layout::GED_PORT as u16).to_le_bytes();
    assert!(contains(
        &dsdt,
        &[b'G', b'D', b'S', b'T', 0x01, 0x0b, port[0], port[1], 0x01]
    ));
}

/// Decodes the AML PkgLength at the start of `b`: (the length it gives, which counts its own
/// bytes, and how many bytes it takes).
fn pkg_length(b: &[u8]) -> (usize, usize) {
    let follow = usize::from(b[0] >> 6);
    if follow == 0 {
        return (usize::from(b[0] & 0x3f), 1);
    }
    let mut len = usize::from(b[0] & 0x0f);
    for i in 0..follow {
        len |= usize::from(b[1 + i]) << (4 + 8 * i);
    }
    (len, 1 + follow)
}

/// The terms inside the one `Device (name)` of `aml` (after its name).
fn device_body<'a>(aml: &'a [u8], name: &[u8; 4]) -> &'a [u8] {
    let found: Vec<&[u8]> = (0..aml.len().saturating_sub(2))
        .filter(|&i| aml[i..i + 2] == [0x5b, 0x82])
        .filter_map(|i| {
            let (len, n) = pkg_length(&aml[i + 2..]);
            let name_at = i + 2 + n;
            (aml.get(name_at..name_at + 4) == Some(&name[..]))
                .then(|| &aml[name_at + 4..i + 2 + len])
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "Device ({}) found {} times",
        String::from_utf8_lossy(name),
        found.len()
    );
    found[0]
}

/// The flags and the terms of the one `Method (name)` of `aml`.
fn method_body<'a>(aml: &'a [u8], name: &[u8; 4]) -> (u8, &'a [u8]) {
    let found: Vec<(u8, &[u8])> = (0..aml.len())
        .filter(|&i| aml[i] == 0x14 && i + 1 < aml.len())
        .filter_map(|i| {
            let (len, n) = pkg_length(&aml[i + 1..]);
            let name_at = i + 1 + n;
            let end = i + 1 + len;
            (end <= aml.len() && aml.get(name_at..name_at + 4) == Some(&name[..]))
                .then(|| (aml[name_at + 4], &aml[name_at + 5..end]))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "Method ({}) found {} times",
        String::from_utf8_lossy(name),
        found.len()
    );
    found[0]
}

/// `Name (name, "value")`.
fn name_string(name: &[u8; 4], value: &str) -> Vec<u8> {
    let mut b = vec![0x08];
    b.extend_from_slice(name);
    b.push(0x0d);
    b.extend_from_slice(value.as_bytes());
    b.push(0);
    b
}

#[test]
fn pkg_length_decodes_one_and_two_byte_encodings() {
    assert_eq!(pkg_length(&[0x3f]), (0x3f, 1));
    assert_eq!(pkg_length(&[0x45, 0x12]), (0x125, 2));
    assert_eq!(pkg_length(&[0x81, 0x02, 0x03]), (0x3021, 3));
}

#[test]
fn dsdt_has_a_vm_generation_id_device() {
    for c in [
        cfg(1, 1),
        AcpiConfig {
            pci: vec![pci_host()],
            ..cfg(MAX_VCPUS, MAX_VCPUS)
        },
    ] {
        let dsdt = dsdt_of(&c);
        let vgen = device_body(&dsdt, b"VGEN");
        // Name (ADDR, Package (2) { low 32 bits, high 32 bits }) of 0xef000: PackageOp,
        // PkgLength 8, two elements, DWordPrefix 0x000ef000, ZeroOp.
        assert_eq!(layout::VMGENID_START.0, 0xef000);
        let addr = [
            0x08, b'A', b'D', b'D', b'R', 0x12, 0x08, 0x02, 0x0c, 0x00, 0xf0, 0x0e, 0x00, 0x00,
        ];
        let want = [
            name_string(b"_HID", "VMGENCTR"),
            name_string(b"_CID", "VM_GEN_COUNTER"),
            name_string(b"_DDN", "VM_Gen_Counter"),
            addr.to_vec(),
        ]
        .concat();
        assert_eq!(vgen, &want[..], "the whole of Device (VGEN)");
    }
}

#[test]
fn ged_evt_notifies_the_power_button_and_vgen_and_scans_cpus_each_on_its_own_bit() {
    let dsdt = dsdt_of(&cfg(1, 1));
    let ged = device_body(&dsdt, b"GED_");
    let (flags, evt) = method_body(ged, b"_EVT");
    assert_eq!(flags, 0x09, "one argument, serialized");
    let mut want = vec![
        // Local0 = GDAT
        0x70, b'G', b'D', b'A', b'T', 0x60, //
        // Local1 = Local0 & 1
        0x7b, 0x60, 0x01, 0x61, //
        // If (Local1 == 1) { Notify (\_SB_.PWRB, 0x80) }
        0xa0, 0x11, 0x93, 0x61, 0x01, 0x86, b'\\', 0x2e,
    ];
    want.extend_from_slice(b"_SB_PWRB\x0a\x80");
    want.extend_from_slice(&[
        // Local2 = Local0 & 2
        0x7b, 0x60, 0x0a, 0x02, 0x62, //
        // If (Local2 == 2) { Notify (\_SB_.VGEN, 0x80) }
        0xa0, 0x12, 0x93, 0x62, 0x0a, 0x02, 0x86, b'\\', 0x2e,
    ]);
    want.extend_from_slice(b"_SB_VGEN\x0a\x80");
    want.extend_from_slice(&[
        // Local4 = Local0 & 8
        0x7b, 0x60, 0x0a, 0x08, 0x64, //
        // If (Local4 == 8) { \_SB_.CPUS.CSCN () }
        0xa0, 0x14, 0x93, 0x64, 0x0a, 0x08, b'\\', 0x2f, 0x03,
    ]);
    want.extend_from_slice(b"_SB_CPUSCSCN");
    assert_eq!(evt, &want[..], "_EVT body");
}

#[test]
fn ged_event_bits_and_the_generation_id_agree_with_the_devices_crate() {
    assert_eq!(GED_EVENT_POWER_BUTTON, devices::GED_POWER_BUTTON);
    assert_eq!(GED_EVENT_VMGENID, devices::GED_VMGENID);
    assert_eq!(GED_EVENT_PCI_HOTPLUG, devices::GED_PCI_HOTPLUG);
    assert_eq!(GED_EVENT_CPU_HOTPLUG, devices::GED_CPU_HOTPLUG);
    assert_eq!(GED_EVENT_MEMORY_HOTPLUG, devices::GED_MEMORY_HOTPLUG);
    // `_EVT` acts on every bit the device may latch.
    assert_eq!(
        GED_EVENT_POWER_BUTTON
            | GED_EVENT_VMGENID
            | GED_EVENT_PCI_HOTPLUG
            | GED_EVENT_CPU_HOTPLUG
            | GED_EVENT_MEMORY_HOTPLUG,
        devices::GED_EVENTS
    );
    assert_eq!(
        layout::MEMORY_HOTPLUG_SIZE,
        devices::memory_hotplug::MEMORY_HOTPLUG_SIZE
    );
    assert_eq!(
        layout::CPU_HOTPLUG_SIZE,
        devices::cpu_hotplug::CPU_HOTPLUG_SIZE
    );
    assert_eq!(
        layout::PCI_HOTPLUG_SIZE,
        devices::pci_hotplug::PCI_HOTPLUG_SIZE
    );
    assert_eq!(
        layout::VMGENID_SIZE,
        devices::vmgenid::GENERATION_ID_LEN as u64
    );
}

#[test]
fn tpm_adds_the_tpm2_table_and_the_crb_device() {
    let without = place_tables(&cfg(1, 1)).unwrap();
    assert!(without.iter().all(|t| &t.signature != b"TPM2"));
    assert!(!contains(&dsdt_of(&cfg(1, 1)), b"MSFT0101"));

    let c = AcpiConfig {
        tpm: true,
        numa: Vec::new(),
        ..cfg(1, 1)
    };
    let tables = place_tables(&c).unwrap();
    let tpm2 = table(&tables, b"TPM2");
    let b = &tpm2.bytes;
    assert_eq!(b.len(), 76);
    assert_eq!(u32_at(b, 4) as usize, b.len());
    assert_eq!(b[8], 4, "revision");
    assert_eq!(sum(b), 0, "checksum");
    assert_eq!(u16_at(b, 36), 0, "client platform");
    assert_eq!(
        u64::from_le_bytes(b[40..48].try_into().unwrap()),
        0xfed4_0040,
        "CRB control area"
    );
    assert_eq!(u32_at(b, 48), 7, "start method: CRB");
    assert!(b[52..].iter().all(|&x| x == 0));
    // Listed in the XSDT.
    let xsdt = table(&tables, b"XSDT");
    let entries: Vec<u64> = xsdt.bytes[HEADER_LEN..]
        .chunks(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
        .collect();
    assert!(entries.contains(&tpm2.addr.0), "{entries:#x?}");

    let dsdt = dsdt_of(&c);
    assert!(contains(&dsdt, b"TPM2"));
    assert!(contains(&dsdt, b"MSFT0101\0"));
    // Memory32Fixed (0x86), length 9, read-write, base 0xfed40000, length 0x1000.
    let crs = [0x86, 9, 0, 1, 0, 0, 0xd4, 0xfe, 0, 0x10, 0, 0];
    assert!(contains(&dsdt, &crs), "TPM _CRS");
}

/// The VIOT: on segment 0 exactly what acpi_tables writes for the same topology (an
/// independent writer; its range node leaves the segment out of the endpoint id, so it cannot
/// write other segments); on segment 1 the endpoint id carries the segment. Listed in the
/// XSDT, checksum valid.
#[test]
fn viot_matches_acpi_tables_and_carries_the_segment() {
    use acpi_tables::viot::{PciDevice, PciRange, VirtIoPciIommu, VIOT};
    let viot = Viot {
        iommu: (0, 3 << 3),
        endpoints: vec![(0, 1 << 3), (0, 2 << 3)],
    };
    let ours = build_viot(&viot);
    let mut theirs = VIOT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let handle = theirs.add_virtio_pci_iommu(VirtIoPciIommu::new(PciDevice::new(0, 0, 3, 0)));
    for slot in [1, 2] {
        let f = || PciDevice::new(0, 0, slot, 0);
        theirs.add_pci_range(PciRange::new(f(), f(), &handle));
    }
    let theirs = to_bytes(&theirs);
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[HEADER_LEN..], theirs[HEADER_LEN..]);
    assert_eq!(sum(&ours), 0);

    let two = build_viot(&Viot {
        iommu: (0, 3 << 3),
        endpoints: vec![(1, 4 << 3)],
    });
    let node = &two[HEADER_LEN + 12 + 16..];
    assert_eq!(node[0], 1, "a PCI range node");
    assert_eq!(u32_at(node, 4), 1 << 16 | 4 << 3, "endpoint id");
    assert_eq!((u16_at(node, 8), u16_at(node, 10)), (1, 1), "segments");
    assert_eq!(
        (u16_at(node, 12), u16_at(node, 14)),
        (32, 32),
        "requester ids"
    );
    assert_eq!(u16_at(node, 16), 48, "output node");

    let tables = place_tables(&AcpiConfig {
        viot: Some(viot),
        ..cfg(1, 1)
    })
    .unwrap();
    let xsdt = table(&tables, b"XSDT");
    let v = table(&tables, b"VIOT");
    let n = (xsdt.bytes.len() - HEADER_LEN) / 8;
    assert!((0..n).any(|i| u64_at(&xsdt.bytes, HEADER_LEN + 8 * i) == v.addr.0));
}
