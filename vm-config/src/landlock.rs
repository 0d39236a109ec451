//! `--landlock` and `--landlock-rules path=<path>,access=r|w|rw` (the API's `landlock_enable`
//! and `landlock_rules`, with the original's names), and what a configuration lets the VMM
//! reach once Landlock confines it: each path the configuration names, with the access its
//! device needs (`VmConfig::landlock_grants`). The VMM adds its own fixed paths (`/dev/kvm`,
//! `/proc/self`, ...) and applies the rules (`vmm/src/landlock.rs`; docs/security.md).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ConfigError, ConsoleConfig, ConsoleOutputMode, OptionParser, VmConfig};

/// One `--landlock-rules` entry: `path` (a file or a directory, and everything beneath it)
/// with `access` `r`, `w` or `rw`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockConfig {
    pub path: PathBuf,
    pub access: String,
    /// Keys the original does not have; refused unless they ask for nothing.
    #[serde(flatten, skip_serializing)]
    pub extra: crate::Extra,
}

impl LandlockConfig {
    pub const OPTION: &'static str = "--landlock-rules";

    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(Self::OPTION, raw, &["path", "access"], &[])?;
        let (Some(path), Some(access)) = (p.get("path"), p.get("access")) else {
            return Err(p.error("path= and access= are both required"));
        };
        let c = LandlockConfig {
            path: PathBuf::from(path),
            access,
            extra: Default::default(),
        };
        c.check().map_err(|m| p.error(m))?;
        Ok(c)
    }

    /// What `parse` checks, for a rule that came as JSON too: the access letters, and that the
    /// path exists (a Landlock rule is tied to an existing file or directory).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.extra.check("landlock_rules")?;
        self.check().map_err(|m| {
            ConfigError::new(
                Self::OPTION,
                &format!("path={},access={}", self.path.display(), self.access),
                m,
            )
        })
    }

    fn check(&self) -> Result<(), String> {
        self.rights()?;
        if self.path.as_os_str().is_empty() {
            return Err("path= is required".into());
        }
        std::fs::metadata(&self.path)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// `(read, write)` from `access`: `r`, `w`, `rw` or `wr`, as the original reads it.
    pub fn rights(&self) -> Result<(bool, bool), String> {
        let a = self.access.as_str();
        let ok = (1..=2).contains(&a.len()) && a.chars().all(|c| c == 'r' || c == 'w');
        if !ok {
            return Err(format!(
                "access={a}: must be r, w or rw (read, write or both)"
            ));
        }
        Ok((a.contains('r'), a.contains('w')))
    }
}

/// What the VMM may do under a path once Landlock confines it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockAccess {
    /// Read files (and list directories).
    Read,
    /// Read and write files (and truncate them).
    ReadWrite,
    /// A file the VMM creates or truncates (a serial port's output): created, empty, before
    /// Landlock applies if it is missing, then read and written.
    CreateFile,
    /// A device node: read, write and its ioctls.
    Device,
    /// A directory where the VMM binds (creates) Unix sockets, removes them, and connects to
    /// them.
    Sockets,
    /// A Unix socket the VMM connects to.
    Connect,
    /// A directory in which the VMM removes a file it made (its API socket).
    Unlink,
    /// A `--landlock-rules` entry: the original's sets of rights for `r` and `w`.
    Rule { read: bool, write: bool },
}

/// A path the VMM may reach, with what it may do there and the option that names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandlockGrant {
    pub path: PathBuf,
    pub access: LandlockAccess,
    pub option: &'static str,
}

impl LandlockGrant {
    pub fn new(path: impl Into<PathBuf>, access: LandlockAccess, option: &'static str) -> Self {
        LandlockGrant {
            path: path.into(),
            access,
            option,
        }
    }
}

