//! `--api-socket` and `--event-monitor`: `path=<path>` or `fd=<fd>` (a bare path is taken as
//! `path=`, as the original does).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use vmm::config::OptionParser;
use vmm::ConfigError;

#[derive(Debug, PartialEq, Eq)]
pub enum Endpoint {
    Path(PathBuf),
    Fd(RawFd),
}

pub fn parse(option: &'static str, raw: &str) -> Result<Endpoint, ConfigError> {
    if !raw.contains('=') && !raw.is_empty() {
        return Ok(Endpoint::Path(PathBuf::from(raw)));
    }
    let p = OptionParser::parse(option, raw, &["path", "fd"], &[])?;
    match (p.get("path"), p.number::<RawFd>("fd")?) {
        (Some(path), None) if !path.is_empty() => Ok(Endpoint::Path(PathBuf::from(path))),
        (None, Some(fd)) if fd >= 0 => Ok(Endpoint::Fd(fd)),
        _ => Err(p.error("give exactly one of path=<path> or fd=<fd>")),
    }
}

/// Checks that `fd` is open and of the kind wanted (`S_IFSOCK`, ...; 0 for any).
fn check_fd(fd: RawFd, kind: libc::mode_t) -> io::Result<()> {
    // SAFETY: fstat only writes into the zeroed struct we pass; a bad fd gives EBADF.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if kind != 0 && st.st_mode & libc::S_IFMT != kind {
        return Err(io::Error::other("not the right kind of file"));
    }
    Ok(())
}

/// Binds or adopts the API socket. A stale socket file (nobody listening) is replaced; a live
/// one is refused.
pub fn api_listener(ep: &Endpoint) -> io::Result<(UnixListener, Option<PathBuf>)> {
    match ep {
        Endpoint::Path(path) => match UnixListener::bind(path) {
            Ok(l) => Ok((l, Some(path.clone()))),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is serving this socket",
                    ));
                }
                std::fs::remove_file(path)?;
                Ok((UnixListener::bind(path)?, Some(path.clone())))
            }
            Err(e) => Err(e),
        },
        Endpoint::Fd(fd) => {
            check_fd(*fd, libc::S_IFSOCK)?;
            // SAFETY: the fd is open and a socket (checked above), and the command line hands
            // it to us: nothing else in this process owns it.
            Ok((unsafe { UnixListener::from_raw_fd(*fd) }, None))
        }
    }
}

pub fn event_monitor(ep: &Endpoint) -> io::Result<File> {
    match ep {
        Endpoint::Path(path) => File::create(path),
        Endpoint::Fd(fd) => {
            check_fd(*fd, 0)?;
            // SAFETY: the fd is open (checked above) and handed to us by the command line;
            // nothing else in this process owns it.
            Ok(unsafe { File::from_raw_fd(*fd) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            parse("--api-socket", "path=/tmp/a").unwrap(),
            Endpoint::Path("/tmp/a".into())
        );
        assert_eq!(
            parse("--api-socket", "/tmp/a").unwrap(),
            Endpoint::Path("/tmp/a".into())
        );
        assert_eq!(parse("--api-socket", "fd=3").unwrap(), Endpoint::Fd(3));
        for bad in ["", "fd=x", "fd=-1", "path=", "path=/a,fd=3", "sock=/x"] {
            let e = parse("--api-socket", bad).unwrap_err();
            assert!(e.to_string().starts_with("--api-socket"), "{bad}: {e}");
        }
    }
}
