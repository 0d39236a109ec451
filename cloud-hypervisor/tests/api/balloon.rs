//! virtio-balloon end to end with the test guest's `test=balloon` driver: `ch-remote resize
//! --balloon` inflates the balloon and the host's resident memory falls (MADV_DONTNEED, or
//! MADV_REMOVE on shared memfd RAM), `vm.info` shows what the guest kept, and deflating gives
//! the guest pages it can use again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common;
use crate::helpers::*;

/// How long the guest may take for a step (each page it writes faults in on a PVM host).
const WAIT: Duration = Duration::from_secs(60);

const MIB: u64 = 1 << 20;
const RAM: u64 = 512 * MIB;
const TOUCH_MIB: u64 = 384;

/// Boots the balloon guest from the command line (`--balloon size=0`: an empty balloon), with
/// 512 MiB of RAM (`shared=on` when `shared`) of which it fills 384 MiB; waits for its READY.
fn boot_balloon_guest(name: &str, shared: bool) -> (Vmm, PathBuf) {
    require_curl();
    // The serial file's directory exists before the VMM starts.
    let out = common::scratch(&format!("{name}-serial"));
    let serial = out.join("serial.out");
    let kernel = common::guest().elf_pvh.display().to_string();
    let cmdline = format!("test=balloon touch={TOUCH_MIB}");
    let memory = format!("size={RAM}{}", if shared { ",shared=on" } else { "" });
    let serial_arg = format!("file={}", serial.display());
    let vmm = Vmm::start(
        name,
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            &cmdline,
            "--cpus",
            "boot=1",
            "--memory",
            &memory,
            "--balloon",
            "size=0",
            "--serial",
            &serial_arg,
            "--console",
            "off",
        ],
    );
    // Filling 384 MiB takes the guest a few seconds on a PVM host (each page faults in).
    wait_line(
        &serial,
        &format!("BALLOON TOUCHED mib={TOUCH_MIB}"),
        1,
        WAIT,
    );
    wait_line(&serial, "READY", 1, WAIT);
    // The guest shows the balloon it starts with.
    wait_balloon(&serial, 0, 0, 1);
    (vmm, serial)
}

/// Waits for the guest to report `actual` pages in the balloon with the target `target` for
/// the `n`-th time.
fn wait_balloon(serial: &Path, actual: u64, target: u64, n: usize) {
    wait_line(
        serial,
        &format!("BALLOON actual={actual} target={target}"),
        n,
        WAIT,
    );
}

fn memory_actual_size(vmm: &Vmm) -> u64 {
    let info = vmm.ok_json("vm.info");
    info["memory_actual_size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no memory_actual_size: {info}"))
}

/// Inflates to 256 MiB and deflates to 0; `rss` is the resident figure that must fall by at
/// least 200 MiB and come back (VmRSS, or RssShmem for shared RAM).
fn inflate_and_deflate(vmm: &Vmm, serial: &Path, rss: &str) {
    let pid = vmm.pid();
    assert_eq!(memory_actual_size(vmm), RAM);
    let before = status_bytes(pid, rss);
    assert!(
        before >= TOUCH_MIB * MIB,
        "{rss} {} MiB before inflating: the guest's {TOUCH_MIB} MiB are not resident",
        before / MIB
    );

    let irqs = config_irqs(serial, "balloon");
    ch_remote_ok(vmm, &["resize", "--balloon", "256M"]);
    wait_balloon(serial, 65536, 65536, 1);
    // The new target came with a configuration interrupt (the guest also polls every 50 ms).
    wait_config_irqs_above(serial, "balloon", irqs);
    let inflated = status_bytes(pid, rss);
    assert!(
        inflated + 200 * MIB <= before,
        "{rss}: {} MiB before, {} MiB with 256 MiB in the balloon",
        before / MIB,
        inflated / MIB
    );
    assert_eq!(memory_actual_size(vmm), RAM - 256 * MIB);
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["balloon"]["size"], 256 * MIB, "{info}");

    let irqs = config_irqs(serial, "balloon");
    ch_remote_ok(vmm, &["resize", "--balloon", "0"]);
    wait_balloon(serial, 0, 0, 2);
    wait_config_irqs_above(serial, "balloon", irqs);
    // The guest wrote every page it took back and read it back.
    assert_no_fail(serial);
    let deflated = status_bytes(pid, rss);
    assert!(
        deflated >= inflated + 200 * MIB,
        "{rss}: {} MiB inflated, {} MiB after the guest used the deflated pages",
        inflated / MIB,
        deflated / MIB
    );
    assert_eq!(memory_actual_size(vmm), RAM);
    assert_eq!(vmm.state(), "Running");
    eprintln!(
        "{rss}: {} MiB, inflated {} MiB, deflated {} MiB",
        before / MIB,
        inflated / MIB,
        deflated / MIB
    );
}

#[test]
fn balloon_inflate_releases_memory_and_deflate_gives_it_back() {
    let (vmm, serial) = boot_balloon_guest("balloon", false);
    inflate_and_deflate(&vmm, &serial, "VmRSS");

    // A balloon as large as RAM (or larger) is refused, and nothing changes.
    let (status, body) = vmm.curl(
        "PUT",
        "vm.resize",
        Some(&format!("{{\"desired_balloon\": {}}}", 1u64 << 30)),
    );
    assert_eq!(status, 400, "{body}");
    let out = vmm.ch_remote(&["resize", "--balloon", "512M"]);
    assert!(!out.status.success(), "a balloon the size of RAM accepted");
    assert_eq!(vmm.ok_json("vm.info")["config"]["balloon"]["size"], 0);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(text.matches("BALLOON actual=").count(), 3, "{text}");
    assert_eq!(memory_actual_size(&vmm), RAM);
}

/// `shared=on`: guest RAM is a memfd, whose pages only go when the balloon punches holes
/// (MADV_REMOVE); they count in RssShmem.
#[test]
fn balloon_on_shared_memory_punches_holes() {
    let (vmm, serial) = boot_balloon_guest("balloon-shared", true);
    inflate_and_deflate(&vmm, &serial, "RssShmem");
}

/// A target set while the VM is paused is recorded at once, reaches the guest (with a
/// configuration interrupt) only when it resumes, and is then followed.
#[test]
fn balloon_target_set_while_paused_arrives_on_resume() {
    let (vmm, serial) = boot_balloon_guest("balloon-paused", false);
    let irqs = config_irqs(&serial, "balloon");
    assert_eq!(vmm.put("vm.pause").0, 204);
    ch_remote_ok(&vmm, &["resize", "--balloon", "128M"]);
    let info = vmm.ok_json("vm.info");
    assert_eq!(info["config"]["balloon"]["size"], 128 * MIB, "{info}");
    assert_eq!(memory_actual_size(&vmm), RAM);
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(text.matches("BALLOON actual=").count(), 1, "{text}");
    assert_eq!(vmm.put("vm.resume").0, 204);
    wait_balloon(&serial, 32768, 32768, 1);
    // The interrupt may come after the guest found the target by polling (a loaded host).
    wait_config_irqs_above(&serial, "balloon", irqs);
    assert_eq!(memory_actual_size(&vmm), RAM - 128 * MIB);
    assert_no_fail(&serial);
}
