//! From a subcommand's arguments to its request body: JSON files as they are, the device
//! options' syntax (`--disk`, `--net`, ...) through the VMM's own parsers, `key=value` lists.

use std::io::Read;
use std::os::fd::RawFd;

use clap::ArgMatches;
use serde_json::{Map, Value};
use vm_config::{
    parse_size, DiskConfig, FsConfig, GenericVhostUserConfig, NetConfig, PmemConfig, RestoreConfig,
    VsockConfig,
};

use crate::subcommands::{Args, Body, Sub};

fn read_file(path: &str) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let read = if path == "-" {
        std::io::stdin().read_to_end(&mut body).map(|_| ())
    } else {
        std::fs::read(path).map(|b| body = b)
    };
    read.map_err(|e| format!("create {path}: cannot read: {e}"))?;
    Ok(body)
}

/// `on`/`true`, `off`/`false`, numbers and strings.
fn kv_value(v: &str) -> Value {
    match v {
        "on" | "true" => Value::Bool(true),
        "off" | "false" => Value::Bool(false),
        _ => v
            .parse::<u64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(v.to_string())),
    }
}

/// Splits `a=1,b=[x,y],c=2` at the commas outside brackets and quotes.
fn split_options(raw: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quoted, mut start) = (Vec::new(), 0i32, false, 0);
    for (i, c) in raw.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '[' if !quoted => depth += 1,
            ']' if !quoted => depth -= 1,
            ',' if !quoted && depth <= 0 => {
                parts.push(&raw[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&raw[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// The JSON spelling of the enumerations the migration options take (the help text writes
/// them in lower case, the API's schema capitalised, as the original's ch-remote converts).
fn enum_value(sub: &str, key: &str, v: &str) -> Result<Option<Value>, String> {
    let names: &[&str] = match key {
        "timeout_strategy" => &["Cancel", "Ignore"],
        "memory_mode" => &["Precopy", "Postcopy"],
        _ => return Ok(None),
    };
    names
        .iter()
        .find(|n| n.eq_ignore_ascii_case(v))
        .map(|n| Some(Value::from(*n)))
        .ok_or_else(|| {
            let all: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
            format!("{sub}: {key}={v}: expected {}", all.join(" or "))
        })
}

fn kv_body(sub: &str, primary: &str, raw: Option<&str>) -> Result<Value, String> {
    let mut map = Map::new();
    for part in split_options(raw.unwrap_or("")) {
        match part.split_once('=') {
            Some((k, v)) => {
                let v = v.trim_matches('"');
                let value = match enum_value(sub, k, v)? {
                    Some(e) => e,
                    None => kv_value(v),
                };
                map.insert(k.to_string(), value);
            }
            None if !primary.is_empty() => {
                map.insert(primary.to_string(), Value::String(part.to_string()));
            }
            None => return Err(format!("{sub}: '{part}' is not key=value")),
        }
    }
    Ok(Value::Object(map))
}

/// An option value parsed as the VMM's command line parses it, as the body's JSON.
fn typed<T: serde::Serialize>(parsed: Result<T, vm_config::ConfigError>) -> Result<Value, String> {
    let c = parsed.map_err(|e| e.to_string())?;
    serde_json::to_value(c).map_err(|e| e.to_string())
}

fn size_arg(m: &ArgMatches, name: &str) -> Result<Option<u64>, String> {
    m.get_one::<String>(name)
        .map(|v| parse_size(v).ok_or_else(|| format!("--{name} {v}: not a size")))
        .transpose()
}

/// `restore`'s body and the descriptors that go beside it, as the original's ch-remote sends
/// them: net_fds' descriptors, in order, taken out of the body (only their count stays).
/// Everything else stays in the body for the VMM to judge: it refuses VFIO (vfio_fds,
/// iommufd_fd) and NUMA zone updates itself, so their numbers are not sent as descriptors.
pub(crate) fn restore_request(raw: &str) -> Result<(Value, Vec<RawFd>), String> {
    let mut c = RestoreConfig::parse(raw).map_err(|e| e.to_string())?;
    let fds = c
        .net_fds
        .iter_mut()
        .flatten()
        .flat_map(|n| n.fds.take().unwrap_or_default())
        .collect();
    Ok((serde_json::to_value(c).map_err(|e| e.to_string())?, fds))
}

/// The request body for subcommand `s` with its arguments `m`, and the file descriptors to
/// pass beside it.
pub(crate) fn body(s: &Sub, m: &ArgMatches) -> Result<(Option<Vec<u8>>, Vec<RawFd>), String> {
    let positional = match &s.args {
        Args::Positional { name, .. } => m.get_one::<String>(name).map(String::as_str),
        Args::Path => m.get_one::<String>("path").map(String::as_str),
        _ => None,
    };
    let to_vec = |v: &Value| serde_json::to_vec(v).map_err(|e| e.to_string());
    let mut fds = Vec::new();
    let value = match s.body {
        Body::None => return Ok((None, fds)),
        Body::File => return read_file(positional.unwrap_or("-")).map(|b| (Some(b), fds)),
        Body::Disk => {
            let c = DiskConfig::parse(positional.unwrap_or("")).map_err(|e| e.to_string())?;
            serde_json::to_value(c).map_err(|e| e.to_string())?
        }
        Body::Net => {
            let c = NetConfig::parse(positional.unwrap_or("")).map_err(|e| e.to_string())?;
            // `fd=[...]`: this process's TAP descriptors go beside the body (SCM_RIGHTS), as
            // the original's ch-remote sends them; the VMM uses the ones it receives.
            fds = c.fds.clone().unwrap_or_default();
            serde_json::to_value(c).map_err(|e| e.to_string())?
        }
        Body::Fs => typed(FsConfig::parse(positional.unwrap_or("")))?,
        Body::GenericVhostUser => typed(GenericVhostUserConfig::parse(positional.unwrap_or("")))?,
        Body::Pmem => typed(PmemConfig::parse(positional.unwrap_or("")))?,
        Body::Vsock => typed(VsockConfig::parse(positional.unwrap_or("")))?,
        Body::Kv(primary) => kv_body(s.name, primary, positional)?,
        Body::Restore => {
            let (value, net_fds) = restore_request(positional.unwrap_or(""))?;
            fds = net_fds;
            value
        }
        Body::Resize => {
            let mut map = Map::new();
            if let Some(v) = m.get_one::<String>("cpus") {
                let n: u32 = v
                    .parse()
                    .map_err(|_| format!("--cpus {v}: not a number of vCPUs"))?;
                map.insert("desired_vcpus".into(), n.into());
            }
            if let Some(v) = size_arg(m, "memory")? {
                map.insert("desired_ram".into(), v.into());
            }
            if let Some(v) = size_arg(m, "balloon")? {
                map.insert("desired_balloon".into(), v.into());
            }
            Value::Object(map)
        }
        Body::ResizeDisk | Body::ResizeZone => {
            let (id_arg, size_key) = match s.body {
                Body::ResizeDisk => ("disk", "desired_size"),
                _ => ("id", "desired_ram"),
            };
            let mut map = Map::new();
            if let Some(id) = m.get_one::<String>(id_arg) {
                map.insert("id".into(), id.as_str().into());
            }
            if let Some(v) = size_arg(m, "size")? {
                map.insert(size_key.into(), v.into());
            }
            Value::Object(map)
        }
    };
    Ok((Some(to_vec(&value)?), fds))
}
