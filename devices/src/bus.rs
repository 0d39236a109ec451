//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device that answers guest accesses to an address range. `offset` is relative to the start
/// of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap { base: u64, len: u64 },
    #[error("zero-length range at {0:#x}")]
    Empty(u64),
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Devices keyed by the first address of their range. Lookups take a read lock only, so vCPUs
/// do not serialise on the bus, just on the device they touch.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let before = devices.range(..end).next_back();
        if let Some((&b, e)) = before {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        devices.insert(base, Entry { len, device });
        Ok(())
    }

    pub fn remove(&self, base: u64) -> bool {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        devices.remove(&base).is_some()
    }

    /// Takes every device off the bus (they are dropped once nothing else holds them).
    pub fn clear(&self) {
        let old = std::mem::take(&mut *self.devices.write().unwrap_or_else(|e| e.into_inner()));
        drop(old);
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = devices.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (addr - base, entry.device.clone()))
    }

    /// Returns false when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.write(0x3f7, &[1]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, 9)]);
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(vec![]))), 0x10, 0x10)
            .unwrap();
        for (base, len) in [(0x8, 0x9), (0x1f, 1), (0x0, 0x100)] {
            assert_eq!(
                bus.insert(Arc::new(Mutex::new(Echo(vec![]))), base, len),
                Err(BusError::Overlap { base, len })
            );
        }
        bus.insert(Arc::new(Mutex::new(Echo(vec![]))), 0x20, 1)
            .unwrap();
        assert_eq!(
            bus.insert(Arc::new(Mutex::new(Echo(vec![]))), 0x40, 0),
            Err(BusError::Empty(0x40))
        );
        assert!(bus.remove(0x20));
        assert!(!bus.remove(0x20));
        bus.clear();
        let mut b = [0u8; 1];
        assert!(!bus.read(0x10, &mut b));
    }
}
