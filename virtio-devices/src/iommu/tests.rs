use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::mapping::{Status, MAP_READ, MAP_WRITE};
use super::*;

const EP: u32 = 0x18;
const RW: u32 = MAP_READ | MAP_WRITE;

fn mapping() -> Arc<IommuMapping> {
    let m = Arc::new(IommuMapping::new());
    m.manage(EP);
    m.manage(EP + 8);
    m
}

/// The pieces `[iova, iova + len)` translates to, or the fault.
fn pieces(d: &Dma, iova: u64, len: u64, write: bool) -> Result<Vec<(u64, u64)>, Fault> {
    let mut v = Vec::new();
    d.translate(iova, len, write, |a, n| v.push((a, n)))?;
    Ok(v)
}

#[test]
fn translation_follows_attach_map_unmap_and_bypass() {
    let m = mapping();
    let d = m.endpoint(EP);
    // Unattached: bypass (on after a reset) gives identity, off gives nothing.
    assert_eq!(pieces(&d, 0x5000, 8, true), Ok(vec![(0x5000, 8)]));
    m.set_bypass(false);
    assert!(pieces(&d, 0x5000, 8, true).is_err());
    // Unknown endpoint, missing domain.
    assert_eq!(m.attach(1, 0x999, false), Status::Noent);
    assert_eq!(m.map(7, 0, 0xfff, 0, RW), Status::Noent);
    assert_eq!(m.attach(1, EP, false), Status::Ok);
    // Attached to an empty domain: nothing is reachable, whatever bypass says.
    m.set_bypass(true);
    assert!(pieces(&d, 0x5000, 8, false).is_err());
    // Two pages at IOVA 0x10000 on guest pages 0x3000 and 0x7000 (not adjacent), a third
    // read-only page right after the second's guest page.
    assert_eq!(m.map(1, 0x10000, 0x10fff, 0x3000, RW), Status::Ok);
    assert_eq!(m.map(1, 0x11000, 0x11fff, 0x7000, RW), Status::Ok);
    assert_eq!(m.map(1, 0x12000, 0x12fff, 0x8000, MAP_READ), Status::Ok);
    // Overlaps are refused.
    assert_eq!(m.map(1, 0x11000, 0x13fff, 0x9000, RW), Status::Inval);
    assert_eq!(m.map(1, 0xf000, 0x10000, 0x9000, RW), Status::Inval);
    assert_eq!(pieces(&d, 0x10010, 0x10, true), Ok(vec![(0x3010, 0x10)]));
    // Across the non-adjacent pages: split; across adjacent guest pages: merged.
    assert_eq!(
        pieces(&d, 0x10ff0, 0x1020, false),
        Ok(vec![(0x3ff0, 0x10), (0x7000, 0x1010)])
    );
    // Writes into the read-only page fault; reads do not.
    assert!(pieces(&d, 0x11ff0, 0x20, true).is_err());
    assert!(pieces(&d, 0x12000, 1, false).is_ok());
    // Past the last mapping.
    assert!(pieces(&d, 0x12ff0, 0x20, false).is_err());
    // The other endpoint, in no domain, bypasses.
    assert_eq!(
        pieces(&m.endpoint(EP + 8), 0x10000, 4, false),
        Ok(vec![(0x10000, 4)])
    );
    // UNMAP that would split a mapping: refused, nothing removed.
    assert_eq!(m.unmap(1, 0x10000, 0x117ff), Status::Range);
    assert_eq!(m.unmap(1, 0x10800, 0x11fff), Status::Range);
    assert!(pieces(&d, 0x10000, 0x2000, false).is_ok());
    // Whole mappings go; unmapping nothing is fine.
    assert_eq!(m.unmap(1, 0x10000, 0x11fff), Status::Ok);
    assert!(pieces(&d, 0x10000, 1, false).is_err());
    assert!(pieces(&d, 0x12000, 1, false).is_ok());
    assert_eq!(m.unmap(1, 0, 0xffff), Status::Ok);
    // The last endpoint leaving a domain takes it and its mappings away.
    assert_eq!(m.detach(2, EP), Status::Inval);
    assert_eq!(m.detach(1, EP), Status::Ok);
    assert_eq!(m.map(1, 0x10000, 0x10fff, 0x3000, RW), Status::Noent);
    // An identity domain: everything, untranslated; no mappings in it.
    assert_eq!(m.attach(2, EP, true), Status::Ok);
    assert_eq!(pieces(&d, 0x123456, 9, true), Ok(vec![(0x123456, 9)]));
    assert_eq!(m.map(2, 0, 0xfff, 0, RW), Status::Inval);
    // Joining it the other way is refused.
    assert_eq!(m.attach(2, EP + 8, false), Status::Inval);
    // A reset forgets everything.
    m.reset();
    assert!(m.bypass());
    assert_eq!(
        m.state(),
        Spaces {
            bypass: true,
            ..Default::default()
        }
    );
}

