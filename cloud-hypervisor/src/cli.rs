//! The command line, shaped like the original's: the same option names, value syntax and help.

use clap::{Arg, ArgAction, Command};

/// Options of the original that this VMM does not implement yet: accepted by the parser so
/// `--help` matches, refused with a clear message when used.
pub const NOT_YET: &[&str] = &["device", "user-device", "vdpa"];

/// The options the original puts in its `vm-config` group, which needs a payload (`--kernel`,
/// `--firmware`): with `--restore` and no payload the VM's configuration comes from the
/// snapshot, and the original refuses them.
pub const VM_CONFIG: &[&str] = &[
    "balloon",
    "cmdline",
    "console",
    "cpus",
    "debug-console",
    "device",
    "disk",
    "fs",
    "generic-vhost-user",
    "initramfs",
    "landlock",
    "landlock-rules",
    "memory",
    "memory-zone",
    "net",
    "numa",
    "pci-segment",
    "platform",
    "pmem",
    "pvpanic",
    "rate-limit-group",
    "rng",
    "rtc",
    "serial",
    "tpm",
    "user-device",
    "vdpa",
    "vsock",
];

/// Flags of the original we do not implement yet.
pub const NOT_YET_FLAGS: &[&str] = &[];

fn opt(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .help(help)
        .num_args(1)
        .value_name(name)
}

fn multi(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .help(help)
        .num_args(1..)
        .action(ArgAction::Append)
        .value_name(name)
}

fn flag(name: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .help(help)
        .action(ArgAction::SetTrue)
}

