//! virtio-rtc (`--rtc`, device 17, virtio 1.4): one clock, the host's wall clock (UTC, maybe
//! smeared: whatever the host's NTP does), read through one request queue. As the original's:
//! no alarm (`VIRTIO_RTC_F_ALARM` is not offered), no cross-timestamping (`CROSS_CAP` says
//! none, `READ_CROSS` is not supported).
//!
//! A request is a chain of one device-readable buffer (the request: an 8-byte header with the
//! message type, then its body) and one device-writable buffer (the response: an 8-byte header
//! with the status, then its body). A request too short for its type gets `EINVAL`; an unknown
//! type `EOPNOTSUPP`; a clock other than 0 `ENODEV`; a response buffer too small for the answer
//! gets just the header with `EINVAL` when that fits, else nothing (used length 0).

use std::time::{SystemTime, UNIX_EPOCH};

use guest_memory::GuestMemoryMmap;
use log::debug;
use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use crate::device_worker::{version_only_state, worker_lifecycle, DeviceWorker};
use crate::vring::VirtQueue;
use crate::worker::{process_chains, QueueHandler};
use crate::{VirtioDevice, F_VERSION_1};

/// The virtio device id of an RTC device.
pub const TYPE_RTC: u16 = 17;
const QUEUE_SIZE: u16 = 256;

/// Request types.
pub const REQ_READ: u16 = 0x0001;
pub const REQ_READ_CROSS: u16 = 0x0002;
pub const REQ_CFG: u16 = 0x1000;
pub const REQ_CLOCK_CAP: u16 = 0x1001;
pub const REQ_CROSS_CAP: u16 = 0x1002;

/// Response statuses.
pub const S_OK: u8 = 0;
pub const S_EOPNOTSUPP: u8 = 2;
pub const S_ENODEV: u8 = 3;
pub const S_EINVAL: u8 = 4;
pub const S_EIO: u8 = 5;

/// The clock's type: UTC, possibly smeared around leap seconds (the host's NTP decides).
pub const CLOCK_UTC_MAYBE_SMEARED: u8 = 4;
/// Both headers are 8 bytes.
const HEAD: usize = 8;

/// What a request asks for, or how it is wrong.
fn answer(req: &[u8]) -> Vec<u8> {
    let status = |s: u8| {
        let mut r = vec![0u8; HEAD];
        r[0] = s;
        r
    };
    let msg_type = u16::from_le_bytes([req[0], req[1]]);
    // READ, CLOCK_CAP and CROSS_CAP name a clock in the body's first two bytes.
    let clock = req
        .get(HEAD..HEAD + 8)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    let ok_with = |body: &[u8]| {
        let mut r = status(S_OK);
        r.extend_from_slice(body);
        r
    };
    match (msg_type, clock) {
        (REQ_CFG, _) => {
            // One clock, then 6 reserved bytes.
            ok_with(&[1, 0, 0, 0, 0, 0, 0, 0])
        }
        (REQ_READ | REQ_CLOCK_CAP | REQ_CROSS_CAP, None) => status(S_EINVAL),
        (REQ_READ | REQ_CLOCK_CAP | REQ_CROSS_CAP, Some(c)) if c != 0 => status(S_ENODEV),
        (REQ_CLOCK_CAP, Some(_)) => {
            // Type, leap second smearing (unspecified), flags (no alarm), 5 reserved bytes.
            ok_with(&[CLOCK_UTC_MAYBE_SMEARED, 0, 0, 0, 0, 0, 0, 0])
        }
        // Flags: no cross-timestamping for any counter.
        (REQ_CROSS_CAP, Some(_)) => ok_with(&[0; 8]),
        (REQ_READ, Some(_)) => match SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
        {
            Some(ns) => ok_with(&ns.to_le_bytes()),
            None => status(S_EIO),
        },
        // CROSS_CAP answers that no counter is supported, so a driver has no reason to ask.
        (REQ_READ_CROSS, _) => status(S_EOPNOTSUPP),
        _ => status(S_EOPNOTSUPP),
    }
}

/// Serves one chain; returns the used length.
fn serve(mem: &GuestMemoryMmap, chain: &[Descriptor]) -> u32 {
    let [req, resp] = chain else {
        debug!("virtio-rtc: a request is two buffers, not {}", chain.len());
        return 0;
    };
    if req.is_write_only() || !resp.is_write_only() {
        debug!("virtio-rtc: buffers in the wrong direction");
        return 0;
    }
    // The longest request (a header and an 8-byte body) is all that is read.
    let mut buf = [0u8; 2 * HEAD];
    let n = (req.len() as usize).min(buf.len());
    if n < HEAD || mem.read_slice(&mut buf[..n], req.addr()).is_err() {
        debug!("virtio-rtc: request header unreadable");
        return 0;
    }
    let mut out = answer(&buf[..n]);
    if out.len() > resp.len() as usize {
        if (resp.len() as usize) < HEAD {
            debug!("virtio-rtc: response buffer too small for a header");
            return 0;
        }
        out.truncate(HEAD);
        out.fill(0);
        out[0] = S_EINVAL;
    }
    match mem.write_slice(&out, resp.addr()) {
        Ok(()) => out.len() as u32,
        Err(_) => {
            debug!("virtio-rtc: response buffer outside guest memory");
            0
        }
    }
}

