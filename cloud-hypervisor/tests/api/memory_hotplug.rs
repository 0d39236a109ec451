//! Memory hotplug with virtio-mem end to end (`--memory hotplug_method=virtio-mem`), with the
//! test guest's `test=virtiomem` driver: `vm.resize` / `ch-remote resize --memory` sets the
//! device's requested size, the guest plugs blocks of the hotplug region (above 4 GiB, not in
//! its memory map) and writes every page of them, or unplugs them and the host's resident
//! memory falls; `vm.info` counts what is plugged, and a reboot plugs `hotplugged_size` again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

/// How long the guest may take for a step (each page it writes faults in on a PVM host).
const WAIT: Duration = Duration::from_secs(30);

const MIB: u64 = 1 << 20;
const RAM: u64 = 256 * MIB;
const HOTPLUG: u64 = 1 << 30;

/// Starts the VMM, creates the test guest in `test=virtiomem` (then the words of `args` on its
/// command line) with 256 MiB of RAM and a 1 GiB virtio-mem region (through vm.create's JSON),
/// boots it and waits for its first settled line.
fn boot_guest(name: &str, args: &str) -> (Vmm, PathBuf) {
    require_curl();
    let vmm = Vmm::start(name, &[]);
    let serial = vmm.dir.join("serial.out");
    let test = format!("virtiomem {args}");
    let mut config: Value = serde_json::from_str(&guest_config(test.trim(), &serial)).unwrap();
    config["cpus"] = serde_json::json!({"boot_vcpus": 1, "max_vcpus": 1});
    config["memory"] = serde_json::json!({
        "size": RAM,
        "hotplug_method": "VirtioMem",
        "hotplug_size": HOTPLUG,
    });
    let (status, body) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    wait_line(&serial, "READY", 1, WAIT);
    wait_plugged(&serial, 0, 0, 1);
    (vmm, serial)
}

/// Waits for the guest's `n`-th report of `plugged` bytes plugged with `requested` asked for,
/// its checks passed.
fn wait_plugged(serial: &Path, plugged: u64, requested: u64, n: usize) {
    wait_line(
        serial,
        &format!("VIRTIOMEM plugged={plugged} requested={requested} ok"),
        n,
        WAIT,
    );
}

