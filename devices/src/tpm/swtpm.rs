//! The host side of the TPM: `swtpm`'s control channel (a Unix stream socket, `--ctrl
//! type=unixio`) and a data channel handed to it with `CMD_SET_DATAFD`, as in swtpm_ioctls(3).
//! Every message is big endian: a command word, then its payload; answers start with a result
//! word (0: success), except `CMD_GET_CAPABILITY`'s. Every read and write has a timeout, so a
//! stuck swtpm costs a vCPU at most that long.

use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thiserror::Error;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::{TpmBackend, TPM_CRB_BUFFER_SIZE, TPM_HEADER_LEN};

const CMD_GET_CAPABILITY: u32 = 1;
const CMD_INIT: u32 = 2;
const CMD_GET_TPMESTABLISHED: u32 = 4;
const CMD_SET_LOCALITY: u32 = 5;
const CMD_SET_DATAFD: u32 = 16;
const CMD_SET_BUFFERSIZE: u32 = 17;

/// Capability bits the device relies on (`PTM_CAP_*`).
const CAP_INIT: u64 = 1 << 0;
const CAP_SET_LOCALITY: u64 = 1 << 4;
const CAP_SET_DATAFD: u64 = 1 << 12;

/// Control commands are quick; a TPM command (key generation) may take seconds.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
const DATA_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum SwtpmError {
    #[error("cannot connect: {0}")]
    Connect(#[source] io::Error),
    #[error("{0}: {1}")]
    Io(&'static str, #[source] io::Error),
    #[error("{0}: swtpm answered {1:#x}")]
    Result(&'static str, u32),
    #[error("swtpm lacks capability {0:#x} (has {1:#x})")]
    Capability(u64, u64),
    #[error("TPM response of {0} bytes does not fit the {1}-byte buffer")]
    ResponseSize(usize, usize),
    #[error("the data channel is out of step after an earlier error")]
    Broken,
}

pub struct Swtpm {
    ctrl: UnixStream,
    data: UnixStream,
    locality: u8,
    broken: bool,
}

impl Swtpm {
    /// Connects to swtpm's control socket `path`, hands it the data channel, sets its buffer
    /// size to the CRB buffer's and initialises the TPM (`CMD_INIT`).
    pub fn connect(path: &Path) -> Result<Self, SwtpmError> {
        let ctrl = UnixStream::connect(path).map_err(SwtpmError::Connect)?;
        let timeouts = |s: &UnixStream, t| {
            s.set_read_timeout(Some(t))
                .and_then(|_| s.set_write_timeout(Some(t)))
        };
        timeouts(&ctrl, CONTROL_TIMEOUT).map_err(SwtpmError::Connect)?;
        let (data, theirs) = UnixStream::pair().map_err(|e| SwtpmError::Io("socketpair", e))?;
        timeouts(&data, DATA_TIMEOUT).map_err(|e| SwtpmError::Io("socketpair", e))?;
        let mut tpm = Swtpm {
            ctrl,
            data,
            locality: 0,
            broken: false,
        };
        let caps = tpm.capabilities()?;
        let needed = CAP_INIT | CAP_SET_LOCALITY | CAP_SET_DATAFD;
        if caps & needed != needed {
            return Err(SwtpmError::Capability(needed, caps));
        }
        tpm.ctrl
            .send_with_fd(&CMD_SET_DATAFD.to_be_bytes()[..], theirs.as_raw_fd())
            .map_err(|e| SwtpmError::Io("CMD_SET_DATAFD", io::Error::from(e)))?;
        tpm.result("CMD_SET_DATAFD")?;
        drop(theirs);
        // Only possible while the TPM is stopped; an older swtpm may refuse: its default
        // (4 KiB) is then as large as ours.
        if let Err(e) = tpm.set_buffer_size(TPM_CRB_BUFFER_SIZE as u32) {
            log::warn!("swtpm: cannot set the buffer size: {e}");
        }
        tpm.control(CMD_INIT, &0u32.to_be_bytes(), "CMD_INIT")?;
        Ok(tpm)
    }

    fn send(&mut self, cmd: u32, payload: &[u8], name: &'static str) -> Result<(), SwtpmError> {
        let mut msg = cmd.to_be_bytes().to_vec();
        msg.extend_from_slice(payload);
        self.ctrl
            .write_all(&msg)
            .map_err(|e| SwtpmError::Io(name, e))
    }

    fn read_exact(&mut self, buf: &mut [u8], name: &'static str) -> Result<(), SwtpmError> {
        self.ctrl
            .read_exact(buf)
            .map_err(|e| SwtpmError::Io(name, e))
    }

    /// Reads the result word and fails on a non-zero one.
    fn result(&mut self, name: &'static str) -> Result<(), SwtpmError> {
        let mut r = [0u8; 4];
        self.read_exact(&mut r, name)?;
        match u32::from_be_bytes(r) {
            0 => Ok(()),
            code => Err(SwtpmError::Result(name, code)),
        }
    }

    fn control(&mut self, cmd: u32, payload: &[u8], name: &'static str) -> Result<(), SwtpmError> {
        self.send(cmd, payload, name)?;
        self.result(name)
    }

    fn capabilities(&mut self) -> Result<u64, SwtpmError> {
        self.send(CMD_GET_CAPABILITY, &[], "CMD_GET_CAPABILITY")?;
        let mut caps = [0u8; 8];
        self.read_exact(&mut caps, "CMD_GET_CAPABILITY")?;
        Ok(u64::from_be_bytes(caps))
    }

    fn set_buffer_size(&mut self, size: u32) -> Result<u32, SwtpmError> {
        const NAME: &str = "CMD_SET_BUFFERSIZE";
        self.control(CMD_SET_BUFFERSIZE, &size.to_be_bytes(), NAME)?;
        // The size in use, then the minimum and maximum swtpm takes.
        let mut sizes = [0u8; 12];
        self.read_exact(&mut sizes, NAME)?;
        Ok(u32::from_be_bytes(sizes[..4].try_into().unwrap()))
    }

    fn established(&mut self) -> Result<bool, SwtpmError> {
        self.control(CMD_GET_TPMESTABLISHED, &[], "CMD_GET_TPMESTABLISHED")?;
        let mut bit = [0u8; 4];
        self.read_exact(&mut bit, "CMD_GET_TPMESTABLISHED")?;
        Ok(bit[0] & 1 != 0)
    }

    fn transfer(&mut self, locality: u8, cmd: &[u8], rsp: &mut [u8]) -> Result<usize, SwtpmError> {
        if self.broken {
            return Err(SwtpmError::Broken);
        }
        if locality != self.locality {
            self.control(CMD_SET_LOCALITY, &[locality], "CMD_SET_LOCALITY")?;
            self.locality = locality;
        }
        // Any failure past this point may leave a partial response in the channel.
        self.broken = true;
        self.data
            .write_all(cmd)
            .map_err(|e| SwtpmError::Io("TPM command", e))?;
        let mut header = [0u8; TPM_HEADER_LEN];
        self.data
            .read_exact(&mut header)
            .map_err(|e| SwtpmError::Io("TPM response", e))?;
        let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
        if len < TPM_HEADER_LEN || len > rsp.len() {
            return Err(SwtpmError::ResponseSize(len, rsp.len()));
        }
        rsp[..TPM_HEADER_LEN].copy_from_slice(&header);
        self.data
            .read_exact(&mut rsp[TPM_HEADER_LEN..len])
            .map_err(|e| SwtpmError::Io("TPM response", e))?;
        self.broken = false;
        Ok(len)
    }
}

impl TpmBackend for Swtpm {
    fn execute(&mut self, locality: u8, cmd: &[u8], rsp: &mut [u8]) -> Result<usize, String> {
        self.transfer(locality, cmd, rsp).map_err(|e| e.to_string())
    }

    fn established(&mut self) -> bool {
        Swtpm::established(self).unwrap_or_else(|e| {
            log::warn!("swtpm: {e}");
            false
        })
    }
}
