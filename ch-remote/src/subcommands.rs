//! The original's subcommands: their arguments, help texts, and the request each sends.

use api::http::Method;
use clap::{Arg, ArgAction, Command};
use vm_config::RestoreConfig;

/// What a subcommand takes on its command line.
pub(crate) enum Args {
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
pub(crate) enum Body {
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

pub(crate) struct Sub {
    pub(crate) name: &'static str,
    pub(crate) about: &'static str,
    pub(crate) args: Args,
    pub(crate) method: Method,
    pub(crate) endpoint: &'static str,
    pub(crate) body: Body,
}

/// The original's subcommands, in its order, with its help texts.
pub(crate) const SUBCOMMANDS: &[Sub] = &[
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

pub(crate) fn command() -> Command {
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
pub(crate) const NO_WAIT: &str = "no-wait";
