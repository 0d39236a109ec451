//! `vm.send-migration` and `vm.receive-migration` bodies, with the original's field names and
//! defaults; `validate` refuses, by name, what this VMM does not do.

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// How memory moves: before the destination runs (the only mode here), or after.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    #[default]
    Precopy,
    Postcopy,
}

/// What a send does once `timeout_s` has passed and the dirty memory still does not fit the
/// downtime: give up (the VM runs on at the source), or pause and finish anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    #[default]
    Cancel,
    Ignore,
}

fn default_downtime_ms() -> u64 {
    300
}

fn default_timeout_s() -> u64 {
    3600
}

fn default_connections() -> u64 {
    1
}

/// The original's `SendMigrationData`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationConfig {
    /// `unix:/path` or `tcp:host:port`.
    pub destination_url: String,
    /// Hand guest RAM's memory files over the Unix socket instead of copying it (needs
    /// `shared=on` or `hugepages=on` memory and a `unix:` URL).
    #[serde(default)]
    pub local: bool,
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    #[serde(default)]
    pub timeout_strategy: TimeoutStrategy,
    #[serde(default = "default_connections")]
    pub connections: u64,
    #[serde(default)]
    pub tls_dir: Option<String>,
    #[serde(default)]
    pub memory_mode: MigrationMode,
    #[serde(default)]
    pub preserve_source: bool,
}

/// The original's `ReceiveMigrationData`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationConfig {
    pub receiver_url: String,
    #[serde(default)]
    pub tls_dir: Option<String>,
    #[serde(default)]
    pub memory_mode: MigrationMode,
    #[serde(default)]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub iommufd_fd: Option<serde_json::Value>,
    #[serde(default)]
    pub zone_updates: Vec<serde_json::Value>,
}

fn refuse(option: &str, value: &str, msg: &str) -> ConfigError {
    ConfigError::new(option, value, msg.to_string())
}

fn check_url(option: &str, url: &str) -> Result<(), ConfigError> {
    let ok = match url.split_once(':') {
        Some(("unix", path)) => !path.is_empty(),
        Some(("tcp", addr)) => addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(refuse(
            option,
            url,
            "the URL must be unix:<path> or tcp:<host>:<port>",
        ))
    }
}

/// The files each side's `tls_dir` must hold, as the original's.
const TLS_CLIENT_FILES: [&str; 3] = ["ca-cert.pem", "client-cert.pem", "client-key.pem"];
const TLS_SERVER_FILES: [&str; 3] = ["ca-cert.pem", "server-cert.pem", "server-key.pem"];

/// `tls_dir`: over `tcp:` only, with its `files`.
fn check_tls(
    option: &str,
    url: &str,
    tls_dir: Option<&str>,
    files: &[&str],
) -> Result<(), ConfigError> {
    if let Some(dir) = tls_dir {
        if !url.starts_with("tcp:") {
            return Err(refuse(option, url, "tls_dir: TLS goes over tcp: URLs only"));
        }
        for f in files {
            let path = std::path::Path::new(dir).join(f);
            if !path.is_file() {
                return Err(refuse(
                    option,
                    url,
                    &format!("tls_dir: {} is missing", path.display()),
                ));
            }
        }
    }
    Ok(())
}

/// The most connections a send may use (the original's bound).
pub const MAX_MIGRATION_CONNECTIONS: u64 = 128;

impl SendMigrationConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        const OPT: &str = "send-migration";
        let url = self.destination_url.as_str();
        check_url(OPT, url)?;
        if self.local && !url.starts_with("unix:") {
            return Err(refuse(OPT, url, "local=on needs a unix: URL"));
        }
        if self.downtime_ms == 0 {
            return Err(refuse(OPT, url, "downtime_ms must be at least 1"));
        }
        if self.timeout_s == 0 {
            return Err(refuse(OPT, url, "timeout_s must be at least 1"));
        }
        if !(1..=MAX_MIGRATION_CONNECTIONS).contains(&self.connections) {
            return Err(refuse(
                OPT,
                url,
                &format!(
                    "connections={}: must be 1 to {MAX_MIGRATION_CONNECTIONS}",
                    self.connections
                ),
            ));
        }
        if self.connections > 1 && !url.starts_with("tcp:") {
            return Err(refuse(
                OPT,
                url,
                "connections: more than one connection needs a tcp: URL",
            ));
        }
        if self.memory_mode == MigrationMode::Postcopy {
            let clash = if self.local {
                Some("local=on")
            } else if self.connections > 1 {
                Some("connections above 1")
            } else if self.preserve_source {
                Some("preserve_source=on")
            } else {
                None
            };
            if let Some(c) = clash {
                return Err(refuse(
                    OPT,
                    url,
                    &format!("memory_mode=postcopy cannot be combined with {c}"),
                ));
            }
        }
        check_tls(OPT, url, self.tls_dir.as_deref(), &TLS_CLIENT_FILES)
    }
}

