//! `qemu-storage-daemon` (Debian's qemu-utils): QEMU's own vhost-user-blk export, a backend
//! none of our code wrote, with its QMP monitor on a socket of its own.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon exporting a raw image writable as vhost-user-blk; killed when dropped.
pub struct StorageDaemon {
    child: Child,
    qmp: PathBuf,
}

impl StorageDaemon {
    /// Exports `img` (node `disk0`) on `sock` with `queues` queues; QMP on `sock` + `.qmp`.
    pub fn start(img: &Path, sock: &Path, queues: u16) -> Self {
        let qmp = sock.with_extension("qmp");
        let child = Command::new("qemu-storage-daemon")
            .args([
                "--blockdev",
                &format!("driver=file,node-name=file0,filename={}", img.display()),
                "--blockdev",
                "driver=raw,node-name=disk0,file=file0",
                "--export",
                &format!(
                    "type=vhost-user-blk,id=exp0,addr.type=unix,addr.path={},node-name=disk0,\
                     writable=on,num-queues={queues}",
                    sock.display()
                ),
                "--chardev",
                &format!("socket,id=qmp0,path={},server=on,wait=off", qmp.display()),
                "--monitor",
                "chardev=qmp0",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon is required (qemu-utils)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() || !qmp.exists() {
            assert!(Instant::now() < deadline, "no {}", sock.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        StorageDaemon { child, qmp }
    }

    /// Runs the QMP command `execute` with `arguments` (JSON); its answer's `return` value.
    pub fn qmp(&self, execute: &str, arguments: &str) -> serde_json::Value {
        let s = UnixStream::connect(&self.qmp).expect("QMP socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        // The greeting, then the capabilities handshake.
        r.read_line(&mut line).unwrap();
        assert!(line.contains("QMP"), "{line}");
        let mut ask = |cmd: String| -> serde_json::Value {
            w.write_all(cmd.as_bytes()).unwrap();
            loop {
                line.clear();
                assert!(r.read_line(&mut line).unwrap() > 0, "QMP closed");
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                // Events may come first.
                if v.get("event").is_none() {
                    return v;
                }
            }
        };
        ask(r#"{"execute": "qmp_capabilities"}"#.into());
        let v = ask(format!(
            r#"{{"execute": "{execute}", "arguments": {arguments}}}"#
        ));
        v.get("return")
            .cloned()
            .unwrap_or_else(|| panic!("QMP {execute}: {v}"))
    }
}

/// `test=blk-resize` with a 1 MiB raw image in `dir` that the daemon serves through the device
/// `device(socket)` gives (guest RAM shared), grown to 4 MiB by QMP's `block_resize` under the
/// running guest: the guest's driver must see it ([`super::assert_blk_grew_to_4m`]).
pub fn grow_under_the_guest(dir: &Path, device: impl FnOnce(&Path) -> [String; 2]) {
    let (img, sock, serial) = (
        dir.join("disk.raw"),
        dir.join("vub.sock"),
        dir.join("serial.out"),
    );
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qsd = StorageDaemon::start(&img, &sock, 1);
    let [option, value] = device(&sock);
    let serial_arg = format!("file={}", serial.display());
    let vmm = super::spawn(&[
        "--kernel",
        super::guest().elf_pvh.to_str().unwrap(),
        "--cmdline",
        "test=blk-resize",
        "--memory",
        "size=256M,shared=on",
        &option,
        &value,
        "--serial",
        &serial_arg,
        "--console",
        "off",
    ]);
    super::wait_serial(
        &serial,
        "BLKRESIZE waiting capacity=2048",
        Duration::from_secs(30),
    );
    qsd.qmp("block_resize", r#"{"node-name": "disk0", "size": 4194304}"#);
    let r = super::wait_with_timeout(vmm, Duration::from_secs(60));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    assert!(r.status.success(), "{text}\n{}", r.stderr);
    super::assert_blk_grew_to_4m(&text, &img);
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
