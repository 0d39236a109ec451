//! A restore's `net_macs`: clones of one snapshot, each with a TAP of its own (`net_fds`) and
//! a guest MAC of its own. The busy guest with `busy_net=1` keeps the virtio-net device
//! started and, on the configuration interrupt or a new VM Generation ID, reads the MAC from
//! the device's configuration again and prints it (`NETMAC`).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;
use crate::restore::{
    clone_rounds, copy_snapshot, edit_json, open_tap, shutdown, taps_of, with_fd3,
};

const SNAP_MAC: &str = "12:34:56:78:9a:bc";

/// The hardware address of interface `name` (in this thread's network namespace).
fn if_mac(name: &str) -> [u8; 6] {
    // SAFETY: a plain datagram socket, closed below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(s >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: ifreq is plain data; all zeros is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = c as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR on our socket with our ifreq.
    let r = unsafe { libc::ioctl(s, libc::SIOCGIFHWADDR, &mut req) };
    let err = std::io::Error::last_os_error();
    // SAFETY: our socket.
    unsafe { libc::close(s) };
    assert_eq!(r, 0, "SIOCGIFHWADDR {name}: {err}");
    // SAFETY: SIOCGIFHWADDR filled the sockaddr member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    std::array::from_fn(|i| data[i] as u8)
}

/// The `NETMAC` lines of `text`: (mac, config_irqs, config_generation).
fn netmac_lines(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("NETMAC ")?.split(' ');
            let mac = w.next()?.to_string();
            let irqs = w.next()?.strip_prefix("config_irqs=")?.parse().ok()?;
            let gen = w.next()?.strip_prefix("config_generation=")?.parse().ok()?;
            Some((mac, irqs, gen))
        })
        .collect()
}

/// Reads a restored VM's output for five rounds after its first, then checks that every
/// `NETMAC` line shows `mac`, the last with `irqs` configuration interrupts and generation
/// `gen`.
fn shows_mac(vmm: &mut Vmm, mac: &str, irqs: u64, gen: u64) -> String {
    let mut text = String::new();
    let n = clone_rounds(vmm, 0, &mut text)[0].n;
    let lines = clone_rounds(vmm, n + 5, &mut text);
    assert!(!text.contains("READY") && !text.contains("FAIL"), "{text}");
    assert!(lines.iter().all(|l| l.mem == "ok"), "{text}");
    assert!(text.contains("VMGENID-CHANGED"), "{text}");
    let seen = netmac_lines(&text);
    assert!(
        !seen.is_empty(),
        "no NETMAC line after the restore:\n{text}"
    );
    assert!(seen.iter().all(|(m, ..)| m == mac), "want {mac}:\n{text}");
    assert_eq!(
        seen.last().map(|(_, i, g)| (*i, *g)),
        Some((irqs, gen)),
        "{text}"
    );
    text
}

/// `--restore` refused in one line naming the option and what was wrong; exit 1.
fn refused(arg: &str, want: &str) {
    let run = common::run(&["--restore", arg]);
    assert_eq!(run.code(), Some(1), "{arg}: {}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().filter(|l| l.contains(want)).collect();
    assert_eq!(lines.len(), 1, "{arg}: {}", run.stderr);
    assert!(lines[0].contains("--restore "), "{}", run.stderr);
}

/// Two clones of one snapshot at once, each with its own TAP (`net_fds`) and its own guest MAC
/// (`net_macs`: `--restore` and `ch-remote restore`): each guest reads its own MAC from the
/// device after the restore, told by one configuration interrupt (generation 1); `vm.info`
/// shows it; the TAPs' own addresses do not change. A snapshot from before the device state
/// recorded its MAC restores with the snapshot's MAC and no interrupt, or with a new one and
/// the interrupt. Bad `net_macs` are
/// refused (one line, exit 1; 400 over the API) and nothing is restored.
#[test]
fn clones_get_their_own_macs() {
    require_curl();
    std::thread::spawn(|| {
        // SAFETY: unshare only moves this thread into a new network namespace (and the VMMs
        // it starts with it): the TAPs stay private to the test.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare: {}", std::io::Error::last_os_error());
        clones_with_macs();
    })
    .join()
    .unwrap();
}

/// A VMM started with `args`, `tap` as its descriptor 3, an API socket, its stdout piped and
/// its standard error in `<dir>/<name>.err`; waits for the socket.
fn vmm_with_tap(dir: &Path, name: &str, tap: &std::fs::File, args: &[&str]) -> Vmm {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = std::process::Command::new(common::VMM);
    cmd.args(["--api-socket", &format!("path={}", sock.display())])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).unwrap());
    with_fd3(&mut cmd, tap.as_raw_fd());
    let vmm = Vmm {
        child: Some(cmd.spawn().unwrap()),
        dir: dir.to_path_buf(),
        sock,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&vmm.sock).is_err() {
        assert!(Instant::now() < deadline, "the API socket did not come up");
        std::thread::sleep(Duration::from_millis(5));
    }
    vmm
}

