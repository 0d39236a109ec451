//! `ch-remote`: drives a running cloud-hypervisor through its API socket, with the original's
//! subcommands, arguments and help. Every subcommand sends its request, as the original's does:
//! for what this VMM lacks the server answers 501 with its reason. Errors are one line on
//! standard error, with exit code 1.
//!
//! Ours: `send-migration` then follows the migration through `vm.migration-progress` (an
//! extension of this VMM), printing its passes on standard error, and exits 0 once it has
//! completed, 1 if it failed; `--no-wait`, or a VMM without the endpoint (the original's),
//! returns once it has started, as the original's ch-remote does.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use api::client::{Client, Reply};
use api::http::Method;
use api::{MigrationProgress, MigrationState};
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde_json::{Map, Value};
use vm_config::{
    parse_size, DiskConfig, FsConfig, GenericVhostUserConfig, NetConfig, PmemConfig, RestoreConfig,
    VsockConfig,
};

/// What a subcommand takes on its command line.
enum Args {
    None,
    /// `create [path]`, `-` (the default) for standard input.
    Path,
    /// One positional argument, with its help text.
    Positional {
        name: &'static str,
        required: bool,
        help: &'static str,
    },
    /// `--<name> <name>` options, with their help texts.
    Options(&'static [(&'static str, &'static str)]),
}

/// How a subcommand's arguments become the request body.
#[derive(Clone, Copy)]
enum Body {
    None,
    /// The JSON file named by the argument, sent as it is.
    File,
    /// `--disk` syntax, turned into a DiskConfig.
    Disk,
    /// `--net` syntax, turned into a NetConfig.
    Net,
    /// `--fs`, `--generic-vhost-user`, `--pmem`, `--vsock` syntax, each turned into its
    /// config (sizes in bytes, as the API takes them).
    Fs,
    GenericVhostUser,
    Pmem,
    Vsock,
    /// `key=value,...` as a JSON object; a bare value is the given key's.
    Kv(&'static str),
    /// `--restore` syntax, turned into a RestoreConfig; net_fds' descriptors go beside it.
    Restore,
    Resize,
    ResizeDisk,
    ResizeZone,
}

struct Sub {
    name: &'static str,
    about: &'static str,
    args: Args,
    method: Method,
    endpoint: &'static str,
    body: Body,
}

/// The original's subcommands, in its order, with its help texts.
const SUBCOMMANDS: &[Sub] = &[
    Sub {
        name: "add-device",
        about: "Add VFIO device",
        args: Args::Positional { name: "device_config", required: false, help: "Direct device assignment parameters \"path=<device_path>,fd=<vfio_cdev_fd>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,x_nv_gpudirect_clique=<clique_id>,x_exclude_mmap_bars=[<bar>...]\"" },
        method: Method::Put,
        endpoint: "vm.add-device",
        body: Body::Kv("path"),
    },
    Sub {
        name: "add-disk",
        about: "Add block device",
        args: Args::Positional { name: "disk_config", required: false, help: "Disk parameters \"path=<disk_image_path>,readonly=on|off,direct=on|off,iommu=on|off,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,vhost_user=on|off,socket=<vhost_user_socket_path>,bw_size=<bytes>,bw_one_time_burst=<bytes>,bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,rate_limit_group=<group_id>,queue_affinity=<list_of_queue_indices_with_their_associated_cpuset>,serial=<serial_number>,backing_files=on|off,sparse=on|off,image_type=<raw,qcow2,vhd,vhdx>,lock_granularity=byte-range|full" },
        method: Method::Put,
        endpoint: "vm.add-disk",
        body: Body::Disk,
    },
    Sub {
        name: "add-fs",
        about: "Add virtio-fs backed fs device",
        args: Args::Positional { name: "fs_config", required: false, help: "virtio-fs parameters \"tag=<tag_name>,socket=<socket_path>,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"" },
        method: Method::Put,
        endpoint: "vm.add-fs",
        body: Body::Fs,
    },
    Sub {
        name: "add-generic-vhost-user",
        about: "Add generic vhost-user device",
        args: Args::Positional { name: "generic_vhost_user_config", required: false, help: "generic vhost-user parameters \"device_type=<ID number for virtio device type (FS, block, net, etc) or symbolic name>,socket=<socket_path>,queue_sizes=<list of queue sizes>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"" },
        method: Method::Put,
        endpoint: "vm.add-generic-vhost-user",
        body: Body::GenericVhostUser,
    },
    Sub {
        name: "add-net",
        about: "Add network device",
        args: Args::Positional { name: "net_config", required: false, help: "Network parameters \"tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,fd=<[fd1,fd2,...]>,iommu=on|off,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,vhost_user=<vhost_user_enable>,socket=<vhost_user_socket_path>,vhost_mode=client|server,bw_size=<bytes>,bw_one_time_burst=<bytes>,bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off\"" },
        method: Method::Put,
        endpoint: "vm.add-net",
        body: Body::Net,
    },
    Sub {
        name: "add-pmem",
        about: "Add persistent memory device",
        args: Args::Positional { name: "pmem_config", required: false, help: "Persistent memory parameters \"file=<backing_file_path>,size=<persistent_memory_size>,iommu=on|off,discard_writes=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"" },
        method: Method::Put,
        endpoint: "vm.add-pmem",
        body: Body::Pmem,
    },
    Sub {
        name: "add-user-device",
        about: "Add userspace device",
        args: Args::Positional { name: "device_config", required: false, help: "Userspace device socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"" },
        method: Method::Put,
        endpoint: "vm.add-user-device",
        body: Body::Kv("socket"),
    },
    Sub {
        name: "add-vdpa",
        about: "Add vDPA device",
        args: Args::Positional { name: "vdpa_config", required: false, help: "vDPA device \"path=<device_path>,num_queues=<number_of_queues>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"" },
        method: Method::Put,
        endpoint: "vm.add-vdpa",
        body: Body::Kv("path"),
    },
    Sub {
        name: "add-vsock",
        about: "Add vsock device",
        args: Args::Positional { name: "vsock_config", required: false, help: "Virtio VSOCK parameters \"cid=<context_id>,socket=<socket_path>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"" },
        method: Method::Put,
        endpoint: "vm.add-vsock",
        body: Body::Vsock,
    },
    Sub {
        name: "boot",
        about: "Boot a created VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.boot",
        body: Body::None,
    },
    Sub {
        name: "coredump",
        about: "Create a coredump from VM",
        args: Args::Positional { name: "coredump_config", required: false, help: "<file_path>" },
        method: Method::Put,
        endpoint: "vm.coredump",
        body: Body::Kv("destination_url"),
    },
    Sub {
        name: "counters",
        about: "Counters from the VM",
        args: Args::None,
        method: Method::Get,
        endpoint: "vm.counters",
        body: Body::None,
    },
    Sub {
        name: "create",
        about: "Create VM from a JSON configuration",
        args: Args::Path,
        method: Method::Put,
        endpoint: "vm.create",
        body: Body::File,
    },
    Sub {
        name: "delete",
        about: "Delete a VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.delete",
        body: Body::None,
    },
    Sub {
        name: "info",
        about: "Info on the VM",
        args: Args::None,
        method: Method::Get,
        endpoint: "vm.info",
        body: Body::None,
    },
    Sub {
        name: "nmi",
        about: "Trigger NMI",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.nmi",
        body: Body::None,
    },
    Sub {
        name: "pause",
        about: "Pause the VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.pause",
        body: Body::None,
    },
    Sub {
        name: "ping",
        about: "Ping the VMM to check for API server availability",
        args: Args::None,
        method: Method::Get,
        endpoint: "vmm.ping",
        body: Body::None,
    },
    Sub {
        name: "power-button",
        about: "Trigger a power button in the VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.power-button",
        body: Body::None,
    },
    Sub {
        name: "reboot",
        about: "Reboot the VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.reboot",
        body: Body::None,
    },
    Sub {
        name: "receive-migration",
        about: "Receive a VM migration",
        args: Args::Positional { name: "receive_migration_config", required: false, help: "VM receive migration parameters \"<receiver_url>\" or \"receiver_url=<url>[,tls_dir=<path>][,memory_mode=precopy|postcopy][,vfio_fds=<list_of_vfio_ids_with_their_associated_fd>][,iommufd_fd=<fd>][,zone_updates=[<id@host_numa_node>]]\"" },
        method: Method::Put,
        endpoint: "vm.receive-migration",
        body: Body::Kv("receiver_url"),
    },
    Sub {
        name: "remove-device",
        about: "Remove VFIO and PCI device",
        args: Args::Positional { name: "id", required: false, help: "<device_id>" },
        method: Method::Put,
        endpoint: "vm.remove-device",
        body: Body::Kv("id"),
    },
    Sub {
        name: "resize",
        about: "Resize the VM",
        args: Args::Options(&[("balloon", "New balloon size in bytes (supports K/M/G suffix)"), ("cpus", "New vCPUs count"), ("memory", "New memory size in bytes (supports K/M/G suffix)")]),
        method: Method::Put,
        endpoint: "vm.resize",
        body: Body::Resize,
    },
    Sub {
        name: "resize-disk",
        about: "Resize an attached disk",
        args: Args::Options(&[("disk", "Disk identifier"), ("size", "New disk size")]),
        method: Method::Put,
        endpoint: "vm.resize-disk",
        body: Body::ResizeDisk,
    },
    Sub {
        name: "resize-zone",
        about: "Resize a memory zone",
        args: Args::Options(&[("id", "Memory zone identifier"), ("size", "New memory zone size in bytes (supports K/M/G suffix)")]),
        method: Method::Put,
        endpoint: "vm.resize-zone",
        body: Body::ResizeZone,
    },
    Sub {
        name: "restore",
        about: "Restore VM from a snapshot",
        args: Args::Positional { name: "restore_config", required: true, help: RestoreConfig::SYNTAX },
        method: Method::Put,
        endpoint: "vm.restore",
        body: Body::Restore,
    },
    Sub {
        name: "resume",
        about: "Resume the VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.resume",
        body: Body::None,
    },
    Sub {
        name: "send-migration",
        about: "Initiate a VM migration",
        args: Args::Positional { name: "send_migration_config", required: false, help: "VM send migration parameters \"destination_url=<url>[,local=on|off,preserve_source=on|off,downtime_ms=<milliseconds>,timeout_s=<seconds>,timeout_strategy=cancel|ignore,connections=<amount>,tls_dir=<path>,memory_mode=precopy|postcopy]\"" },
        method: Method::Put,
        endpoint: "vm.send-migration",
        body: Body::Kv("destination_url"),
    },
    Sub {
        name: "shutdown",
        about: "Shutdown the VM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vm.shutdown",
        body: Body::None,
    },
    Sub {
        name: "shutdown-vmm",
        about: "Shutdown the VMM",
        args: Args::None,
        method: Method::Put,
        endpoint: "vmm.shutdown",
        body: Body::None,
    },
    Sub {
        name: "snapshot",
        about: "Create a snapshot from VM",
        args: Args::Positional { name: "snapshot_config", required: true, help: "<destination_url>" },
        method: Method::Put,
        endpoint: "vm.snapshot",
        body: Body::Kv("destination_url"),
    },
];

fn command() -> Command {
    let mut cmd = Command::new("ch-remote")
        .version(concat!("v", env!("CARGO_PKG_VERSION")))
        .about("Remotely control a cloud-hypervisor VMM.")
        .subcommand_required(true)
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .help("HTTP API socket path (UNIX domain socket).")
                .num_args(1)
                .value_name("api-socket"),
        );
    for s in SUBCOMMANDS {
        let mut sub = Command::new(s.name).about(s.about);
        match &s.args {
            Args::None => {}
            Args::Path => sub = sub.arg(Arg::new("path").default_value("-")),
            Args::Positional {
                name,
                required,
                help,
            } => sub = sub.arg(Arg::new(*name).help(*help).required(*required).num_args(1)),
            Args::Options(opts) => {
                for (name, help) in opts.iter() {
                    sub = sub.arg(Arg::new(*name).long(*name).help(*help).num_args(1));
                }
            }
        }
        if s.name == "send-migration" {
            sub = sub.arg(
                Arg::new(NO_WAIT)
                    .long(NO_WAIT)
                    .action(ArgAction::SetTrue)
                    .help(
                        "Return once the migration has started, as the original's ch-remote \
                         (by default: follow its progress until it completes or fails)",
                    ),
            );
        }
        cmd = cmd.subcommand(sub);
    }
    cmd
}

/// `send-migration --no-wait` (ours).
const NO_WAIT: &str = "no-wait";
/// How often `send-migration` asks for the migration's progress.
const POLL: Duration = Duration::from_millis(200);
/// The longest `send-migration` stays silent while a migration runs.
const QUIET: Duration = Duration::from_secs(2);

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
fn restore_request(raw: &str) -> Result<(Value, Vec<RawFd>), String> {
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
fn body(s: &Sub, m: &ArgMatches) -> Result<(Option<Vec<u8>>, Vec<RawFd>), String> {
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

fn run(m: &ArgMatches) -> Result<(), String> {
    let Some((name, sub_m)) = m.subcommand() else {
        return Err("no command given (see --help)".into());
    };
    let s = SUBCOMMANDS
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| format!("unknown command {name}"))?;
    let socket = m
        .get_one::<String>("api-socket")
        .map(PathBuf::from)
        .ok_or("--api-socket <path> is required")?;
    let (body, fds) = body(s, sub_m)?;
    let mut client = Client::connect(&socket).map_err(|e| e.to_string())?;
    // Asked before the migration starts: whether the VMM tells its progress (the original's
    // does not), and, to ours, that someone will watch it (so the VMM waits, after a success,
    // until it has said so).
    let follow = s.name == "send-migration"
        && !sub_m.get_flag(NO_WAIT)
        && match client.call(Method::Get, PROGRESS, None) {
            Ok(reply) => tells_progress(&reply),
            Err(_) => {
                client = Client::connect(&socket).map_err(|e| e.to_string())?;
                false
            }
        };
    let reply = client
        .call_with_fds(s.method, s.endpoint, body.as_deref(), &fds)
        .map_err(|e| format!("{}: {e}", s.endpoint))?;
    if !(200..300).contains(&reply.status) {
        let mut msg = format!("{}: the VMM answered {}", s.endpoint, reply.status);
        for line in reply.error_lines() {
            msg.push_str(": ");
            msg.push_str(&line);
        }
        return Err(msg);
    }
    // The body as the VMM sent it and a newline, as the original's ch-remote prints it: for
    // every answer that has a body, an empty one included (vmm.shutdown's 200), not for 204.
    if reply.status != 204 {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&reply.body);
        let _ = out.write_all(b"\n");
    }
    if follow {
        follow_migration(client, &socket)?;
    }
    Ok(())
}

const PROGRESS: &str = "vm.migration-progress";

/// Whether `reply`, to `vm.migration-progress`, comes from a VMM that has the endpoint: a
/// progress (200), or the endpoint's own refusal when no migration was started (404 with an
/// "Error from API" chain). The original answers 404 `["Not Found"]`.
fn tells_progress(reply: &Reply) -> bool {
    match reply.status {
        200 => serde_json::from_slice::<MigrationProgress>(&reply.body).is_ok(),
        404 => reply.error_lines().first().map(String::as_str) == Some("Error from API"),
        _ => false,
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The line for a pass, as `send-migration` prints it.
fn pass_line(p: &MigrationProgress) -> String {
    let secs = p.elapsed_ms as f64 / 1000.0;
    format!(
        "pass {}: {:.1} MiB sent ({:.1} MiB in all), {:.1} MiB dirty, {:.0} MiB/s, {secs:.1} s",
        p.pass,
        mib(p.bytes),
        mib(p.total_bytes),
        mib(p.dirty_bytes),
        mib(p.total_bytes) / secs.max(0.001),
    )
}

/// The last line of a completed migration.
fn summary_line(p: &MigrationProgress) -> String {
    let downtime = p.downtime_us.map_or_else(
        || "unknown".to_string(),
        |d| format!("{:.1} ms", d as f64 / 1000.0),
    );
    format!(
        "migration to {} completed in {:.1} s: {} passes, {:.1} MiB sent, downtime {downtime}",
        p.destination_url,
        p.elapsed_ms as f64 / 1000.0,
        p.pass,
        mib(p.total_bytes),
    )
}

/// Follows the migration just started until it completes (Ok) or fails (its error), printing
/// each pass seen on standard error.
fn follow_migration(mut client: Client, socket: &std::path::Path) -> Result<(), String> {
    let mut err = std::io::stderr().lock();
    let mut last: Option<MigrationProgress> = None;
    let mut reconnected = false;
    let mut said = Instant::now();
    loop {
        let reply = match client.call(Method::Get, PROGRESS, None) {
            Ok(r) => r,
            Err(e) => {
                // A connection the VMM closed (it keeps at most so many) is opened again,
                // once; a VMM that is gone has ended without telling the outcome.
                let again = (!reconnected)
                    .then(|| Client::connect(socket).ok())
                    .flatten();
                if let Some(c) = again {
                    client = c;
                    reconnected = true;
                    continue;
                }
                let seen = last.as_ref().map_or_else(
                    || "nothing".to_string(),
                    |p| format!("pass {}, {:.1} MiB sent", p.pass, mib(p.total_bytes)),
                );
                return Err(format!(
                    "{PROGRESS}: {e}: the VMM ended before telling the migration's outcome \
                     (last seen: {seen})"
                ));
            }
        };
        reconnected = false;
        if reply.status != 200 {
            let mut msg = format!("{PROGRESS}: the VMM answered {}", reply.status);
            for line in reply.error_lines() {
                msg.push_str(": ");
                msg.push_str(&line);
            }
            return Err(msg);
        }
        let p: MigrationProgress = serde_json::from_slice(&reply.body).map_err(|e| {
            format!(
                "{PROGRESS}: unreadable answer ({e}): {}",
                String::from_utf8_lossy(&reply.body)
            )
        })?;
        if last.is_none() {
            let _ = writeln!(
                err,
                "migrating to {} ({:.0} MiB of guest memory)",
                p.destination_url,
                mib(p.memory_bytes)
            );
        }
        let new_pass = last.as_ref().map_or(p.pass > 0, |l| p.pass != l.pass);
        match p.state {
            MigrationState::Running => {
                if new_pass {
                    let _ = writeln!(err, "{}", pass_line(&p));
                    said = Instant::now();
                } else if said.elapsed() >= QUIET {
                    // A long pass (or the downtime) says it is still under way.
                    let _ = writeln!(
                        err,
                        "pass {} under way: {:.1} MiB sent in all, {:.1} s",
                        p.pass + 1,
                        mib(p.total_bytes),
                        p.elapsed_ms as f64 / 1000.0
                    );
                    said = Instant::now();
                }
            }
            MigrationState::Completed => {
                let _ = writeln!(err, "{}", summary_line(&p));
                return Ok(());
            }
            MigrationState::Failed => {
                return Err(format!(
                    "vm.send-migration: the migration failed after {:.1} s: {}",
                    p.elapsed_ms as f64 / 1000.0,
                    p.error.as_deref().unwrap_or("no reason given")
                ));
            }
        }
        last = Some(p);
        std::thread::sleep(POLL);
    }
}

fn main() -> ExitCode {
    let m = match command().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!(
                "ch-remote: {} (see --help)",
                first.trim_start_matches("error: ")
            );
            return ExitCode::from(1);
        }
    };
    match run(&m) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ch-remote: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(args: &[&str]) -> Result<Value, String> {
        let m = command()
            .try_get_matches_from(["ch-remote"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let (name, sub_m) = m.subcommand().unwrap();
        let s = SUBCOMMANDS.iter().find(|s| s.name == name).unwrap();
        let b = body(s, sub_m)?.0.unwrap_or_default();
        Ok(serde_json::from_slice(&b).unwrap_or(Value::Null))
    }

    #[test]
    fn bodies_follow_the_original_schemas() {
        assert_eq!(
            body_of(&["resize", "--cpus", "4", "--memory", "1G"]).unwrap(),
            serde_json::json!({"desired_vcpus": 4, "desired_ram": 1u64 << 30})
        );
        assert_eq!(
            body_of(&["resize-zone", "--id", "z0", "--size", "2M"]).unwrap(),
            serde_json::json!({"id": "z0", "desired_ram": 2u64 << 20})
        );
        assert_eq!(
            body_of(&["resize-disk", "--disk", "d0", "--size", "4096"]).unwrap(),
            serde_json::json!({"id": "d0", "desired_size": 4096})
        );
        assert_eq!(
            body_of(&["remove-device", "_disk0"]).unwrap(),
            serde_json::json!({"id": "_disk0"})
        );
        assert_eq!(
            body_of(&["snapshot", "file:///tmp/s"]).unwrap(),
            serde_json::json!({"destination_url": "file:///tmp/s"})
        );
        assert_eq!(
            body_of(&["restore", "source_url=file:///s,prefault=on"]).unwrap(),
            serde_json::json!({"source_url": "file:///s", "prefault": true,
                "memory_restore_mode": "Copy", "net_fds": null, "vfio_fds": null,
                "iommufd_fd": null, "resume": false, "zone_updates": []})
        );
        assert_eq!(
            body_of(&["add-vsock", "cid=3,socket=/tmp/v,id=[a,b]"]).unwrap(),
            serde_json::json!({"cid": 3, "socket": "/tmp/v", "id": "[a,b]", "pci_segment": 0})
        );
        // Sizes in bytes, as the API takes them (the original's VMM refuses "128M").
        assert_eq!(
            body_of(&["add-pmem", "file=/p,size=128M"]).unwrap()["size"],
            128u64 << 20
        );
        assert!(body_of(&["add-pmem", "file=/p,size=12Q"]).is_err());
        assert_eq!(
            body_of(&["add-disk", "path=/img,readonly=on"]).unwrap()["readonly"],
            true
        );
        // The migration enumerations in the API's spelling, as the original's ch-remote
        // sends them (checked by capturing its request), whatever the case given.
        let send = body_of(&[
            "send-migration",
            "destination_url=unix:/m,timeout_strategy=ignore,memory_mode=PRECOPY",
        ])
        .unwrap();
        assert_eq!(send["timeout_strategy"], "Ignore");
        assert_eq!(send["memory_mode"], "Precopy");
        assert_eq!(
            body_of(&[
                "receive-migration",
                "receiver_url=unix:/m,memory_mode=postcopy"
            ])
            .unwrap()["memory_mode"],
            "Postcopy"
        );
        let bad = body_of(&[
            "send-migration",
            "destination_url=unix:/m,timeout_strategy=wait",
        ]);
        assert_eq!(
            bad.unwrap_err(),
            "send-migration: timeout_strategy=wait: expected cancel or ignore"
        );
        assert!(body_of(&["add-fs", "novalue"]).is_err());
        assert!(body_of(&["resize", "--memory", "lots"]).is_err());
        assert!(body_of(&["add-disk", "path=/img,bogus=1"]).is_err());
        assert!(body_of(&["snapshot"]).is_err(), "snapshot needs its URL");
        assert_eq!(body_of(&["nmi"]).unwrap(), Value::Null);
    }

    /// `send-migration`: the original's syntax, plus `--no-wait`; whether a VMM tells
    /// progress, from its answer to `vm.migration-progress`; the lines printed.
    #[test]
    fn send_migration_follows_the_progress() {
        let m = command()
            .try_get_matches_from(["ch-remote", "send-migration", "unix:/m", "--no-wait"])
            .unwrap();
        let (_, sub) = m.subcommand().unwrap();
        assert!(sub.get_flag(NO_WAIT));
        assert_eq!(
            body_of(&["send-migration", "destination_url=unix:/m,downtime_ms=50"]).unwrap(),
            serde_json::json!({"destination_url": "unix:/m", "downtime_ms": 50})
        );
        assert!(command()
            .try_get_matches_from(["ch-remote", "info", "--no-wait"])
            .is_err());
        let reply = |status, body: &str| Reply {
            status,
            body: body.as_bytes().to_vec(),
        };
        // Ours, before any migration and after one; the original's; anything else.
        assert!(tells_progress(&reply(
            404,
            r#"["Error from API","The migration progress is not available","No migration has been started"]"#
        )));
        let p = MigrationProgress {
            state: MigrationState::Running,
            destination_url: "unix:/m".into(),
            pass: 3,
            bytes: 3 << 20,
            total_bytes: 300 << 20,
            dirty_bytes: 1 << 19,
            memory_bytes: 256 << 20,
            elapsed_ms: 1500,
            downtime_us: None,
            error: None,
        };
        let json = serde_json::to_string(&p).unwrap();
        assert!(tells_progress(&reply(200, &json)));
        assert!(!tells_progress(&reply(404, r#"["Not Found"]"#)));
        assert!(!tells_progress(&reply(404, "")));
        assert!(!tells_progress(&reply(200, "{}")));
        assert!(!tells_progress(&reply(400, r#"["Bad Request"]"#)));
        assert_eq!(
            pass_line(&p),
            "pass 3: 3.0 MiB sent (300.0 MiB in all), 0.5 MiB dirty, 200 MiB/s, 1.5 s"
        );
        let done = MigrationProgress {
            state: MigrationState::Completed,
            downtime_us: Some(12_345),
            ..p
        };
        assert_eq!(
            summary_line(&done),
            "migration to unix:/m completed in 1.5 s: 3 passes, 300.0 MiB sent, downtime 12.3 ms"
        );
    }

    /// `restore` takes `--restore`'s syntax; net_fds' descriptors leave the body (their count
    /// stays) and go beside it, in order; what the VMM refuses is sent for it to refuse.
    #[test]
    fn restore_sends_its_descriptors_beside_the_body() {
        let (body, fds) = restore_request(
            "source_url=file:///s,resume=on,memory_restore_mode=OnDemand,\
             net_fds=[net0@[3,4],net1@[5]]",
        )
        .unwrap();
        assert_eq!(fds, [3, 4, 5]);
        assert_eq!(body["resume"], true);
        assert_eq!(body["memory_restore_mode"], "OnDemand");
        assert_eq!(
            body["net_fds"],
            serde_json::json!([{"id": "net0", "num_fds": 2}, {"id": "net1", "num_fds": 1}])
        );
        let (body, fds) =
            restore_request("source_url=tcp://h/s,vfio_fds=[v0@7],iommufd_fd=8").unwrap();
        assert!(fds.is_empty());
        assert_eq!(body["source_url"], "tcp://h/s");
        assert_eq!(body["vfio_fds"], serde_json::json!([{"id": "v0", "fd": 7}]));
        assert_eq!(body["iommufd_fd"], 8);
        // Ours: net_macs go in the body as they are (no descriptors).
        let (body, fds) = restore_request(
            "source_url=file:///s,net_fds=[_net0@[3]],net_macs=[_net0@52:54:00:AB:cd:01]",
        )
        .unwrap();
        assert_eq!(fds, [3]);
        assert_eq!(
            body["net_macs"],
            serde_json::json!([{"id": "_net0", "mac": "52:54:00:ab:cd:01"}])
        );
        assert!(body_of(&[
            "restore",
            "source_url=file:///s,net_macs=[_net0@01:00:5e:00:00:01]"
        ])
        .unwrap_err()
        .contains("multicast"));
        let e = body_of(&["restore", "prefault=on"]).unwrap_err();
        assert_eq!(e, "--restore prefault=on: source_url missing");
        assert!(body_of(&["restore", "source_url=file:///s,net_fds=[net0]"]).is_err());
        assert!(body_of(&["restore", "source_url=file:///s,memory_restore_mode=x"]).is_err());
        assert!(body_of(&["restore"]).is_err(), "restore needs its config");
    }
}
