//! The guest's ACPI namespace, built and evaluated by a third-party AML interpreter: the one in
//! the `acpi` crate 6.x (`aml-interp` in Cargo.toml). The guest loads the DSDT and every SSDT
//! into it and evaluates the objects an OS evaluates (`_STA`, `_MAT`, `_CRS`, `_EJ0`, `_UID`,
//! `_SUN`, ...), so the VMM's AML is checked by code we did not write.
//!
//! One gap of that interpreter shapes how hot plug is driven: it does not implement `Notify`
//! (on its TODO list; reaching one panics), so the scan methods the GED's `_EVT` calls (`PSCN`,
//! `CSCN`, `MSCN`), which only read their controller's registers and `Notify` each device,
//! cannot be run. The guest does their register reads itself, with each field's place (region,
//! bit offset, width) taken from the interpreter's namespace ([`Aml::field`]), and then
//! evaluates the notified devices' methods with the interpreter, as an OS does on the
//! notification. See docs/test-guest.md.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ptr::NonNull;
use core::str::FromStr;
use core::sync::atomic::{AtomicU32, Ordering};

use aml_interp::aml::namespace::{AmlName, NamespaceLevelKind};
use aml_interp::aml::object::{FieldUnitKind, Object, WrappedObject};
use aml_interp::aml::op_region::RegionSpace;
use aml_interp::aml::resource::{self, Resource};
use aml_interp::aml::{AmlError, Interpreter};
use aml_interp::registers::FixedRegisters;
use aml_interp::sdt::fadt::Fadt;
use aml_interp::{AcpiTables, Handle, Handler, PciAddress, PhysicalMapping};

use crate::{smp, svc};

/// What the interpreter needs of the platform. Physical memory below 4 GiB is identity mapped
/// and reachable at CPL3; port I/O goes through the monitor's services; PCI configuration
/// space through ports 0xcf8/0xcfc (segment 0).
#[derive(Clone, Copy, Debug)]
pub struct Host;

static NEXT_MUTEX: AtomicU32 = AtomicU32::new(1);

fn pci_select(a: PciAddress, offset: u16) -> u16 {
    let addr = 0x8000_0000u32
        | (u32::from(a.bus()) << 16)
        | (u32::from(a.device()) << 11)
        | (u32::from(a.function()) << 8)
        | u32::from(offset & 0xfc);
    svc::outl(0xcf8, addr);
    0xcfc + (offset & 3)
}

/// Reads `T` at physical address `a`, for the interpreter.
fn rd<T: Copy>(a: usize) -> T {
    // SAFETY: the interpreter reads only what the AML's OperationRegions (and the tables it
    // maps) name, which the VMM places below 4 GiB, identity mapped and reachable at CPL3.
    unsafe { core::ptr::read_volatile(a as *const T) }
}

/// Writes `T` at physical address `a`, for the interpreter.
fn wr<T: Copy>(a: usize, v: T) {
    // SAFETY: as in `rd`: registers the AML's OperationRegions name.
    unsafe { core::ptr::write_volatile(a as *mut T, v) }
}

impl Handler for Host {
    unsafe fn map_physical_region<T>(&self, phys: usize, size: usize) -> PhysicalMapping<Self, T> {
        let ptr = NonNull::new(phys as *mut T).expect("ACPI mapping at physical address 0");
        PhysicalMapping {
            physical_start: phys,
            virtual_start: ptr,
            region_length: size,
            mapped_length: size,
            handler: *self,
        }
    }
    fn unmap_physical_region<T>(_region: &PhysicalMapping<Self, T>) {}

    fn read_u8(&self, a: usize) -> u8 {
        rd(a)
    }
    fn read_u16(&self, a: usize) -> u16 {
        rd(a)
    }
    fn read_u32(&self, a: usize) -> u32 {
        rd(a)
    }
    fn read_u64(&self, a: usize) -> u64 {
        rd(a)
    }
    fn write_u8(&self, a: usize, v: u8) {
        wr(a, v)
    }
    fn write_u16(&self, a: usize, v: u16) {
        wr(a, v)
    }
    fn write_u32(&self, a: usize, v: u32) {
        wr(a, v)
    }
    fn write_u64(&self, a: usize, v: u64) {
        wr(a, v)
    }

