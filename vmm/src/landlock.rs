//! `--landlock`: confines the VMM's file system access with Landlock, once a VM is created,
//! to the paths its configuration names (`VmConfig::landlock_grants`, beside the config) and
//! the VMM's own fixed paths (`VMM_GRANTS`). See docs/security.md.
//!
//! - **All or nothing.** The ruleset handles every file system right the running kernel knows
//!   (the newest ABI it accepts in full), and the crate is asked for a hard requirement: a
//!   kernel without Landlock, or one older than `MIN_ABI`, refuses `--landlock` with an error
//!   naming it, never a silently weaker sandbox.
//! - **Every thread.** `landlock_restrict_self` confines the calling thread and the threads it
//!   creates later, not those already running. A VM on the command line is confined at the
//!   start of `vmm::run`, when the VMM has one thread. Through the API (`vm.create`,
//!   `vm.restore`, `vm.receive-migration`) the control loop applies the ruleset to itself and
//!   to the seccomp spawner (`seccomp::on_spawner`), the one thread that starts all the others
//!   (vCPUs, device workers, the migration sender). The thread count is checked first
//!   (`/proc/self/status`): any other thread is an error, never a hole.
//!   `LANDLOCK_RESTRICT_SELF_TSYNC` (ABI 8, Linux 7.0) would confine all threads at once; the
//!   kernels here have ABI 7, so it is not used yet.
//! - **Irreversible.** A later `vm.create` (after `vm.delete`) stacks its own ruleset: the
//!   VMM then reaches only what both allow.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, LandlockStatus, PathBeneath, PathFd,
    PathFdError, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, ABI,
};
use log::info;
use thiserror::Error;
use vm_config::{LandlockAccess, LandlockGrant, VmConfig};

/// Below ABI 3, `truncate(2)` is not confined: any file could be emptied.
const MIN_ABI: ABI = ABI::V3;

/// Newest first: the ABIs whose whole set of file system rights we try to handle.
const ABIS: [ABI; 7] = [
    ABI::V9,
    ABI::V8,
    ABI::V7,
    ABI::V6,
    ABI::V5,
    ABI::V4,
    ABI::V3,
];

const OPTION: &str = "--landlock";

/// What the VMM reaches whatever its configuration: the hypervisor, TAP devices (hotplug
/// included), entropy for image formats, userfaultfd for on-demand restores, its own `/proc`
/// entries, and the huge page and THP settings under `/sys`. A missing one is skipped.
const VMM_GRANTS: &[(&str, LandlockAccess)] = &[
    ("/dev/kvm", LandlockAccess::Device),
    ("/dev/net/tun", LandlockAccess::Device),
    ("/dev/urandom", LandlockAccess::Read),
    ("/dev/userfaultfd", LandlockAccess::Device),
    ("/proc/self", LandlockAccess::Read),
    ("/sys/kernel/mm", LandlockAccess::Read),
];

