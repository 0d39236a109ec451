//! The host side of the guest's serial port: where its output goes and where its input comes
//! from, for the whole life of the VMM (it outlives guest reboots).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{info, warn};
use thiserror::Error;

use crate::config::{ConsoleConfig, ConsoleOutputMode};
use crate::pty_resize::ResizeWatcher;

#[derive(Debug, Error)]
pub enum SerialIoError {
    #[error("{option} file={path}: cannot create: {source}")]
    File {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{option} socket={path}: cannot listen: {source}")]
    Socket {
        option: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} pty: cannot open a pseudo-terminal: {1}")]
    Pty(&'static str, #[source] io::Error),
}

/// The terminal is in raw mode while this lives; the saved settings come back on drop (and
/// from the panic hook, through `restore_terminal`).
pub struct RawTerminal;

static SAVED_TERMIOS: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Restores the terminal if we changed it; safe to call more than once.
pub fn restore_terminal() {
    let saved = SAVED_TERMIOS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some((fd, termios)) = saved {
        // SAFETY: tcsetattr reads the termios struct we saved from this same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

impl RawTerminal {
    fn enable(fd: RawFd) -> io::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is open and `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the VMM's own log lines still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `fd` is open and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        *SAVED_TERMIOS.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
        Ok(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(fd) == 1 }
}

pub enum SerialEndpoint {
    /// No serial device at all.
    Off,
    /// A device whose output is discarded.
    Null,
    Tty {
        _raw: Option<RawTerminal>,
    },
    File(File),
    Pty {
        master: File,
        slave: File,
        /// The slave's path, which the configuration records (as the original's `file`).
        path: PathBuf,
        /// Follows resizes, for the console (see `pty_resize`).
        watcher: Option<ResizeWatcher>,
    },
    Socket {
        listener: UnixListener,
        path: PathBuf,
        client: Option<UnixStream>,
    },
}

fn open_pty() -> io::Result<(File, File, PathBuf)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    // SAFETY: openpty writes two fds into the ints we pass; the name, termios and winsize
    // arguments may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both fds are open and now owned by us alone.
    let (master, slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", slave.as_raw_fd()))?;
    // The guest's console expects a raw line: no echo or line editing on the host side.
    // SAFETY: termios is plain data filled by tcgetattr on an open fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: the slave fd is open; `t` is a valid termios.
    unsafe {
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    set_nonblocking(master.as_raw_fd());
    Ok((master, slave, path))
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own; only the O_NONBLOCK flag changes.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}

fn dup_writer(fd: RawFd) -> Option<Box<dyn Write + Send>> {
    // SAFETY: dup of an fd we hold open; the new fd is owned by the returned File.
    let new = unsafe { libc::dup(fd) };
    if new < 0 {
        warn!("serial: dup failed: {}", io::Error::last_os_error());
        return None;
    }
    // SAFETY: `new` is a fresh fd nobody else owns.
    Some(Box::new(File::from(unsafe { OwnedFd::from_raw_fd(new) })))
}

impl SerialEndpoint {
    /// Opens the endpoint of `option` (`--serial` or `--console`).
    pub fn open(option: &'static str, cfg: &ConsoleConfig) -> Result<Self, SerialIoError> {
        let what = option.trim_start_matches('-');
        Ok(match cfg.mode {
            ConsoleOutputMode::Off => SerialEndpoint::Off,
            ConsoleOutputMode::Null => SerialEndpoint::Null,
            ConsoleOutputMode::Tty => {
                let stdin = io::stdin().as_raw_fd();
                let raw = if is_tty(stdin) {
                    match RawTerminal::enable(stdin) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            warn!("cannot put the terminal in raw mode: {e}");
                            None
                        }
                    }
                } else {
                    None
                };
                SerialEndpoint::Tty { _raw: raw }
            }
            ConsoleOutputMode::File => {
                let path = cfg.file.clone().unwrap_or_default();
                let file = File::create(&path).map_err(|source| SerialIoError::File {
                    option,
                    path: path.clone(),
                    source,
                })?;
                SerialEndpoint::File(file)
            }
            ConsoleOutputMode::Pty => {
                let (master, slave, path) =
                    open_pty().map_err(|e| SerialIoError::Pty(option, e))?;
                info!("{what} PTY: {}", path.display());
                eprintln!("cloud-hypervisor: {what} PTY: {}", path.display());
                SerialEndpoint::Pty {
                    master,
                    slave,
                    path,
                    watcher: None,
                }
            }
            ConsoleOutputMode::Socket => {
                let path = cfg.socket.clone().unwrap_or_default();
                let err = |source| SerialIoError::Socket {
                    option,
                    path: path.clone(),
                    source,
                };
                remove_stale_socket(&path);
                let listener = UnixListener::bind(&path).map_err(err)?;
                listener.set_nonblocking(true).map_err(err)?;
                SerialEndpoint::Socket {
                    listener,
                    path,
                    client: None,
                }
            }
        })
    }

    pub fn enabled(&self) -> bool {
        !matches!(self, SerialEndpoint::Off)
    }

    /// A writer for the guest's output, for a newly built serial device.
    pub fn writer(&self) -> Option<Box<dyn Write + Send>> {
        match self {
            SerialEndpoint::Off | SerialEndpoint::Null => None,
            SerialEndpoint::Tty { .. } => Some(Box::new(io::stdout())),
            SerialEndpoint::File(f) => dup_writer(f.as_raw_fd()),
            SerialEndpoint::Pty { master, .. } => dup_writer(master.as_raw_fd()),
            SerialEndpoint::Socket { client, .. } => {
                client.as_ref().and_then(|c| dup_writer(c.as_raw_fd()))
            }
        }
    }

    /// The fd guest input is read from, if any.
    pub fn input_fd(&self) -> Option<RawFd> {
        match self {
            SerialEndpoint::Tty { _raw: Some(_) } => Some(io::stdin().as_raw_fd()),
            SerialEndpoint::Pty { master, .. } => Some(master.as_raw_fd()),
            SerialEndpoint::Socket {
                client: Some(c), ..
            } => Some(c.as_raw_fd()),
            _ => None,
        }
    }

    /// The terminal's size (columns, rows): standard input's for `tty` when it is a terminal,
    /// the pseudo-terminal's for `pty`; `None` otherwise or while it is unset (0x0).
    pub fn window_size(&self) -> Option<(u16, u16)> {
        let fd = match self {
            SerialEndpoint::Tty { _raw: Some(_) } => io::stdin().as_raw_fd(),
            SerialEndpoint::Pty { master, .. } => master.as_raw_fd(),
            _ => return None,
        };
        // SAFETY: winsize is plain data.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize into `ws`; `fd` is open.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 {
            return None;
        }
        (ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
    }

    /// For a `pty`, starts following its size (see `pty_resize`). Returns the fd that becomes
    /// readable after a resize; `window_size` then has the new size.
    pub fn watch_resizes(&mut self) -> Option<RawFd> {
        let SerialEndpoint::Pty { slave, watcher, .. } = self else {
            return None;
        };
        match ResizeWatcher::spawn(slave) {
            Ok(w) => Some(watcher.insert(w).fd()),
            Err(e) => {
                warn!("console PTY resizes will not reach the guest: {e}");
                None
            }
        }
    }

    /// The resize watcher's fd, while there is one.
    pub fn resize_fd(&self) -> Option<RawFd> {
        match self {
            SerialEndpoint::Pty {
                watcher: Some(w), ..
            } => Some(w.fd()),
            _ => None,
        }
    }

    /// Consumes pending resize notifications.
    pub fn drain_resizes(&self) {
        if let SerialEndpoint::Pty {
            watcher: Some(w), ..
        } = self
        {
            w.drain();
        }
    }

    pub fn listener_fd(&self) -> Option<RawFd> {
        match self {
            SerialEndpoint::Socket { listener, .. } => Some(listener.as_raw_fd()),
            _ => None,
        }
    }

    /// Accepts a socket client, replacing any previous one. Returns the new input fd.
    pub fn accept(&mut self) -> Option<RawFd> {
        let SerialEndpoint::Socket {
            listener, client, ..
        } = self
        else {
            return None;
        };
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(true);
                let fd = stream.as_raw_fd();
                *client = Some(stream);
                Some(fd)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    warn!("serial socket accept failed: {e}");
                }
                None
            }
        }
    }

    /// Drops a socket client that hung up.
    pub fn disconnect(&mut self) {
        if let SerialEndpoint::Socket { client, .. } = self {
            *client = None;
        }
    }

    /// Reads pending input. `Ok(0)` means the source is gone.
    pub fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            SerialEndpoint::Tty { .. } => io::stdin().lock().read(buf),
            SerialEndpoint::Pty { master, .. } => master.read(buf),
            SerialEndpoint::Socket {
                client: Some(c), ..
            } => c.read(buf),
            _ => Ok(0),
        }
    }
}

fn remove_stale_socket(path: &Path) {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for SerialEndpoint {
    fn drop(&mut self) {
        if let SerialEndpoint::Socket { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The virtio console on a Unix socket, whose clients come and go while the device's host side
/// is fixed when the VM is built: the device talks to one end of a socket pair and the control
/// loop relays between the other end and whichever client is connected (output with no client
/// is discarded, as the original does).
pub struct ConsoleRelay {
    /// The device's end (blocking, for the device's reads; its writes never wait).
    device_end: UnixStream,
    /// The relay's end (non-blocking).
    vmm_end: UnixStream,
}

impl ConsoleRelay {
    pub fn new() -> io::Result<Self> {
        let (device_end, vmm_end) = UnixStream::pair()?;
        vmm_end.set_nonblocking(true)?;
        Ok(ConsoleRelay {
            device_end,
            vmm_end,
        })
    }

    /// The device's output writer and input, both on the device's end.
    pub fn device_io(&self) -> Option<(Box<dyn Write + Send>, std::fs::File)> {
        let out = self.device_end.try_clone().ok()?;
        let input = self.device_end.try_clone().ok()?;
        Some((
            Box::new(NoWaitWriter(out)),
            std::fs::File::from(OwnedFd::from(input)),
        ))
    }

    /// Readable when the device wrote output.
    pub fn output_fd(&self) -> RawFd {
        self.vmm_end.as_raw_fd()
    }

    /// Moves the device's pending output to `client` (dropped when there is none, or when the
    /// client does not keep up).
    pub fn pump_output(&mut self, client: Option<&UnixStream>) {
        let mut buf = [0u8; 4096];
        loop {
            match self.vmm_end.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some(mut c) = client {
                        let _ = c.write_all(&buf[..n]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Passes client input to the device (dropped if the device does not keep up).
    pub fn push_input(&mut self, data: &[u8]) {
        let _ = self.vmm_end.write_all(data);
    }
}

/// Writes without ever blocking: what does not fit now is dropped (a guest flooding its console
/// must not be able to stall the device thread, or the VMM waiting for it).
struct NoWaitWriter(UnixStream);

impl Write for NoWaitWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: send reads `buf.len()` bytes from a valid slice on a socket we own.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(buf.len()),
            _ => Err(e),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SerialEndpoint {
    /// The connected socket client, if any.
    pub fn client(&self) -> Option<&UnixStream> {
        match self {
            SerialEndpoint::Socket { client, .. } => client.as_ref(),
            _ => None,
        }
    }

    pub fn is_socket(&self) -> bool {
        matches!(self, SerialEndpoint::Socket { .. })
    }

    /// For `pty`: waits (a moment at most) until whoever reads the pseudo-terminal has read
    /// what the guest wrote, before the endpoint is dropped. Closing the master hangs the
    /// terminal up, and the kernel then throws away output still waiting in it: the guest's
    /// last lines before a power-off would be lost to a reader that was a little behind. The
    /// VMM holds the slave open itself, so FIONREAD on it tells how much is still unread.
    pub fn drain_output(&self) {
        const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_millis(200);
        let SerialEndpoint::Pty { slave, .. } = self else {
            return;
        };
        let start = std::time::Instant::now();
        loop {
            let mut unread: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int into `unread`; the slave fd is open.
            let ret = unsafe { libc::ioctl(slave.as_raw_fd(), libc::FIONREAD, &mut unread) };
            if ret != 0 || unread <= 0 || start.elapsed() >= DRAIN_LIMIT {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The pseudo-terminal's path, for `pty`.
    pub fn pty_path(&self) -> Option<&Path> {
        match self {
            SerialEndpoint::Pty { path, .. } => Some(path),
            _ => None,
        }
    }
}
