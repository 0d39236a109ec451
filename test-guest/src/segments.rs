//! `test=segments`: several PCI segments (`--platform num_pci_segments`), found as an OS finds
//! them. The MCFG (read by the `acpi` crate) gives each segment's ECAM; the AML interpreter
//! evaluates each host bridge's `_SEG`, `_UID`, `_CRS` and `_PXM`; every function's BARs lie
//! in its own segment's windows, which do not overlap; segment 0 alone has a host bridge; and
//! devices past segment 0 work through `virtio-drivers`: entropy from a virtio-rng, a sector
//! written and read back on a virtio-blk.
//!
//! Arguments: `segments=<n>` (how many the VM has), `rng_segment=<s>` and `blk_segment=<s>`
//! (where the virtio-rng and virtio-blk to drive are; none: not driven), `pxm=<s>@<node>` (the
//! one bridge whose `_PXM` is not 0).

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use aml_interp::aml::resource::{AddressSpaceResourceType, Resource};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, ConfigurationAccess, DeviceFunction, MemoryBarType, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::DeviceType;

use crate::acpi_sys::AcpiInfo;
use crate::aml::Aml;
use crate::bootinfo::BootInfo;
use crate::virtio::{GuestHal, ECAM_BASE};
use crate::{fail, parse_u64, pass, println};

/// One segment as the guest found it.
struct Segment {
    number: u16,
    ecam: u64,
    /// Its bridge's memory windows, `(start, size)`.
    windows: Vec<(u64, u64)>,
    /// Its functions with their virtio device type.
    functions: Vec<(DeviceFunction, Option<DeviceType>)>,
}

impl Segment {
    fn cam(&self) -> MmioCam<'static> {
        // SAFETY: the MCFG gives this segment's ECAM, below 4 GiB and identity mapped (the
        // monitor maps the first 4 GiB); only configuration accesses go there.
        unsafe { MmioCam::new(self.ecam as *mut u8, Cam::Ecam) }
    }

    fn root(&self) -> PciRoot<MmioCam<'static>> {
        PciRoot::new(self.cam())
    }

    fn find(&self, kind: DeviceType) -> Option<DeviceFunction> {
        self.functions
            .iter()
            .find(|(_, t)| *t == Some(kind))
            .map(|(df, _)| *df)
    }
}

pub fn scenario_segments(boot: &BootInfo, acpi: Option<&AcpiInfo>) {
    let want = boot.arg("segments").and_then(parse_u64).unwrap_or(1);
    let Some(acpi) = acpi else {
        fail("segments-acpi", format_args!("no ACPI tables"));
        return;
    };
    // The MCFG: one entry per segment, bus 0 only, a megabyte of ECAM each, in order.
    let mcfg_ok = acpi.mcfg.len() as u64 == want
        && acpi
            .mcfg
            .iter()
            .enumerate()
            .all(|(i, &(seg, base, b0, b1))| {
                usize::from(seg) == i
                    && base == ECAM_BASE + ((i as u64) << 20)
                    && (b0, b1) == (0, 0)
            });
    crate::check!("segments-mcfg", mcfg_ok, "{:x?}", acpi.mcfg);
    let aml = match Aml::load(boot.rsdp) {
        Ok(a) => a,
        Err(e) => {
            fail("segments-aml", format_args!("{e}"));
            return;
        }
    };
    let mut segments = Vec::new();
    for &(number, ecam, _, _) in &acpi.mcfg {
        match bridge(&aml, number) {
            Ok(windows) => segments.push(Segment {
                number,
                ecam,
                windows,
                functions: Vec::new(),
            }),
            Err(e) => fail("segments-bridge", format_args!("{e}")),
        }
    }
    if segments.len() != acpi.mcfg.len() {
        return;
    }
    pass("segments-bridge");
    check_pxm(boot, &aml, &segments);
    // The windows of different segments do not overlap.
    let mut all: Vec<(u64, u64, u16)> = segments
        .iter()
        .flat_map(|s| s.windows.iter().map(|&(a, n)| (a, n, s.number)))
        .collect();
    all.sort_unstable();
    let overlap = all.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0);
    crate::check!(
        "segments-windows-apart",
        overlap.is_none(),
        "{overlap:x?} in {all:x?}"
    );
    for s in &mut segments {
        enumerate(s);
    }
    if let Some(n) = boot.arg("rng_segment").and_then(parse_u64) {
        drive_rng(&segments, n);
    }
    if let Some(n) = boot.arg("blk_segment").and_then(parse_u64) {
        drive_blk(&segments, n);
    }
}