#[test]
fn a_mapping_up_to_the_last_address_translates_without_overflow() {
    let m = mapping();
    let d = m.endpoint(EP);
    assert_eq!(m.attach(3, EP, false), Status::Ok);
    assert_eq!(m.map(3, u64::MAX - 0xfff, u64::MAX, 0x4000, RW), Status::Ok);
    assert_eq!(
        pieces(&d, u64::MAX - 0xf, 0x10, true),
        Ok(vec![(0x4ff0, 0x10)])
    );
    // An access that would wrap past the last address faults, translated or not (found by the
    // virtio_iommu fuzz target).
    assert!(pieces(&d, u64::MAX - 0xf, 0x20, false).is_err());
    let other = m.endpoint(EP + 8);
    assert_eq!(pieces(&other, u64::MAX, 1, false), Ok(vec![(u64::MAX, 1)]));
    assert!(pieces(&other, u64::MAX, 0xffff_ffff, false).is_err());
    // A GPA range that would wrap is refused.
    assert_eq!(m.map(3, 0, 0x1fff, u64::MAX - 0xfff, RW), Status::Inval);
}

#[test]
fn state_round_trips_and_bad_states_are_refused() {
    let m = mapping();
    assert_eq!(m.attach(1, EP, false), Status::Ok);
    assert_eq!(m.attach(4, EP + 8, true), Status::Ok);
    assert_eq!(m.map(1, 0x10000, 0x11fff, 0x3000, MAP_READ), Status::Ok);
    m.set_bypass(false);
    let s = m.state();
    let back = mapping();
    back.restore(&s).unwrap();
    assert_eq!(back.state(), s);
    assert_eq!(
        pieces(&back.endpoint(EP), 0x11000, 4, false),
        Ok(vec![(0x4000, 4)])
    );
    // An endpoint this IOMMU does not manage, a missing domain, overlapping mappings.
    let mut bad = s.clone();
    bad.endpoints.insert(0x999, 1);
    assert!(mapping().restore(&bad).is_err());
    let mut bad = s.clone();
    bad.endpoints.insert(EP, 9);
    assert!(mapping().restore(&bad).is_err());
    let mut bad = s.clone();
    let d = bad.domains.get_mut(&1).unwrap();
    d.mappings.push(Mapping {
        iova: 0x11000,
        last: 0x11fff,
        gpa: 0,
        flags: MAP_READ,
    });
    let target = mapping();
    assert!(target.restore(&bad).is_err());
    // All or nothing: the failed restore left the target as it was.
    assert_eq!(target.state(), mapping().state());
}

