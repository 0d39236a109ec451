//! The report of a call outside a thread's filter (mode `true`): a SIGSYS handler writes one
//! line naming the thread, its filter kind and the call, to stderr and the log file, then makes
//! the kernel kill the process with SIGSYS.
//!
//! A signal handler may only make async-signal-safe calls: the thread's name and kind are
//! copied into thread-local buffers when its filter is installed, the line is assembled in a
//! stack buffer, and written with write(2) (allowed by every filter).

use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use syscalls::Sysno;

/// Longest thread name or kind kept (Linux thread names are at most 15 bytes).
const NAME: usize = 32;

thread_local! {
    static THREAD: Cell<[u8; NAME]> = const { Cell::new([0; NAME]) };
    static KIND: Cell<[u8; NAME]> = const { Cell::new([0; NAME]) };
}

/// A second place for the report (the `--log-file`); -1 when there is none.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);
static HANDLER: Once = Once::new();

/// Also writes reports to `fd` (which must stay open for the process's life).
pub fn report_to(fd: i32) {
    REPORT_FD.store(fd, Ordering::SeqCst);
}

fn fixed(s: &str) -> [u8; NAME] {
    let mut buf = [0u8; NAME];
    let n = s.len().min(NAME);
    buf[..n].copy_from_slice(&s.as_bytes()[..n]);
    buf
}

/// Records the calling thread's name and filter kind for a report, and installs the
/// process's SIGSYS handler the first time.
pub(crate) fn arm(kind: &str) {
    let current = std::thread::current();
    THREAD.with(|t| t.set(fixed(current.name().unwrap_or("?"))));
    KIND.with(|k| k.set(fixed(kind)));
    HANDLER.call_once(|| {
        // SAFETY: sigaction is plain data; zeroed is a valid initial value, and every field
        // the kernel reads is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action` is valid and its handler only makes async-signal-safe calls.
        // SIGSYS stays blocked while the handler runs (no SA_NODEFER), which `on_sigsys`
        // relies on to die.
        unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
        }
    });
}

/// The SIGSYS part of siginfo_t (`_sigsys`): the kernel fills it for a seccomp trap.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// si_code of a SIGSYS sent by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

/// A line buffer on the stack.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_name(&mut self, name: &[u8; NAME]) {
        let end = name.iter().position(|&b| b == 0).unwrap_or(NAME);
        self.push(&name[..end]);
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Formats the report of a trapped call `nr` by thread `thread` (filter `kind`).
fn format(thread: &[u8; NAME], kind: &[u8; NAME], nr: i32) -> Line {
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"cloud-hypervisor: seccomp: thread '");
    line.push_name(thread);
    line.push(b"' (filter '");
    line.push_name(kind);
    line.push(b"') made system call ");
    line.push_number(nr.max(0) as u64);
    line.push(b" (");
    let name = usize::try_from(nr)
        .ok()
        .and_then(Sysno::new)
        .map(|s| s.name())
        .unwrap_or("unknown");
    line.push(name.as_bytes());
    line.push(b"), which its filter does not allow: stopping the VMM\n");
    line
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo_t to an SA_SIGINFO handler; for a seccomp
    // SIGSYS its union holds `_sigsys`, which `SigsysInfo` lays out.
    let info = unsafe { &*(info as *const SigsysInfo) };
    if info.code != SYS_SECCOMP {
        return;
    }
    let line = format(&THREAD.get(), &KIND.get(), info.syscall);
    for fd in [libc::STDERR_FILENO, REPORT_FD.load(Ordering::Relaxed)] {
        if fd >= 0 {
            // SAFETY: writes `line.len` initialised bytes of a stack buffer.
            unsafe { libc::write(fd, line.buf.as_ptr().cast(), line.len) };
        }
    }
    // Making the same call again, with SIGSYS blocked (it is, inside its own handler), makes
    // the kernel reset SIGSYS to its default action and deliver it: the process dies of SIGSYS
    // as with a kill action (and a core dump where enabled). The arguments do not matter: the
    // filter stops the call before it runs.
    // SAFETY: the call is refused by the filter before the kernel looks at its arguments.
    unsafe { libc::syscall(libc::c_long::from(info.syscall)) };
    // Not reached; should a kernel not kill, abort rather than go on without the call.
    // SAFETY: abort is async-signal-safe.
    unsafe { libc::abort() };
}

#[cfg(test)]
pub(crate) fn format_for_test(thread: &str, kind: &str, nr: i32) -> String {
    let line = format(&fixed(thread), &fixed(kind), nr);
    String::from_utf8_lossy(&line.buf[..line.len]).into_owned()
}
