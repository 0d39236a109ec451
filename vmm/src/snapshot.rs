//! `vm.snapshot`: the state of a paused VM as one versioned serde type (`VmSnapshot`), and the
//! snapshot directory the original writes: `config.json` (the VM's configuration as `vm.info`
//! shows it), `state.json` (the `VmSnapshot`) and `memory-ranges` (guest RAM, region after
//! region; `state.json`'s `memory_ranges` says which guest range each stretch of the file is).

use std::fs::{File, OpenOptions};
use std::io::Seek;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use devices::{
    AcpiSleepState, CmosState, GedState, I8042State, PmTimerState, SerialState, Stateful,
};
use guest_memory::GuestMemoryMmap;
use hypervisor::{VcpuState, VmState};
use pci::{PciConfigIoState, PciRootState};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_devices::{VirtioDeviceState, VirtioPciState};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::device_manager::DeviceManager;

/// The `VmSnapshot` layout this build writes and the only one it restores.
pub const VM_SNAPSHOT_VERSION: u32 = 1;

/// The original's names for the files of a snapshot directory.
pub const SNAPSHOT_CONFIG_FILE: &str = "config.json";
pub const SNAPSHOT_STATE_FILE: &str = "state.json";
pub const SNAPSHOT_MEMORY_FILE: &str = "memory-ranges";

/// Everything a paused VM holds beyond its configuration and its RAM's contents.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// [`VM_SNAPSHOT_VERSION`] when written.
    pub version: u32,
    /// One per vCPU, in vCPU id order.
    pub vcpus: Vec<VcpuState>,
    /// The in-kernel irqchip and the kvmclock (as it was when the VM was paused).
    pub vm: VmState,
    pub devices: PlatformSnapshot,
    pub pci: PciSnapshot,
    /// The guest ranges whose bytes `memory-ranges` holds, in file order, back to back.
    pub memory_ranges: Vec<MemoryRange>,
}

/// Device ids that earlier builds wrote and this one names otherwise: the virtio-mem device
/// of the memory hotplug region was `__virtio_mem` before it took the original's name.
const RENAMED_IDS: &[(&str, &str)] = &[("__virtio_mem", vm_config::DEFAULT_ZONE_ID)];

impl VmSnapshot {
    /// Renames the devices an earlier build wrote under ids this build names otherwise, so
    /// their state meets the device it belongs to (restore and incoming migration).
    pub fn rename_old_ids(&mut self) {
        for d in &mut self.pci.devices {
            if let Some((_, new)) = RENAMED_IDS.iter().find(|(old, _)| d.id == *old) {
                d.id = new.to_string();
            }
        }
    }
}

/// The platform devices' states (`devices::Stateful`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformSnapshot {
    /// `None` without a serial port.
    pub serial: Option<SerialState>,
    pub cmos: CmosState,
    pub i8042: I8042State,
    pub acpi_sleep: AcpiSleepState,
    pub pm_timer: PmTimerState,
    pub ged: GedState,
    /// The CPU hotplug controller (absent in snapshots of builds without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_hotplug: Option<devices::CpuHotplugState>,
    /// The ACPI memory hotplug controller's DIMMs, with `hotplug_method=acpi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<devices::MemoryHotplugState>,
}

/// The PCI segments: segment 0's host bridge and ports, the hotplug controller, and every
/// function of every segment.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciSnapshot {
    pub root: PciRootState,
    pub config_io: PciConfigIoState,
    /// The PCI hotplug controller's unread bitmaps (absent in snapshots of builds without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug: Option<devices::PciHotplugState>,
    /// Every virtio-pci function, in the order the VM placed them.
    pub devices: Vec<VirtioPciSnapshot>,
    /// The functions that are not virtio (pvpanic), in the order the VM placed them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<PlainPciSnapshot>,
}

/// A function that is not virtio: its configuration space is all its state.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainPciSnapshot {
    pub id: String,
    /// Its segment (written when not 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub segment: u16,
    pub slot: u8,
    pub config: pci::PciConfigurationState,
}

/// One virtio-pci function: the transport's state and its device's own.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioPciSnapshot {
    /// The device id (`vm.info`'s).
    pub id: String,
    /// Its segment (written when not 0: a state of a build without segments reads as 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub segment: u16,
    /// Its device number on its segment's bus 0.
    pub slot: u8,
    pub transport: VirtioPciState,
    pub device: VirtioDeviceState,
}

