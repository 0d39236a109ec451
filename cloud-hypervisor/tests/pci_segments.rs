//! Several PCI segments (`--platform num_pci_segments`, `--pci-segment`, `pci_segment=` on the
//! devices): the test guest finds them through the MCFG and the AML interpreter and drives
//! devices past segment 0 with `virtio-drivers` (test-guest/src/segments.rs).

mod common;

use std::io::Write;

use common::{boot, guest, scratch};

#[test]
fn devices_on_segments_past_0_are_found_and_work() {
    let img = scratch("segments").join("d.img");
    std::fs::File::create(&img)
        .and_then(|mut f| f.write_all(&[0u8; 1 << 20]))
        .unwrap();
    let disk = format!("path={},pci_segment=2,id=disk2", img.display());
    let r = boot(
        &guest().elf_pvh,
        "test=segments segments=3 rng_segment=1 blk_segment=2 pxm=2@1",
        &[
            "--memory",
            "size=0",
            "--memory-zone",
            "id=z0,size=128M",
            "id=z1,size=128M",
            "--cpus",
            "boot=2",
            "--numa",
            "guest_numa_id=0,cpus=[0],memory_zones=[z0]",
            "guest_numa_id=1,cpus=[1],memory_zones=[z1],pci_segments=[2]",
            "--platform",
            "num_pci_segments=3",
            "--pci-segment",
            "pci_segment=1,mmio32_aperture_weight=2",
            "--rng",
            "src=/dev/urandom,pci_segment=1",
            "--disk",
            &disk,
        ],
    );
    r.assert_guest_passed();
    for c in [
        "segments-mcfg",
        "segments-bridge",
        "segments-pxm",
        "segments-windows-apart",
        "segment0-host-bridge",
        "segment1-host-bridge",
        "segment2-host-bridge",
        "segment0-bars",
        "segment1-bars",
        "segment2-bars",
        "segments-rng",
        "segments-blk",
    ] {
        r.assert_passed(c);
    }
    // The first device of a segment past 0 takes its slot 0 (no host bridge there).
    for line in [
        "INFO segment 1: 00:00.0 Some(EntropySource)",
        "INFO segment 2: 00:00.0 Some(Block)",
    ] {
        assert!(r.stdout.contains(line), "{line} missing in\n{}", r.stdout);
    }
    // The guest's sector reached the image.
    let data = std::fs::read(&img).unwrap();
    let want: Vec<u8> = (0..512u32).map(|i| (i * 7 + 2) as u8).collect();
    assert_eq!(&data[512..1024], &want[..]);
}

#[test]
fn a_device_on_a_segment_the_vm_lacks_is_refused() {
    let r = boot(
        &guest().elf_pvh,
        "test=boot",
        &[
            "--memory",
            "size=256M",
            "--platform",
            "num_pci_segments=2",
            "--rng",
            "src=/dev/urandom,pci_segment=2",
        ],
    );
    assert_eq!(r.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--rng pci_segment=2: the VM has 2 PCI segment(s)"),
        "{}",
        r.stderr
    );
}
