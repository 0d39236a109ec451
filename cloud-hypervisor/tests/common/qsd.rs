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

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