/// `\_SB_.PCxx`'s `_SEG` and `_UID` (both `number`) and the memory windows of its `_CRS`.
fn bridge(aml: &Aml, number: u16) -> Result<Vec<(u64, u64)>, String> {
    let path = format!("\\_SB_.PC{:02X}", number & 0xff);
    for name in ["_SEG", "_UID"] {
        let v = aml.int(&format!("{path}.{name}"))?;
        if v != u64::from(number) {
            return Err(format!("{path}.{name} = {v}, not {number}"));
        }
    }
    let windows: Vec<(u64, u64)> = aml
        .resources(&format!("{path}._CRS"))?
        .iter()
        .filter_map(|r| match r {
            Resource::AddressSpace(d)
                if matches!(d.resource_type, AddressSpaceResourceType::MemoryRange) =>
            {
                Some((d.address_range.0, d.length))
            }
            _ => None,
        })
        .collect();
    if windows.is_empty() {
        return Err(format!("{path}._CRS has no memory window"));
    }
    println!("INFO segment {number}: windows {windows:x?}");
    Ok(windows)
}

/// Every bridge's `_PXM` is 0 (as the original's), but with `pxm=<s>@<node>` bridge `s`'s is
/// `node`.
fn check_pxm(boot: &BootInfo, aml: &Aml, segments: &[Segment]) {
    let want = boot.arg("pxm").and_then(|v| {
        let (s, n) = v.split_once('@')?;
        Some((parse_u64(s)?, parse_u64(n)?))
    });
    let mut wrong = Vec::new();
    for s in segments {
        let path = format!("\\_SB_.PC{:02X}._PXM", s.number & 0xff);
        let expected = match want {
            Some((seg, node)) if seg == u64::from(s.number) => node,
            _ => 0,
        };
        match aml.int(&path) {
            Ok(v) if v == expected => {}
            other => wrong.push((s.number, other, expected)),
        }
    }
    crate::check!(
        "segments-pxm",
        wrong.is_empty(),
        "(segment, _PXM, expected): {wrong:?}"
    );
}

/// Lists the segment's functions and checks its slot 0 and its BARs; maps the BARs above
/// 4 GiB (only segment 0's window was mapped at start).
fn enumerate(s: &mut Segment) {
    let mut root = s.root();
    let name = |n: &str| format!("segment{}-{n}", s.number);
    s.functions = root
        .enumerate_bus(0)
        .map(|(df, info)| (df, virtio_device_type(&info)))
        .collect();
    for (df, t) in &s.functions {
        println!("INFO segment {}: {df} {t:?}", s.number);
    }
    let slot0 = DeviceFunction {
        bus: 0,
        device: 0,
        function: 0,
    };
    let id = s.cam().read_word(slot0, 0);
    let bridge = id == 0x0d57_8086;
    crate::check!(
        &name("host-bridge"),
        bridge == (s.number == 0),
        "slot 0 reads {id:#x}"
    );
    let mut outside = Vec::new();
    for &(df, _) in &s.functions {
        let mut bar = 0;
        while bar < 6 {
            let index = bar;
            let info = root.bar_info(df, index);
            bar += 1;
            let Ok(Some(BarInfo::Memory {
                address_type,
                address,
                size,
                ..
            })) = info
            else {
                continue;
            };
            if address_type == MemoryBarType::Width64 {
                // The next register is this BAR's upper half.
                bar += 1;
            }
            if size == 0 {
                continue;
            }
            let inside = s
                .windows
                .iter()
                .any(|&(a, n)| address >= a && address + size <= a + n);
            if !inside {
                outside.push((df, index, address));
            }
            if address >= 1 << 32 {
                if let Err(e) = crate::paging::map_uncached(address, size) {
                    fail(&name("map-bar"), format_args!("{address:#x}: {e:?}"));
                }
            }
        }
    }
    crate::check!(&name("bars"), outside.is_empty(), "outside: {outside:x?}");
}

