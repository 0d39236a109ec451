//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and moving packets between descriptor
//! chains and host buffers. Every header field comes from the guest: nothing here trusts it.

use guest_memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

/// Bytes of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The largest payload one packet may carry (as the original and Linux).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

pub const TYPE_STREAM: u16 = 1;
/// The host's CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;

/// `struct virtio_vsock_hdr`, all little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a transmitted chain is not a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum BadPacket {
    /// Fewer readable bytes than a header, or a buffer outside guest memory.
    Short,
    /// `len` over `MAX_PKT_PAYLOAD` or past the chain's readable bytes (the header is kept:
    /// its connection is reset).
    BadLen(Header),
}

/// Reads the packet of a transmit chain: its header, and its payload (`len` bytes) into
/// `payload` (cleared first). Only the readable descriptors before the first writable one count.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    payload: &mut Vec<u8>,
) -> Result<Header, BadPacket> {
    payload.clear();
    let mut hdr = [0u8; HDR_LEN];
    let mut have = 0usize;
    let mut header: Option<Header> = None;
    let mut want = 0usize;
    for d in chain {
        if d.is_write_only() {
            break;
        }
        let mut addr = d.addr().0;
        let mut left = d.len() as usize;
        if header.is_none() {
            let n = left.min(HDR_LEN - have);
            mem.read_slice(&mut hdr[have..have + n], GuestAddress(addr))
                .map_err(|_| BadPacket::Short)?;
            have += n;
            addr = addr.checked_add(n as u64).ok_or(BadPacket::Short)?;
            left -= n;
            if have < HDR_LEN {
                continue;
            }
            let h = Header::parse(&hdr);
            want = h.len as usize;
            if want > MAX_PKT_PAYLOAD {
                return Err(BadPacket::BadLen(h));
            }
            header = Some(h);
        }
        let n = left.min(want - payload.len());
        if n > 0 {
            let at = payload.len();
            payload.resize(at + n, 0);
            if mem
                .read_slice(&mut payload[at..], GuestAddress(addr))
                .is_err()
            {
                return Err(BadPacket::BadLen(header.unwrap_or_default()));
            }
        }
        if payload.len() == want {
            break;
        }
    }
    let h = header.ok_or(BadPacket::Short)?;
    if payload.len() != want {
        return Err(BadPacket::BadLen(h));
    }
    Ok(h)
}

/// Bytes the writable descriptors of a receive chain hold (at most 4 GiB).
pub fn rx_room(chain: &[Descriptor]) -> usize {
    chain
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| d.len() as usize)
        .sum::<usize>()
        .min(u32::MAX as usize)
}

/// Writes `hdr` and then the `data` slices into the writable descriptors of a receive chain.
/// Returns the bytes written, or None when a buffer lies outside guest memory or the chain is
/// too small (the caller checked `rx_room`).
pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    hdr: &Header,
    data: [&[u8]; 2],
) -> Option<u32> {
    let h = hdr.to_bytes();
    let mut parts = [&h[..], data[0], data[1]];
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut part = 0usize;
    let mut written = 0usize;
    for d in chain.iter().filter(|d| d.is_write_only()) {
        let mut addr = d.addr().0;
        let mut left = d.len() as usize;
        while left > 0 && part < parts.len() {
            let n = left.min(parts[part].len());
            if n > 0 {
                mem.write_slice(&parts[part][..n], GuestAddress(addr))
                    .ok()?;
                parts[part] = &parts[part][n..];
                addr = addr.checked_add(n as u64)?;
                left -= n;
                written += n;
            }
            if parts[part].is_empty() {
                part += 1;
            }
        }
        if written == total {
            break;
        }
    }
    (written == total).then_some(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234,
            dst_port: 0x8000_0001,
            len: 10,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: u32::MAX,
        };
        assert_eq!(Header::parse(&h.to_bytes()), h);
        // The wire layout: the length at 24, op at 30.
        let b = h.to_bytes();
        assert_eq!(b[24], 10);
        assert_eq!(b[30], OP_RW as u8);
    }
}
