//! Following the size of a `pty` console.
//!
//! When a terminal's size changes, the kernel sends SIGWINCH to the foreground process group of
//! the session that terminal controls, and only to it. For `--console tty` that is us (our
//! terminal), but the pseudo-terminal we create for `--console pty` controls no session, so a
//! resize of it (by `screen`, a terminal emulator, `stty cols`) would go unnoticed. A small child
//! process makes the pty its controlling terminal and turns each SIGWINCH into one byte on a
//! pipe, which the control loop watches and answers by reading the size again.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// The child process that watches one pseudo-terminal; killed and reaped on drop.
pub struct ResizeWatcher {
    pid: libc::pid_t,
    events: File,
}

/// The signals the child waits for: SIGWINCH reports a resize, the rest end it.
const WATCHED: [libc::c_int; 4] = [libc::SIGWINCH, libc::SIGHUP, libc::SIGTERM, libc::SIGINT];

impl ResizeWatcher {
    /// Starts a watcher for the pseudo-terminal whose subordinate side is `tty`.
    pub fn spawn(tty: &File) -> io::Result<Self> {
        let mut fds = [-1; 2];
        // SAFETY: pipe2 writes two fds into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded; both fds are ours alone from here.
        let (events, notify) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        // Everything the child needs is prepared here: after fork it may only make
        // async-signal-safe calls, because the VMM has other threads.
        // SAFETY: sigset_t is plain data, initialised by sigfillset/sigemptyset below.
        let (mut all, mut wait): (libc::sigset_t, libc::sigset_t) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: both sets are valid sigset_t values we own.
        unsafe {
            libc::sigfillset(&mut all);
            libc::sigemptyset(&mut wait);
            for s in WATCHED {
                libc::sigaddset(&mut wait, s);
            }
        }
        let child = Child {
            tty: tty.as_raw_fd(),
            notify: notify.as_raw_fd(),
            // SAFETY: getpid has no preconditions.
            parent: unsafe { libc::getpid() },
            wait,
        };
        // The child starts with every signal blocked, so that none of the VMM's handlers,
        // which it inherits, ever runs in it (they write to the VMM's pipes); this thread's
        // mask is restored right after the fork.
        // SAFETY: sigset_t is plain data, written by pthread_sigmask.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: both sets are valid; this changes only the calling thread's mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
        // SAFETY: the child branch runs only `Child::run`, which makes async-signal-safe calls
        // and never returns; guest memory is MADV_DONTFORK, so the child does not share it.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: we are the freshly forked child; see `Child::run`.
            unsafe { child.run() }
        }
        let forked = io::Error::last_os_error();
        // SAFETY: `old` is the mask read above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        match pid {
            -1 => Err(forked),
            pid => Ok(ResizeWatcher { pid, events }),
        }
    }

    /// The fd that becomes readable after a resize.
    pub fn fd(&self) -> RawFd {
        self.events.as_raw_fd()
    }

    /// Consumes the pending notifications.
    pub fn drain(&self) {
        let mut b = [0u8; 64];
        while matches!(io::Read::read(&mut &self.events, &mut b), Ok(n) if n > 0) {}
    }
}

impl Drop for ResizeWatcher {
    fn drop(&mut self) {
        // SAFETY: `pid` is our own child, not yet reaped (only this drop waits for it).
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// What the forked child works with, all prepared before the fork.
struct Child {
    tty: RawFd,
    notify: RawFd,
    parent: libc::pid_t,
    wait: libc::sigset_t,
}

impl Child {
    /// The child's whole life. Only async-signal-safe calls, no allocation, no locks.
    ///
    /// # Safety
    /// Must be called only in a freshly forked child, and only there.
    unsafe fn run(&self) -> ! {
        // SAFETY (whole body): plain system calls on fds and data this process owns.
        unsafe {
            // Every signal is blocked (since before the fork) and only waited for below: the
            // VMM's handlers, inherited, never run here.

            // Die with the VMM, including when it died before this line.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != self.parent {
                libc::_exit(0);
            }
            self.close_other_fds();
            // A new session, with the pty as its controlling terminal: this process is now its
            // foreground process group, to which the kernel sends SIGWINCH.
            if libc::setsid() < 0 || libc::ioctl(self.tty, libc::TIOCSCTTY, 0) < 0 {
                libc::_exit(1);
            }
            loop {
                match libc::sigwaitinfo(&self.wait, std::ptr::null_mut()) {
                    libc::SIGWINCH => {
                        // A full pipe already holds a pending notification.
                        let one = 1u8;
                        if libc::write(self.notify, (&one as *const u8).cast(), 1) < 0
                            && *libc::__errno_location() != libc::EAGAIN
                        {
                            libc::_exit(0);
                        }
                    }
                    -1 => {}
                    _ => libc::_exit(0),
                }
            }
        }
    }

    /// Closes every inherited fd but the two the child uses, so that it holds no disk (and
    /// its lock), tap, socket or KVM fd of the VMM open.
    unsafe fn close_other_fds(&self) {
        let (lo, hi) = (
            self.tty.min(self.notify) as u32,
            self.tty.max(self.notify) as u32,
        );
        let mut first = 0u32;
        for keep in [lo, hi, u32::MAX] {
            if keep > first {
                // SAFETY: closing fds of this single-threaded child process.
                let r = unsafe { libc::syscall(libc::SYS_close_range, first, keep - 1, 0u32) };
                if r != 0 {
                    // Kernels before 5.9: one at a time, as far as fds usually go.
                    for fd in first..=(keep - 1).min(65535) {
                        // SAFETY: as above.
                        unsafe { libc::close(fd as libc::c_int) };
                    }
                }
            }
            first = keep.saturating_add(1);
        }
    }
}