/// A transport to the first function of type `kind` on segment `number` (its ECAM from the
/// MCFG), its BARs above 4 GiB mapped (`None`: the segment has no such function): for
/// scenarios that take a device past segment 0.
pub fn transport_on(
    acpi: Option<&AcpiInfo>,
    number: u16,
    kind: DeviceType,
) -> Result<Option<PciTransport>, String> {
    let ecam = acpi
        .and_then(|a| a.mcfg.iter().find(|e| e.0 == number))
        .map(|e| e.1)
        .ok_or_else(|| format!("the MCFG has no segment {number}"))?;
    let mut s = Segment {
        number,
        ecam,
        windows: Vec::new(),
        functions: Vec::new(),
    };
    let mut root = s.root();
    s.functions = root
        .enumerate_bus(0)
        .map(|(df, info)| (df, virtio_device_type(&info)))
        .collect();
    let Some(df) = s.find(kind) else {
        return Ok(None);
    };
    for bar in 0..6 {
        if let Ok(Some(BarInfo::Memory { address, size, .. })) = root.bar_info(df, bar) {
            if address >= 1 << 32 && size > 0 {
                crate::paging::map_uncached(address, size)
                    .map_err(|e| format!("BAR{bar} at {address:#x}: {e:?}"))?;
            }
        }
    }
    PciTransport::new::<GuestHal, _>(&mut root, df)
        .map(Some)
        .map_err(|e| format!("{df}: {e}"))
}

fn segment(segments: &[Segment], n: u64) -> Option<&Segment> {
    segments.iter().find(|s| u64::from(s.number) == n)
}

fn transport(s: &Segment, df: DeviceFunction) -> Option<PciTransport> {
    match PciTransport::new::<GuestHal, _>(&mut s.root(), df) {
        Ok(t) => Some(t),
        Err(e) => {
            fail("segments-transport", format_args!("{df}: {e}"));
            None
        }
    }
}

fn drive_rng(segments: &[Segment], n: u64) {
    let Some((s, df)) =
        segment(segments, n).and_then(|s| Some((s, s.find(DeviceType::EntropySource)?)))
    else {
        fail("segments-rng", format_args!("no virtio-rng on segment {n}"));
        return;
    };
    let Some(t) = transport(s, df) else { return };
    let mut buf = [0u8; 64];
    let read = VirtIORng::<GuestHal, _>::new(t)
        .map_err(|e| format!("{e}"))
        .and_then(|mut rng| rng.request_entropy(&mut buf).map_err(|e| format!("{e}")));
    match read {
        Ok(got) => crate::check!(
            "segments-rng",
            got > 0 && buf[..got].iter().any(|&b| b != buf[0]),
            "{got} bytes from {:04x}:{df}",
            s.number
        ),
        Err(e) => fail("segments-rng", format_args!("{e}")),
    }
}

fn drive_blk(segments: &[Segment], n: u64) {
    let Some((s, df)) = segment(segments, n).and_then(|s| Some((s, s.find(DeviceType::Block)?)))
    else {
        fail("segments-blk", format_args!("no virtio-blk on segment {n}"));
        return;
    };
    let Some(t) = transport(s, df) else { return };
    let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => {
            fail("segments-blk", format_args!("{e}"));
            return;
        }
    };
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7 + n as u32) as u8).collect();
    let mut back = [0u8; 512];
    let done = blk
        .write_blocks(1, &pattern)
        .and_then(|()| blk.read_blocks(1, &mut back));
    match done {
        Ok(()) => crate::check!(
            "segments-blk",
            back[..] == pattern[..],
            "sector 1 read back differs on {:04x}:{df}",
            s.number
        ),
        Err(e) => fail("segments-blk", format_args!("{e}")),
    }
}