/// The directory a socket or file at `path` is created in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn console_grants(option: &'static str, c: &ConsoleConfig, out: &mut Vec<LandlockGrant>) {
    use LandlockAccess::*;
    match c.mode {
        ConsoleOutputMode::File => {
            if let Some(f) = &c.file {
                out.push(LandlockGrant::new(f, CreateFile, option));
            }
        }
        ConsoleOutputMode::Socket => {
            if let Some(s) = &c.socket {
                out.push(LandlockGrant::new(parent_dir(s), Sockets, option));
            }
        }
        ConsoleOutputMode::Pty => {
            out.push(LandlockGrant::new("/dev/ptmx", Device, option));
            out.push(LandlockGrant::new("/dev/pts", Device, option));
        }
        ConsoleOutputMode::Off | ConsoleOutputMode::Tty | ConsoleOutputMode::Null => {}
    }
}

impl VmConfig {
    /// The paths this configuration names, each with the access its device needs; with
    /// `landlock_enable` the VMM reaches these (and its own fixed paths) only.
    pub fn landlock_grants(&self) -> Vec<LandlockGrant> {
        use LandlockAccess::*;
        let mut out = Vec::new();
        let p = &self.payload;
        for (option, path) in [
            ("--kernel", &p.kernel),
            ("--firmware", &p.firmware),
            ("--initramfs", &p.initramfs),
        ] {
            if let Some(path) = path {
                out.push(LandlockGrant::new(path, Read, option));
            }
        }
        for d in &self.disks {
            if let Some(s) = &d.vhost_socket {
                out.push(LandlockGrant::new(s, Connect, "--disk"));
                continue;
            }
            let access = if d.readonly { Read } else { ReadWrite };
            out.push(LandlockGrant::new(&d.path, access, "--disk"));
        }
        for z in self.memory.zones.iter().flatten() {
            if let Some(f) = &z.file {
                // A shared mapping writes the guest's pages back to the file.
                let access = if z.shared { ReadWrite } else { Read };
                out.push(LandlockGrant::new(f, access, "--memory-zone"));
            }
        }
        for pm in &self.pmem {
            // A directory gets an unnamed temporary file (O_TMPFILE) written in it.
            let access = if pm.discard_writes && !pm.file.is_dir() {
                Read
            } else {
                ReadWrite
            };
            out.push(LandlockGrant::new(&pm.file, access, "--pmem"));
        }
        for f in &self.fs {
            out.push(LandlockGrant::new(&f.socket, Connect, "--fs"));
        }
        for g in &self.generic_vhost_user {
            out.push(LandlockGrant::new(
                &g.socket,
                Connect,
                "--generic-vhost-user",
            ));
        }
        for n in &self.net {
            match (&n.vhost_socket, n.vhost_mode) {
                (Some(s), crate::VhostMode::Client) => {
                    out.push(LandlockGrant::new(s, Connect, "--net"))
                }
                // The listener is made (and removed) in the socket's directory.
                (Some(s), crate::VhostMode::Server) => out.push(LandlockGrant::new(
                    parent_dir(Path::new(s)),
                    Sockets,
                    "--net",
                )),
                (None, _) => {}
            }
        }
        console_grants("--serial", &self.serial, &mut out);
        console_grants("--console", &self.console, &mut out);
        if self.debug_console.enabled() {
            let c = self.debug_console.as_console();
            console_grants(crate::DebugConsoleConfig::OPTION, &c, &mut out);
        }
        out.push(LandlockGrant::new(&self.rng.src, Read, "--rng"));
        if let Some(v) = &self.vsock {
            // The listener at `socket`, and the host's listeners at `socket_<port>` beside it.
            out.push(LandlockGrant::new(
                parent_dir(&v.socket),
                Sockets,
                "--vsock",
            ));
        }
        if let Some(t) = &self.tpm {
            out.push(LandlockGrant::new(&t.socket, Connect, "--tpm"));
        }
        for r in self.landlock_rules.iter().flatten() {
            let (read, write) = r.rights().unwrap_or_default();
            out.push(LandlockGrant::new(
                &r.path,
                Rule { read, write },
                LandlockConfig::OPTION,
            ));
        }
        out
    }