    fn read_io_u8(&self, port: u16) -> u8 {
        svc::inb(port)
    }
    fn read_io_u16(&self, port: u16) -> u16 {
        svc::inw(port)
    }
    fn read_io_u32(&self, port: u16) -> u32 {
        svc::inl(port)
    }
    fn write_io_u8(&self, port: u16, v: u8) {
        svc::outb(port, v)
    }
    fn write_io_u16(&self, port: u16, v: u16) {
        svc::outw(port, v)
    }
    fn write_io_u32(&self, port: u16, v: u32) {
        svc::outl(port, v)
    }

    fn read_pci_u8(&self, a: PciAddress, off: u16) -> u8 {
        svc::inb(pci_select(a, off))
    }
    fn read_pci_u16(&self, a: PciAddress, off: u16) -> u16 {
        svc::inw(pci_select(a, off))
    }
    fn read_pci_u32(&self, a: PciAddress, off: u16) -> u32 {
        svc::inl(pci_select(a, off))
    }
    fn write_pci_u8(&self, a: PciAddress, off: u16, v: u8) {
        svc::outb(pci_select(a, off), v)
    }
    fn write_pci_u16(&self, a: PciAddress, off: u16, v: u16) {
        svc::outw(pci_select(a, off), v)
    }
    fn write_pci_u32(&self, a: PciAddress, off: u16, v: u32) {
        svc::outl(pci_select(a, off), v)
    }

    fn nanos_since_boot(&self) -> u64 {
        svc::rdtsc() * 1000 / smp::TSC_PER_US
    }
    fn stall(&self, us: u64) {
        let end = svc::rdtsc() + us * smp::TSC_PER_US;
        while svc::rdtsc() < end {
            core::hint::spin_loop();
        }
    }
    fn sleep(&self, ms: u64) {
        self.stall(ms * 1000)
    }

    // The guest evaluates AML on one CPU only, so a mutex never has to wait.
    fn create_mutex(&self) -> Handle {
        Handle(NEXT_MUTEX.fetch_add(1, Ordering::Relaxed))
    }
    fn acquire(&self, _mutex: Handle, _timeout: u16) -> Result<(), AmlError> {
        Ok(())
    }
    fn release(&self, _mutex: Handle) {}
}

/// Where a named field lies: its region's space and address, and its bits there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    /// SystemIO (a port) rather than SystemMemory.
    pub io: bool,
    /// The region's base.
    pub region: u64,
    /// The region's base plus the field's byte offset.
    pub addr: u64,
    /// The field's first bit in the byte at `addr`.
    pub bit: u8,
    pub bits: u8,
}

impl Field {
    /// The byte (or bytes) the field lies in, read with the narrowest access that holds them.
    fn raw_read(&self, bytes: u64) -> u64 {
        let (a, h) = (self.addr, Host);
        match (self.io, bytes) {
            (true, 1) => h.read_io_u8(a as u16).into(),
            (true, 2) => h.read_io_u16(a as u16).into(),
            (true, _) => h.read_io_u32(a as u16).into(),
            (false, 1) => h.read_u8(a as usize).into(),
            (false, 2) => h.read_u16(a as usize).into(),
            (false, 3 | 4) => h.read_u32(a as usize).into(),
            (false, _) => h.read_u64(a as usize),
        }
    }

    fn width(&self) -> u64 {
        (u64::from(self.bit) + u64::from(self.bits)).div_ceil(8)
    }

    pub fn read(&self) -> u64 {
        let v = self.raw_read(self.width()) >> self.bit;
        if self.bits >= 64 {
            v
        } else {
            v & ((1 << self.bits) - 1)
        }
    }

    /// Writes `v` into the field, the other bits of its bytes as zeros (the update rule of the
    /// registers this guest writes: acknowledge bits and selectors).
    pub fn write(&self, v: u64) {
        let v = v << self.bit;
        let (a, h) = (self.addr, Host);
        match (self.io, self.width()) {
            (true, 1) => h.write_io_u8(a as u16, v as u8),
            (true, 2) => h.write_io_u16(a as u16, v as u16),
            (true, _) => h.write_io_u32(a as u16, v as u32),
            (false, 1) => h.write_u8(a as usize, v as u8),
            (false, 2) => h.write_u16(a as usize, v as u16),
            (false, 3 | 4) => h.write_u32(a as usize, v as u32),
            (false, _) => h.write_u64(a as usize, v),
        }
    }
}

/// The loaded namespace.
pub struct Aml {
    interp: Interpreter<Host>,
}