/// Guest memory for request tests: the request at 0x1000, the answer at 0x2000.
fn request(dev: &mut IommuHandler, mem: &GuestMemoryMmap, req: &[u8], room: u32) -> (u32, Vec<u8>) {
    mem.write_slice(req, GuestAddress(0x1000)).unwrap();
    mem.write_slice(&vec![0xee; room as usize], GuestAddress(0x2000))
        .unwrap();
    let chain = [
        Descriptor::new(0x1000, req.len() as u32, 1, 1),
        Descriptor::new(0x2000, room, 2, 0),
    ];
    let n = dev.serve(mem, &chain);
    let mut out = vec![0u8; room as usize];
    mem.read_slice(&mut out, GuestAddress(0x2000)).unwrap();
    (n, out)
}

fn req(ty: u8, words: &[u64], sizes: &[usize]) -> Vec<u8> {
    let mut v = vec![ty, 0, 0, 0];
    for (&w, &n) in words.iter().zip(sizes) {
        v.extend_from_slice(&w.to_le_bytes()[..n]);
    }
    v
}

fn attach(domain: u32, ep: u32, flags: u32) -> Vec<u8> {
    let mut v = req(1, &[domain.into(), ep.into(), flags.into()], &[4, 4, 4]);
    v.extend_from_slice(&[0; 4]);
    v
}

fn map(domain: u32, start: u64, end: u64, gpa: u64, flags: u32) -> Vec<u8> {
    req(
        3,
        &[domain.into(), start, end, gpa, flags.into()],
        &[4, 8, 8, 8, 4],
    )
}

#[test]
fn requests_answer_with_the_statuses_the_specification_gives() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let m = mapping();
    let mut dev = IommuHandler {
        mapping: m.clone(),
        input_end: (1 << 48) - 1,
    };
    let status = |dev: &mut IommuHandler, r: Vec<u8>| {
        let (n, out) = request(dev, &mem, &r, 4);
        assert_eq!(n, 4, "{r:?}");
        out[0]
    };
    assert_eq!(status(&mut dev, attach(1, 0x999, 0)), Status::Noent as u8);
    assert_eq!(status(&mut dev, attach(1, EP, 2)), Status::Inval as u8);
    assert_eq!(status(&mut dev, attach(1, EP, 0)), Status::Ok as u8);
    assert_eq!(status(&mut dev, map(1, 0x1000, 0x1fff, 0x3000, RW)), 0);
    // Outside the input range, unaligned, unknown flags, missing domain.
    assert_eq!(
        status(&mut dev, map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW)),
        Status::Range as u8
    );
    assert_eq!(
        status(&mut dev, map(1, 0x2000, 0x2ffe, 0, RW)),
        Status::Range as u8
    );
    assert_eq!(
        status(&mut dev, map(1, 0x2000, 0x2fff, 0x800, RW)),
        Status::Range as u8
    );
    assert_eq!(
        status(&mut dev, map(1, 0x2000, 0x2fff, 0, 8)),
        Status::Inval as u8
    );
    assert_eq!(
        status(&mut dev, map(9, 0x2000, 0x2fff, 0, RW)),
        Status::Noent as u8
    );
    let unmap = |d: u32, s: u64, e: u64| {
        let mut v = req(4, &[d.into(), s, e], &[4, 8, 8]);
        v.extend_from_slice(&[0; 4]);
        v
    };
    assert_eq!(status(&mut dev, unmap(1, 0x1000, 0x1fff)), 0);
    assert_eq!(
        pieces(&m.endpoint(EP), 0x1000, 1, false),
        Err(Fault {
            iova: 0x1000,
            len: 1
        })
    );
    // DETACH ignores its reserved word.
    let mut detach = attach(1, EP, 0xffff);
    detach[0] = 2;
    assert_eq!(status(&mut dev, detach), 0);
    assert_eq!(status(&mut dev, vec![0x42, 0, 0, 0]), Status::Unsupp as u8);
    // Too short to say anything.
    assert_eq!(status(&mut dev, vec![1, 0, 0, 0, 1]), Status::Inval as u8);

    // PROBE: the MSI window, then the tail after probe_size bytes.
    let mut probe = req(5, &[EP.into()], &[4]);
    probe.extend_from_slice(&[0; 64]);
    let (n, out) = request(&mut dev, &mem, &probe, PROBE_SIZE + 4);
    assert_eq!(n, PROBE_SIZE + 4);
    assert_eq!(&out[0..4], &[1, 0, 20, 0]);
    assert_eq!(out[4], RESV_MEM_T_MSI);
    assert_eq!(u64_at(&out, 8), Some(MSI_WINDOW.0));
    assert_eq!(u64_at(&out, 16), Some(MSI_WINDOW.1));
    assert!(out[24..PROBE_SIZE as usize].iter().all(|&b| b == 0));
    assert_eq!(out[PROBE_SIZE as usize], 0);
    // An unknown endpoint; a buffer too small for the properties (the tail says so).
    let mut probe = req(5, &[0x999], &[4]);
    probe.extend_from_slice(&[0; 64]);
    let (_, out) = request(&mut dev, &mem, &probe, PROBE_SIZE + 4);
    assert_eq!(out[PROBE_SIZE as usize], Status::Noent as u8);
    let mut probe = req(5, &[EP.into()], &[4]);
    probe.extend_from_slice(&[0; 64]);
    let (n, out) = request(&mut dev, &mem, &probe, 4);
    assert_eq!((n, out[0]), (4, Status::Inval as u8));
}

