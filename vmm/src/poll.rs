//! Waiting for one descriptor to be readable, or for a stop event: the shape of every helper
//! thread's wait (a migration's accepting thread, the userfaultfd loaders).

/// What [`fd_or_stop`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    Fd,
    Stop,
    Timeout,
}

/// Waits at most `timeout_ms` (-1: for ever) for `fd` or `stop` to be readable; `stop` wins
/// when both are. A failed poll (logged) counts as `Stop`: the caller ends.
pub fn fd_or_stop(fd: i32, stop: i32, timeout_ms: i32) -> Ready {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("poll failed: {e}");
            return Ready::Stop;
        }
        return if fds[1].revents != 0 {
            Ready::Stop
        } else if fds[0].revents != 0 {
            Ready::Fd
        } else {
            Ready::Timeout
        };
    }
}
