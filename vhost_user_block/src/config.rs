//! The backend's one option, `--block-backend "path=,socket=,num_queues=,queue_size=,
//! readonly=on|off,direct=on|off,poll_queue=on|off"`, as the original's `vhost_user_block`
//! takes it. Every error names the option and its value.

use std::path::PathBuf;

/// What `--block-backend` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// The disk image (raw, qcow2, vhd or vhdx: detected as `--disk` does).
    pub path: PathBuf,
    /// The vhost-user socket to listen on (an existing file there is replaced).
    pub socket: PathBuf,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    /// O_DIRECT: bypass the host page cache.
    pub direct: bool,
    /// After a request, look for the next one for a while before sleeping on the kick.
    pub poll_queue: bool,
}

/// The option's syntax, for `--help` and errors.
pub const SYNTAX: &str = "path=<image>,socket=<socket>,num_queues=<n>,queue_size=<n>,\
readonly=on|off,direct=on|off,poll_queue=on|off";

/// Most queues the backend serves (a worker thread each).
pub const MAX_QUEUES: u16 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--block-backend: unknown parameter {0:?} (expected {SYNTAX})")]
    Unknown(String),
    #[error("--block-backend: {0}= given twice")]
    Twice(String),
    #[error("--block-backend: {0}= is required")]
    Missing(&'static str),
    #[error("--block-backend: {key}={value}: {why}")]
    Value {
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

/// `on`/`off` (also `true`/`false`, as the original's toggles).
fn toggle(key: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(ConfigError::Value {
            key,
            value: value.into(),
            why: "expected on or off",
        }),
    }
}

fn number(
    key: &'static str,
    value: &str,
    ok: impl Fn(u16) -> bool,
    why: &'static str,
) -> Result<u16, ConfigError> {
    let bad = || ConfigError::Value {
        key,
        value: value.into(),
        why,
    };
    let n: u16 = value.parse().map_err(|_| bad())?;
    if ok(n) {
        Ok(n)
    } else {
        Err(bad())
    }
}

impl BackendConfig {
    /// Parses the value of `--block-backend`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        let mut seen: Vec<String> = Vec::new();
        let mut c = BackendConfig {
            path: PathBuf::new(),
            socket: PathBuf::new(),
            num_queues: 1,
            queue_size: 1024,
            readonly: false,
            direct: false,
            poll_queue: true,
        };
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if seen.iter().any(|k| k == key) {
                return Err(ConfigError::Twice(key.into()));
            }
            seen.push(key.into());
            match key {
                "path" | "socket" if value.is_empty() => {
                    return Err(ConfigError::Value {
                        key: if key == "path" { "path" } else { "socket" },
                        value: String::new(),
                        why: "empty",
                    })
                }
                "path" => c.path = value.into(),
                "socket" => c.socket = value.into(),
                "num_queues" => {
                    c.num_queues = number(
                        "num_queues",
                        value,
                        |n| (1..=MAX_QUEUES).contains(&n),
                        "expected 1 to 64",
                    )?
                }
                "queue_size" => {
                    c.queue_size = number(
                        "queue_size",
                        value,
                        |n| n.is_power_of_two() && (2..=32768).contains(&n),
                        "expected a power of two from 2 to 32768",
                    )?
                }
                "readonly" => c.readonly = toggle("readonly", value)?,
                "direct" => c.direct = toggle("direct", value)?,
                "poll_queue" => c.poll_queue = toggle("poll_queue", value)?,
                _ => return Err(ConfigError::Unknown(key.into())),
            }
        }
        if c.path.as_os_str().is_empty() {
            return Err(ConfigError::Missing("path"));
        }
        if c.socket.as_os_str().is_empty() {
            return Err(ConfigError::Missing("socket"));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_every_option() {
        let c = BackendConfig::parse("path=/d.img,socket=/s.sock").unwrap();
        assert_eq!(
            c,
            BackendConfig {
                path: "/d.img".into(),
                socket: "/s.sock".into(),
                num_queues: 1,
                queue_size: 1024,
                readonly: false,
                direct: false,
                poll_queue: true,
            }
        );
        let c = BackendConfig::parse(
            "socket=/s,path=/p,num_queues=4,queue_size=256,readonly=on,direct=true,poll_queue=off",
        )
        .unwrap();
        assert_eq!(
            (
                c.num_queues,
                c.queue_size,
                c.readonly,
                c.direct,
                c.poll_queue
            ),
            (4, 256, true, true, false)
        );
    }

    #[test]
    fn bad_options_name_the_option_and_value() {
        for (s, want) in [
            ("socket=/s", "--block-backend: path= is required"),
            ("path=/p", "--block-backend: socket= is required"),
            ("path=,socket=/s", "--block-backend: path=: empty"),
            (
                "path=/p,socket=/s,num_queues=0",
                "--block-backend: num_queues=0: expected 1 to 64",
            ),
            (
                "path=/p,socket=/s,num_queues=x",
                "--block-backend: num_queues=x: expected 1 to 64",
            ),
            (
                "path=/p,socket=/s,queue_size=100",
                "--block-backend: queue_size=100: expected a power of two from 2 to 32768",
            ),
            (
                "path=/p,socket=/s,queue_size=65536",
                "--block-backend: queue_size=65536: expected a power of two from 2 to 32768",
            ),
            (
                "path=/p,socket=/s,readonly=yes",
                "--block-backend: readonly=yes: expected on or off",
            ),
            (
                "path=/p,socket=/s,direct",
                "--block-backend: direct=: expected on or off",
            ),
            (
                "path=/p,path=/q,socket=/s",
                "--block-backend: path= given twice",
            ),
        ] {
            let e = BackendConfig::parse(s).unwrap_err().to_string();
            assert_eq!(e, want, "{s}");
        }
        let e = BackendConfig::parse("path=/p,socket=/s,size=1").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("--block-backend: unknown parameter \"size\""),
            "{e}"
        );
    }
}