/// `ch-remote resize --memory <size>`, which must succeed.
fn resize(vmm: &Vmm, size: &str) {
    let out = vmm.ch_remote(&["resize", "--memory", size]);
    assert!(
        out.status.success(),
        "resize --memory {size}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Resizes to `size` (`ram` bytes) and waits for the guest's `n`-th report of having plugged
/// `ram - RAM`; returns the time from the call to the report.
fn resize_and_wait(vmm: &Vmm, serial: &Path, size: &str, ram: u64, n: usize) -> Duration {
    let start = Instant::now();
    resize(vmm, size);
    wait_plugged(serial, ram - RAM, ram - RAM, n);
    start.elapsed()
}

/// vm.info's `memory_actual_size` and `config.memory.hotplugged_size` (0 when absent).
fn memory_info(vmm: &Vmm) -> (u64, u64) {
    let info = vmm.ok_json("vm.info");
    let actual = info["memory_actual_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no memory_actual_size: {info}"));
    let hotplugged = info["config"]["memory"]["hotplugged_size"]
        .as_u64()
        .unwrap_or(0);
    (actual, hotplugged)
}

#[test]
fn virtio_mem_resize_plugs_and_unplugs_memory() {
    let (vmm, serial) = boot_guest("virtio-mem", "");
    let pid = vmm.pid();
    let text = serial_text(&serial);
    assert!(
        text.contains("INFO virtiomem addr=0x100000000 region=0x40000000 ")
            && text.contains(" block=0x200000 requested=0x0 plugged=0x0\n"),
        "the region at 4 GiB, 1 GiB in 2 MiB blocks, nothing asked for:\n{text}"
    );
    // A PLUG with nothing requested was refused.
    assert!(text.contains("INFO virtiomem nack ok\n"), "{text}");
    assert_eq!(memory_info(&vmm), (RAM, 0));
    let base = status_bytes(pid, "VmRSS");

    // +512 MiB: the guest plugs and writes every page of it. The new requested size came with
    // a configuration interrupt (the guest also polls every 20 ms).
    let irqs = config_irqs(&serial, "virtiomem");
    let t = resize_and_wait(&vmm, &serial, "768M", 768 * MIB, 1);
    wait_config_irqs_above(&serial, "virtiomem", irqs);
    let plugged = status_bytes(pid, "VmRSS");
    assert_eq!(memory_info(&vmm), (768 * MIB, 512 * MIB));
    assert!(
        plugged >= base + 480 * MIB,
        "VmRSS {} MiB before, {} MiB with 512 MiB plugged and written",
        base / MIB,
        plugged / MIB
    );
    let text = serial_text(&serial);
    assert!(
        text.contains("INFO virtiomem state ok blocks=512 plugged=256\n"),
        "STATE of the plugged, unplugged and mixed ranges:\n{text}"
    );

    // -384 MiB: the top 192 blocks go, and their host pages with them.
    let irqs = config_irqs(&serial, "virtiomem");
    let t2 = resize_and_wait(&vmm, &serial, "384M", 384 * MIB, 1);
    wait_config_irqs_above(&serial, "virtiomem", irqs);
    let unplugged = status_bytes(pid, "VmRSS");
    assert_eq!(memory_info(&vmm), (384 * MIB, 128 * MIB));
    assert!(
        unplugged + 350 * MIB <= plugged,
        "VmRSS {} MiB with 512 MiB plugged, {} MiB with 128 MiB",
        plugged / MIB,
        unplugged / MIB
    );
    eprintln!(
        "virtio-mem: +512 MiB in {t:?} (VmRSS {} -> {} MiB), -384 MiB in {t2:?} (-> {} MiB)",
        base / MIB,
        plugged / MIB,
        unplugged / MIB
    );

    // Beyond size + hotplug_size, below size, off the 2 MiB grid: 400, nothing changes.
    for ram in [2u64 << 30, 128 * MIB, 384 * MIB + 4096] {
        let (status, body) = vmm.curl(
            "PUT",
            "vm.resize",
            Some(&format!("{{\"desired_ram\": {ram}}}")),
        );
        assert_eq!(status, 400, "desired_ram={ram}: {body}");
        let lines = error_lines(&body).join("\n");
        assert!(
            lines.contains(&format!("desired_ram={ram}")),
            "{ram}: {lines}"
        );
    }
    let out = vmm.ch_remote(&["resize", "--memory", "2G"]);
    assert!(!out.status.success(), "resize --memory 2G accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("desired_ram"), "{err}");
    assert_eq!(memory_info(&vmm), (384 * MIB, 128 * MIB));

    // A reboot builds the device again asked for hotplugged_size: the guest plugs it anew.
    assert_eq!(vmm.put("vm.reboot").0, 204);
    wait_line(&serial, "READY", 2, WAIT);
    wait_plugged(&serial, 128 * MIB, 128 * MIB, 2);
    let text = serial_text(&serial);
    let after = text.rsplit("test-guest: entry").next().unwrap_or_default();
    assert!(after.contains(" requested=0x8000000 "), "{text}");
    assert_eq!(memory_info(&vmm), (384 * MIB, 128 * MIB));
    assert_eq!(vmm.state(), "Running");
    assert!(
        !text.lines().any(|l| l.starts_with("FAIL")),
        "the guest failed:\n{text}"
    );
}

/// A new driver (the guest resets the device and starts again with 512 MiB plugged) finds the
/// blocks still plugged, as the device keeps them across a reset: it unplugs them all
/// (UNPLUG_ALL) and plugs the requested size anew.
#[test]
fn virtio_mem_new_driver_unplugs_all_first() {
    let (vmm, serial) = boot_guest("virtio-mem-restart", "virtiomem_restart=512");
    resize_and_wait(&vmm, &serial, "768M", 768 * MIB, 1);
    wait_line(&serial, "VIRTIOMEM restart", 1, WAIT);
    wait_line(
        &serial,
        "INFO virtiomem unplug-all plugged=0x20000000 after=0x0",
        1,
        WAIT,
    );
    wait_plugged(&serial, 512 * MIB, 512 * MIB, 2);
    assert_eq!(memory_info(&vmm), (768 * MIB, 512 * MIB));
    // The restarted driver follows the next request too.
    resize_and_wait(&vmm, &serial, "256M", RAM, 2);
    assert_eq!(memory_info(&vmm), (RAM, 0));
    let text = serial_text(&serial);
    assert_eq!(text.matches("READY").count(), 1, "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("FAIL")),
        "the guest failed:\n{text}"
    );
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// Figures for docs/hotplug.md (`cargo test -p cloud-hypervisor --test api virtio_mem_figures
/// -- --ignored --nocapture`): the time from the resize call to the guest's report for +512 MiB
/// (plugged and every page written) and -384 MiB, and VmRSS, median of 5 rounds of
/// 0 -> 512 -> 128 -> 0 MiB plugged; and the `ch-remote resize` call alone.
#[test]
#[ignore]
fn virtio_mem_figures() {
    let (vmm, serial) = boot_guest("virtio-mem-figures", "");
    let pid = vmm.pid();
    let (mut plug, mut unplug, mut rss_up, mut rss_down) = (vec![], vec![], vec![], vec![]);
    let mut call = vec![];
    for round in 1..=5 {
        let r0 = status_bytes(pid, "VmRSS");
        plug.push(resize_and_wait(&vmm, &serial, "768M", 768 * MIB, round));
        let r1 = status_bytes(pid, "VmRSS");
        unplug.push(resize_and_wait(&vmm, &serial, "384M", 384 * MIB, round));
        let r2 = status_bytes(pid, "VmRSS");
        resize_and_wait(&vmm, &serial, "256M", RAM, round + 1);
        // The call alone: a resize to the size the VM has is no change for the guest.
        let start = Instant::now();
        resize(&vmm, "256M");
        call.push(start.elapsed());
        rss_up.push((r1 - r0) / MIB);
        rss_down.push((r1 - r2) / MIB);
        eprintln!(
            "round {round}: +512 MiB {:?} (VmRSS +{} MiB), -384 MiB {:?} (VmRSS -{} MiB)",
            plug.last().unwrap(),
            (r1 - r0) / MIB,
            unplug.last().unwrap(),
            (r1 - r2) / MIB
        );
    }
    eprintln!("ch-remote resize call alone: {:?}", median(call));
    eprintln!(
        "median: +512 MiB {:?} (VmRSS +{} MiB), -384 MiB {:?} (VmRSS -{} MiB)",
        median(plug),
        median(rss_up),
        median(unplug),
        median(rss_down)
    );
}