fn is_zero(n: &u16) -> bool {
    *n == 0
}

/// A stretch of guest RAM, in the original's shape (`MemoryRange`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    pub gpa: u64,
    pub length: u64,
}

impl PlatformSnapshot {
    pub fn of(d: &DeviceManager) -> Self {
        fn state<T: Stateful>(dev: &std::sync::Mutex<T>) -> T::State {
            dev.lock().unwrap_or_else(|e| e.into_inner()).state()
        }
        PlatformSnapshot {
            serial: d.serial.as_deref().map(state),
            cmos: state(&d.cmos),
            i8042: state(&d.i8042),
            acpi_sleep: state(&d.acpi_sleep),
            pm_timer: state(&d.pm_timer),
            ged: state(&d.ged),
            cpu_hotplug: Some(state(&d.cpu_hotplug)),
            memory_hotplug: d.memory_hotplug.as_deref().map(state),
        }
    }
}

impl PlatformSnapshot {
    /// Restores each platform device of `d` (built from the snapshot's configuration).
    pub fn restore_into(&self, d: &DeviceManager) -> Result<(), Cause> {
        fn restore<T: Stateful>(dev: &std::sync::Mutex<T>, s: &T::State) -> Result<(), Cause> {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore(s)
                .map_err(|e| Cause::new(e.to_string()))
        }
        match (&self.serial, d.serial.as_deref()) {
            (Some(s), Some(dev)) => restore(dev, s)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(Cause::new(
                    "the state has a serial port and the configuration has none",
                ))
            }
            (None, Some(_)) => {
                return Err(Cause::new(
                    "the configuration has a serial port and the state has none",
                ))
            }
        }
        restore(&d.cmos, &self.cmos)?;
        restore(&d.i8042, &self.i8042)?;
        restore(&d.acpi_sleep, &self.acpi_sleep)?;
        restore(&d.pm_timer, &self.pm_timer)?;
        if let Some(s) = &self.cpu_hotplug {
            restore(&d.cpu_hotplug, s)?;
        }
        match (&self.memory_hotplug, d.memory_hotplug.as_deref()) {
            (Some(s), Some(dev)) => restore(dev, s)?,
            (None, None) => {}
            _ => {
                return Err(Cause::new(
                    "the state and the configuration disagree on ACPI memory hotplug",
                ))
            }
        }
        restore(&d.ged, &self.ged)
    }
}

/// The guest RAM ranges `memory-ranges` holds: every region, in address order.
pub fn memory_ranges(mem: &GuestMemoryMmap) -> Vec<MemoryRange> {
    mem.iter()
        .map(|r| MemoryRange {
            gpa: r.start_addr().0,
            length: r.len(),
        })
        .collect()
}

/// The last of an error chain: a message and, where there is one, the system's error.
#[derive(Debug, Error)]
#[error("{msg}")]
pub struct Cause {
    msg: String,
    #[source]
    source: Option<io::Error>,
}

impl Cause {
    pub fn new(msg: impl Into<String>) -> Self {
        Cause {
            msg: msg.into(),
            source: None,
        }
    }

    pub(crate) fn io(msg: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let msg = msg.into();
        move |source| Cause {
            msg,
            source: Some(source),
        }
    }
}

