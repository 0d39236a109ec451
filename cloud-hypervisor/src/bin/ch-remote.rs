//! `ch-remote`: drives a running cloud-hypervisor through its API socket, with the original's
//! subcommands and arguments. Errors are one line on standard error, with exit code 1.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use api::client::Client;
use clap::{Arg, ArgMatches, Command};
use hyper::Method;

/// Subcommands that map to one endpoint: name, help, method, endpoint.
const SIMPLE: &[(&str, &str, Method, &str)] = &[
    ("boot", "Boot a created VM", Method::PUT, "vm.boot"),
    (
        "counters",
        "Counters from the VM",
        Method::GET,
        "vm.counters",
    ),
    ("delete", "Delete a VM", Method::PUT, "vm.delete"),
    ("info", "Info on the VM", Method::GET, "vm.info"),
    ("pause", "Pause the VM", Method::PUT, "vm.pause"),
    (
        "ping",
        "Ping the VMM to check for API server availability",
        Method::GET,
        "vmm.ping",
    ),
    (
        "power-button",
        "Trigger a power button in the VM",
        Method::PUT,
        "vm.power-button",
    ),
    ("reboot", "Reboot the VM", Method::PUT, "vm.reboot"),
    ("resume", "Resume the VM", Method::PUT, "vm.resume"),
    ("shutdown", "Shutdown the VM", Method::PUT, "vm.shutdown"),
    (
        "shutdown-vmm",
        "Shutdown the VMM",
        Method::PUT,
        "vmm.shutdown",
    ),
];

/// The original's subcommands for what this VMM does not have yet: name, help, argument.
const NOT_YET: &[(&str, &str, &str)] = &[
    ("add-device", "Add VFIO device", "device_config"),
    ("add-disk", "Add block device", "disk_config"),
    ("add-fs", "Add virtio-fs backed fs device", "fs_config"),
    (
        "add-generic-vhost-user",
        "Add generic vhost-user device",
        "generic_vhost_user_config",
    ),
    ("add-net", "Add network device", "net_config"),
    ("add-pmem", "Add persistent memory device", "pmem_config"),
    ("add-user-device", "Add userspace device", "device_config"),
    ("add-vdpa", "Add vDPA device", "vdpa_config"),
    ("add-vsock", "Add vsock device", "vsock_config"),
    ("coredump", "Create a coredump from VM", "coredump_config"),
    ("nmi", "Trigger NMI", ""),
    (
        "receive-migration",
        "Receive a VM migration",
        "receive_migration_config",
    ),
    ("remove-device", "Remove VFIO and PCI device", "id"),
    ("resize", "Resize the VM", ""),
    ("resize-disk", "Resize an attached disk", ""),
    ("resize-zone", "Resize a memory zone", ""),
    ("restore", "Restore VM from a snapshot", "restore_config"),
    (
        "send-migration",
        "Initiate a VM migration",
        "send_migration_config",
    ),
    ("snapshot", "Create a snapshot from VM", "snapshot_config"),
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
        )
        .subcommand(
            Command::new("create")
                .about("Create VM from a JSON configuration")
                .arg(Arg::new("path").default_value("-")),
        );
    for (name, about, _, _) in SIMPLE {
        cmd = cmd.subcommand(Command::new(*name).about(*about));
    }
    for (name, about, arg) in NOT_YET {
        let mut sub = Command::new(*name).about(*about);
        sub = match *name {
            "resize" => sub
                .arg(Arg::new("balloon").long("balloon").num_args(1))
                .arg(Arg::new("cpus").long("cpus").num_args(1))
                .arg(Arg::new("memory").long("memory").num_args(1)),
            "resize-disk" => sub
                .arg(Arg::new("disk").long("disk").num_args(1))
                .arg(Arg::new("size").long("size").num_args(1)),
            "resize-zone" => sub
                .arg(Arg::new("id").long("id").num_args(1))
                .arg(Arg::new("size").long("size").num_args(1)),
            _ if arg.is_empty() => sub,
            _ => sub.arg(Arg::new(*arg)),
        };
        cmd = cmd.subcommand(sub);
    }
    cmd
}

fn read_config(m: &ArgMatches) -> Result<Vec<u8>, String> {
    let path = m
        .get_one::<String>("path")
        .map(String::as_str)
        .unwrap_or("-");
    let mut body = Vec::new();
    let read = if path == "-" {
        std::io::stdin().read_to_end(&mut body).map(|_| ())
    } else {
        std::fs::read(path).map(|b| body = b)
    };
    read.map_err(|e| format!("create {path}: cannot read: {e}"))?;
    // Check locally so a typo gets a precise message before anything is sent.
    serde_json::from_slice::<serde_json::Value>(&body)
        .map_err(|e| format!("create {path}: not valid JSON: {e}"))?;
    Ok(body)
}

fn run(m: &ArgMatches) -> Result<(), String> {
    let Some((sub, sub_m)) = m.subcommand() else {
        return Err("no command given (see --help)".into());
    };
    if NOT_YET.iter().any(|(n, _, _)| *n == sub) {
        return Err(format!("{sub}: not supported yet by this VMM"));
    }
    let socket = m
        .get_one::<String>("api-socket")
        .map(PathBuf::from)
        .ok_or("--api-socket <path> is required")?;
    let (method, endpoint, body) = if sub == "create" {
        (Method::PUT, "vm.create", Some(read_config(sub_m)?))
    } else {
        let (_, _, method, endpoint) = SIMPLE
            .iter()
            .find(|(n, _, _, _)| *n == sub)
            .ok_or_else(|| format!("unknown command {sub}"))?;
        (method.clone(), *endpoint, None)
    };
    let mut client = Client::connect(&socket).map_err(|e| e.to_string())?;
    let reply = client
        .call(method, endpoint, body)
        .map_err(|e| format!("{endpoint}: {e}"))?;
    let text = String::from_utf8_lossy(&reply.body);
    if !(200..300).contains(&reply.status) {
        return Err(format!(
            "{endpoint}: the VMM answered {}: {}",
            reply.status,
            text.trim()
        ));
    }
    if !reply.body.is_empty() {
        match serde_json::from_slice::<serde_json::Value>(&reply.body) {
            Ok(v) => println!(
                "{}",
                serde_json::to_string_pretty(&v).unwrap_or_else(|_| text.to_string())
            ),
            Err(_) => println!("{}", text.trim_end()),
        }
    }
    Ok(())
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
