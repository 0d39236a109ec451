//! The REST API and `ch-remote`, driving the real binary over its socket with independent
//! clients: `curl --unix-socket` and raw sockets.

#[path = "../common/mod.rs"]
mod common;

mod acpi_memory;
mod bad_requests;
mod balloon;
mod contract;
mod coredump;
mod cpu_hotplug;
mod debug_console;
mod fs;
mod helpers;
mod hostile;
mod hotplug;
mod iommu;
mod landlock;
mod lifecycle;
mod memory_hotplug;
mod memory_zones;
mod migration;
mod migration_tls;
mod net_options;
mod nmi;
mod original_client;
mod pmem;
mod postcopy_faults;
mod pvpanic;
mod resize_disk;
mod restore;
mod restore_macs;
mod seccomp;
mod segments;
mod snapshot;
mod vsock;
mod watchdog;
