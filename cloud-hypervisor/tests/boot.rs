//! Boots the test guest through every boot path and a range of vCPU counts and memory sizes.

mod common;

use common::{boot, guest};

#[test]
fn pvh_elf_boots_and_powers_off() {
    let r = boot(
        &guest().elf_pvh,
        "test=boot expect_protocol=pvh expect_cpus=1 aml=1",
        &[],
    );
    r.assert_guest_passed();
    r.assert_passed("boot-protocol pvh");
    r.assert_passed("acpi-s5");
    // A third-party AML interpreter (the `acpi` crate's) loads the DSDT and agrees on `\_S5_`.
    r.assert_passed("acpi-aml");
    // The ACPI PM timer, found through the FADT, counts at 3.579545 MHz.
    r.assert_passed("acpi-pm-timer");
    r.assert_passed("pm-timer-rate");
}

#[test]
fn bzimage_boots_through_the_linux_protocol() {
    let r = boot(
        &guest().bzimage,
        "test=boot expect_protocol=linux expect_cpus=2",
        &["--cpus", "boot=2"],
    );
    r.assert_guest_passed();
    r.assert_passed("boot-protocol linux");
    r.assert_passed("smp");
    r.assert_passed("smbios-system");
}

/// `--firmware` takes the kernel's loader (a PVH ELF here, as the original's firmwares are)
/// and, as in the original, no command line: `--cmdline` is dropped with a warning, so the
/// guest runs its default scenario, which finds the SMBIOS entry point and checks the tables.
#[test]
fn firmware_boots_a_pvh_elf_without_cmdline_and_finds_smbios() {
    let fw = guest().elf_pvh.to_str().unwrap();
    let r = common::run(&[
        "--firmware",
        fw,
        // Would fault at once if it reached the guest.
        "--cmdline",
        "test=fault",
        "--serial",
        "tty",
        "--console",
        "off",
    ]);
    r.assert_guest_passed();
    assert!(
        r.stdout.contains("test-guest: protocol=pvh cmdline=\"\"\n"),
        "{}",
        r.stdout
    );
    for check in [
        "boot-protocol pvh",
        "smbios-entry",
        "smbios-tables",
        "smbios-bios",
        "smbios-system",
        "acpi-s5",
        // The original's edk2 firmware times its delays with the PM timer at 0x608.
        "acpi-pm-timer",
        "pm-timer-rate",
    ] {
        r.assert_passed(check);
    }
    assert!(
        r.stderr
            .contains("Ignoring cmdline parameter as firmware is provided"),
        "{}",
        r.stderr
    );
}

#[test]
fn elf_without_pvh_note_boots_through_the_linux_protocol() {
    let r = boot(&guest().elf_linux, "test=boot expect_protocol=linux", &[]);
    r.assert_guest_passed();
    r.assert_passed("boot-protocol linux");
}

#[test]
fn four_vcpus_start_and_report() {
    let r = boot(
        &guest().elf_pvh,
        "test=boot expect_cpus=4 aml=1",
        &["--cpus", "boot=4,max=8,topology=2:2:1:2"],
    );
    r.assert_guest_passed();
    r.assert_passed("smp-cpus");
    // Eight CPU devices (four present) in the interpreter's namespace, each `_STA` evaluated.
    r.assert_passed("acpi-aml");
}

#[test]
fn memory_sizes_across_the_32bit_hole() {
    for (size, bytes) in [("256M", 256u64 << 20), ("3G", 3 << 30), ("5G", 5 << 30)] {
        let cmdline = format!("test=boot expect_mem={bytes}");
        let r = boot(
            &guest().bzimage,
            &cmdline,
            &["--memory", &format!("size={size}")],
        );
        r.assert_guest_passed();
        r.assert_passed("memory-map");
    }
}

#[test]
fn shared_and_mergeable_memory_boot() {
    // Each on its own: the original refuses shared=on with mergeable=on.
    for memory in ["size=512M,shared=on,thp=off", "size=512M,mergeable=on"] {
        let r = boot(
            &guest().elf_pvh,
            &format!("test=boot expect_mem={}", 512u64 << 20),
            &["--memory", memory],
        );
        r.assert_guest_passed();
    }
}

#[test]
fn cmdline_and_initramfs_reach_the_guest() {
    let dir = common::scratch("initramfs");
    let initrd = dir.join("initrd.img");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&initrd, &data).unwrap();
    // FNV-1a, 32 bits: the guest computes the same over what it finds.
    let sum = data.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    for kernel in [&guest().elf_pvh, &guest().bzimage] {
        let cmdline = format!(
            "test=boot hello-from-host expect_cmdline_token=hello-from-host expect_initrd_size={} expect_initrd_sum={sum:08x}",
            data.len()
        );
        let r = boot(kernel, &cmdline, &["--initramfs", initrd.to_str().unwrap()]);
        r.assert_guest_passed();
        r.assert_passed("initrd-size");
        r.assert_passed("initrd-checksum");
        r.assert_passed("cmdline");
    }
}

