//! `busy`'s net watch (`busy_net=1`): a minimal driver of the first virtio-net function that
//! keeps the device started (VERSION_1 and MAC, the receive and transmit queues with no
//! buffers, the configuration interrupt on MSI-X entry 0) and reads the MAC address from the
//! device configuration (with `config_generation`, as virtio 1.2, 4.1.4.3.1 asks). It prints
//! `NETMAC <mac> config_irqs=<n> config_generation=<g>` at the start, and again when a
//! configuration interrupt came or the VM Generation ID changed: so a clone restored with its
//! own MAC (`--restore ...,net_macs=[...]`) shows it. See docs/test-guest.md.

use virtio_drivers::transport::pci::bus::{Command, ConfigurationAccess};
use virtio_drivers::transport::DeviceType;

use crate::rawq::{r16, r8, w16, w32, w64, Layout, QSIZE, VERSION_1};
use crate::virtio::{dma_pages, ecam, find, root};
use crate::{println, svc};

/// The vector configuration changes come on.
pub const CONFIG_VECTOR: u32 = svc::IRQ_VECTOR + 3;
const F_MAC: u64 = 1 << 5;
const NO_VECTOR: u16 = 0xffff;

pub struct NetWatch {
    l: Layout,
    /// Configuration interrupts taken when the MAC was last read.
    irqs: u64,
}

/// Six bytes as `12:34:56:78:9a:bc`.
struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl NetWatch {
    /// Starts the first virtio-net function; `Ok(None)` when there is none, `Err` (what
    /// failed) when it cannot be started.
    pub fn start() -> Result<Option<NetWatch>, alloc::string::String> {
        let Some(df) = find(DeviceType::Network).into_iter().next() else {
            return Ok(None);
        };
        let mut r = root();
        let (_, cmd) = r.get_status_command(df);
        r.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
        let l = Layout::find(df).ok_or("no virtio structures")?;
        l.set_status(0);
        l.set_status(1 | 2);
        let features = VERSION_1 | F_MAC;
        if l.device_features() & features != features {
            return Err(alloc::format!("{df}: VERSION_1 or MAC not offered"));
        }
        for half in 0..2u32 {
            w32(l.common + 0x08, half);
            w32(l.common + 0x0c, (features >> (32 * half)) as u32);
        }
        l.set_status(1 | 2 | 8);
        if l.status() & 8 == 0 {
            return Err(alloc::format!("{df}: FEATURES_OK refused"));
        }
        // receiveq 0 and transmitq 0, no buffers: the device runs, nothing moves.
        for index in [0u16, 1] {
            w16(l.common + 0x16, index);
            let max = r16(l.common + 0x18);
            if max < QSIZE {
                return Err(alloc::format!("{df}: queue {index} size {max}"));
            }
            let ring = dma_pages(2);
            w16(l.common + 0x18, QSIZE);
            w64(l.common + 0x20, ring);
            w64(l.common + 0x28, ring + 0x100);
            w64(l.common + 0x30, ring + 0x1000);
            w16(l.common + 0x1a, NO_VECTOR);
            w16(l.common + 0x1c, 1);
        }
        // MSI-X entry 0 for configuration changes, to this CPU.
        let cap = r
            .capabilities(df)
            .find(|c| c.id == 0x11)
            .map(|c| c.offset)
            .ok_or("no MSI-X capability")?;
        let mut cam = ecam();
        let table = l.bar + u64::from(cam.read_word(df, cap + 4) & !7);
        // The legacy PIC's interrupts (the GED's on IRQ 5, which announces each new VM
        // Generation ID) would come as vectors 0-15 through the LAPIC's virtual wire, once
        // interrupts are taken: masked, as an OS does.
        svc::outb(0x21, 0xff);
        svc::outb(0xa1, 0xff);
        let apic = svc::lapic_enable();
        w32(table, 0xfee0_0000 | apic << 12);
        w32(table + 4, 0);
        w32(table + 8, CONFIG_VECTOR);
        w32(table + 12, 0);
        w16(l.common + 0x10, 0);
        cam.write_word(df, cap, 0x8000 << 16);
        if r16(l.common + 0x10) != 0 {
            return Err(alloc::format!("{df}: the configuration vector was refused"));
        }
        l.set_status(1 | 2 | 8 | 4);
        let w = NetWatch { l, irqs: 0 };
        w.show();
        Ok(Some(w))
    }

    /// The MAC and the generation it was read under (read again while the generation moves).
    fn read(&self) -> ([u8; 6], u8) {
        loop {
            let before = r8(self.l.common + 0x15);
            let mut mac = [0u8; 6];
            for (i, b) in mac.iter_mut().enumerate() {
                *b = r8(self.l.device + i as u64);
            }
            if r8(self.l.common + 0x15) == before {
                return (mac, before);
            }
        }
    }

    fn show(&self) {
        let (mac, generation) = self.read();
        println!(
            "NETMAC {} config_irqs={} config_generation={generation}",
            Mac(mac),
            self.irqs
        );
    }

    /// Once a round: reads the MAC again and prints it when a configuration interrupt came
    /// since the last read, or when `gen_changed` (a new VM Generation ID).
    pub fn poll(&mut self, gen_changed: bool) {
        let irqs = svc::irq_count(CONFIG_VECTOR);
        if irqs != self.irqs || gen_changed {
            self.irqs = irqs;
            self.show();
        }
    }

    /// Waits (at most about 10 ms) with interrupts taken, so a configuration interrupt is
    /// counted; returns early when one comes.
    pub fn wait(&self) {
        svc::wait_vector(CONFIG_VECTOR, self.irqs + 1, 10);
    }
}