#[test]
fn hostile_request_chains_fail_without_answers() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let mut dev = IommuHandler {
        mapping: mapping(),
        input_end: u64::MAX,
    };
    // The answer outside memory, a readable part after the writable one, nothing at all,
    // a request outside memory.
    for chain in [
        vec![
            Descriptor::new(0x1000, 20, 1, 1),
            Descriptor::new(0xffff_0000, 4, 2, 0),
        ],
        vec![
            Descriptor::new(0x2000, 4, 2, 1),
            Descriptor::new(0x1000, 20, 1, 0),
        ],
        vec![],
        vec![
            Descriptor::new(u64::MAX - 3, 20, 1, 1),
            Descriptor::new(0x2000, 4, 2, 0),
        ],
    ] {
        assert_eq!(dev.serve(&mem, &chain), 0, "{chain:?}");
    }
}

#[test]
fn bypass_field_and_reset() {
    let m = mapping();
    let mut dev = Iommu::new(m.clone(), 48);
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64_at(&cfg, 0), Some(!0xfff));
    assert_eq!(u64_at(&cfg, 8), Some(0));
    assert_eq!(u64_at(&cfg, 16), Some((1 << 48) - 1));
    assert_eq!(u32_at(&cfg, 28), Some(u32::MAX));
    assert_eq!(u32_at(&cfg, 32), Some(PROBE_SIZE));
    assert_eq!(cfg[36], 1);
    dev.write_config(36, &[0]);
    assert!(!m.bypass());
    // Read-only fields stay.
    dev.write_config(0, &[0xff; 8]);
    dev.read_config(0, &mut cfg);
    assert_eq!((u64_at(&cfg, 0), cfg[36]), (Some(!0xfff), 0));
    assert_eq!(m.attach(1, EP, false), Status::Ok);
    // The state carries the field and the spaces.
    let s = dev.device_state();
    let mut other = Iommu::new(mapping(), 48);
    other.set_device_state(&s).unwrap();
    assert_eq!(other.device_state(), s);
    dev.reset();
    assert!(m.bypass());
    assert_eq!(m.state().endpoints.len(), 0);
    dev.read_config(36, &mut cfg[..1]);
    assert_eq!(cfg[0], 1);
    assert_eq!(Iommu::new(mapping(), 64).input_end, u64::MAX);
}