#[test]
fn reboot_keeps_cmos_nvram_then_powers_off() {
    for scenario in ["reboot", "i8042-reset"] {
        let r = boot(
            &guest().elf_pvh,
            &format!("test={scenario}"),
            &["--cpus", "boot=2"],
        );
        r.assert_guest_passed();
        assert_eq!(
            r.stdout.matches("test-guest: entry").count(),
            2,
            "{scenario}: expected two boots:\n{}",
            r.stdout
        );
        r.assert_passed("reboot-survived-nvram");
    }
}

#[test]
fn rtc_reports_time_and_memory_size() {
    let r = boot(&guest().elf_pvh, "test=rtc", &["--memory", "size=5G"]);
    r.assert_guest_passed();
}

/// `--cpus core_scheduling=`: where the kernel has core scheduling, the vCPU threads carry the
/// cookies the mode asks for (`vm`: one for all, `vcpu`: one each, `off`: none); elsewhere the
/// VMM says once that the kernel lacks it, as the original does, and the guest runs.
#[test]
fn core_scheduling_modes() {
    common::require_kvm();
    let supported = vmm::core_sched::cookie_of(0).is_ok();
    for mode in ["vm", "vcpu", "off"] {
        let mut child = spawn_ticking(
            &format!("core-sched-{mode}"),
            &format!("core_scheduling={mode}"),
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let cookies: Vec<u64> = threads_named(child.id(), "vcpu", 2, deadline)
            .into_iter()
            .map(|(_, tid)| vmm::core_sched::cookie_of(tid).unwrap_or(0))
            .collect();
        assert_eq!(cookies.len(), 2, "{mode}: two vCPU threads");
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let warned = stderr
            .matches("Kernel lacks CONFIG_SCHED_CORE support")
            .count();
        if supported {
            match mode {
                "vm" => assert!(cookies[0] != 0 && cookies[0] == cookies[1], "{cookies:?}"),
                "vcpu" => assert!(
                    cookies[0] != 0 && cookies[1] != 0 && cookies[0] != cookies[1],
                    "{cookies:?}"
                ),
                _ => assert_eq!(cookies, [0, 0]),
            }
            assert_eq!(warned, 0, "{stderr}");
        } else {
            assert_eq!(cookies, [0, 0]);
            let expected = usize::from(mode != "off");
            assert_eq!(warned, expected, "{mode}: {stderr}");
        }
    }
}

/// The threads of VMM `pid` whose names start with `prefix` (name, thread id), by name, once
/// `n` of them run (or at `deadline`: vCPU 0 may print READY before vCPU 1's thread has
/// started).
fn threads_named(
    pid: u32,
    prefix: &str,
    n: usize,
    deadline: std::time::Instant,
) -> Vec<(String, i32)> {
    loop {
        let mut threads = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let tid: i32 = entry
                .unwrap()
                .file_name()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let comm =
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap_or_default();
            if comm.trim().starts_with(prefix) {
                threads.push((comm.trim().to_string(), tid));
            }
        }
        threads.sort();
        if threads.len() == n || std::time::Instant::now() > deadline {
            return threads;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Thread `tid` of process `pid`: the CPUs it may run on, as the kernel lists them.
fn cpus_allowed(pid: u32, tid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// The CPUs this test may run on.
fn our_cpus() -> Vec<usize> {
    seccomp::CpuSet::allowed().unwrap().cpus()
}

/// Spawns the VMM on the tick guest (2 vCPUs, `--cpus boot=2,<cpus>`) and waits for READY.
fn spawn_ticking(name: &str, cpus: &str) -> std::process::Child {
    let dir = common::scratch(name);
    let serial = dir.join("serial.out");
    let kernel = common::guest().elf_pvh.display().to_string();
    let child = common::spawn(&[
        "--kernel",
        &kernel,
        "--cmdline",
        "test=tick",
        "--cpus",
        &format!("boot=2,{cpus}"),
        "--memory",
        "size=128M",
        "--serial",
        &format!("file={}", serial.display()),
        "--console",
        "off",
    ]);
    common::wait_serial(&serial, "READY", std::time::Duration::from_secs(20));
    child
}

/// `--cpus affinity=`: each listed vCPU's thread runs only on its host CPUs; a set with no CPU
/// the VMM may use fails the boot naming the vCPU.
#[test]
fn vcpu_affinity_pins_the_vcpu_threads() {
    common::require_kvm();
    let ours = our_cpus();
    // vCPU 0 on the last CPU we may use, vCPU 1 on the first (the same one on a 1-CPU host).
    let (first, last) = (ours[0], *ours.last().unwrap());
    let mut child = spawn_ticking(
        "vcpu-affinity",
        &format!("affinity=[0@[{last}],1@[{first}]]"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let threads = threads_named(child.id(), "vcpu", 2, deadline);
    let got: Vec<(String, String)> = threads
        .iter()
        .map(|(n, t)| (n.clone(), cpus_allowed(child.id(), *t)))
        .collect();
    assert_eq!(
        got,
        [
            ("vcpu0".to_string(), last.to_string()),
            ("vcpu1".to_string(), first.to_string())
        ]
    );
    let _ = child.kill();
    let _ = child.wait();

    let r = common::run(&[
        "--kernel",
        &common::guest().elf_pvh.display().to_string(),
        "--cpus",
        "boot=2,affinity=[1@[1023]]",
        "--serial",
        "null",
        "--console",
        "off",
    ]);
    assert_eq!(r.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains(
            "--cpus affinity: vCPU 1: none of host CPUs [1023] is one this VMM may run on"
        ),
        "{}",
        r.stderr
    );
}

/// `--platform`: the serial number and UUID reach SMBIOS type 1 and the OEM strings type 11,
/// where the guest reads them (the original's legacy `serial_number`/`uuid` keys).
#[test]
fn platform_identity_reaches_smbios() {
    let uuid = "67e55044-10b1-426f-9247-bb680e5fe0c8";
    let r = boot(
        &guest().elf_pvh,
        &format!("test=boot smbios_serial=CH-TEST-1 smbios_uuid={uuid}"),
        &[
            "--platform",
            &format!("serial_number=CH-TEST-1,uuid={uuid},oem_strings=[a,b]"),
        ],
    );
    r.assert_guest_passed();
    r.assert_passed("smbios-system");
    let want = format!("SMBIOS serial=CH-TEST-1 uuid={uuid} oem=[a,b]\n");
    assert!(r.stdout.contains(&want), "{}", r.stdout);

    // Without --platform: the original's default identity.
    let r = boot(&guest().elf_pvh, "test=boot", &[]);
    r.assert_guest_passed();
    let want = "SMBIOS serial= uuid=00000000-0000-0000-0000-000000000000 oem=[]\n";
    assert!(r.stdout.contains(want), "{}", r.stdout);
}

/// What `--platform` cannot give is refused, naming the option.
#[test]
fn platform_refuses_too_many_segments_and_iommus() {
    let k = guest().elf_pvh.to_str().unwrap();
    for (value, why) in [
        ("num_pci_segments=97", "must be 1-96"),
        ("num_pci_segments=0", "must be 1-96"),
        ("iommu_segments=[1]", "segment 1 does not exist"),
        // Segment 0 behind the IOMMU: its always-present rng must say iommu=on too.
        (
            "iommu_segments=[0]",
            "--rng: the device is on an IOMMU PCI segment (0)",
        ),
        ("uuid=nope", "is not a UUID"),
    ] {
        let r = common::run(&["--kernel", k, "--platform", value]);
        assert_eq!(r.code(), Some(1), "{value}: {}", r.stderr);
        assert!(r.stderr.contains(why), "{value}: {}", r.stderr);
        assert!(
            r.stderr.contains(&format!("--platform {value}")) || why.starts_with("--rng"),
            "{value}: {}",
            r.stderr
        );
    }
}

/// `--disk queue_affinity=`: the thread of each listed queue runs only on its host CPUs (a busy
/// guest keeps its disk's queue 0 working); a set with no CPU the VMM may use fails the boot
/// naming the queue. (Two queues each served by its own thread: virtio.rs.)
#[test]
fn disk_queue_affinity_pins_the_queue_threads() {
    common::require_kvm();
    let ours = our_cpus();
    let last = *ours.last().unwrap();
    let dir = common::scratch("queue-affinity");
    let (serial, img) = (dir.join("serial.out"), dir.join("d.img"));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let kernel = common::guest().elf_pvh.display().to_string();
    let disk = format!("path={},queue_affinity=[0@[{last}]]", img.display());
    let mut child = common::spawn(&[
        "--kernel",
        &kernel,
        "--cmdline",
        "test=busy",
        "--memory",
        "size=128M",
        "--disk",
        &disk,
        "--serial",
        &format!("file={}", serial.display()),
        "--console",
        "off",
    ]);
    common::wait_serial(&serial, "BUSY 3 ", std::time::Duration::from_secs(20));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let threads = threads_named(child.id(), "virtio-blk", 1, deadline);
    let got: Vec<String> = threads
        .iter()
        .map(|(_, t)| cpus_allowed(child.id(), *t))
        .collect();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(got, [last.to_string()]);
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.contains("disk=ok"), "{text}");

    let bad = format!("path={},queue_affinity=[0@[1023]]", img.display());
    let r = common::run(&["--kernel", &kernel, "--disk", &bad, "--serial", "null"]);
    assert_eq!(r.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("queue_affinity: queue 0: none of host CPUs [1023] is one this VMM may"),
        "{}",
        r.stderr
    );
}