#[derive(Debug, Error)]
pub enum LandlockError {
    #[error("--landlock: this kernel does not enforce Landlock (not built in, or not in the lsm= boot parameter): refusing to run unconfined")]
    Unsupported,
    #[error("--landlock: this kernel's Landlock is older than ABI {MIN_ABI} (it cannot confine truncate): refusing to run partly confined")]
    TooOld,
    #[error("--landlock: {0} threads are running, and Landlock confines only the calling thread and those it creates later: give --landlock with the VM on the command line, where it applies before any other thread starts")]
    Threads(usize),
    #[error("{option} {path}: cannot allow it under --landlock: {source}")]
    Rule {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: RulesetError,
    },
    #[error("{option} {path}: cannot allow it under --landlock: {source}")]
    Open {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: PathFdError,
    },
    #[error("{option} {path}: cannot create it before --landlock applies: {source}")]
    Create {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--landlock: {0}")]
    Ruleset(#[source] RulesetError),
    #[error("--landlock: cannot confine the seccomp spawner thread: {0}")]
    Spawner(#[source] std::io::Error),
    #[error(
        "--landlock: the ruleset is not fully enforced ({0:?}): refusing to run partly confined"
    )]
    NotEnforced(RulesetStatus),
}

/// The rights of `access` under a ruleset of `abi` (before masking to what is handled).
fn rights(access: LandlockAccess, abi: ABI) -> BitFlags<AccessFs> {
    use AccessFs::*;
    use LandlockAccess as A;
    let read = ReadFile | ReadDir;
    let write = WriteFile | Truncate;
    match access {
        A::Read => read,
        A::ReadWrite | A::CreateFile => read | write,
        A::Device => read | write | IoctlDev,
        A::Sockets => MakeSock | RemoveFile | ResolveUnix,
        A::Connect => BitFlags::from(ResolveUnix),
        A::Unlink => BitFlags::from(RemoveFile),
        A::Rule { read, write } => {
            let mut r = BitFlags::empty();
            if read {
                r |= AccessFs::from_read(abi);
            }
            if write {
                r |= AccessFs::from_write(abi);
            }
            r
        }
    }
}

/// The backing files of the qcow2 image at `image`, in chain order, as the block layer
/// resolves them (a relative name is beside the image that names it). Stops at the first
/// file that is not a readable qcow2 image: opening the disk reports those problems.
fn backing_chain(image: &Path) -> Vec<PathBuf> {
    use std::io::{Read, Seek};
    let mut chain = Vec::new();
    let mut current = image.to_path_buf();
    while chain.len() < block::MAX_BACKING_DEPTH {
        let Ok(file) = std::fs::File::open(&current) else {
            break;
        };
        if !matches!(
            block::detect::detect_image_type(&file),
            Ok(block::ImageType::Qcow2)
        ) {
            break;
        }
        // The header lies within the first cluster (at most 2 MiB).
        let mut head = Vec::new();
        let read = (&file)
            .seek(std::io::SeekFrom::Start(0))
            .and_then(|_| file.take(2 << 20).read_to_end(&mut head));
        if read.is_err() {
            break;
        }
        let Ok(header) = block::qcow2::header::Header::parse(&head) else {
            break;
        };
        let Some(name) = header.backing_file else {
            break;
        };
        let next = block::qcow2::resolve_backing_path(&current, &name);
        if chain.contains(&next) {
            break;
        }
        chain.push(next.clone());
        current = next;
    }
    chain
}

/// The grants for `config`, the backing files of its disks that may have them, the VMM's
/// fixed grants, and `extra` (the API socket's directory, a restore's source).
fn all_grants(config: &VmConfig, extra: Vec<LandlockGrant>) -> Vec<LandlockGrant> {
    let mut grants: Vec<LandlockGrant> = VMM_GRANTS
        .iter()
        .filter(|(p, _)| Path::new(p).exists())
        .map(|(p, a)| LandlockGrant::new(*p, *a, OPTION))
        .collect();
    grants.extend(config.landlock_grants());
    for d in config.disks.iter().filter(|d| d.backing_files) {
        for b in backing_chain(&d.path) {
            grants.push(LandlockGrant::new(b, LandlockAccess::Read, "--disk"));
        }
    }
    grants.extend(extra);
    grants
}

/// How many threads this process has (`Threads:` in `/proc/self/status`).
fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(usize::MAX)
}

/// Where a grant's rule goes: the path itself, or for a socket the VMM connects to, its
/// directory (the socket may not exist yet when the VM is created).
fn rule_path(g: &LandlockGrant) -> PathBuf {
    match g.access {
        LandlockAccess::Connect => vm_config::parent_dir(&g.path),
        _ => g.path.clone(),
    }
}