/// `VirtQueue::chain` behind the IOMMU: each descriptor translated, split where its pages
/// are not adjacent in guest memory, an indirect table found through its mapping, an
/// unmapped buffer pointed far outside guest memory.
#[test]
fn queue_chains_are_translated() {
    use crate::vring::{VirtQueue, UNMAPPED};
    use virtio_queue::{Queue, QueueT};
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap();
    let m = mapping();
    assert_eq!(m.attach(1, EP, false), Status::Ok);
    // Descriptor table (device-readable) at IOVA 0x100000 → 0x1000; buffers at IOVA
    // 0x200000.. → 0x8000 and 0x5000; an indirect table at IOVA 0x300000 → 0x6000.
    for (iova, gpa, flags) in [
        (0x100000u64, 0x1000u64, MAP_READ),
        (0x200000, 0x8000, RW),
        (0x201000, 0x5000, RW),
        (0x300000, 0x6000, MAP_READ),
        (0x400000, 0x9000, MAP_READ),
    ] {
        assert_eq!(m.map(1, iova, iova + 0xfff, gpa, flags), Status::Ok);
    }
    let desc = |at: u64, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(at + 16 * i)).unwrap();
    };
    // Chain 0: readable 0x200ff0+0x20 (split), writable 0x400000 (read-only mapping:
    // unmapped for the write), writable 0x500000 (not mapped).
    desc(0x1000, 0, 0x200ff0, 0x20, 1, 1);
    desc(0x1000, 1, 0x400000, 8, 1 | 2, 2);
    desc(0x1000, 2, 0x500000, 1, 2, 0);
    // Chain 3: an indirect table of one writable descriptor.
    desc(0x1000, 3, 0x300000, 16, 4, 0);
    desc(0x6000, 0, 0x201004, 4, 2, 0);
    let mut q = Queue::new(8).unwrap();
    q.set_desc_table_address(Some(0x1000), Some(0));
    q.set_avail_ring_address(Some(0x2000), Some(0));
    q.set_used_ring_address(Some(0x3000), Some(0));
    q.set_ready(true);
    let vq = VirtQueue::new(q, &mem).with_dma(Some(m.endpoint(EP)));
    let mut out = Vec::new();
    vq.chain(0, &mut out);
    let got: Vec<(u64, u32, bool)> = out
        .iter()
        .map(|d| (d.addr().0, d.len(), d.is_write_only()))
        .collect();
    assert_eq!(
        got,
        [
            (0x8ff0, 0x10, false),
            (0x5000, 0x10, false),
            (UNMAPPED, 8, true),
            (UNMAPPED, 1, true)
        ]
    );
    vq.chain(3, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].addr().0, out[0].len()), (0x5004, 4));
    // The indirect table unmapped: the chain ends there.
    assert_eq!(m.unmap(1, 0x300000, 0x300fff), Status::Ok);
    vq.chain(3, &mut out);
    assert!(out.is_empty());
}