pub fn command() -> Command {
    Command::new("cloud-hypervisor")
        .version(concat!("v", env!("CARGO_PKG_VERSION")))
        .about("Launch a cloud-hypervisor VMM.")
        .next_line_help(true)
        // `-V, --version` where the original lists it: among the options, by name.
        .disable_version_flag(true)
        .arg(opt("api-socket", "HTTP API socket (UNIX domain socket): path=<path> or fd=<fd>."))
        .arg(opt("balloon", "Balloon parameters \"size=<balloon_size>,deflate_on_oom=on|off,free_page_reporting=on|off,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(opt("cmdline", "Kernel command line"))
        .arg(opt("console", "Control (virtio) console: \"off|null|pty|tty|file=<path>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"").default_value("tty"))
        .arg(opt("cpus", "boot=<boot_vcpus>,max=<max_vcpus>,topology=<threads_per_core>:<cores_per_die>:<dies_per_package>:<packages>,kvm_hyperv=on|off,max_phys_bits=<maximum_number_of_physical_bits>,affinity=<list_of_vcpus_with_their_associated_cpuset>,features=<list_of_features_to_enable>,nested=on|off,core_scheduling=vm|vcpu|off").default_value("boot=1,max_phys_bits=46"))
        .arg(opt("debug-console", "Debug console: off|pty|tty|file=<path>,iobase=<port in hex>").default_value("off,iobase=0xe9"))
        .arg(multi("device", "Direct device assignment parameters \"path=<device_path>,fd=<vfio_cdev_fd>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,x_nv_gpudirect_clique=<clique_id>,x_exclude_mmap_bars=[<bar>...]\""))
        .arg(multi("disk", "Disk parameters \"path=<disk_image_path>,readonly=on|off,direct=on|off,iommu=on|off,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,vhost_user=on|off,socket=<vhost_user_socket_path>,bw_size=<bytes>,bw_one_time_burst=<bytes>,bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,rate_limit_group=<group_id>,queue_affinity=<list_of_queue_indices_with_their_associated_cpuset>,serial=<serial_number>,backing_files=on|off,sparse=on|off,image_type=<raw,qcow2,vhd,vhdx>,lock_granularity=byte-range|full"))
        .arg(opt("event-monitor", "Path to report events on: path=<path> or fd=<fd>"))
        .arg(opt("firmware", "Path to firmware that is loaded in an architectural specific way"))
        .arg(multi("fs", "virtio-fs parameters \"tag=<tag_name>,socket=<socket_path>,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(multi("generic-vhost-user", "generic vhost-user parameters \"device_type=<ID number for virtio device type (FS, block, net, etc) or symbolic name>,socket=<socket_path>,queue_sizes=<list of queue sizes>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(opt("initramfs", "Path to initramfs image"))
        .arg(opt("kernel", "Path to kernel to load. This may be a kernel or firmware that supports a PVH entry point (e.g. vmlinux) or architecture equivalent"))
        .arg(flag("landlock", "enable/disable Landlock."))
        .arg(multi("landlock-rules", "Landlock parameters \"path=<path/to/{file/dir}>,access=[rw]\""))
        .arg(opt("log-file", "Log file. Standard error is used if not specified"))
        .arg(opt("log-format", "Log format. Common tokens: {boottime}, {wallclock}, {glog}, {localglog}, {thread}, {level}, {location}, {msg}. See docs/logging.md for the full list (per-field date/time tokens, local-time variants, glog level letter).").default_value(crate::logger::DEFAULT_FORMAT))
        .arg(opt("memory", "Memory parameters \"size=<guest_memory_size>,mergeable=on|off,shared=on|off,hugepages=on|off,hugepage_size=<hugepage_size>,hotplug_method=acpi|virtio-mem,hotplug_size=<hotpluggable_memory_size>,hotplugged_size=<hotplugged_memory_size>,prefault=on|off,reserve=on|off,thp=on|off\"").default_value("size=512M"))
        .arg(multi("memory-zone", "User defined memory zone parameters \"size=<guest_memory_region_size>,file=<backing_file>,shared=on|off,hugepages=on|off,hugepage_size=<hugepage_size>,host_numa_node=<node_id>,id=<zone_identifier>,hotplug_size=<hotpluggable_memory_size>,hotplugged_size=<hotplugged_memory_size>,prefault=on|off,reserve=on|off\""))
        .arg(multi("net", "Network parameters \"tap=<if_name>,ip=<ip_addr>,mask=<net_mask>,mac=<mac_addr>,fd=<[fd1,fd2,...]>,iommu=on|off,num_queues=<number_of_queues>,queue_size=<size_of_each_queue>,id=<device_id>,vhost_user=<vhost_user_enable>,socket=<vhost_user_socket_path>,vhost_mode=client|server,bw_size=<bytes>,bw_one_time_burst=<bytes>,bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,pci_segment=<segment_id>,pci_device_id=<pci_slot>,offload_tso=on|off,offload_ufo=on|off,offload_csum=on|off\""))
        .arg(flag("no-shutdown", "Do not exit the VMM when the guest shuts down"))
        .arg(multi("numa", "Settings related to a given NUMA node \"guest_numa_id=<node_id>,cpus=<cpus_id>,distances=<list_of_distances_to_destination_nodes>,device_id=<device_id>,memory_zones=<list_of_memory_zones>,pci_segments=<list_of_pci_segments>\""))
        .arg(multi("pci-segment", "PCI Segment parameters \"pci_segment=<segment_id>,mmio32_aperture_weight=<scale>,mmio64_aperture_weight=<scale>\""))
        .arg(opt("platform", "Platform configuration parameters \"num_pci_segments=<num_pci_segments>,iommu_segments=<list_of_segments>,iommu_address_width=<bits>,iommufd=on|off,iommufd_fd=<fd>,vfio_p2p_dma=on|off,system_manufacturer=<dmi_system_manufacturer>,system_product_name=<dmi_system_product_name>,system_version=<dmi_system_version>,system_serial_number=<dmi_system_serial_number>,system_uuid=<dmi_system_uuid>,system_sku_number=<dmi_system_sku_number>,system_family=<dmi_system_family>,oem_strings=<list_of_strings>,chassis_asset_tag=<dmi_chassis_asset_tag>\""))
        .arg(multi("pmem", "Persistent memory parameters \"file=<backing_file_path>,size=<persistent_memory_size>,iommu=on|off,discard_writes=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(flag("pvpanic", "Enable pvpanic device"))
        .arg(multi("rate-limit-group", "Rate Limit Group parameters \"bw_size=<bytes>,bw_one_time_burst=<bytes>,bw_refill_time=<ms>,ops_size=<io_ops>,ops_one_time_burst=<io_ops>,ops_refill_time=<ms>,id=<device_id>\""))
        .arg(opt("restore", vmm::config::RestoreConfig::SYNTAX))
        .arg(opt("rng", "Random number generator parameters \"src=<entropy_source_path>,iommu=on|off,pci_segment=<segment_id>,pci_device_id=<pci_slot>\"").default_value("src=/dev/urandom"))
        .arg(
            Arg::new("rtc")
                .long("rtc")
                .help("Virtio RTC parameters \"iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\". Passing --rtc with no arguments enables the device with default settings.")
                .num_args(0..=1)
                .default_missing_value("")
                .value_name("rtc"),
        )
        .arg(opt("seccomp", "").value_parser(["true", "false", "log", "errno"]).default_value("true"))
        .arg(opt("serial", "Control serial port: \"off|null|pty|tty|file=<path>|socket=<path>\"").default_value("null"))
        .arg(opt("tpm", "TPM device \"(UNIX Domain Socket from swtpm) socket=</path/to/a/socket>\""))
        .arg(multi("user-device", "Userspace device socket=<socket_path>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(Arg::new("v").short('v').action(ArgAction::Count).help("Sets the level of debugging output"))
        .arg(multi("vdpa", "vDPA device \"path=<device_path>,num_queues=<number_of_queues>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(Arg::new("version").short('V').long("version").action(ArgAction::Version).help("Print version"))
        .arg(opt("vsock", "Virtio VSOCK parameters \"cid=<context_id>,socket=<socket_path>,iommu=on|off,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<pci_slot>\""))
        .arg(flag("watchdog", "Enable virtio-watchdog"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the original's clap setup: the device options take several values per occurrence and
    /// repeat; the single-value options may be given once.
    #[test]
    fn repeated_options_as_the_original() {
        let m = command()
            .try_get_matches_from(["ch", "--disk", "path=a", "path=b", "--disk", "path=c"])
            .unwrap();
        let disks: Vec<&String> = m.get_many("disk").unwrap().collect();
        assert_eq!(disks, ["path=a", "path=b", "path=c"]);
        let m = command()
            .try_get_matches_from(["ch", "--net", "tap=", "--net", "tap=,mac=", "tap=t1"])
            .unwrap();
        assert_eq!(m.get_many::<String>("net").unwrap().count(), 3);
        for once in ["--cpus", "--memory", "--serial", "--console", "--rng"] {
            let r = command().try_get_matches_from(["ch", once, "a=1", once, "a=2"]);
            assert!(r.is_err(), "{once} twice");
        }
    }
}