/// Confines this process to what `config` names plus `extra` (see the module's comment).
pub(crate) fn apply(config: &VmConfig, extra: Vec<LandlockGrant>) -> Result<(), LandlockError> {
    // Checked first, before any Landlock system call: a thread already running (the seccomp
    // spawner, started after a command-line VM is confined) would escape the ruleset.
    // The seccomp spawner, where it runs, joins the domain below.
    let spawner = seccomp::spawner_running();
    let n = thread_count();
    if n != 1 + usize::from(spawner) {
        return Err(LandlockError::Threads(n));
    }
    // The newest ABI whose rights the kernel handles in full.
    let mut found = None;
    for abi in ABIS {
        // The crate checks a hard requirement when the ruleset is created.
        let r = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| r.create());
        if let Ok(r) = r {
            found = Some((abi, r));
            break;
        }
    }
    let Some((abi, ruleset)) = found else {
        let v1 = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(ABI::V1))
            .and_then(|r| r.create());
        return Err(match v1 {
            Ok(_) => LandlockError::TooOld,
            Err(_) => LandlockError::Unsupported,
        });
    };
    let handled = AccessFs::from_all(abi);
    let mut ruleset = ruleset;
    for g in all_grants(config, extra) {
        if g.access == LandlockAccess::CreateFile && !g.path.exists() {
            // Created now, empty, as the VM would create it: a rule needs an existing file.
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&g.path)
                .map_err(|source| LandlockError::Create {
                    option: g.option,
                    path: g.path.clone(),
                    source,
                })?;
        }
        let path = rule_path(&g);
        let mut access = rights(g.access, abi) & handled;
        if !path.is_dir() {
            access &= AccessFs::from_file(abi);
        }
        if access.is_empty() {
            continue;
        }
        let rule_err = |source: RulesetError| LandlockError::Rule {
            option: g.option,
            path: path.clone(),
            source,
        };
        let fd = PathFd::new(&path).map_err(|source| LandlockError::Open {
            option: g.option,
            path: path.clone(),
            source,
        })?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(rule_err)?;
    }
    if spawner {
        // First the spawner, which starts every later thread (vCPUs, device workers, the
        // migration sender), so a refusal leaves the control loop as it was.
        let copy = ruleset.try_clone().map_err(LandlockError::Spawner)?;
        let status = seccomp::on_spawner(move || copy.restrict_self().map(|s| s.ruleset))
            .ok_or_else(|| LandlockError::Spawner(std::io::Error::other("it has ended")))?
            .map_err(LandlockError::Ruleset)?;
        if status != RulesetStatus::FullyEnforced {
            return Err(LandlockError::NotEnforced(status));
        }
    }
    let status = ruleset.restrict_self().map_err(LandlockError::Ruleset)?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotEnforced(status.ruleset));
    }
    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi,
        _ => abi,
    };
    info!(
        "landlock: enforced (ABI {abi}) on the control loop{}, before any other thread started",
        if spawner {
            " and the seccomp spawner"
        } else {
            ""
        }
    );
    Ok(())
}