fn name(path: &str) -> Result<AmlName, String> {
    AmlName::from_str(path).map_err(|e| format!("{path}: not an AML name ({e:?})"))
}

impl Aml {
    /// Loads the DSDT and the SSDTs found from the RSDP at `rsdp`.
    pub fn load(rsdp: u64) -> Result<Aml, String> {
        if rsdp == 0 {
            return Err("no RSDP address".into());
        }
        // SAFETY: the address is the one the VMM's boot information gave (the crate checks the
        // signatures and checksums).
        let tables = unsafe { AcpiTables::from_rsdp(Host, rsdp as usize) }
            .map_err(|e| format!("tables: {e:?}"))?;
        let fadt = tables.find_table::<Fadt>().ok_or("no FADT")?;
        let registers =
            FixedRegisters::new(&fadt, Host).map_err(|e| format!("FADT registers: {e:?}"))?;
        let dsdt = tables.dsdt().map_err(|e| format!("DSDT: {e:?}"))?;
        // The interpreter's API takes an Arc; the guest evaluates AML on one CPU only.
        #[allow(clippy::arc_with_non_send_sync)]
        let registers = Arc::new(registers);
        let interp = Interpreter::new(Host, dsdt.revision, registers, None);
        let header = core::mem::size_of::<aml_interp::sdt::SdtHeader>();
        for (what, t) in core::iter::once(("DSDT", dsdt)).chain(tables.ssdts().map(|t| ("SSDT", t)))
        {
            // SAFETY: the table lies in ACPI memory (identity mapped) and was validated above.
            let stream = unsafe {
                core::slice::from_raw_parts(
                    (t.phys_address + header) as *const u8,
                    (t.length as usize).saturating_sub(header),
                )
            };
            interp
                .load_table(stream)
                .map_err(|e| format!("{what} at {:#x}: {e:?}", t.phys_address))?;
        }
        Ok(Aml { interp })
    }

    /// Evaluates `path` (a method is called with `args`, integers).
    pub fn eval(&self, path: &str, args: &[u64]) -> Result<WrappedObject, String> {
        let args = args.iter().map(|&a| Object::Integer(a).wrap()).collect();
        self.interp
            .evaluate(name(path)?, args)
            .map_err(|e| format!("{path}: {e:?}"))
    }

    pub fn exists(&self, path: &str) -> bool {
        name(path).is_ok_and(|n| self.interp.namespace.lock().get(n).is_ok())
    }

    pub fn int(&self, path: &str) -> Result<u64, String> {
        let v = self.eval(path, &[])?;
        match *v {
            Object::Integer(i) => Ok(i),
            ref other => Err(format!("{path}: {other}, not an integer")),
        }
    }

    pub fn buffer(&self, path: &str) -> Result<Vec<u8>, String> {
        let v = self.eval(path, &[])?;
        match *v {
            Object::Buffer(ref b) => Ok(b.clone()),
            ref other => Err(format!("{path}: {other}, not a buffer")),
        }
    }

    /// The integers of the package `path`.
    pub fn package(&self, path: &str) -> Result<Vec<u64>, String> {
        let v = self.eval(path, &[])?;
        let Object::Package(ref elems) = *v else {
            return Err(format!("{path}: {}, not a package", *v));
        };
        elems
            .iter()
            .map(|e| match **e {
                Object::Integer(i) => Ok(i),
                ref other => Err(format!("{path}: element {other}, not an integer")),
            })
            .collect()
    }

    /// The resources of the buffer `path` (a `_CRS`) evaluates to.
    pub fn resources(&self, path: &str) -> Result<Vec<Resource>, String> {
        resource::resource_descriptor_list(self.eval(path, &[])?)
            .map_err(|e| format!("{path}: {e:?}"))
    }

