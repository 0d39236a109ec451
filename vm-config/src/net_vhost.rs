//! `--net vhost_user=on,socket=<path>,vhost_mode=client|server`: a virtio-net device whose
//! frames a vhost-user-net backend moves (it owns the TAP or whatever carries them). What
//! only makes sense for a TAP of ours is refused with it, never accepted and ignored.

use crate::devices::{NetConfig, VhostMode};
use crate::parser::OptionParser;
use crate::ConfigError;

/// Keys for a TAP of ours (or its rate limit), meaningless when a backend moves the frames.
const TAP_KEYS: &[&str] = &[
    "tap",
    "ip",
    "mask",
    "host_mac",
    "fd",
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
];

/// With `vhost_user=on`: the first TAP key given, by name (an empty value asks for nothing).
pub(crate) fn refuse_tap_keys(p: &OptionParser) -> Result<(), ConfigError> {
    for k in TAP_KEYS {
        if p.get(k).is_some() {
            return Err(p.error(format!(
                "'{k}' does not go with vhost_user=on (the backend owns the TAP)"
            )));
        }
    }
    Ok(())
}

/// The vhost-user rules of a net device, for the command line and the API alike.
pub(crate) fn check(n: &NetConfig) -> Result<(), String> {
    if !n.vhost_user {
        if let Some(s) = &n.vhost_socket {
            return Err(format!("socket={s} needs vhost_user=on"));
        }
        if n.vhost_mode != VhostMode::Client {
            return Err("vhost_mode=server needs vhost_user=on".into());
        }
        return Ok(());
    }
    match &n.vhost_socket {
        None => return Err("vhost_user=on needs socket=<backend socket>".into()),
        Some(s) if s.is_empty() => return Err("vhost_user=on needs socket=<backend socket>".into()),
        Some(_) => {}
    }
    let what = [
        ("tap", n.tap.is_some()),
        ("ip", n.ip.is_some()),
        ("mask", n.mask.is_some()),
        ("host_mac", n.host_mac.is_some()),
        ("fd", n.fds.is_some()),
        ("rate_limiter_config", n.rate_limiter_config.is_some()),
    ];
    if let Some((k, _)) = what.iter().find(|(_, given)| *given) {
        return Err(format!(
            "'{k}' does not go with vhost_user=on (the backend owns the TAP)"
        ));
    }
    Ok(())
}

/// The error of a vhost-user net device on RAM the backend cannot map.
pub(crate) fn shared_memory_error() -> ConfigError {
    ConfigError::new(
        "--net",
        "vhost_user=on",
        "--net vhost_user=on needs --memory shared=on".into(),
    )
}