/// With `config.landlock_enable`, confines the VMM to what `config` names, the directory of
/// the API socket (removed at the end) and a restore's `source`; returns whether it did.
pub(crate) fn confine(
    config: &VmConfig,
    api_socket: Option<&Path>,
    source: Option<&Path>,
) -> Result<bool, LandlockError> {
    if !config.landlock_enable {
        if config
            .landlock_rules
            .as_ref()
            .is_some_and(|r| !r.is_empty())
        {
            log::warn!("--landlock-rules has no effect without --landlock");
        }
        return Ok(false);
    }
    let mut extra = Vec::new();
    if let Some(p) = api_socket {
        let dir = vm_config::parent_dir(p);
        extra.push(LandlockGrant::new(
            dir,
            LandlockAccess::Unlink,
            "--api-socket",
        ));
    }
    if let Some(dir) = source {
        extra.push(LandlockGrant::new(dir, LandlockAccess::Read, "--restore"));
    }
    apply(config, extra)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_take_the_originals_rights_and_devices_their_ioctls() {
        let r = rights(
            LandlockAccess::Rule {
                read: true,
                write: false,
            },
            ABI::V7,
        );
        assert_eq!(r, AccessFs::from_read(ABI::V7));
        let rw = rights(
            LandlockAccess::Rule {
                read: true,
                write: true,
            },
            ABI::V7,
        );
        assert_eq!(rw, AccessFs::from_all(ABI::V7));
        assert!(rights(LandlockAccess::Device, ABI::V7).contains(AccessFs::IoctlDev));
        // A disk read and written, never executed, nothing created beside it.
        let disk = rights(LandlockAccess::ReadWrite, ABI::V7);
        assert!(disk.contains(AccessFs::WriteFile | AccessFs::Truncate));
        assert!(!disk.intersects(AccessFs::Execute | AccessFs::MakeReg | AccessFs::RemoveFile));
        assert!(!rights(LandlockAccess::Read, ABI::V7).contains(AccessFs::WriteFile));
    }

    #[test]
    fn fixed_grants_are_added_where_they_exist() {
        let config: VmConfig =
            serde_json::from_value(serde_json::json!({"payload": {"kernel": "/k"}})).unwrap();
        let extra = vec![LandlockGrant::new(
            "/run",
            LandlockAccess::Unlink,
            "--api-socket",
        )];
        let g = all_grants(&config, extra);
        let paths: Vec<String> = g.iter().map(|g| g.path.display().to_string()).collect();
        assert!(paths.contains(&"/proc/self".to_string()), "{paths:?}");
        assert!(paths.contains(&"/k".to_string()), "{paths:?}");
        assert!(paths.contains(&"/dev/urandom".to_string()), "{paths:?}");
        assert_eq!(g.last().unwrap().option, "--api-socket");
        for (p, _) in VMM_GRANTS {
            assert_eq!(paths.contains(&p.to_string()), Path::new(p).exists(), "{p}");
        }
    }

    /// Runs `f` in a forked child (one thread, so `apply` may confine it without touching the
    /// test process) and returns its exit status.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `f` (no locks held by other threads are needed: it opens
        // files and makes system calls) and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = f();
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child we forked; `status` is a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// The child is confined to a kernel file and a directory: those stay readable, anything
    /// else is refused by the kernel with EACCES.
    #[test]
    fn a_confined_process_reaches_only_what_its_configuration_names() {
        let dir = std::env::temp_dir().join(format!("landlock-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("rules")).unwrap();
        std::fs::write(dir.join("kernel"), b"k").unwrap();
        std::fs::write(dir.join("rules/extra"), b"e").unwrap();
        std::fs::write(dir.join("other"), b"o").unwrap();
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": dir.join("kernel")},
            "landlock_enable": true,
            "landlock_rules": [{"path": dir.join("rules"), "access": "r"}],
        }))
        .unwrap();
        let code = in_child(|| {
            if apply(&config, Vec::new()).is_err() {
                return 10;
            }
            let denied = |p: &Path| {
                std::fs::read(p).err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES)
            };
            let checks = [
                std::fs::read(dir.join("kernel")).is_ok(),
                std::fs::read(dir.join("rules/extra")).is_ok(),
                std::fs::read("/proc/self/status").is_ok(),
                denied(&dir.join("other")),
                denied(Path::new("/etc/passwd")),
                // Read-only rule: no writing there.
                std::fs::write(dir.join("rules/new"), b"x").is_err(),
            ];
            checks
                .iter()
                .position(|ok| !ok)
                .map_or(0, |i| 20 + i as i32)
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(code, 0, "10: apply failed; 20+i: check i failed");
    }

    /// Through the API the seccomp spawner already runs: it joins the domain, so a thread it
    /// starts afterwards (as every vCPU and device worker is) is confined too.
    #[test]
    fn threads_the_spawner_starts_later_are_confined() {
        let dir = std::env::temp_dir().join(format!("landlock-spawner-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kernel"), b"k").unwrap();
        std::fs::write(dir.join("other"), b"o").unwrap();
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": dir.join("kernel")},
            "landlock_enable": true,
        }))
        .unwrap();
        let (kernel, other) = (dir.join("kernel"), dir.join("other"));
        let code = in_child(move || {
            // No filters (the mode is off), just the spawner thread.
            seccomp::set_mode(seccomp::Mode::Off);
            if seccomp::start_spawner(seccomp::Filter::new("spawner")).is_err() {
                return 10;
            }
            if apply(&config, Vec::new()).is_err() {
                return 11;
            }
            let t = seccomp::spawn("later".into(), seccomp::Filter::new("later"), move || {
                let denied = std::fs::read(&other).err().and_then(|e| e.raw_os_error());
                (std::fs::read(&kernel).is_ok(), denied == Some(libc::EACCES))
            });
            match t.map(|h| h.join()) {
                Ok(Ok((true, true))) => 0,
                Ok(Ok((false, _))) => 12,
                Ok(Ok((_, false))) => 13,
                _ => 14,
            }
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            code, 0,
            "10/11: set-up; 12: kernel unreadable; 13: other readable"
        );
    }

    /// A kernel without Landlock (here: its system calls answer ENOSYS under a seccomp filter)
    /// refuses `--landlock` by name instead of running unconfined.
    #[test]
    fn a_kernel_without_landlock_refuses_it() {
        let config: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/proc/self/status"},
            "landlock_enable": true,
        }))
        .unwrap();
        let code = in_child(|| {
            let nr = libc::SYS_landlock_create_ruleset as u32;
            let prog = [
                // The system call's number (offset 0 of struct seccomp_data).
                libc::sock_filter {
                    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: nr,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                },
            ];
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: plain prctl calls; `fprog` points at `prog`, alive across the call.
            let installed = unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
                    && libc::prctl(
                        libc::PR_SET_SECCOMP,
                        libc::SECCOMP_MODE_FILTER,
                        &fprog as *const libc::sock_fprog,
                    ) == 0
            };
            if !installed {
                return 10;
            }
            match apply(&config, Vec::new()) {
                Err(e @ LandlockError::Unsupported)
                    if e.to_string().starts_with("--landlock: ") =>
                {
                    0
                }
                Err(_) => 11,
                Ok(()) => 12,
            }
        });
        assert_eq!(code, 0, "10: no filter; 11: another error; 12: applied");
    }

    /// A qcow2 chain: a relative backing name beside its image, an absolute one elsewhere;
    /// each disk with `backing_files=on` gets them all, read-only.
    #[test]
    fn backing_files_of_qcow2_disks_are_allowed_read_only() {
        let dir = std::env::temp_dir().join(format!("landlock-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mid = dir.join("a/b/mid.qcow2");
        let top = dir.join("a/b/top.qcow2");
        let create = |path: &Path, backing: &str| {
            let mut o = block::qcow2::CreateOptions::new(1 << 20);
            o.backing_file = Some(backing.to_string());
            block::qcow2::create(path, &o).unwrap();
        };
        create(&mid, base.to_str().unwrap());
        create(&top, "mid.qcow2");
        assert_eq!(backing_chain(&top), [mid.clone(), base.clone()]);
        assert!(backing_chain(&base).is_empty());
        let disk = |backing: bool| serde_json::json!({"path": top, "backing_files": backing});
        for backing in [true, false] {
            let config: VmConfig = serde_json::from_value(serde_json::json!({
                "payload": {"kernel": "/k"},
                "disks": [disk(backing)],
            }))
            .unwrap();
            let reads: Vec<PathBuf> = all_grants(&config, Vec::new())
                .into_iter()
                .filter(|g| g.option == "--disk" && g.access == LandlockAccess::Read)
                .map(|g| g.path)
                .collect();
            let want = if backing {
                vec![mid.clone(), base.clone()]
            } else {
                vec![]
            };
            assert_eq!(reads, want, "backing_files={backing}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sockets_connected_to_are_allowed_through_their_directory() {
        let g = LandlockGrant::new("/run/swtpm/ctrl", LandlockAccess::Connect, "--tpm");
        assert_eq!(rule_path(&g), PathBuf::from("/run/swtpm"));
        let g = LandlockGrant::new("/d", LandlockAccess::Read, "--disk");
        assert_eq!(rule_path(&g), PathBuf::from("/d"));
    }
}