/// A failed translation is a fault for the event queue: its reason (no domain, or no mapping
/// with the permission), read or write, the endpoint and address; at most
/// `MAX_PENDING_FAULTS` wait. The worker puts each in an event buffer (24 bytes), keeping
/// the rest for the driver's next buffers.
#[test]
fn faults_reach_the_event_queue() {
    use crate::vring::VirtQueue;
    use mapping::{
        FaultRecord, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE, FAULT_R_DOMAIN, FAULT_R_MAPPING,
        MAX_PENDING_FAULTS,
    };
    use virtio_queue::{Queue, QueueT};
    let m = mapping();
    m.set_bypass(false);
    assert!(pieces(&m.endpoint(EP), 0x5000, 8, true).is_err());
    assert_eq!(m.attach(1, EP, false), Status::Ok);
    assert_eq!(m.map(1, 0x10000, 0x10fff, 0x3000, MAP_READ), Status::Ok);
    assert!(pieces(&m.endpoint(EP), 0x10000, 8, true).is_err());
    assert!(pieces(&m.endpoint(EP), 0x10000, 8, false).is_ok());
    let first = FaultRecord {
        reason: FAULT_R_DOMAIN,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: EP,
        address: 0x5000,
    };
    let second = FaultRecord {
        reason: FAULT_R_MAPPING,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: EP,
        address: 0x10000,
    };
    assert_eq!(m.next_fault(), Some(first));
    for i in 0..2 * MAX_PENDING_FAULTS as u64 {
        assert!(pieces(&m.endpoint(EP), 0x20000 + i, 1, false).is_err());
    }

    // Two event buffers of 24 bytes at 0x8000 and 0x8100, then a third of 8 (too small).
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    for (i, (addr, len)) in [(0x8000u64, 24u32), (0x8100, 24), (0x8200, 8)]
        .iter()
        .enumerate()
    {
        let d = Descriptor::new(*addr, *len, 2, 0);
        mem.write_obj(d, GuestAddress(0x1000 + 16 * i as u64))
            .unwrap();
        mem.write_obj(i as u16, GuestAddress(0x2004 + 2 * i as u64))
            .unwrap();
    }
    mem.write_obj(3u16, GuestAddress(0x2002)).unwrap();
    let mut q = Queue::new(8).unwrap();
    q.set_desc_table_address(Some(0x1000), Some(0));
    q.set_avail_ring_address(Some(0x2000), Some(0));
    q.set_used_ring_address(Some(0x3000), Some(0));
    q.set_ready(true);
    let mut queues = [None, Some(VirtQueue::new(q, &mem))];
    let mut h = IommuHandler {
        mapping: m.clone(),
        input_end: u64::MAX,
    };
    assert_eq!(h.report_faults(&mut queues, &mem), Ok(1 << EVENT_QUEUE));
    queues[1].as_mut().unwrap().publish();
    let read = |at: u64| {
        let mut b = [0u8; 24];
        mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        b
    };
    assert_eq!(read(0x8000), first.bytes());
    assert_eq!(read(0x8100), second.bytes());
    // Used lengths 24, 24, then 0 for the buffer too small; the rest still wait.
    let used_len = |i: u64| mem.read_obj::<u32>(GuestAddress(0x3008 + 8 * i)).unwrap();
    assert_eq!((used_len(0), used_len(1), used_len(2)), (24, 24, 0));
    assert_eq!(mem.read_obj::<u16>(GuestAddress(0x3002)).unwrap(), 3);
    let third = m.next_fault().unwrap();
    assert_eq!(
        (third.reason, third.flags, third.address),
        (FAULT_R_MAPPING, FAULT_F_READ | FAULT_F_ADDRESS, 0x20001)
    );
    // A reset forgets them.
    m.reset();
    assert_eq!(m.next_fault(), None);
}

/// At most `MAX_MAPPINGS` mappings in all: the next MAP is NOMEM; an UNMAP, or a domain going
/// away with its mappings, makes room again.
#[test]
fn mappings_are_bounded() {
    use mapping::MAX_MAPPINGS;
    let m = mapping();
    assert_eq!(m.attach(1, EP, false), Status::Ok);
    assert_eq!(m.attach(2, EP + 8, false), Status::Ok);
    for i in 0..MAX_MAPPINGS as u64 {
        let iova = i * 0x1000;
        assert_eq!(m.map(1, iova, iova + 0xfff, 0, RW), Status::Ok);
    }
    let past = MAX_MAPPINGS as u64 * 0x1000;
    assert_eq!(m.map(1, past, past + 0xfff, 0, RW), Status::Nomem);
    assert_eq!(m.map(2, 0, 0xfff, 0, RW), Status::Nomem);
    // An overlap is still INVAL, not NOMEM.
    assert_eq!(m.map(1, 0, 0xfff, 0, RW), Status::Inval);
    assert_eq!(m.unmap(1, 0, 0xfff), Status::Ok);
    assert_eq!(m.map(2, 0, 0xfff, 0, RW), Status::Ok);
    assert_eq!(m.map(2, 0x1000, 0x1fff, 0, RW), Status::Nomem);
    assert_eq!(m.detach(1, EP), Status::Ok);
    assert_eq!(m.map(2, 0x1000, 0x1fff, 0, RW), Status::Ok);
}
