//! Serial port modes (`--serial off|null|tty|file|pty|socket`), terminal handling, signals, and
//! the debug console (`--debug-console`).

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    connect_when_listening, guest, openpty, read_until, run, spawn, wait_with_timeout, VMM,
};

/// Arguments that boot the PVH test guest with `cmdline`, the serial port in `serial` mode and
/// no virtio console.
fn serial_args<'a>(cmdline: &'a str, serial: &'a str) -> [&'a str; 8] {
    [
        "--kernel",
        guest().elf_pvh.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--serial",
        serial,
        "--console",
        "off",
    ]
}

#[test]
fn off_and_null_produce_no_output_but_the_guest_still_powers_off() {
    for mode in ["off", "null"] {
        let r = run(&serial_args("test=boot", mode));
        assert_eq!(r.code(), Some(0), "{mode}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{mode}: {}", r.stdout);
    }
}

#[test]
fn file_receives_the_guest_output() {
    let dir = common::scratch("serial-file");
    let out = dir.join("serial.log");
    let arg = format!("file={}", out.display());
    let r = run(&serial_args("test=boot", &arg));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.contains("SUMMARY passed="), "{text}");
    assert!(text.contains(" failed=0"), "{text}");
    assert!(r.stdout.is_empty());
}

#[test]
fn socket_carries_output_and_input_both_ways() {
    let dir = common::scratch("serial-socket");
    let sock = dir.join("serial.sock");
    let arg = format!("socket={}", sock.display());
    let child = spawn(&serial_args("test=echo", &arg));
    let mut stream = connect_when_listening(&sock, "serial");
    stream.write_all(b"over the socket\n").unwrap();
    let fd = stream.as_raw_fd();
    let text = read_until(
        &mut stream,
        fd,
        "ECHO over the socket",
        Duration::from_secs(10),
    );
    assert!(text.contains("ECHO over the socket"), "{text}");
    let r = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    assert!(!sock.exists(), "the socket file is left behind");
}

#[test]
fn pty_carries_output_and_input_both_ways() {
    let mut child = spawn(&serial_args("test=echo", "pty"));
    let mut pty = common::open_announced_pty(&mut child, "serial");
    let pfd = pty.as_raw_fd();
    read_until(&mut pty, pfd, "READY", Duration::from_secs(10));
    pty.write_all(b"through the pty\n").unwrap();
    let text = read_until(
        &mut pty,
        pfd,
        "ECHO through the pty",
        Duration::from_secs(10),
    );
    assert!(text.contains("ECHO through the pty"));
    child.stderr = None;
    let r = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(r.code(), Some(0));
}

fn termios(f: &File) -> libc::termios {
    // SAFETY: termios is plain data filled by tcgetattr on an open tty fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
    t
}

fn spawn_on_tty(slave: &File, cmdline: &str) -> std::process::Child {
    Command::new(VMM)
        .args(serial_args(cmdline, "tty"))
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn tty_stdin_reaches_the_guest_in_raw_mode_and_is_restored() {
    let (mut master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(before.c_lflag & libc::ICANON, 0);
    let child = spawn_on_tty(&slave, "test=echo");
    let fd = master.as_raw_fd();
    read_until(&mut master, fd, "READY", Duration::from_secs(10));
    let raw = termios(&slave);
    assert_eq!(
        raw.c_lflag & (libc::ICANON | libc::ECHO),
        0,
        "terminal not in raw mode"
    );
    // Raw mode sends a carriage return for Enter; the guest reads up to '\n'.
    master.write_all(b"typed on a tty\n").unwrap();
    read_until(
        &mut master,
        fd,
        "ECHO typed on a tty",
        Duration::from_secs(10),
    );
    let r = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(r.code(), Some(0), "{}", r.stderr);
    let after = termios(&slave);
    assert_eq!(after.c_lflag, before.c_lflag, "terminal flags not restored");
}

#[test]
fn sigterm_and_sigint_stop_the_vmm_cleanly_and_restore_the_terminal() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut master, slave) = openpty();
        let before = termios(&slave);
        let child = spawn_on_tty(&slave, "test=wait");
        let fd = master.as_raw_fd();
        read_until(&mut master, fd, "READY", Duration::from_secs(10));
        // SAFETY: sending a signal to our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let start = Instant::now();
        let r = wait_with_timeout(child, Duration::from_secs(10));
        assert_eq!(
            r.code(),
            Some(0),
            "signal {sig}: {:?} {}",
            r.status,
            r.stderr
        );
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(
            termios(&slave).c_lflag,
            before.c_lflag,
            "signal {sig}: terminal not restored"
        );
    }
}

/// `--debug-console`: port 0xe9 (or `iobase=`) reads back its low byte and sends what the guest
/// writes to the file, byte for byte; `off` makes no device (the guest's read check fails).
#[test]
fn the_debug_console_writes_the_guests_bytes_to_its_file() {
    let dir = common::scratch("debug-console-file");
    for (port, cmdline) in [
        (None, "test=debugcon"),
        (Some("0x2f8"), "test=debugcon debugcon_port=0x2f8"),
    ] {
        let out = dir.join("debug.out");
        let mut arg = format!("file={}", out.display());
        if let Some(p) = port {
            arg.push_str(&format!(",iobase={p}"));
        }
        let mut args = serial_args(cmdline, "tty").to_vec();
        args.extend(["--debug-console", &arg]);
        let r = run(&args);
        assert_eq!(r.code(), Some(0), "{arg}: {}", r.stderr);
        r.assert_guest_passed();
        r.assert_passed("debugcon-read");
        let want = format!("DEBUGCON hello {}\n", port.unwrap_or("0xe9"));
        assert_eq!(std::fs::read_to_string(&out).unwrap(), want, "{arg}");
    }
    let mut args = serial_args("test=debugcon", "tty").to_vec();
    args.extend(["--debug-console", "off"]);
    let r = run(&args);
    assert!(r.stdout.contains("FAIL debugcon-read"), "{}", r.stdout);
}

#[test]
fn the_debug_console_on_a_pty() {
    let mut args = serial_args("test=debugcon", "null").to_vec();
    args.extend(["--debug-console", "pty"]);
    let mut child = spawn(&args);
    let mut pty = common::open_announced_pty(&mut child, "debug-console");
    let fd = pty.as_raw_fd();
    let text = read_until(&mut pty, fd, "DEBUGCON hello 0xe9", Duration::from_secs(10));
    assert!(text.contains("DEBUGCON hello 0xe9"), "{text}");
    child.stderr = None;
    let r = wait_with_timeout(child, Duration::from_secs(10));
    assert_eq!(r.code(), Some(0));
}

#[test]
fn a_debug_console_on_a_taken_port_is_refused_naming_it() {
    let mut args = serial_args("test=debugcon", "null").to_vec();
    args.extend(["--debug-console", "tty,iobase=0x3f8"]);
    let r = run(&args);
    assert_eq!(r.code(), Some(1), "{}", r.stderr);
    assert_eq!(
        r.stderr.trim(),
        "cloud-hypervisor: --debug-console iobase=0x3f8: another device has that I/O port"
    );
}
