//! The receiving side: one connection from a source VMM, answered request by request. The
//! source is not trusted more than a file: every length is bounded, every memory range must lie
//! in guest RAM, and any error is answered with an error response and ends the reception with
//! nothing kept.

use std::fs::File;
use std::io::{Read, Write};

use log::{debug, info};

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::connections::{receive_memory, Acceptor, Listener, PostcopyRam};
use super::postcopy;
use super::protocol::{Command, Request, Response, Stream, PROTOCOL_VERSION};
use super::MigrationConfig;
use crate::config::VmConfig;
use crate::snapshot::VmSnapshot;
use crate::uffd::OnDemand;

/// Largest configuration or state payload taken (both are JSON of a few KiB to a few MiB).
const MAX_JSON: u64 = 64 << 20;

pub type ReceiveError = String;

/// How long a connection may stay silent before the other side is taken for gone.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long the destination waits, at State, for a postcopy source's fault connection.
const FAULT_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for the source on `url` (`unix:<path>`, the socket file created; `tcp:<host>:<port>`,
/// in TLS with `tls_dir`): returns the connection and the listener, which takes the source's
/// further connections until State (a Unix socket's file goes with it; a postcopy source's
/// fault connection comes over `unix:` too). Gives up when `cancel` becomes readable.
pub fn accept(
    url: &str,
    cancel: i32,
    tls_dir: Option<&std::path::Path>,
) -> Result<(Stream, Listener), ReceiveError> {
    let listener = Listener::bind(url, tls_dir)?;
    let s = listener
        .accept(cancel)
        .map_err(|e| format!("{url}: {e}"))?
        .ok_or_else(|| format!("stopped waiting on {url}: the VMM is asked to end"))?;
    Ok((s, listener))
}

/// What a reception builds, step by step.
pub trait Builder {
    /// Guest RAM for `config` (from the memory files where the source sent them).
    fn memory(&mut self, config: &VmConfig, files: Vec<File>) -> Result<(), String>;
    fn ram(&self) -> Option<&guest_memory::GuestMemoryMmap>;
    /// Postcopy: the fetcher filling the RAM from the source (each page when first touched,
    /// the rest in the background), for the VM to hold.
    fn postcopy(&mut self, loader: OnDemand) -> Result<(), String>;
    /// The VM, paused, from the RAM and `state`.
    fn vm(&mut self, state: VmSnapshot) -> Result<(), String>;
    /// Lets the VM run (`resume`), or leaves it paused (the source's was).
    fn complete(&mut self, resume: bool) -> Result<(), String>;
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

/// Serves the connection until Complete or CompletePaused (Ok: whether the VM runs) or an
/// error, Abandon included. `listener` (the one the connection came from) takes the source's
/// further connections, from Config to State. `postcopy` (`memory_mode=postcopy`): the event
/// that stops the VM if its source is lost once it runs here.
pub fn receive(
    s: &mut Stream,
    listener: Option<Listener>,
    b: &mut dyn Builder,
    postcopy: Option<EventFd>,
) -> Result<bool, ReceiveError> {
    let mut listener = listener;
    let mut acceptor: Option<Acceptor> = None;
    let mut failed = postcopy;
    let receiving_postcopy = failed.is_some();
    let mut link: Option<Arc<postcopy::Link>> = None;
    let mut started = false;
    let mut files: Vec<File> = Vec::new();
    let mut config: Option<VmConfig> = None;
    let mut built = false;
    let mut resume = true;
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
                    if receiving_postcopy {
                        if c.vm_config.memory.any_prefault() {
                            return Err("postcopy migration is incompatible with memory \
                                        prefault; the source VM must not be configured with \
                                        prefault=on"
                                .into());
                        }
                        if !files.is_empty() {
                            return Err("memory_mode=postcopy cannot take memory files \
                                        (local=on)"
                                .into());
                        }
                    }
                    b.memory(&c.vm_config, std::mem::take(&mut files))?;
                    config = Some(c.vm_config);
                    let mem = b.ram().ok_or("no RAM after Config")?;
                    // Postcopy: the RAM is registered now, so the fetcher can start the moment
                    // the fault connection comes.
                    let pc = match failed.take() {
                        Some(f) => {
                            let l = Arc::new(postcopy::Link::new(f));
                            link = Some(Arc::clone(&l));
                            Some(PostcopyRam {
                                ram: postcopy::Prepared::new(mem)?,
                                link: l,
                            })
                        }
                        None => None,
                    };
                    match listener.take() {
                        Some(l) => acceptor = Some(Acceptor::start(l, mem.clone(), pc)?),
                        None if receiving_postcopy => {
                            return Err("postcopy needs the listener the source connected to".into())
                        }
                        None => {}
                    }
                }
                Command::Memory => {
                    if receiving_postcopy {
                        return Err("a Memory request in a postcopy migration (receive with \
                                    memory_mode=precopy)"
                            .into());
                    }
                    let mem = b.ram().ok_or("Memory before Config")?;
                    receive_memory(mem, &req, s)?;
                }
                Command::State => {
                    if config.is_none() || built {
                        return Err("State out of place".into());
                    }
                    // The further connections end here (the source sends State once its
                    // memory is all answered); postcopy's fault connection is kept.
                    let loader = match acceptor.take() {
                        Some(acc) if receiving_postcopy => {
                            let f = acc.fetcher(FAULT_WAIT);
                            acc.finish()?;
                            Some(f.ok_or(
                                "no fault connection came within 30 s: does the source send \
                                 with memory_mode=postcopy?",
                            )??)
                        }
                        Some(acc) => {
                            let seen = acc.fault_seen();
                            acc.finish()?;
                            if seen {
                                return Err("the source migrates in postcopy: receive with \
                                            memory_mode=postcopy"
                                    .into());
                            }
                            None
                        }
                        None => None,
                    };
                    let mut state: VmSnapshot = read_json(s, req.length, "state")?;
                    state.rename_old_ids();
                    if let Some(l) = loader {
                        b.postcopy(l)?;
                    }
                    b.vm(state)?;
                    built = true;
                }
                Command::Complete | Command::CompletePaused => {
                    if !built {
                        return Err("Complete before State".into());
                    }
                    // Postcopy: the VM is ours from here; its source must still be there.
                    if let Some(l) = &link {
                        l.arm()?;
                    }
                    resume = req.command == Command::Complete;
                    b.complete(resume)?;
                    return Ok(true);
                }
                Command::PageFault => {
                    return Err("a PageFault on the main connection".into());
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
                    return Ok(resume);
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::migration::protocol::encode_ranges;
    use crate::snapshot::MemoryRange;

    /// A builder with 1 MiB of RAM at 0 once configured, counting its steps.
    #[derive(Default)]
    struct Fake {
        mem: Option<guest_memory::GuestMemoryMmap>,
        vms: usize,
        completed: bool,
    }

    impl Builder for Fake {
        fn memory(&mut self, _config: &VmConfig, _files: Vec<File>) -> Result<(), String> {
            self.mem = Some(
                guest_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            );
            Ok(())
        }
        fn ram(&self) -> Option<&guest_memory::GuestMemoryMmap> {
            self.mem.as_ref()
        }
        fn postcopy(&mut self, _loader: OnDemand) -> Result<(), String> {
            Ok(())
        }
        fn vm(&mut self, _state: VmSnapshot) -> Result<(), String> {
            self.vms += 1;
            Ok(())
        }
        fn complete(&mut self, _resume: bool) -> Result<(), String> {
            self.completed = true;
            Ok(())
        }
    }

    fn config_json() -> Vec<u8> {
        let c: VmConfig = serde_json::from_value(serde_json::json!({
            "payload": {"kernel": "/bin/true"},
            "memory": {"size": 1 << 20},
        }))
        .unwrap();
        serde_json::to_vec(&MigrationConfig::new(c)).unwrap()
    }

    fn frame(cmd: Command, payload: &[u8]) -> Vec<u8> {
        let mut b = Request::new(cmd, payload.len() as u64).encode().to_vec();
        b.extend_from_slice(payload);
        b
    }

    /// Sends `bytes` to a receiver and returns its result, the responses it sent, and the
    /// builder.
    fn run(bytes: Vec<u8>) -> (Result<(), String>, Vec<bool>, Fake) {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let mut a = a;
            let _ = a.write_all(&bytes);
            let _ = a.shutdown(std::net::Shutdown::Write);
            let mut out = Vec::new();
            let _ = a.read_to_end(&mut out);
            out
        });
        let mut s = Stream::Unix(b);
        let mut fake = Fake::default();
        let r = receive(&mut s, None, &mut fake, None).map(|_| ());
        drop(s);
        let out = writer.join().unwrap();
        let oks = out
            .chunks_exact(16)
            .map(|c| u16::from_le_bytes([c[0], c[1]]) == Response::STATUS_OK)
            .collect();
        (r, oks, fake)
    }

    #[test]
    fn a_whole_migration_is_taken_in_order() {
        let ranges = [MemoryRange {
            gpa: 0x1000,
            length: 8,
        }];
        let mut b = frame(Command::Start, &[]);
        b.extend(frame(Command::Config, &config_json()));
        let mut mem = encode_ranges(&ranges);
        let table_len = mem.len() as u64;
        mem.extend_from_slice(&[7u8; 8]);
        let mut req = Request::new(Command::Memory, table_len).encode().to_vec();
        req.extend(mem);
        b.extend(req);
        b.extend(frame(Command::Complete, &[]));
        let (r, oks, fake) = run(b);
        // Complete before State is refused: the VM was never built.
        assert_eq!(r.unwrap_err(), "Complete before State");
        assert_eq!(oks, [true, true, true, false]);
        let mut got = [0u8; 8];
        use vm_memory::Bytes;
        fake.mem
            .unwrap()
            .read_slice(&mut got, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(got, [7u8; 8]);
        assert_eq!(fake.vms, 0);
    }

    #[test]
    fn hostile_sources_are_refused_without_harm() {
        let start = frame(Command::Start, &[]);
        let config = frame(Command::Config, &config_json());
        let memory = |r: MemoryRange| {
            let t = encode_ranges(&[r]);
            let mut b = Request::new(Command::Memory, t.len() as u64)
                .encode()
                .to_vec();
            b.extend(t);
            b
        };
        let mut bad_version = Request::new(Command::Start, 0);
        bad_version.headers[0] = 9;
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                frame(Command::Config, &config_json()),
                "Config before Start",
            ),
            (
                bad_version.encode().to_vec(),
                "Migration protocol version 9",
            ),
            (
                [start.clone(), frame(Command::Config, b"{")].concat(),
                "configuration does not read",
            ),
            (
                [
                    start.clone(),
                    Request::new(Command::Config, 1 << 40).encode().to_vec(),
                ]
                .concat(),
                "a configuration of",
            ),
            (
                [
                    start.clone(),
                    memory(MemoryRange {
                        gpa: 0,
                        length: 4096,
                    }),
                ]
                .concat(),
                "Memory before Config",
            ),
            (
                [
                    start.clone(),
                    config.clone(),
                    memory(MemoryRange {
                        gpa: 0xff000,
                        length: 0x2000,
                    }),
                ]
                .concat(),
                "is not guest RAM",
            ),
            (
                [
                    start.clone(),
                    config.clone(),
                    memory(MemoryRange {
                        gpa: u64::MAX - 10,
                        length: 100,
                    }),
                ]
                .concat(),
                "is not guest RAM",
            ),
            (
                [
                    start.clone(),
                    config.clone(),
                    Request::new(Command::Memory, 17).encode().to_vec(),
                ]
                .concat(),
                "memory table",
            ),
            (
                [start.clone(), config.clone(), config.clone()].concat(),
                "a second Config",
            ),
            (
                [start.clone(), frame(Command::State, b"{}")].concat(),
                "State out of place",
            ),
            (
                [start.clone(), frame(Command::Abandon, &[])].concat(),
                "abandoned",
            ),
            ([7u8; 16].to_vec(), "unknown command"),
            (start.clone(), "reading a request"),
        ];
        for (bytes, why) in cases {
            let (r, oks, fake) = run(bytes);
            let e = r.unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
            assert_eq!(fake.vms, 0);
            assert!(!fake.completed);
            // Everything before the refusal was answered ok; the refusal with an error (an
            // Abandon is acknowledged; a broken request gets no answer).
            let refused = !matches!(why, "reading a request" | "unknown command" | "abandoned");
            match oks.split_last() {
                Some((last, rest)) if refused => {
                    assert!(rest.iter().all(|&ok| ok), "{why}: {oks:?}");
                    assert!(!last, "{why}: {oks:?}");
                }
                _ => assert!(oks.iter().all(|&ok| ok), "{why}: {oks:?}"),
            }
        }
    }
}