    /// Where the field `path` lies (see the module's doc for why the guest reads some fields
    /// itself).
    pub fn field(&self, path: &str) -> Result<Field, String> {
        let obj = self.interp.namespace.lock().get(name(path)?);
        let obj = obj.map_err(|e| format!("{path}: {e:?}"))?;
        let Object::FieldUnit(ref f) = *obj else {
            return Err(format!("{path}: {}, not a field", *obj));
        };
        let FieldUnitKind::Normal { ref region } = f.kind else {
            return Err(format!("{path}: a bank or index field"));
        };
        let Object::OpRegion(ref r) = **region else {
            return Err(format!("{path}: its region is {}", **region));
        };
        let io = match r.space {
            RegionSpace::SystemIO => true,
            RegionSpace::SystemMemory => false,
            other => return Err(format!("{path}: in a {other:?} region")),
        };
        if f.bit_length == 0 || f.bit_length > 64 {
            return Err(format!("{path}: {} bits", f.bit_length));
        }
        let byte = (f.bit_index / 8) as u64;
        if byte + ((f.bit_index % 8 + f.bit_length) as u64).div_ceil(8) > r.length {
            return Err(format!("{path}: beyond its region ({} bytes)", r.length));
        }
        Ok(Field {
            io,
            region: r.base,
            addr: r.base + byte,
            bit: (f.bit_index % 8) as u8,
            bits: f.bit_length as u8,
        })
    }

    /// Checks that the device `path` has the `_HID` `want` and the objects `names` (methods,
    /// fields) in its scope.
    pub fn check_device(&self, path: &str, want: &str, names: &[&str]) -> Result<(), String> {
        let h = hid(self, path)?;
        if h != want {
            return Err(format!("{path}._HID is {h}, not {want}"));
        }
        match names.iter().find(|n| !self.exists(&format!("{path}.{n}"))) {
            Some(n) => Err(format!("{path} has no {n}")),
            None => Ok(()),
        }
    }

    /// The full paths of the devices directly in the scope `path` (in name order).
    pub fn devices(&self, path: &str) -> Result<Vec<String>, String> {
        let scope = name(path)?;
        let mut out = Vec::new();
        self.interp
            .namespace
            .lock()
            .traverse(|n, level| {
                if n.parent().ok().as_ref() == Some(&scope)
                    && matches!(level.kind, NamespaceLevelKind::Device)
                {
                    out.push(n.as_string());
                }
                Ok(true)
            })
            .map_err(|e| format!("{path}: {e:?}"))?;
        Ok(out)
    }
}

impl core::fmt::Debug for Aml {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        f.write_str("Aml")
    }
}

/// The `_HID` of `dev` as text (an EISA ID integer decoded, or a string).
pub fn hid(aml: &Aml, dev: &str) -> Result<String, String> {
    let path = format!("{dev}._HID");
    let v = aml.eval(&path, &[])?;
    match *v {
        Object::String(ref s) => Ok(s.clone()),
        Object::Integer(id) => {
            let id = (id as u32).swap_bytes();
            let c = |s: u32| (b'@' + ((id >> s) & 0x1f) as u8) as char;
            Ok(format!("{}{}{}{:04X}", c(26), c(21), c(16), id & 0xffff))
        }
        ref other => Err(format!("{path}: {other}")),
    }
}

/// `acpi-aml`: the interpreter loads the DSDT and SSDTs, `\_S5_` evaluates to the sleep type
/// the byte scan found (acpi_sys.rs), and every device in `\_SB_` that has a `_STA` evaluates it
/// to an integer.
pub fn check_namespace(a: &crate::acpi_sys::AcpiInfo) {
    let t0 = svc::rdtsc();
    let aml = match Aml::load(a.rsdp_addr) {
        Ok(aml) => aml,
        Err(e) => return crate::fail("acpi-aml", format_args!("{e}")),
    };
    let us = (svc::rdtsc() - t0) / smp::TSC_PER_US;
    let s5 = aml.package("\\_S5_");
    if s5.as_ref().ok().and_then(|p| p.first()).map(|&t| t as u8) != a.slp_typ_s5 {
        return crate::fail(
            "acpi-aml",
            format_args!("\\_S5_ = {s5:?}, the DSDT's bytes say {:?}", a.slp_typ_s5),
        );
    }
    let devices = match aml.devices("\\_SB_") {
        Ok(d) => d,
        Err(e) => return crate::fail("acpi-aml", format_args!("{e}")),
    };
    let mut with_sta = 0;
    for dev in &devices {
        let sta = format!("{dev}._STA");
        if aml.exists(&sta) {
            if let Err(e) = aml.int(&sta) {
                return crate::fail("acpi-aml", format_args!("{e}"));
            }
            with_sta += 1;
        }
    }
    crate::println!(
        "INFO acpi aml loaded in about {us} us: {} devices in \\_SB_, {with_sta} with _STA",
        devices.len()
    );
    crate::pass("acpi-aml");
}
