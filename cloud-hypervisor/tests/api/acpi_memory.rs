//! ACPI memory hotplug end to end (`--memory hotplug_size=…`, the default `hotplug_method=acpi`),
//! with the test guest's `test=acpimem` doing what Linux does with the original's mechanism:
//! each `vm.resize` / `ch-remote resize --memory` up plugs a DIMM after the last in the hotplug
//! region (above 4 GiB, not in the memory map), the guest finds it through `\_SB_.MHPC` and the
//! GED, acknowledges it, and writes and reads back every page of it. Memory cannot be taken
//! back; a reboot finds the plugged memory present at boot as one DIMM; a snapshot restored in
//! a new VMM and a live migration keep the DIMMs, the guest's data in them and the slots.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;

const MIB: u64 = 1 << 20;
const RAM: u64 = 256 * MIB;
const HOTPLUG: u64 = 1 << 30;
/// Where the hotplug region starts for 256 MiB of RAM: the first GiB boundary above RAM and
/// 4 GiB.
const REGION: u64 = 1 << 32;

/// The guest's serial output (its port on the VMM's stdout), gathered by a thread.
struct Serial(Arc<Mutex<String>>);

impl Serial {
    /// Reads `vmm`'s stdout from now on.
    fn of(vmm: &mut Vmm) -> Serial {
        let mut out = vmm
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .expect("the VMM's stdout");
        let text = Arc::new(Mutex::new(String::new()));
        let t = text.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                t.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Serial(text)
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, line: &str) -> usize {
        self.text().lines().filter(|l| *l == line).count()
    }

    /// Waits (up to 30 s) until `line` is a line of the output `n` times; fails at once on a
    /// FAIL line.
    fn wait_line(&self, line: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.text();
            if text.lines().filter(|l| *l == line).count() >= n {
                return;
            }
            assert!(
                !text.lines().any(|l| l.starts_with("FAIL")),
                "the guest failed:\n{text}"
            );
            assert!(Instant::now() < deadline, "no {n}x '{line}' in:\n{text}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn assert_no_fail(&self) {
        let text = self.text();
        assert!(
            !text.lines().any(|l| l.starts_with("FAIL")),
            "the guest failed:\n{text}"
        );
    }
}

/// The test guest in `test=acpimem` (then the words of `args`) with 256 MiB of RAM, a hotplug
/// region of `hotplug` bytes (the default method: ACPI) and one vCPU, its serial port on the
/// VMM's stdout.
fn config(hotplug: u64, args: &str) -> Value {
    let kernel = common::guest().elf_pvh.display().to_string();
    json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": RAM, "hotplug_size": hotplug},
        "payload": {"kernel": kernel, "cmdline": format!("test=acpimem {args}").trim()},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    })
}

/// Starts a VMM, creates and boots the guest (`config`) and waits for its READY with nothing
/// plugged.
fn boot_guest(name: &str, hotplug: u64, args: &str) -> (Vmm, Serial) {
    boot_with(name, config(hotplug, args))
}