fn clones_with_macs() {
    let dir = common::scratch("restore-net-macs");
    let kernel = common::guest().elf_pvh.display().to_string();
    let tap_a = open_tap("mactap0");
    let mut a = vmm_with_tap(
        &dir,
        "a",
        &tap_a,
        &[
            "--kernel",
            &kernel,
            "--cmdline",
            "test=busy busy_net=1",
            "--memory",
            "size=256M",
            "--cpus",
            "boot=1",
            "--serial",
            "tty",
            "--console",
            "off",
            "--net",
            &format!("fd=3,mac={SNAP_MAC}"),
        ],
    );
    let mut text = String::new();
    clone_rounds(&mut a, 3, &mut text);
    assert_eq!(
        netmac_lines(&text),
        [(SNAP_MAC.to_string(), 0, 0)],
        "the guest reads the MAC at the start:\n{text}"
    );
    assert_eq!(a.put("vm.pause").0, 204);
    let snap = dir.join("snap");
    std::fs::create_dir(&snap).unwrap();
    let url = format!("file://{}", snap.display());
    let body = json!({ "destination_url": url }).to_string();
    assert_eq!(a.curl("PUT", "vm.snapshot", Some(&body)).0, 204);
    shutdown(a);

    // Bad net_macs: one line naming the option and value, exit 1.
    refused(
        &format!("source_url={url},net_macs=[_net0@52:54:00:12:34]"),
        "net_macs: _net0: '52:54:00:12:34' is not a MAC address",
    );
    refused(
        &format!("source_url={url},net_macs=[_net0@01:00:5e:00:00:01]"),
        "net_macs: _net0: 01:00:5e:00:00:01 is a multicast address",
    );
    refused(
        &format!("source_url={url},net_macs=[nic9@52:54:00:00:00:09]"),
        "net_macs: the snapshot has no net device 'nic9' (its net devices: _net0)",
    );
    // Over the API: 400, and no VM afterwards.
    let c = Vmm::start("restore-net-macs-c", &[]);
    for (macs, want) in [
        (
            json!([{"id": "nic9", "mac": "52:54:00:00:00:09"}]),
            "net_macs: the snapshot has no net device 'nic9'",
        ),
        (
            json!([{"id": "_net0", "mac": "52:54:00:00:00"}]),
            "is not a MAC address",
        ),
        (
            json!([{"id": "_net0", "mac": "ff:ff:ff:ff:ff:ff"}]),
            "is a multicast address",
        ),
    ] {
        let body = json!({"source_url": url, "net_macs": macs}).to_string();
        let (status, text) = c.curl("PUT", "vm.restore", Some(&body));
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
        assert_eq!(c.curl("GET", "vm.info", None).0, 404, "nothing restored");
    }

    // Clone 1: --restore; clone 2: ch-remote restore into the empty VMM above.
    let tap_b = open_tap("mactap1");
    let tap_c = open_tap("mactap2");
    let (tap_b_mac, tap_c_mac) = (if_mac("mactap1"), if_mac("mactap2"));
    let mut b = vmm_with_tap(
        &dir,
        "b",
        &tap_b,
        &[
            "--restore",
            &format!(
                "source_url={url},net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:00:00:01],resume=on"
            ),
        ],
    );
    let mut cmd = std::process::Command::new(ch_remote_bin());
    cmd.arg("--api-socket").arg(&c.sock).args([
        "restore",
        &format!(
            "source_url={url},net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:00:00:02],resume=on"
        ),
    ]);
    with_fd3(&mut cmd, tap_c.as_raw_fd());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut c = c;
    shows_mac(&mut b, "52:54:00:00:00:01", 1, 1);
    shows_mac(&mut c, "52:54:00:00:00:02", 1, 1);
    for (vmm, mac, tap, tap_mac) in [
        (&b, "52:54:00:00:00:01", "mactap1", tap_b_mac),
        (&c, "52:54:00:00:00:02", "mactap2", tap_c_mac),
    ] {
        let info = vmm.ok_json("vm.info");
        assert_eq!(info["config"]["net"][0]["mac"], mac, "{info}");
        assert_eq!(taps_of(vmm.pid()), [tap]);
        assert_eq!(if_mac(tap), tap_mac, "the TAP's own address stays");
    }
    shutdown(b);
    shutdown(c);

    // A snapshot from before the state recorded the MAC: restored as it was, no interrupt.
    let old = dir.join("snap-old");
    copy_snapshot(&snap, &old);
    edit_json(&old.join("state.json"), |v: &mut Value| {
        for d in v["pci"]["devices"].as_array_mut().unwrap() {
            // (`get_mut`: indexing would add a key to the other devices' states.)
            if let Some(net) = d["device"].get_mut("net").and_then(Value::as_object_mut) {
                assert!(net.remove("mac").is_some(), "{net:?}");
                net.remove("config_generation");
            }
        }
    });
    let old_url = format!("file://{}", old.display());
    let tap_d = open_tap("mactap3");
    let mut d = vmm_with_tap(
        &dir,
        "d",
        &tap_d,
        &[
            "--restore",
            &format!("source_url={old_url},net_fds=[_net0@[3]],resume=on"),
        ],
    );
    // And with a MAC given: the snapshot configuration's stands for the one the guest saw.
    let tap_e = open_tap("mactap4");
    let mut e = vmm_with_tap(
        &dir,
        "e",
        &tap_e,
        &[
            "--restore",
            &format!(
                "source_url={old_url},net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:00:00:03],\
                 resume=on"
            ),
        ],
    );
    shows_mac(&mut d, SNAP_MAC, 0, 0);
    assert_eq!(d.ok_json("vm.info")["config"]["net"][0]["mac"], SNAP_MAC);
    shows_mac(&mut e, "52:54:00:00:00:03", 1, 1);
    shutdown(d);
    shutdown(e);
}
