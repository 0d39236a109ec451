//! `vm.coredump` (and `ch-remote coredump`): an ELF core file of the guest (docs/snapshot
//! design: `vmm/src/coredump.rs`). Checked against what the snapshot of the same paused
//! moment holds (RAM byte for byte, each vCPU's registers) and against binutils' `readelf`.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::helpers::*;

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A core file's program headers, (type, offset, guest-physical address, size), and its notes,
/// (name, type, description).
struct Core {
    phdrs: Vec<(u32, u64, u64, u64)>,
    notes: Vec<(String, u32, Vec<u8>)>,
}

/// Reads the headers and notes of the core file at `path` (its RAM stays on disk).
fn read_core(path: &Path) -> Core {
    let mut head = vec![0u8; 1 << 20];
    let n = std::fs::File::open(path).unwrap().read(&mut head).unwrap();
    head.truncate(n);
    assert_eq!(&head[..4], b"\x7fELF");
    assert_eq!((head[4], head[5]), (2, 1), "64-bit little-endian");
    assert_eq!(u16_at(&head, 16), 4, "ET_CORE");
    assert_eq!(u16_at(&head, 18), 62, "EM_X86_64");
    let (phoff, phnum) = (u64_at(&head, 32) as usize, usize::from(u16_at(&head, 56)));
    let phdrs: Vec<_> = (0..phnum)
        .map(|i| {
            let p = phoff + 56 * i;
            (
                u32_at(&head, p),
                u64_at(&head, p + 8),
                u64_at(&head, p + 24),
                u64_at(&head, p + 32),
            )
        })
        .collect();
    let &(kind, off, _, size) = phdrs.first().unwrap();
    assert_eq!(kind, 4, "the first program header is PT_NOTE");
    let (mut at, end) = (off as usize, (off + size) as usize);
    let mut notes = Vec::new();
    while at < end {
        let (namesz, descsz, kind) = (
            u32_at(&head, at) as usize,
            u32_at(&head, at + 4) as usize,
            u32_at(&head, at + 8),
        );
        let name = String::from_utf8_lossy(&head[at + 12..at + 12 + namesz - 1]).into_owned();
        let desc = at + 12 + namesz.next_multiple_of(4);
        notes.push((name, kind, head[desc..desc + descsz].to_vec()));
        at = desc + descsz.next_multiple_of(4);
    }
    Core { phdrs, notes }
}

