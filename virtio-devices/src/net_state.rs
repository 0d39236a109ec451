//! virtio-net's own state across a snapshot, and what a restore makes of it: the device may be
//! restored with another guest MAC address than it had (a clone given its own, `net_macs`), and
//! then tells its driver the configuration changed: `config_generation` moves on and, once the
//! restored device runs, it raises the configuration interrupt.

use log::info;
use net_util::MacAddr;

/// virtio-net's own state: what the driver set through the control queue, and what its
/// configuration space showed. Frames are moved synchronously (no request stays in flight
/// across a pause); frames the TAP holds are the host's, not state. The MAC, MTU and TAP are
/// configuration.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    pub version: u32,
    /// Queue pairs in use (VQ_PAIRS_SET): 1 to the device's pairs.
    pub active_pairs: u16,
    /// The receive offloads in force (VIRTIO_NET_F_GUEST_* bits, GUEST_OFFLOADS_SET), a subset
    /// of those the device offers.
    pub guest_offloads: u64,
    /// The MAC address the configuration space showed (`12:34:56:78:9a:bc`). States written
    /// before it was recorded have none; the restoring VMM gives them the snapshot
    /// configuration's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `config_generation` as the device reported it (0 in older states).
    #[serde(default)]
    pub config_generation: u32,
}

/// What restoring `state` into a device configured with `mac` means for its configuration:
/// the generation to report, and whether the configuration changed (the saved MAC is another),
/// so the driver must be told. A state without a MAC is taken as unchanged.
pub(crate) fn restored_config(state: &NetState, mac: MacAddr) -> Result<(u32, bool), String> {
    let Some(saved) = &state.mac else {
        return Ok((state.config_generation, false));
    };
    let saved: MacAddr = saved.parse().map_err(|e| format!("mac: {e}"))?;
    if saved == mac {
        return Ok((state.config_generation, false));
    }
    info!("virtio-net: restored with MAC {mac} (was {saved}): the driver is told");
    Ok((state.config_generation.wrapping_add(1), true))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use guest_memory::GuestMemoryMmap;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::tests::{Irq, QSIZE};
    use crate::{ActivateContext, DeviceStatus, VirtioDevice, VirtioDeviceState};

    const A: MacAddr = MacAddr::new([0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc]);
    const B: MacAddr = MacAddr::new([0x52, 0x54, 0x00, 0x00, 0x00, 0x01]);

    fn state(mac: Option<MacAddr>, generation: u32) -> NetState {
        NetState {
            version: crate::VIRTIO_DEVICE_STATE_VERSION,
            active_pairs: 1,
            guest_offloads: 0,
            mac: mac.map(|m| m.to_string()),
            config_generation: generation,
        }
    }

    #[test]
    fn a_new_mac_moves_the_generation_on() {
        assert_eq!(restored_config(&state(Some(A), 4), A), Ok((4, false)));
        assert_eq!(restored_config(&state(Some(A), 4), B), Ok((5, true)));
        assert_eq!(restored_config(&state(None, 0), B), Ok((0, false)));
        assert_eq!(restored_config(&state(Some(A), u32::MAX), B), Ok((0, true)));
        let mut bad = state(None, 0);
        bad.mac = Some("12:34".into());
        assert!(restored_config(&bad, A).unwrap_err().starts_with("mac: "));
        // Older states (no mac, no generation) still read.
        let old: NetState =
            serde_json::from_str(r#"{"version": 1, "active_pairs": 1, "guest_offloads": 0}"#)
                .unwrap();
        assert_eq!(old.mac, None);
        assert_eq!(old.config_generation, 0);
    }

    /// Activates `net` with its receive queue ready; returns the interrupt counts.
    fn activate(net: &mut dyn VirtioDevice) -> Arc<Irq> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        let mut queues: Vec<Option<(Queue, EventFd)>> = (0..3).map(|_| None).collect();
        queues[0] = Some((q, EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let irq = Arc::new(Irq::default());
        net.activate(ActivateContext {
            mem,
            interrupt: irq.clone(),
            queues,
            acked_features: crate::F_VERSION_1,
            status: Arc::new(DeviceStatus::default()),
            dma: None,
        })
        .unwrap();
        irq
    }

    /// A device restored with another MAC shows it, reports a new generation and raises one
    /// configuration interrupt when it starts; with the same MAC, neither.
    #[test]
    fn restored_with_another_mac_the_device_interrupts() {
        std::thread::spawn(|| {
            // SAFETY: unshare only moves this thread into a new network namespace.
            let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
            for (name, saved, want_gen, want_irqs) in [("vns0", A, 7, 0), ("vns1", B, 8, 1)] {
                let tap = net_util::Tap::open(name, 1)
                    .expect("creating a TAP (the tests run as root with /dev/net/tun)");
                let mut net = crate::Net::new(
                    tap,
                    crate::NetConfig {
                        mac: A,
                        mtu: 1500,
                        queue_size: QSIZE,
                        offloads: Default::default(),
                    },
                )
                .unwrap();
                net.set_device_state(&VirtioDeviceState::Net(state(Some(saved), 7)))
                    .unwrap();
                assert_eq!(net.config_generation(), want_gen);
                let mut cfg = [0u8; 6];
                net.read_config(0, &mut cfg);
                assert_eq!(cfg, A.bytes());
                let irq = activate(&mut net);
                assert_eq!(irq.config.load(Ordering::SeqCst), want_irqs, "{saved}");
                // What a snapshot of it now records: its own MAC and generation.
                let VirtioDeviceState::Net(s) = net.device_state() else {
                    panic!("not a net state");
                };
                assert_eq!(s.mac.as_deref(), Some("12:34:56:78:9a:bc"));
                assert_eq!(s.config_generation, want_gen);
                // A reset and a new start by the driver: no more interrupts.
                net.reset();
                let irq = activate(&mut net);
                assert_eq!(irq.config.load(Ordering::SeqCst), 0);
                assert_eq!(net.config_generation(), want_gen);
            }
        })
        .join()
        .unwrap();
    }
}
