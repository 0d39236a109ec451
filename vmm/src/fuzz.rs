//! Fuzzing entry points (the `fuzz/` crate, `scripts/fuzz`): not for VMM use.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use guest_memory::GuestMemoryMmap;

use crate::config::VmConfig;
use crate::migration::protocol::Stream;
use crate::migration::receive::{receive, Builder};
use crate::snapshot::VmSnapshot;

struct Fake<'a> {
    ram: &'a mut dyn FnMut() -> GuestMemoryMmap,
    vm: &'a mut dyn FnMut(VmSnapshot),
    mem: Option<GuestMemoryMmap>,
}

impl Builder for Fake<'_> {
    fn memory(&mut self, _config: &VmConfig, _files: Vec<std::fs::File>) -> Result<(), String> {
        self.mem = Some((self.ram)());
        Ok(())
    }
    fn ram(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_ref()
    }
    fn postcopy(&mut self, _loader: crate::uffd::OnDemand) -> Result<(), String> {
        Ok(())
    }
    fn vm(&mut self, state: VmSnapshot) -> Result<(), String> {
        (self.vm)(state);
        Ok(())
    }
    fn complete(&mut self, _resume: bool) -> Result<(), String> {
        Ok(())
    }
}

/// Runs `serve` on one end of a connection whose other end sends `data`, then closes its
/// side and reads every answer (a peer that sends everything at once).
fn with_peer(data: &[u8], peer: &str, serve: impl FnOnce(&mut Stream)) {
    let Ok((mut a, b)) = UnixStream::pair() else {
        return;
    };
    let bytes = data.to_vec();
    let Ok(peer) = std::thread::Builder::new()
        .name(peer.into())
        .spawn(move || {
            let _ = a.write_all(&bytes);
            let _ = a.shutdown(std::net::Shutdown::Write);
            let mut answers = Vec::new();
            let _ = a.read_to_end(&mut answers);
        })
    else {
        return;
    };
    let mut s = Stream::Unix(b);
    serve(&mut s);
    drop(s);
    let _ = peer.join();
}

/// Receives a migration whose source sends `data` (then closes its side): the receiving
/// VMM's side of the protocol as it is, with guest RAM from `ram` (once the configuration
/// came) and the VM state handed to `vm`.
pub fn receive_migration(
    data: &[u8],
    ram: &mut dyn FnMut() -> GuestMemoryMmap,
    vm: &mut dyn FnMut(VmSnapshot),
) {
    with_peer(data, "fuzz-source", |s| {
        let mut fake = Fake { ram, vm, mem: None };
        let _ = receive(s, None, &mut fake, None);
    });
}

/// The source's postcopy page server reading what a destination sends on the fault
/// connection (`data`, then that side closed), its pages from `ram`.
pub fn serve_page_faults(data: &[u8], ram: &GuestMemoryMmap) {
    with_peer(data, "fuzz-destination", |s| {
        let _ = crate::migration::postcopy::serve(s, ram, &mut |_| {});
    });
}

/// A migration stream as a source sends it: `(command, payload)` framed.
pub fn migration_frames(frames: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (cmd, payload) in frames {
        out.extend_from_slice(&cmd.to_le_bytes());
        out.extend_from_slice(&[0u8; 6]);
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
    }
    out
}
