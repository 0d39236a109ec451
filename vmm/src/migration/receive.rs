//! The receiving side: one connection from a source VMM, answered request by request. The
//! source is not trusted more than a file: every length is bounded, every memory range must lie
//! in guest RAM, and any error is answered with an error response and ends the reception with
//! nothing kept.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;

use log::{debug, info};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{read_ranges, Command, Request, Response, Stream, PROTOCOL_VERSION};
use super::MigrationConfig;
use crate::config::VmConfig;
use crate::snapshot::VmSnapshot;

/// Largest configuration or state payload taken (both are JSON of a few KiB to a few MiB).
const MAX_JSON: u64 = 64 << 20;
/// Most ranges in one Memory request.
const MAX_RANGES: usize = 1 << 20;

pub type ReceiveError = String;

/// Waits for the source on `url` (`unix:<path>`: the socket file is created and removed after;
/// `tcp:<host>:<port>`): returns the connection.
pub fn accept(url: &str) -> Result<Stream, ReceiveError> {
    match url.split_once(':') {
        Some(("unix", path)) => {
            let _ = std::fs::remove_file(path);
            let listener =
                UnixListener::bind(path).map_err(|e| format!("cannot listen on {url}: {e}"))?;
            let accepted = listener.accept();
            let _ = std::fs::remove_file(path);
            let (s, _) = accepted.map_err(|e| format!("cannot accept on {url}: {e}"))?;
            Ok(Stream::Unix(s))
        }
        Some(("tcp", addr)) => {
            let listener = std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {url}: {e}"))?;
            let (s, _) = listener
                .accept()
                .map_err(|e| format!("cannot accept on {url}: {e}"))?;
            let _ = s.set_nodelay(true);
            Ok(Stream::Tcp(s))
        }
        _ => Err(format!("not a unix: or tcp: URL: {url}")),
    }
}

/// What a reception builds, step by step.
pub trait Builder {
    /// Guest RAM for `config` (from the memory files where the source sent them).
    fn memory(&mut self, config: &VmConfig, files: Vec<File>) -> Result<(), String>;
    fn ram(&self) -> Option<&vm_memory::GuestMemoryMmap>;
    /// The VM, paused, from the RAM and `state`.
    fn vm(&mut self, state: VmSnapshot) -> Result<(), String>;
    /// Lets the VM run.
    fn complete(&mut self) -> Result<(), String>;
}

fn read_json<T: serde::de::DeserializeOwned>(
    s: &mut Stream,
    len: u64,
    what: &str,
) -> Result<T, String> {
    if len > MAX_JSON {
        return Err(format!("a {what} of {len} bytes"));
    }
    let mut b = vec![0u8; len as usize];
    s.read_exact(&mut b)
        .map_err(|e| format!("reading the {what}: {e}"))?;
    serde_json::from_slice(&b).map_err(|e| format!("the {what} does not read: {e}"))
}

/// Serves the connection until Complete (Ok) or an error, Abandon included.
pub fn receive(s: &mut Stream, b: &mut dyn Builder) -> Result<(), ReceiveError> {
    let mut started = false;
    let mut files: Vec<File> = Vec::new();
    let mut config: Option<VmConfig> = None;
    let mut built = false;
    loop {
        let req = Request::read_from(s).map_err(|e| format!("reading a request: {e}"))?;
        debug!("migration: {:?}, {} bytes", req.command, req.length);
        let step = (|| -> Result<bool, String> {
            match req.command {
                Command::Start => {
                    if req.version() != PROTOCOL_VERSION {
                        return Err(format!(
                            "Migration protocol version {} doesn't match supported versions: \
                             {PROTOCOL_VERSION}",
                            req.version()
                        ));
                    }
                    started = true;
                }
                _ if !started => return Err(format!("{:?} before Start", req.command)),
                Command::MemoryFd => {
                    if req.length != 4 || config.is_some() {
                        return Err("a MemoryFd out of place".into());
                    }
                    let mut slot = [0u8; 4];
                    let fd = s
                        .recv_with_fd(&mut slot)
                        .map_err(|e| format!("receiving a memory file: {e}"))?;
                    if u32::from_le_bytes(slot) as usize != files.len() {
                        return Err("memory files out of order".into());
                    }
                    files.push(File::from(fd));
                }
                Command::Config => {
                    if config.is_some() {
                        return Err("a second Config".into());
                    }
                    let mut c: MigrationConfig = read_json(s, req.length, "configuration")?;
                    c.vm_config
                        .validate()
                        .map_err(|e| format!("the configuration is invalid: {e}"))?;
                    b.memory(&c.vm_config, std::mem::take(&mut files))?;
                    config = Some(c.vm_config);
                }
                Command::Memory => {
                    let ranges = read_ranges(s, req.length, MAX_RANGES)
                        .map_err(|e| format!("reading a memory table: {e}"))?;
                    let mem = b.ram().ok_or("Memory before Config")?;
                    for r in &ranges {
                        let fits = mem.find_region(GuestAddress(r.gpa)).is_some_and(|reg| {
                            r.gpa
                                .checked_add(r.length)
                                .is_some_and(|end| end <= reg.start_addr().0 + reg.len())
                        });
                        if !fits {
                            return Err(format!(
                                "memory range {:#x}+{:#x} is not guest RAM",
                                r.gpa, r.length
                            ));
                        }
                        super::read_into(mem, r, &mut s.fd())
                            .map_err(|e| format!("receiving memory at {:#x}: {e}", r.gpa))?;
                    }
                }
                Command::State => {
                    if config.is_none() || built {
                        return Err("State out of place".into());
                    }
                    let state: VmSnapshot = read_json(s, req.length, "state")?;
                    b.vm(state)?;
                    built = true;
                }
                Command::Complete => {
                    if !built {
                        return Err("Complete before State".into());
                    }
                    b.complete()?;
                    return Ok(true);
                }
                Command::Abandon => {
                    let _ = s.write_all(&Response::ok().encode());
                    return Err("the source abandoned the migration".into());
                }
            }
            Ok(false)
        })();
        match step {
            Ok(done) => {
                s.write_all(&Response::ok().encode())
                    .map_err(|e| format!("answering {:?}: {e}", req.command))?;
                if done {
                    info!("migration received");
                    return Ok(());
                }
            }
            Err(e) => {
                if req.command != Command::Abandon {
                    let _ = s.write_all(&Response::error().encode());
                }
                return Err(e);
            }
        }
    }
}
