//! Seccomp confinement, one filter per thread kind.
//!
//! Each crate that spawns a thread keeps that thread's filter beside the code whose system
//! calls it allows (`vmm::seccomp_filters`, `virtio_devices::seccomp`, ...); this crate only
//! holds the mechanism:
//! - [`Mode`]: `--seccomp true|false|log|errno`, set once for the process ([`set_mode`]);
//! - [`Filter`]: a thread kind's allowed system calls, on top of [`base`] (what every Rust
//!   thread needs);
//! - [`spawn`]: starts a thread that installs its filter before it runs anything else;
//! - the report: a call outside the filter (mode `true`) prints one line naming the thread and
//!   the system call, then the process dies of SIGSYS.
//!
//! The kernel ANDs a thread's filters with those of the thread that created it. So confined
//! threads are created by one unconfined-by-others thread, the spawner ([`start_spawner`]),
//! whose own filter is the union of every kind it may start; a vCPU that activates a device
//! (and so starts its worker) asks the spawner, and the worker gets only its own list.

mod base;
mod bpf;
mod cpuset;
mod report;
mod spawn;
pub mod testing;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU8, Ordering};

pub use cpuset::CpuSet;
use seccompiler::{BpfProgram, SeccompAction};
pub use spawn::{on_spawner, spawn, spawner_running, start_spawner};
pub use syscalls::Sysno;

pub use report::report_to;

/// What a thread's filter does with a system call outside its list (`--seccomp`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `false`: no filter is installed.
    Off,
    /// `true` (the default): the VMM stops, after one line naming the thread and the call.
    Trap,
    /// `log`: the call goes through and the kernel logs it (the audit log, or the kernel
    /// log without an audit daemon).
    Log,
    /// `errno`: the call fails with EPERM.
    Errno,
}