impl ReceiveMigrationConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        const OPT: &str = "receive-migration";
        let url = self.receiver_url.as_str();
        check_url(OPT, url)?;
        check_tls(OPT, url, self.tls_dir.as_deref(), &TLS_SERVER_FILES)?;
        if self.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) || self.iommufd_fd.is_some() {
            return Err(refuse(
                OPT,
                url,
                "VFIO devices are not supported by this VMM",
            ));
        }
        crate::zone_updates(&self.zone_updates).map_err(|m| refuse(OPT, url, &m))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(json: &str) -> Result<(), String> {
        let c: SendMigrationConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        c.validate().map_err(|e| e.to_string())
    }

    #[test]
    fn send_defaults_and_refusals() {
        let c: SendMigrationConfig =
            serde_json::from_str(r#"{"destination_url": "unix:/tmp/m.sock"}"#).unwrap();
        assert_eq!((c.downtime_ms, c.timeout_s, c.connections), (300, 3600, 1));
        assert_eq!(c.timeout_strategy, TimeoutStrategy::Cancel);
        assert!(!c.local);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(send(r#"{"destination_url": "tcp:127.0.0.1:6000"}"#), Ok(()));
        for ok in [
            r#"{"destination_url": "tcp:127.0.0.1:6000", "connections": 128}"#,
            r#"{"destination_url": "unix:/s", "memory_mode": "Postcopy"}"#,
            r#"{"destination_url": "tcp:127.0.0.1:6000", "memory_mode": "Postcopy"}"#,
        ] {
            assert_eq!(send(ok), Ok(()), "{ok}");
        }
        for (json, why) in [
            (
                r#"{"destination_url": "/tmp/m.sock"}"#,
                "unix:<path> or tcp:",
            ),
            (r#"{"destination_url": "tcp:host"}"#, "unix:<path> or tcp:"),
            (r#"{"destination_url": "unix:"}"#, "unix:<path> or tcp:"),
            (
                r#"{"destination_url": "tcp:127.0.0.1:6000", "local": true}"#,
                "local=on needs a unix: URL",
            ),
            (
                r#"{"destination_url": "unix:/s", "connections": 2}"#,
                "needs a tcp: URL",
            ),
            (
                r#"{"destination_url": "tcp:127.0.0.1:6000", "connections": 0}"#,
                "connections=0: must be 1 to 128",
            ),
            (
                r#"{"destination_url": "tcp:127.0.0.1:6000", "connections": 129}"#,
                "connections=129: must be 1 to 128",
            ),
            (
                r#"{"destination_url": "tcp:127.0.0.1:6000", "connections": 2, "memory_mode": "Postcopy"}"#,
                "postcopy cannot be combined with connections above 1",
            ),
            (
                r#"{"destination_url": "unix:/s", "local": true, "memory_mode": "Postcopy"}"#,
                "postcopy cannot be combined with local=on",
            ),
            (
                r#"{"destination_url": "unix:/s", "preserve_source": true, "memory_mode": "Postcopy"}"#,
                "postcopy cannot be combined with preserve_source=on",
            ),
            (r#"{"destination_url": "unix:/s", "tls_dir": "/t"}"#, "TLS"),
            (
                r#"{"destination_url": "tcp:127.0.0.1:6000", "tls_dir": "/nonexistent"}"#,
                "/nonexistent/ca-cert.pem is missing",
            ),
            (
                r#"{"destination_url": "unix:/s", "downtime_ms": 0}"#,
                "downtime_ms",
            ),
            (r#"{"destination_url": "unix:/s", "bogus": 1}"#, "bogus"),
        ] {
            let e = send(json).unwrap_err();
            assert!(e.contains(why), "{json}: {e}");
        }
    }

    #[test]
    fn receive_refusals() {
        for ok in [
            r#"{"receiver_url": "tcp:0.0.0.0:6000"}"#,
            r#"{"receiver_url": "unix:/s", "memory_mode": "Postcopy"}"#,
        ] {
            let c: ReceiveMigrationConfig = serde_json::from_str(ok).unwrap();
            assert_eq!(c.validate(), Ok(()), "{ok}");
        }
        for (json, why) in [
            (r#"{"receiver_url": "x"}"#, "unix:<path> or tcp:"),
            (r#"{"receiver_url": "unix:/s", "tls_dir": "/t"}"#, "TLS"),
            (
                r#"{"receiver_url": "tcp:0.0.0.0:6000", "tls_dir": "/nonexistent"}"#,
                "/nonexistent/ca-cert.pem is missing",
            ),
            (
                r#"{"receiver_url": "unix:/s", "zone_updates": [{}]}"#,
                "empty ID",
            ),
        ] {
            let c: ReceiveMigrationConfig = serde_json::from_str(json).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{json}: {e}");
        }
    }
}