struct RtcHandler;

impl QueueHandler for RtcHandler {
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Option<VirtQueue>],
        mem: &GuestMemoryMmap,
    ) -> Result<u64, String> {
        let Some(Some(q)) = queues.get_mut(index) else {
            return Ok(0);
        };
        process_chains(index, q, |_, chain| Some(serve(mem, chain)))
    }
}

/// virtio-rtc's own state: nothing beyond the transport's (its queue positions) — the
/// version only. Requests are answered at once, so a paused device has none in flight.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtcState {
    pub version: u32,
}

pub struct Rtc {
    worker: DeviceWorker<RtcHandler>,
}

impl Default for Rtc {
    fn default() -> Self {
        Rtc {
            worker: DeviceWorker::new("virtio-rtc", RtcHandler),
        }
    }
}

impl VirtioDevice for Rtc {
    fn device_type(&self) -> u16 {
        TYPE_RTC
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    worker_lifecycle!(worker);
    version_only_state!(Rtc, RtcState, "virtio-rtc");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(msg_type: u16, body: &[u8]) -> Vec<u8> {
        let mut r = vec![0u8; HEAD];
        r[..2].copy_from_slice(&msg_type.to_le_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn answers_as_the_specification_lays_them_out() {
        let cfg = answer(&req(REQ_CFG, &[]));
        assert_eq!((cfg.len(), cfg[0], cfg[8]), (16, S_OK, 1));
        let cap = answer(&req(REQ_CLOCK_CAP, &[0; 8]));
        assert_eq!((cap.len(), cap[0], cap[8], cap[10]), (16, S_OK, 4, 0));
        let cross = answer(&req(REQ_CROSS_CAP, &[0; 8]));
        assert_eq!((cross.len(), cross[0], cross[8]), (16, S_OK, 0));
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let read = answer(&req(REQ_READ, &[0; 8]));
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        assert_eq!((read.len(), read[0]), (16, S_OK));
        let ns = u128::from(u64::from_le_bytes(read[8..16].try_into().unwrap()));
        assert!(before.as_nanos() <= ns && ns <= after.as_nanos());
        // Another clock, a short body, an unknown or unsupported type.
        assert_eq!(
            answer(&req(REQ_READ, &[1, 0, 0, 0, 0, 0, 0, 0])),
            [S_ENODEV, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(answer(&req(REQ_CLOCK_CAP, &[0; 2]))[0], S_EINVAL);
        assert_eq!(answer(&req(REQ_READ_CROSS, &[0; 8]))[0], S_EOPNOTSUPP);
        assert_eq!(answer(&req(0x7777, &[]))[0], S_EOPNOTSUPP);
    }

    /// Through a real ring with the worker running: a READ, a response buffer too small (the
    /// header with EINVAL), a chain in the wrong shape (used length 0), and the queue goes on.
    #[test]
    fn requests_through_the_ring() {
        use crate::tests::{Ring, DATA, NEXT, STATUS, WRITE};
        use vm_memory::GuestAddress;
        let mut rtc = Rtc::default();
        let mut r = Ring::start(&mut rtc, 0, 1);
        r.mem
            .write_slice(&req(REQ_READ, &[0; 8]), GuestAddress(DATA))
            .unwrap();
        let send = |r: &mut Ring, resp_len: u32, flags: u16| {
            r.desc(0, DATA, 16, NEXT, 1);
            r.desc(1, STATUS, resp_len, flags, 0);
            r.submit(0)
        };
        assert_eq!(send(&mut r, 16, WRITE), Some(16));
        let mut out = [0u8; 16];
        r.mem.read_slice(&mut out, GuestAddress(STATUS)).unwrap();
        assert_eq!(out[0], S_OK);
        assert!(u64::from_le_bytes(out[8..].try_into().unwrap()) > 1_700_000_000 * 1_000_000_000);
        assert_eq!(send(&mut r, 12, WRITE), Some(8));
        r.mem
            .read_slice(&mut out[..8], GuestAddress(STATUS))
            .unwrap();
        assert_eq!(out[..8], [S_EINVAL, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(send(&mut r, 16, 0), Some(0), "a read-only response buffer");
        assert_eq!(send(&mut r, 16, WRITE), Some(16), "still served");
        rtc.reset();
    }
}