/// Why `vm.snapshot` or `vm.restore` failed, in the original's words (its `VmError` and
/// `MigratableError`).
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("Cannot snapshot VM")]
    Snapshot(#[source] MigratableError),
    #[error("Cannot send VM snapshot")]
    Send(#[source] MigratableError),
    #[error("Cannot restore VM")]
    Restore(#[source] MigratableError),
}

#[derive(Debug, Error)]
pub enum MigratableError {
    #[error("Failed to snapshot migratable component")]
    Snapshot(#[source] Cause),
    #[error("Failed to send migratable component snapshot")]
    MigrateSend(#[source] Cause),
    #[error("Failed to restore migratable component")]
    Restore(#[source] Cause),
    #[error("Failed to receive migratable component snapshot")]
    MigrateReceive(#[source] Cause),
}

impl SnapshotError {
    pub fn snapshot(c: Cause) -> Self {
        SnapshotError::Snapshot(MigratableError::Snapshot(c))
    }

    pub fn send(c: Cause) -> Self {
        SnapshotError::Send(MigratableError::MigrateSend(c))
    }

    /// A restore that failed on the snapshot's contents or on building the VM from them.
    pub fn restore(c: Cause) -> Self {
        SnapshotError::Restore(MigratableError::Restore(c))
    }

    /// A restore that could not read the snapshot.
    pub fn receive(c: Cause) -> Self {
        SnapshotError::Restore(MigratableError::MigrateReceive(c))
    }

    /// The chain of messages, from the top.
    pub fn chain(&self) -> Vec<String> {
        let mut lines = vec![self.to_string()];
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            lines.push(s.to_string());
            source = s.source();
        }
        lines
    }

    /// The chain on one line, for the command line and logs.
    pub fn one_line(&self) -> String {
        self.chain().join(": ")
    }
}

/// The directory a `file://` URL names; as the original, it must exist and be a directory.
/// (The original words these as a send error for a restore too.)
pub fn url_to_path(url: &str) -> Result<PathBuf, MigratableError> {
    let path: PathBuf = url
        .strip_prefix("file://")
        .ok_or_else(|| {
            MigratableError::MigrateSend(Cause::new(format!(
                "Could not extract path from URL: {url}"
            )))
        })?
        .into();
    if !path.is_dir() {
        return Err(MigratableError::MigrateSend(Cause::new(format!(
            "Destination is not a directory: {path:?}"
        ))));
    }
    Ok(path)
}

/// Creates the snapshot's three files in `dir` (none may exist yet, as the original's
/// `create_new`); on a failure the ones created are removed again.
fn create_files(dir: &Path) -> Result<[(PathBuf, File); 3], SnapshotError> {
    let mut created: Vec<(PathBuf, File)> = Vec::with_capacity(3);
    for name in [
        SNAPSHOT_CONFIG_FILE,
        SNAPSHOT_STATE_FILE,
        SNAPSHOT_MEMORY_FILE,
    ] {
        let path = dir.join(name);
        let what = match name {
            SNAPSHOT_CONFIG_FILE => "Error creating VM config snapshot file".to_string(),
            SNAPSHOT_STATE_FILE => "Error creating VM state snapshot file".to_string(),
            _ => format!("Error creating memory snapshot file {path:?}"),
        };
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => created.push((path, f)),
            Err(e) => {
                for (p, _) in &created {
                    let _ = std::fs::remove_file(p);
                }
                return Err(SnapshotError::send(Cause::io(what)(e)));
            }
        }
    }
    let mut it = created.into_iter();
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), Some(c)) => Ok([a, b, c]),
        _ => unreachable!("three files were created"),
    }
}

/// Writes the snapshot directory: `config`, `snapshot`, and the bytes of `mem` as
/// `snapshot.memory_ranges` lists them. `fresh`: the anonymous RAM was made fresh (not loaded
/// on demand), so its pages never touched are zeros and stay holes in the file. Returns the
/// number of RAM bytes written.
pub fn write(
    dir: &Path,
    config: &VmConfig,
    snapshot: &VmSnapshot,
    mem: &GuestMemoryMmap,
    fresh: bool,
) -> Result<u64, SnapshotError> {
    let [(config_path, mut config_file), (state_path, mut state_file), (mem_path, mut mem_file)] =
        create_files(dir)?;
    let result = (|| {
        let bytes = serde_json::to_vec(config).map_err(|e| {
            SnapshotError::send(Cause::new(format!(
                "Error serializing VM config snapshot: {e}"
            )))
        })?;
        config_file
            .write_all(&bytes)
            .map_err(Cause::io("Error writing VM config snapshot"))
            .map_err(SnapshotError::send)?;
        let bytes = serde_json::to_vec(snapshot).map_err(|e| {
            SnapshotError::send(Cause::new(format!(
                "Error serializing VM state snapshot: {e}"
            )))
        })?;
        state_file
            .write_all(&bytes)
            .map_err(Cause::io("Error writing VM state snapshot"))
            .map_err(SnapshotError::send)?;
        write_memory(mem, &snapshot.memory_ranges, &mut mem_file, 0, fresh)
            .map_err(SnapshotError::send)
    })();
    if result.is_err() {
        for p in [config_path, state_path, mem_path] {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Bytes per write of guest RAM into the memory file. Small writes let the page cache take
/// small pages: one huge write asks for large folios, which a host that hands free memory
/// back to its own hypervisor (free page reporting) allocates slowly.
const WRITE_CHUNK: u64 = 1 << 20;

/// Writes each range's bytes to `out`, back to back from offset `base` (where `out` stands):
/// from the region's own file (the memfd of shared or huge-page RAM) with `sendfile`, or from
/// the mapping. Of fresh anonymous RAM (`fresh`) only the pages that hold anything are
/// written; the others stay holes in the file (they read as zeros), so a guest that used
/// little of its RAM (or of a hotplug region) makes a small file, and a copy restore skips
/// them (`restore::data_extents`). A core file (`coredump.rs`) has its RAM after its headers.
pub(crate) fn write_memory(
    mem: &GuestMemoryMmap,
    ranges: &[MemoryRange],
    out: &mut File,
    base: u64,
    fresh: bool,
) -> Result<u64, Cause> {
    let mut total = 0u64;
    let write_err = |e: String| Cause {
        msg: "Error writing memory snapshot region".into(),
        source: Some(io::Error::other(e)),
    };
    for range in ranges {
        let addr = vm_memory::GuestAddress(range.gpa);
        let region = mem
            .find_region(addr)
            .filter(|r| r.start_addr() == addr && r.len() == range.length)
            .ok_or_else(|| Cause::new(format!("no RAM region at {:#x}", range.gpa)))?;
        let from_file = match region
            .file_offset()
            .filter(|_| crate::restore::region_is_file(region))
        {
            Some(fo) => send_file(fo.file(), fo.start(), out, range.length)
                .map_err(Cause::io("Error writing memory snapshot region"))?,
            None => false,
        };
        let populated = (fresh && region.file_offset().is_none())
            .then(|| crate::memory::populated_pages(region))
            .flatten();
        match (from_file, populated) {
            (true, _) => {}
            (false, Some(pages)) => {
                for (first, count) in page_runs(&pages, range.length) {
                    out.seek(io::SeekFrom::Start(base + total + first * PAGE))
                        .map_err(Cause::io("Error writing memory snapshot region"))?;
                    let len = (count * PAGE).min(range.length - first * PAGE);
                    crate::memory::write_range(
                        mem,
                        range.gpa + first * PAGE,
                        len,
                        out,
                        WRITE_CHUNK,
                    )
                    .map_err(write_err)?;
                }
                // The holes up to the range's end.
                out.set_len(base + total + range.length)
                    .map_err(Cause::io("Error writing memory snapshot region"))?;
                out.seek(io::SeekFrom::Start(base + total + range.length))
                    .map_err(Cause::io("Error writing memory snapshot region"))?;
            }
            (false, None) => {
                crate::memory::write_range(mem, range.gpa, range.length, out, WRITE_CHUNK)
                    .map_err(write_err)?
            }
        }
        total += range.length;
    }
    Ok(total)
}

const PAGE: u64 = 4096;

/// The runs of set bits of `bits` (bit i: page i of a range of `len` bytes): (first page,
/// pages).
fn page_runs(bits: &[u64], len: u64) -> Vec<(u64, u64)> {
    let pages = len.div_ceil(PAGE);
    let mut runs = Vec::new();
    let mut start: Option<u64> = None;
    for p in 0..=pages {
        let set = p < pages
            && bits
                .get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0);
        match (set, start) {
            (true, None) => start = Some(p),
            (false, Some(s)) => {
                runs.push((s, p - s));
                start = None;
            }
            _ => {}
        }
    }
    runs
}

/// Copies `len` bytes of `src` from `offset` to `out`'s position with `sendfile` (page cache to
/// page cache, no user-space buffer). `Ok(false)`, nothing written, where the kernel cannot
/// sendfile from this file (the caller copies from the mapping instead).
fn send_file(src: &File, offset: u64, out: &File, len: u64) -> io::Result<bool> {
    let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let mut left = len;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both fds are open for the call; `off` is a valid off_t the kernel updates.
        let n = unsafe { libc::sendfile(out.as_raw_fd(), src.as_raw_fd(), &mut off, chunk) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            if left == len && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) {
                return Ok(false);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "guest memory file ended early",
            ));
        }
        left -= n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_are_the_runs_of_set_bits() {
        assert_eq!(page_runs(&[0], 64 * PAGE), vec![]);
        assert_eq!(page_runs(&[0b1101], 64 * PAGE), vec![(0, 1), (2, 2)]);
        // A run across words, and one up to the range's last page.
        assert_eq!(
            page_runs(&[1 << 63, 0b1, 1 << 63], 192 * PAGE),
            vec![(63, 2), (191, 1)]
        );
        // Bits past the range's end do not count.
        assert_eq!(page_runs(&[u64::MAX], 3 * PAGE), vec![(0, 3)]);
    }
}
