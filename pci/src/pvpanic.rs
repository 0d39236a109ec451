//! The pvpanic PCI device (`--pvpanic`), as QEMU's `pvpanic-pci` and the original define it:
//! vendor 0x1b36 (Red Hat), device 0x0011, class 0x08 (base system peripheral) subclass 0x80
//! (other), one 32-bit memory BAR. A guest read of the BAR gives the events the device
//! supports (panicked, crash kernel loaded); a write reports one of them. Linux's
//! `pvpanic-pci` driver writes 1 from its panic notifier and 2 when a crash kernel is loaded.
//!
//! The device only passes the write on to its [`PanicSink`]; the VM keeps running, as in the
//! original (what to do with a panicked guest is the management stack's choice).

use std::sync::Arc;

use log::info;

use crate::{BarKind, PciConfiguration, PciDevice, PciIds};

pub const PVPANIC_VENDOR: u16 = 0x1b36;
pub const PVPANIC_DEVICE: u16 = 0x0011;
const CLASS_BASE_SYSTEM_PERIPHERAL: u8 = 0x08;
const SUBCLASS_OTHER: u8 = 0x80;
/// The original's revision ("modern PCI device").
const REVISION: u8 = 1;

/// The guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// The guest loaded a crash kernel (it will boot it after a panic).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// What a read of the BAR answers.
pub const PVPANIC_EVENTS: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
/// The BAR's size: the smallest a memory BAR can have (the guest uses its first byte; the
/// original asks for 2 bytes aligned to 16, which the guest sizes as 16 too).
pub const PVPANIC_BAR_SIZE: u64 = 16;
pub const PVPANIC_BAR_KIND: BarKind = BarKind::Mem32;
/// The original's id for the device (`vm.info`).
pub const PVPANIC_ID: &str = "__pvpanic";

/// Who hears of the guest's reports.
pub trait PanicSink: Send + Sync {
    /// The guest wrote `event` (normally one of the `PVPANIC_*` bits).
    fn guest_panic(&self, event: u8);
}

/// The original's names for the events, as its event monitor reports them.
pub fn event_name(event: u8) -> &'static str {
    match event {
        PVPANIC_PANICKED => "panic",
        PVPANIC_CRASH_LOADED => "crash_loaded",
        _ => "unknown_event",
    }
}

pub struct PvPanic {
    config: PciConfiguration,
    sink: Arc<dyn PanicSink>,
}

impl PvPanic {
    /// The device with its BAR at `bar_addr` (below 4 GiB, aligned to [`PVPANIC_BAR_SIZE`]).
    pub fn new(bar_addr: u64, sink: Arc<dyn PanicSink>) -> Self {
        let mut config = PciConfiguration::new(PciIds {
            vendor: PVPANIC_VENDOR,
            device: PVPANIC_DEVICE,
            class: CLASS_BASE_SYSTEM_PERIPHERAL,
            subclass: SUBCLASS_OTHER,
            prog_if: 0,
            revision: REVISION,
            subsystem_vendor: 0,
            subsystem: 0,
        });
        config.add_bar(0, PVPANIC_BAR_SIZE, PVPANIC_BAR_KIND, bar_addr);
        PvPanic { config, sink }
    }
}

impl PciDevice for PvPanic {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    /// As the original: the first byte of any read holds the supported events.
    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = PVPANIC_EVENTS;
        }
    }
    /// As the original: the first byte of any write is the event.
    fn write_bar(&mut self, _bar: usize, _offset: u64, data: &[u8]) {
        let Some(&event) = data.first() else { return };
        info!("pvpanic: the guest reports {}", event_name(event));
        self.sink.guest_panic(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Heard(Mutex<Vec<u8>>);
    impl PanicSink for Heard {
        fn guest_panic(&self, event: u8) {
            self.0.lock().unwrap().push(event);
        }
    }

    #[test]
    fn identity_bar_and_events() {
        let heard = Arc::new(Heard::default());
        let mut d = PvPanic::new(0xc000_1000, heard.clone());
        assert_eq!(d.config().read_reg(0), 0x0011_1b36);
        assert_eq!(
            d.config().read_reg(2),
            0x0880_0001,
            "class, subclass, revision"
        );
        assert_eq!(d.config().bar(0), Some((0xc000_1000, PVPANIC_BAR_SIZE)));
        // Sizing: all ones written, the size read back.
        d.write_config(0x10, &[0xff; 4]);
        assert_eq!(d.config().read_reg(4), !(PVPANIC_BAR_SIZE as u32 - 1));
        let mut b = [0xaa; 4];
        d.read_bar(0, 0, &mut b);
        assert_eq!(b, [3, 0, 0, 0]);
        let mut one = [0];
        d.read_bar(0, 0, &mut one);
        assert_eq!(one, [PVPANIC_EVENTS]);
        d.write_bar(0, 0, &[PVPANIC_PANICKED]);
        d.write_bar(0, 0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(*heard.0.lock().unwrap(), [1, 2]);
        assert_eq!(event_name(1), "panic");
        assert_eq!(event_name(2), "crash_loaded");
        assert_eq!(event_name(3), "unknown_event");
    }
}