impl Mode {
    /// The option's values, as the original's `--seccomp` takes them.
    pub fn parse(value: &str) -> Option<Mode> {
        Some(match value {
            "true" => Mode::Trap,
            "false" => Mode::Off,
            "log" => Mode::Log,
            "errno" => Mode::Errno,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Mode::Off => 0,
            Mode::Trap => 1,
            Mode::Log => 2,
            Mode::Errno => 3,
        }
    }

    fn from_code(code: u8) -> Mode {
        match code {
            1 => Mode::Trap,
            2 => Mode::Log,
            3 => Mode::Errno,
            _ => Mode::Off,
        }
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the process's mode; the VMM's `main` does it once, from `--seccomp`. Until then (and in
/// libraries' unit tests) it is [`Mode::Off`]: threads start unconfined.
pub fn set_mode(mode: Mode) {
    MODE.store(mode.code(), Ordering::SeqCst);
}

/// The process's mode.
pub fn mode() -> Mode {
    Mode::from_code(MODE.load(Ordering::SeqCst))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the seccomp filter of thread kind '{kind}' is {len} instructions long, over the kernel's 4096")]
    TooLong { kind: &'static str, len: usize },
    #[error("cannot install the seccomp filter of thread kind '{kind}': {source}")]
    Install {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot start thread '{name}': {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
}

/// The system calls one kind of thread may make: [`base`]'s and its own.
#[derive(Clone, Debug)]
pub struct Filter {
    kind: &'static str,
    allowed: BTreeSet<Sysno>,
    /// `ioctl` with these request types (the request's bits 8-15: 0xAE for KVM, `T` for
    /// terminals and TAPs, ...), unless `allowed` has `ioctl` itself (any request).
    ioctl_types: BTreeSet<u8>,
    /// `ioctl` with exactly these requests (the low 32 bits: the kernel takes the request as
    /// an `unsigned int`), unless `allowed` has `ioctl` itself.
    ioctls: BTreeSet<u32>,
}

impl Filter {
    /// A filter for thread kind `kind` (named in reports), allowing [`base`]'s calls.
    pub fn new(kind: &'static str) -> Filter {
        Filter {
            kind,
            allowed: base::BASE.iter().copied().collect(),
            ioctl_types: BTreeSet::new(),
            ioctls: BTreeSet::new(),
        }
    }

    /// Allows `ioctl` requests of these types (bits 8-15 of the request number).
    pub fn allow_ioctl_types(mut self, types: &[u8]) -> Filter {
        self.ioctl_types.extend(types.iter().copied());
        self
    }

    /// Allows `ioctl` with exactly these requests. Only their low 32 bits count, as in the
    /// kernel, which takes the request as an `unsigned int`: the filter compares those bits
    /// alone, so a request with junk in the upper half is the same request to both.
    pub fn allow_ioctls(mut self, requests: &[u64]) -> Filter {
        self.ioctls
            .extend(requests.iter().map(|&r| ioctl_request(r)));
        self
    }

    /// Whether ioctl `request` is allowed: any request, its type, or the request itself.
    pub fn allows_ioctl(&self, request: u64) -> bool {
        self.allowed.contains(&Sysno::ioctl)
            || self.ioctl_types.contains(&((request >> 8) as u8))
            || self.ioctls.contains(&ioctl_request(request))
    }

    /// The requests allowed one by one (`allow_ioctls`), in number order.
    pub fn ioctls(&self) -> impl Iterator<Item = u64> + '_ {
        self.ioctls.iter().map(|&r| u64::from(r))
    }

    /// The request types allowed whole (`allow_ioctl_types`).
    pub fn ioctl_types(&self) -> impl Iterator<Item = u8> + '_ {
        self.ioctl_types.iter().copied()
    }

    /// Allows `calls` as well.
    pub fn allow(mut self, calls: &[Sysno]) -> Filter {
        self.allowed.extend(calls.iter().copied());
        self
    }

    /// Allows everything `other` allows as well (the spawner's filter is such a union).
    pub fn merge(mut self, other: &Filter) -> Filter {
        self.allowed.extend(other.allowed.iter().copied());
        self.ioctl_types.extend(other.ioctl_types.iter().copied());
        self.ioctls.extend(other.ioctls.iter().copied());
        self
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn allows(&self, call: Sysno) -> bool {
        self.allowed.contains(&call)
    }

    /// The allowed calls, in number order.
    pub fn allowed(&self) -> impl Iterator<Item = Sysno> + '_ {
        self.allowed.iter().copied()
    }

    /// Installs the filter on the calling thread under the process's [`mode`] (nothing when it
    /// is [`Mode::Off`]). It stays for the thread's life, and threads it creates inherit it.
    pub fn install(&self) -> Result<(), Error> {
        let mismatch = match mode() {
            Mode::Off => return Ok(()),
            Mode::Trap => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
            Mode::Errno => SeccompAction::Errno(libc::EPERM as u32),
        };
        let program = self.compile(mismatch)?;
        let quiet = self.quiet_denials()?;
        report::arm(self.kind);
        let install = |p: &BpfProgram| {
            seccompiler::apply_filter(p).map_err(|source| Error::Install {
                kind: self.kind,
                source,
            })
        };
        // The quiet one first: installing a filter takes calls the main one refuses.
        if let Some(q) = &quiet {
            install(q)?;
        }
        install(&program)
    }

    /// The second filter of a thread that does not allow [`base::QUIET`]'s calls: they fail
    /// with EACCES instead of stopping the VMM. The first filter lets them through to it (the
    /// kernel takes the stricter answer of a thread's filters, and a trap is stricter than an
    /// error).
    fn quiet_denials(&self) -> Result<Option<BpfProgram>, Error> {
        let quiet: Vec<u32> = base::QUIET
            .iter()
            .filter(|s| !self.allowed.contains(s))
            .map(|s| s.id() as u32)
            .collect();
        if quiet.is_empty() {
            return Ok(None);
        }
        let eacces = SeccompAction::Errno(libc::EACCES as u32);
        self.checked(bpf::program(
            quiet,
            None,
            eacces.into(),
            SeccompAction::Allow.into(),
        ))
        .map(Some)
    }

    fn compile(&self, mismatch: SeccompAction) -> Result<BpfProgram, Error> {
        let exact: Vec<u32> = self.ioctls.iter().copied().collect();
        let types: Vec<u8> = self.ioctl_types.iter().copied().collect();
        // `ioctl` allowed whole, or only with these requests (if any).
        let ioctl = (!exact.is_empty() || !types.is_empty()).then_some(bpf::IoctlArgs {
            exact: &exact,
            types: &types,
        });
        let numbers = self
            .allowed
            .iter()
            .chain(base::QUIET)
            .map(|s| s.id() as u32);
        self.checked(bpf::program(
            numbers,
            ioctl,
            SeccompAction::Allow.into(),
            mismatch.into(),
        ))
    }

    fn checked(&self, program: BpfProgram) -> Result<BpfProgram, Error> {
        if program.len() > bpf::MAX_LEN {
            return Err(Error::TooLong {
                kind: self.kind,
                len: program.len(),
            });
        }
        Ok(program)
    }
}

/// An ioctl request as the kernel compares it: its low 32 bits.
fn ioctl_request(request: u64) -> u32 {
    request as u32
}

/// What every thread of ours needs, whatever its job (see `base.rs` for why each).
pub fn base() -> &'static [Sysno] {
    base::BASE
}

#[cfg(test)]
mod bpf_tests;
#[cfg(test)]
mod tests;