/// Whether the file at `a` from `a_off` on and the file `b` are the same bytes.
fn same_bytes(a: &Path, a_off: u64, b: &Path) -> bool {
    use std::io::{Seek, SeekFrom};
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    fa.seek(SeekFrom::Start(a_off)).unwrap();
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fb.read(&mut bb).unwrap();
        if n == 0 {
            return fa.read(&mut ba[..1]).unwrap() == 0;
        }
        fa.read_exact(&mut ba[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

#[test]
fn coredump_of_a_paused_and_of_a_running_vm() {
    require_curl();
    let vmm = Vmm::start("api-coredump", &[]);
    let serial = vmm.dir.join("serial.out");
    let body = |p: &Path| format!(r#"{{"destination_url": "file://{}"}}"#, p.display());
    let core = vmm.dir.join("core");
    assert_eq!(
        vmm.curl("PUT", "vm.coredump", Some(&body(&core))).0,
        404,
        "no VM"
    );
    assert_eq!(
        vmm.curl("PUT", "vm.create", Some(&guest_config("tick", &serial)))
            .0,
        204
    );
    assert_ne!(
        vmm.curl("PUT", "vm.coredump", Some(&body(&core))).0,
        204,
        "not booted"
    );
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_for(&serial, "TICK 3", 1);

    // Paused: the snapshot and the core file of the same moment.
    assert_eq!(vmm.put("vm.pause").0, 204);
    let snap = vmm.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    assert_eq!(vmm.curl("PUT", "vm.snapshot", Some(&body(&snap))).0, 204);
    let (status, text) = vmm.curl("PUT", "vm.coredump", Some(&body(&core)));
    assert_eq!(status, 204, "{text}");
    assert_eq!(vmm.state(), "Paused", "a paused VM stays paused");
    let state: vmm::snapshot::VmSnapshot =
        serde_json::from_str(&std::fs::read_to_string(snap.join("state.json")).unwrap()).unwrap();
    let c = read_core(&core);
    // One PT_LOAD per RAM range, in order, back to back after the notes: RAM byte for byte.
    let loads: Vec<_> = c.phdrs[1..].iter().map(|p| (p.0, p.2, p.3)).collect();
    let ranges: Vec<_> = state
        .memory_ranges
        .iter()
        .map(|r| (1u32, r.gpa, r.length))
        .collect();
    assert_eq!(loads, ranges);
    assert!(
        same_bytes(&core, c.phdrs[1].1, &snap.join("memory-ranges")),
        "the core's RAM differs from the snapshot's"
    );
    let meta = std::fs::metadata(&core).unwrap();
    let size = meta.len();
    let last = c.phdrs.last().unwrap();
    assert_eq!(size, last.1 + last.3);
    // RAM the guest never touched is left as holes, as in the snapshot's file.
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < size / 4,
        "{} bytes allocated for a {size}-byte core",
        meta.blocks() * 512
    );
    // Per vCPU a CORE note (NT_PRSTATUS: pid the vCPU, rip and rsp its own), then per vCPU a
    // QEMU note (version 1; rip, cr3).
    assert_eq!(c.notes.len(), 2 * state.vcpus.len());
    for (i, v) in state.vcpus.iter().enumerate() {
        let (name, kind, d) = &c.notes[i];
        assert_eq!((name.as_str(), *kind, d.len()), ("CORE", 1, 336));
        assert_eq!(u32_at(d, 32), i as u32, "pr_pid");
        assert_eq!(u64_at(d, 112 + 16 * 8), v.regs.rip, "vCPU {i} rip");
        assert_eq!(u64_at(d, 112 + 19 * 8), v.regs.rsp, "vCPU {i} rsp");
        let (name, kind, d) = &c.notes[state.vcpus.len() + i];
        assert_eq!((name.as_str(), *kind), ("QEMU", 0));
        assert_eq!((u32_at(d, 0), u32_at(d, 4) as usize), (1, d.len()));
        assert_eq!(u64_at(d, 8 + 16 * 8), v.regs.rip, "vCPU {i} rip");
        assert_eq!(
            u64_at(d, 8 + 18 * 8 + 10 * 24 + 3 * 8),
            v.sregs.cr3,
            "vCPU {i} cr3"
        );
    }
    // binutils reads it as a core file with those notes.
    let out = Command::new("readelf")
        .args(["-h", "-l", "-n"])
        .arg(&core)
        .output()
        .expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("CORE (Core file)"), "{text}");
    assert_eq!(
        text.matches("NT_PRSTATUS").count(),
        state.vcpus.len(),
        "{text}"
    );
    assert_eq!(text.matches("QEMU").count(), state.vcpus.len(), "{text}");
    assert_eq!(text.matches("LOAD").count(), ranges.len(), "{text}");

    // The file exists: refused, and left as it was.
    let (status, text) = vmm.curl("PUT", "vm.coredump", Some(&body(&core)));
    assert_eq!(status, 400, "{text}");
    assert_eq!(std::fs::metadata(&core).unwrap().len(), size);
    let (status, _) = vmm.curl(
        "PUT",
        "vm.coredump",
        Some(r#"{"destination_url": "tcp://127.0.0.1:1"}"#),
    );
    assert_ne!(status, 204);

    // Running: paused for the dump and resumed; the guest goes on. Through ch-remote.
    assert_eq!(vmm.put("vm.resume").0, 204);
    let before = ticks(&serial);
    let core2 = vmm.dir.join("core2");
    ch_remote_ok(&vmm, &["coredump", &format!("file://{}", core2.display())]);
    assert_eq!(vmm.state(), "Running");
    assert_eq!(std::fs::metadata(&core2).unwrap().len(), size);
    wait_for(&serial, &format!("TICK {}", before + 3), 1);
    assert_no_fail(&serial);
}