    /// `--landlock-rules` checked; without `--landlock` they are accepted and do nothing, as
    /// the original (the VMM warns when it creates the VM).
    pub(crate) fn validate_landlock(&self) -> Result<(), ConfigError> {
        for r in self.landlock_rules.iter().flatten() {
            r.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_originals_syntax() {
        let r = LandlockConfig::parse("path=/tmp,access=rw").unwrap();
        assert_eq!(
            (r.path.as_path(), r.access.as_str()),
            (Path::new("/tmp"), "rw")
        );
        assert_eq!(r.rights().unwrap(), (true, true));
        assert_eq!(
            LandlockConfig::parse("access=r,path=/").unwrap().rights(),
            Ok((true, false))
        );
        assert_eq!(
            LandlockConfig::parse("path=/,access=wr").unwrap().rights(),
            Ok((true, true))
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"path":"/tmp","access":"rw"}"#
        );
    }

    #[test]
    fn refuses_bad_access_and_missing_keys_naming_the_option() {
        for (bad, why) in [
            ("path=/tmp,access=x", "access=x: must be r, w or rw"),
            ("path=/tmp,access=rwr", "access=rwr: must be"),
            ("path=/tmp,access=R", "access=R: must be"),
            ("path=/tmp,access=", "path= and access= are both required"),
            ("path=/tmp", "path= and access= are both required"),
            ("access=rw", "path= and access= are both required"),
            ("path=/tmp,access=r,mode=1", "unknown key 'mode'"),
            ("path=/no/such/landlock/path,access=r", "No such file"),
        ] {
            let e = LandlockConfig::parse(bad).unwrap_err();
            let text = e.to_string();
            assert!(
                text.starts_with(&format!("--landlock-rules {bad}: ")),
                "{text}"
            );
            assert!(text.contains(why), "{bad}: {text}");
        }
    }

    #[test]
    fn json_rules_are_checked_as_the_command_line() {
        let ok: LandlockConfig =
            serde_json::from_str(r#"{"path": "/tmp", "access": "r"}"#).unwrap();
        ok.validate().unwrap();
        let bad: LandlockConfig =
            serde_json::from_str(r#"{"path": "/tmp", "access": "rx"}"#).unwrap();
        let e = bad.validate().unwrap_err();
        assert_eq!(e.option, "--landlock-rules");
        assert!(e.msg.contains("access=rx"), "{e}");
        assert!(serde_json::from_str::<LandlockConfig>(r#"{"path": "/tmp"}"#).is_err());
        let extra: LandlockConfig =
            serde_json::from_str(r#"{"path": "/tmp", "access": "r", "x": 1}"#).unwrap();
        assert!(extra.validate().is_err());
    }

    #[test]
    fn grants_name_every_path_of_the_configuration() {
        let mut c: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/k", "initramfs": "/i"},
            "disks": [{"path": "/d0"}, {"path": "/d1", "readonly": true}],
            "pmem": [{"file": "/p", "discard_writes": true}],
            "generic_vhost_user": [{"socket": "/run/g.sock", "queue_sizes": [2], "device_type": 2}],
            "serial": {"mode": "File", "file": "/log/serial"},
            "console": {"mode": "Socket", "socket": "/run/ch/console.sock"},
            "vsock": {"cid": 3, "socket": "/run/vs/v.sock"},
            "tpm": {"socket": "/run/swtpm"},
            "landlock_enable": true,
            "landlock_rules": [{"path": "/srv", "access": "w"}],
        }))
        .unwrap();
        c.rng.src = PathBuf::from("/dev/random");
        let g: Vec<(String, LandlockAccess)> = c
            .landlock_grants()
            .into_iter()
            .map(|g| (g.path.display().to_string(), g.access))
            .collect();
        use LandlockAccess::*;
        let want = [
            ("/k", Read),
            ("/i", Read),
            ("/d0", ReadWrite),
            ("/d1", Read),
            ("/p", Read),
            ("/run/g.sock", Connect),
            ("/log/serial", CreateFile),
            ("/run/ch", Sockets),
            ("/dev/random", Read),
            ("/run/vs", Sockets),
            ("/run/swtpm", Connect),
            (
                "/srv",
                Rule {
                    read: false,
                    write: true,
                },
            ),
        ];
        let want: Vec<(String, LandlockAccess)> =
            want.iter().map(|(p, a)| (p.to_string(), *a)).collect();
        assert_eq!(g, want);
        assert!(c.landlock_enable);
    }
}