/// `boot_guest` with this configuration.
fn boot_with(name: &str, config: Value) -> (Vmm, Serial) {
    require_curl();
    let mut vmm = Vmm::start(name, &[]);
    let serial = Serial::of(&mut vmm);
    let (status, body) = vmm.curl("PUT", "vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    assert_eq!(vmm.put("vm.boot").0, 204);
    serial.wait_line("READY", 1);
    let text = serial.text();
    assert!(
        text.contains("INFO acpimem mhpr=0xfea02000 ")
            && text.contains(" devices=16 ")
            && text.contains("\nINFO acpimem slots=0 total=0\n"),
        "MHPC's registers at 0xfea02000, 16 memory devices, nothing plugged:\n{text}"
    );
    (vmm, serial)
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

/// The guest's line for a DIMM it onlined (`what`: "added" or "present").
fn dimm_line(what: &str, slot: u32, base: u64, size: u64) -> String {
    format!("ACPIMEM {what} slot={slot} base={base:#x} size={size:#x} ok")
}

/// Resizes to `size` and waits for the guest's `n`-th report of having added `slot` at `base`,
/// `bytes` long; returns the time from the call to the report.
fn plug(vmm: &Vmm, serial: &Serial, size: &str, dimm: (u32, u64, u64), n: usize) -> Duration {
    let (slot, base, bytes) = dimm;
    let start = Instant::now();
    resize(vmm, size);
    serial.wait_line(&dimm_line("added", slot, base, bytes), n);
    start.elapsed()
}

fn vm_rss(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status:\n{text}"));
    kib * 1024
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

/// `vm.resize` with `desired_ram` refused with a 400 naming it and saying `why`.
fn refused(vmm: &Vmm, ram: u64, why: &str) {
    let body = format!("{{\"desired_ram\": {ram}}}");
    let (status, text) = vmm.curl("PUT", "vm.resize", Some(&body));
    assert_eq!(status, 400, "desired_ram={ram}: {text}");
    let lines = error_lines(&text).join("\n");
    assert!(
        lines.contains(&format!("desired_ram={ram}")) && lines.contains(why),
        "desired_ram={ram}: {lines}"
    );
}

#[test]
fn acpi_memory_resize_plugs_dimms_the_guest_onlines() {
    let (mut vmm, serial) = boot_guest("acpi-memory", HOTPLUG, "");
    let pid = vmm.pid();
    assert_eq!(memory_info(&vmm), (RAM, 0));
    let base = vm_rss(pid);

    // +256 MiB: DIMM 0 at the region's start; the guest acknowledges and writes it, and finds
    // an ejection refused.
    plug(&vmm, &serial, "512M", (0, REGION, 256 * MIB), 1);
    serial.wait_line("INFO acpimem eject refused ok", 1);
    serial.wait_line(&format!("INFO acpimem total={}", 256 * MIB), 1);
    // +256 MiB more: DIMM 1 right after it.
    plug(&vmm, &serial, "768M", (1, REGION + 256 * MIB, 256 * MIB), 1);
    serial.wait_line(&format!("INFO acpimem verify ok total={}", 256 * MIB), 1);
    serial.wait_line(&format!("INFO acpimem total={}", 512 * MIB), 1);
    assert_eq!(memory_info(&vmm), (768 * MIB, 512 * MIB));
    let plugged = vm_rss(pid);
    assert!(
        plugged >= base + 480 * MIB,
        "VmRSS {} MiB before, {} MiB with 512 MiB plugged and written",
        base / MIB,
        plugged / MIB
    );
    eprintln!("acpi memory: VmRSS {} -> {} MiB", base / MIB, plugged / MIB);

    // Less (memory cannot be removed), off the 128 MiB grid, beyond size + hotplug_size: 400,
    // nothing changes.
    refused(&vmm, 640 * MIB, "cannot be removed");
    refused(&vmm, 700 * MIB, "128 MiB");
    refused(&vmm, RAM + HOTPLUG + 128 * MIB, "size + hotplug_size");
    let out = vmm.ch_remote(&["resize", "--memory", "640M"]);
    assert!(!out.status.success(), "resize --memory 640M accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("desired_ram") && err.contains("cannot be removed"),
        "{err}"
    );
    assert_eq!(memory_info(&vmm), (768 * MIB, 512 * MIB));
    // The same size again plugs nothing.
    resize(&vmm, "768M");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        serial.count(&format!("INFO acpimem total={}", 512 * MIB)),
        1
    );
    assert_eq!(memory_info(&vmm), (768 * MIB, 512 * MIB));

    // A reboot: the 512 MiB are there at boot as one DIMM (present, not inserting).
    assert_eq!(vmm.put("vm.reboot").0, 204);
    serial.wait_line("READY", 2);
    let text = serial.text();
    let after = text.rsplit("test-guest: entry").next().unwrap_or_default();
    assert!(
        after.contains(&format!(
            "\n{}\n",
            dimm_line("present", 0, REGION, 512 * MIB)
        )) && after.contains(&format!("\nINFO acpimem slots=1 total={}\n", 512 * MIB))
            && after.contains("\nINFO acpimem eject refused ok\n"),
        "{text}"
    );
    assert_eq!(memory_info(&vmm), (768 * MIB, 512 * MIB));
    // And the next DIMM comes after it.
    plug(&vmm, &serial, "896M", (1, REGION + 512 * MIB, 128 * MIB), 1);
    assert_eq!(memory_info(&vmm), (896 * MIB, 640 * MIB));
    assert_eq!(vmm.state(), "Running");
    serial.assert_no_fail();
    assert_eq!(vmm.put("vmm.shutdown").0, 200);
    assert_eq!(vmm.wait().code(), Some(0));
}

/// Sixteen DIMMs of 128 MiB, each onlined by the guest in the slot after the last; the
/// seventeenth is 400 (every slot taken), with room left in the region.
#[test]
fn acpi_memory_sixteen_slots() {
    let hotplug = 18 * 128 * MIB;
    let (vmm, serial) = boot_guest("acpi-memory-slots", hotplug, "");
    for slot in 0..16u32 {
        let ram = RAM + u64::from(slot + 1) * 128 * MIB;
        let base = REGION + u64::from(slot) * 128 * MIB;
        plug(
            &vmm,
            &serial,
            &format!("{}M", ram / MIB),
            (slot, base, 128 * MIB),
            1,
        );
    }
    serial.wait_line(&format!("INFO acpimem total={}", 2048 * MIB), 1);
    assert_eq!(memory_info(&vmm), (RAM + 2048 * MIB, 2048 * MIB));
    refused(&vmm, RAM + 2176 * MIB, "every memory hotplug slot is taken");
    assert_eq!(memory_info(&vmm), (RAM + 2048 * MIB, 2048 * MIB));
    serial.assert_no_fail();
}

/// Pause, snapshot, restore in a new VMM, resume: the restored VM has the DIMMs (the same
/// memory slots and controller state), the guest's data in them is intact, and the next resize
/// takes the next slot.
#[test]
fn acpi_memory_snapshot_restore_keeps_the_dimms() {
    snapshot_restore("acpi-memory-snap", None);
}

/// The same, restored on demand (userfaultfd, the DIMMs' pages read from the snapshot as the
/// guest touches them) and copy-on-write (the snapshot's memory file mapped privately).
#[test]
fn acpi_memory_restore_on_demand_and_copy_on_write() {
    snapshot_restore("acpi-memory-ondemand", Some("ondemand"));
    snapshot_restore("acpi-memory-cow", Some("copyonwrite"));
}

/// Boots, plugs a DIMM of 256 MiB, snapshots, restores in a new VMM (over the API, or with
/// `ch-remote restore` in `mode`), resumes and plugs the next DIMM.
fn snapshot_restore(name: &str, mode: Option<&str>) {
    let (mut a, serial) = boot_guest(&format!("{name}-a"), HOTPLUG, "");
    plug(&a, &serial, "512M", (0, REGION, 256 * MIB), 1);
    assert_eq!(a.put("vm.pause").0, 204);
    let snap = a.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    let (status, text) = a.curl("PUT", "vm.snapshot", Some(&body));
    assert_eq!(status, 204, "{text}");
    assert_eq!(a.put("vmm.shutdown").0, 200);
    assert_eq!(a.wait().code(), Some(0));
    serial.assert_no_fail();

    let mut b = Vmm::start(&format!("{name}-b"), &[]);
    let restored = Serial::of(&mut b);
    match mode {
        None => {
            let body = json!({ "source_url": url }).to_string();
            let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
            assert_eq!(status, 204, "{text}");
        }
        Some(m) => {
            let arg = format!("source_url={url},memory_restore_mode={m}");
            let out = b.ch_remote(&["restore", &arg]);
            assert!(
                out.status.success(),
                "restore {arg}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_eq!(b.state(), "Paused");
    assert_eq!(memory_info(&b), (512 * MIB, 256 * MIB));
    assert_eq!(b.put("vm.resume").0, 204);
    // +128 MiB: the guest checks DIMM 0 first, then adds DIMM 1 after it.
    plug(&b, &restored, "640M", (1, REGION + 256 * MIB, 128 * MIB), 1);
    restored.wait_line(&format!("INFO acpimem verify ok total={}", 256 * MIB), 1);
    assert_eq!(memory_info(&b), (640 * MIB, 384 * MIB));
    let text = restored.text();
    assert!(!text.contains("READY"), "the guest started again:\n{text}");
    restored.assert_no_fail();
    assert_eq!(b.put("vmm.shutdown").0, 200);
    assert_eq!(b.wait().code(), Some(0));
    // The snapshot holds the whole region: gone with the test.
    let _ = std::fs::remove_dir_all(&a.dir);
}

/// A DIMM plugged while the VM is paused and snapshotted before the guest has seen it: the
/// restored VM's guest gets the GED's interrupt on resume, finds the slot inserting and onlines
/// it.
#[test]
fn acpi_memory_plugged_while_paused_survives_a_snapshot() {
    let (mut a, serial) = boot_guest("acpi-memory-paused-a", HOTPLUG, "");
    plug(&a, &serial, "512M", (0, REGION, 256 * MIB), 1);
    assert_eq!(a.put("vm.pause").0, 204);
    resize(&a, "640M");
    assert_eq!(memory_info(&a), (640 * MIB, 384 * MIB));
    let snap = a.dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    let (status, text) = a.curl("PUT", "vm.snapshot", Some(&body));
    assert_eq!(status, 204, "{text}");
    assert_eq!(a.put("vmm.shutdown").0, 200);
    assert_eq!(a.wait().code(), Some(0));
    let text = serial.text();
    assert!(
        !text.contains("slot=1"),
        "the paused guest saw DIMM 1:\n{text}"
    );

    let mut b = Vmm::start("acpi-memory-paused-b", &[]);
    let restored = Serial::of(&mut b);
    let body = json!({ "source_url": url }).to_string();
    let (status, text) = b.curl("PUT", "vm.restore", Some(&body));
    assert_eq!(status, 204, "{text}");
    assert_eq!(memory_info(&b), (640 * MIB, 384 * MIB));
    assert_eq!(b.put("vm.resume").0, 204);
    restored.wait_line(&dimm_line("added", 1, REGION + 256 * MIB, 128 * MIB), 1);
    restored.wait_line(&format!("INFO acpimem total={}", 384 * MIB), 1);
    plug(&b, &restored, "768M", (2, REGION + 384 * MIB, 128 * MIB), 1);
    restored.assert_no_fail();
    assert_eq!(b.put("vmm.shutdown").0, 200);
    assert_eq!(b.wait().code(), Some(0));
    // The snapshot holds the whole region: gone with the test.
    let _ = std::fs::remove_dir_all(&a.dir);
}

/// `ch-remote receive-migration <url>` on `vmm`, in the background.
fn receive(vmm: &Vmm, url: &str) -> Child {
    Command::new(ch_remote_bin())
        .arg("--api-socket")
        .arg(&vmm.sock)
        .args(["receive-migration", url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The guest's `acpimem_busy` reports so far: (round, bytes onlined).
fn rounds(serial: &Serial) -> Vec<(u64, u64)> {
    serial
        .text()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("INFO acpimem round=")?;
            let (n, total) = rest.split_once(" ok total=")?;
            Some((n.parse().ok()?, total.parse().ok()?))
        })
        .collect()
}

/// Waits (up to 30 s) for `n` busy reports with `total` bytes onlined; returns the reports.
fn wait_rounds(serial: &Serial, total: u64, n: usize) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        serial.assert_no_fail();
        let r = rounds(serial);
        if r.iter().filter(|x| x.1 == total).count() >= n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no {n} rounds with {total} bytes:\n{}",
            serial.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A live migration of a VM with two DIMMs the guest has written and keeps rewriting
/// (`acpimem_busy=1`: a word of every 2 MiB every 20 ms, each checked against the previous
/// round's, so the dirty log must cover the DIMMs): the destination has them (vm.info, the
/// slots), the guest's rounds go on there with every word right, and its data is intact at
/// the next scan, which a resize triggers and which adds the next DIMM.
#[test]
fn acpi_memory_live_migration_keeps_the_dimms() {
    migrate_and_check("acpi-memory-migrate", false);
}

/// The same as a local migration with shared memory: the memory files (the hotplug region's
/// among them) are handed over instead of copied.
#[test]
fn acpi_memory_local_migration_hands_the_dimms_over() {
    migrate_and_check("acpi-memory-migrate-local", true);
}

fn migrate_and_check(name: &str, local: bool) {
    let mut config = config(HOTPLUG, "acpimem_busy=1");
    config["memory"]["shared"] = json!(local);
    let (mut a, serial) = boot_with(&format!("{name}-src"), config);
    plug(&a, &serial, "512M", (0, REGION, 256 * MIB), 1);
    plug(&a, &serial, "768M", (1, REGION + 256 * MIB, 256 * MIB), 1);
    wait_rounds(&serial, 512 * MIB, 2);
    let mut b = Vmm::start(&format!("{name}-dst"), &[]);
    let dst = Serial::of(&mut b);
    let sock = b.dir.join("migration.sock");
    let url = format!("unix:{}", sock.display());
    let mut rx = receive(&b, &url);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "nothing listens on {url}");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The file appears at bind(), a moment before listen().
    std::thread::sleep(Duration::from_millis(50));
    let body = json!({ "destination_url": url, "local": local }).to_string();
    let (status, text) = a.curl("PUT", "vm.send-migration", Some(&body));
    assert_eq!(status, 204, "{text}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = rx.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "receive-migration did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    let _ = rx.stderr.take().unwrap().read_to_string(&mut err);
    assert!(st.success(), "receive-migration: {err}");
    let run = a.wait();
    assert_eq!(run.code(), Some(0), "the source VMM ends: {}", run.stderr);
    serial.assert_no_fail();
    let last = rounds(&serial)
        .last()
        .copied()
        .expect("rounds at the source");

    assert_eq!(b.state(), "Running");
    assert_eq!(memory_info(&b), (768 * MIB, 512 * MIB));
    let after = wait_rounds(&dst, 512 * MIB, 3);
    assert!(after[0].0 > last.0, "round {:?} after {last:?}", after[0]);
    plug(&b, &dst, "896M", (2, REGION + 512 * MIB, 128 * MIB), 1);
    dst.wait_line(&format!("INFO acpimem verify ok total={}", 512 * MIB), 1);
    assert_eq!(memory_info(&b), (896 * MIB, 640 * MIB));
    let text = dst.text();
    assert!(!text.contains("READY"), "the guest started again:\n{text}");
    dst.assert_no_fail();
    assert_eq!(b.put("vmm.shutdown").0, 200);
    assert_eq!(b.wait().code(), Some(0));
}

fn median<T: Ord + Copy>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// Figures for docs/hotplug.md (`cargo test -p cloud-hypervisor --test api
/// acpi_memory_figures -- --ignored --nocapture`): the time from the `ch-remote resize` call
/// to the guest's `ACPIMEM added` line for +256 MiB (acknowledged, mapped, every page written
/// and read back), and VmRSS, in 3 VMs of 4 rounds each; the first plug of each VM apart.
#[test]
#[ignore]
fn acpi_memory_figures() {
    let (mut first, mut later, mut rss) = (vec![], vec![], vec![]);
    for vm in 0..3 {
        let (vmm, serial) = boot_guest(&format!("acpi-memory-figures-{vm}"), HOTPLUG, "");
        let pid = vmm.pid();
        for slot in 0..4u32 {
            let r0 = vm_rss(pid);
            let ram = RAM + (u64::from(slot) + 1) * 256 * MIB;
            let dimm = (slot, REGION + u64::from(slot) * 256 * MIB, 256 * MIB);
            let t = plug(&vmm, &serial, &format!("{}M", ram / MIB), dimm, 1);
            let r1 = vm_rss(pid);
            eprintln!(
                "vm {vm} slot {slot}: +256 MiB in {t:?} (VmRSS +{} MiB)",
                (r1 - r0) / MIB
            );
            rss.push((r1 - r0) / MIB);
            if slot == 0 {
                first.push(t);
            } else {
                later.push(t);
            }
        }
        let text = serial.text();
        let guest: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("written and read back"))
            .collect();
        eprintln!("vm {vm}: {guest:?}");
    }
    let call = {
        let (vmm, _serial) = boot_guest("acpi-memory-figures-call", HOTPLUG, "");
        let mut v = vec![];
        for _ in 0..5 {
            // The size the VM has: nothing to plug.
            let start = Instant::now();
            resize(&vmm, "256M");
            v.push(start.elapsed());
        }
        median(v)
    };
    eprintln!(
        "median: +256 MiB {:?} (first of a VM {:?}), VmRSS +{} MiB; the call alone {call:?}",
        median(later),
        median(first),
        median(rss)
    );
}
