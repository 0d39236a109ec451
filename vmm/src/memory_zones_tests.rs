use std::io::{Read, Seek, SeekFrom, Write};

use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::*;
use crate::memory::create_guest_memory;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn zones(memory: &str, zones: &[&str]) -> MemoryConfig {
    MemoryConfig::parse_with_zones(memory, zones).unwrap()
}

fn spans(cfg: &MemoryConfig) -> Vec<(u64, u64, Option<String>, bool)> {
    layout(cfg)
        .into_iter()
        .map(|s| (s.start.0, s.size, s.zone, s.hotplug))
        .collect()
}

/// Zones follow one another; one that reaches the 32-bit hole goes on at 4 GiB; the
/// virtio-mem regions follow the RAM from the first GiB above it and 4 GiB, in zone order.
#[test]
fn zones_are_laid_out_in_order_around_the_hole() {
    let cfg = zones(
        "size=0,hotplug_method=virtio-mem",
        &[
            "id=a,size=1G,hotplug_size=256M",
            "id=b,size=3G",
            "id=c,size=512M,hotplug_size=128M",
        ],
    );
    let a = Some("a".to_string());
    let b = Some("b".to_string());
    let c = Some("c".to_string());
    assert_eq!(
        spans(&cfg),
        vec![
            (0, GIB, a.clone(), false),
            (GIB, 2 * GIB, b.clone(), false),
            (4 * GIB, GIB, b, false),
            (5 * GIB, 512 * MIB, c.clone(), false),
            (6 * GIB, 256 * MIB, a, true),
            (6 * GIB + 256 * MIB, 128 * MIB, c, true),
        ]
    );
    // The file offset of a zone's second part is where its first part ended.
    let cfg = zones("size=0", &["id=a,size=2G", "id=b,size=2G,file=/f"]);
    let l = layout(&cfg);
    assert_eq!(l[1].file, Some((PathBuf::from("/f"), 0)));
    assert_eq!(l[2].file, Some((PathBuf::from("/f"), GIB)));
    assert_eq!(
        zone_hotplug_region(&zones("size=0", &["id=a,size=1G"]), "a"),
        None
    );
    // Without zones: as before.
    let plain = zones("size=256M,hotplug_size=1G", &[]);
    assert_eq!(
        spans(&plain),
        vec![(0, 256 * MIB, None, false), (4 * GIB, GIB, None, true)]
    );
}

/// A zone's own file backs it: shared=on, the guest's writes reach the file and the file's
/// bytes are the guest's; shared=off maps it privately (the file never changes). A file too
/// short, or a directory, is refused naming the zone and the file.
#[test]
fn a_file_backs_its_zone() {
    let dir = std::env::temp_dir().join(format!("zones-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("z1");
    let p = path.display().to_string();
    for shared in [true, false] {
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[0x5a; 4096]).unwrap();
        f.set_len(8 * MIB).unwrap();
        drop(f);
        let cfg = zones(
            "size=0",
            &[
                "id=z0,size=4M",
                &format!(
                    "id=z1,size=8M,file={p},shared={}",
                    if shared { "on" } else { "off" }
                ),
            ],
        );
        let mem = create_guest_memory(&cfg).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let z1 = GuestAddress(4 * MIB);
        assert_eq!(mem.read_obj::<u8>(z1).unwrap(), 0x5a, "the file's bytes");
        mem.write_obj(0xfeed_f00d_u32, z1.unchecked_add(0x1000))
            .unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        f.seek(SeekFrom::Start(0x1000)).unwrap();
        let mut word = [0u8; 4];
        f.read_exact(&mut word).unwrap();
        let want = if shared { 0xfeed_f00d_u32 } else { 0 };
        assert_eq!(u32::from_le_bytes(word), want, "shared={shared}");
        let region = mem.iter().nth(1).unwrap();
        assert!(region.file_offset().is_some());
    }
    let short = zones("size=0", &[&format!("id=z,size=16M,file={p}")]);
    let e = create_guest_memory(&short).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("--memory-zone id=z file={p}: holds 8388608 bytes")),
        "{e}"
    );
    let d = dir.display().to_string();
    let e = create_guest_memory(&zones("size=0", &[&format!("id=z,size=4M,file={d}")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// host_numa_node binds the zone where the host has the node, and a node it lacks is refused
/// by name (never accepted and ignored).
#[test]
fn host_numa_node_binds_or_is_refused() {
    let e = create_guest_memory(&zones("size=0", &["id=z,size=4M,host_numa_node=63"]))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("--memory-zone id=z host_numa_node=63: the host has no NUMA node 63"),
        "{e}"
    );
    if Path::new("/sys/devices/system/node/node0").exists() {
        let mem =
            create_guest_memory(&zones("size=0", &["id=z,size=4M,host_numa_node=0"])).unwrap();
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
    }
}

/// Huge pages the host lacks are refused naming the zone.
#[test]
fn missing_hugepages_name_the_zone() {
    if crate::memory::tests_free_hugepages(1 << 30) > 0 {
        return;
    }
    let e = create_guest_memory(&zones(
        "size=0",
        &[
            "id=a,size=4M",
            "id=big,size=1G,hugepages=on,hugepage_size=1G",
        ],
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.starts_with("--memory-zone id=big hugepages=on: the host has 0 free huge pages"),
        "{e}"
    );
}
