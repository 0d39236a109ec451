//! A TPM 2.0 behind the Command Response Buffer (CRB) interface of the TCG PC Client Platform
//! TPM Profile, for locality 0: one 4 KiB MMIO page (`arch::layout::TPM_START`) with the
//! locality and control registers and the command/response buffer from offset 0x80. A guest
//! write of 1 to `CTRL_START` sends the command in the buffer to the backend (`swtpm`) and
//! puts the response in its place before the write returns.
//!
//! The guest is not trusted: accesses that are not whole registers, sizes in a command header
//! that do not fit the buffer and offsets past the page are logged and ignored (a bad command
//! size is answered with a TPM error response); the backend has timeouts, so no access blocks
//! a vCPU for ever.

mod swtpm;

pub use swtpm::{Swtpm, SwtpmError};

use crate::BusDevice;

/// Size of a TPM command or response header (tag, size, code).
pub const TPM_HEADER_LEN: usize = 10;
/// Offset of the command/response buffer in the CRB page.
pub const CRB_DATA_BUFFER: u64 = 0x80;
/// Bytes of the command/response buffer: the rest of the 4 KiB page.
pub const TPM_CRB_BUFFER_SIZE: usize = 0x1000 - CRB_DATA_BUFFER as usize;

const CRB_LOC_STATE: u64 = 0x00;
const CRB_LOC_CTRL: u64 = 0x08;
const CRB_LOC_STS: u64 = 0x0c;
const CRB_INTF_ID: u64 = 0x30;
const CRB_INTF_ID2: u64 = 0x34;
const CRB_CTRL_REQ: u64 = 0x40;
const CRB_CTRL_STS: u64 = 0x44;
const CRB_CTRL_CANCEL: u64 = 0x48;
const CRB_CTRL_START: u64 = 0x4c;
const CRB_CTRL_CMD_SIZE: u64 = 0x58;
const CRB_CTRL_CMD_LADDR: u64 = 0x5c;
const CRB_CTRL_RSP_SIZE: u64 = 0x64;
const CRB_CTRL_RSP_ADDR: u64 = 0x68;

const LOC_STATE_ESTABLISHED: u32 = 1 << 0;
const LOC_STATE_ASSIGNED: u32 = 1 << 1;
const LOC_STATE_REG_VALID: u32 = 1 << 7;
const LOC_CTRL_REQUEST_ACCESS: u32 = 1 << 0;
const LOC_CTRL_RELINQUISH: u32 = 1 << 1;
const LOC_STS_GRANTED: u32 = 1 << 0;
const CTRL_REQ_CMD_READY: u32 = 1 << 0;
const CTRL_REQ_GO_IDLE: u32 = 1 << 1;
const CTRL_STS_IDLE: u32 = 1 << 1;
const CTRL_START: u32 = 1 << 0;

/// `INTF_ID`: interface type CRB (active), version 1 (CRB), locality 0 only, 64-byte
/// transfers, CRB supported and selected; then vendor 0x1014 (IBM, as the original and QEMU).
const INTF_ID: u32 = 1 | (1 << 4) | (3 << 11) | (1 << 14) | (1 << 17);
const INTF_ID2: u32 = 0x1014;

/// `TPM_RC_COMMAND_SIZE` and `TPM_RC_FAILURE`, answered for a bad header and a backend error.
const TPM_RC_COMMAND_SIZE: u32 = 0x142;
const TPM_RC_FAILURE: u32 = 0x101;

/// What executes TPM commands: swtpm, or a test double.
pub trait TpmBackend: Send {
    /// Runs `cmd` at `locality` and writes the response into `rsp`; returns its length.
    fn execute(&mut self, locality: u8, cmd: &[u8], rsp: &mut [u8]) -> Result<usize, String>;
    /// The TPM's "established" flag (`tpmEstablished` in `LOC_STATE`).
    fn established(&mut self) -> bool;
}

pub struct TpmCrb {
    backend: Box<dyn TpmBackend>,
    /// Guest-physical address of the page, for the buffer address registers.
    base: u64,
    locality_assigned: bool,
    idle: bool,
    cancel: u32,
    established: bool,
    buffer: Box<[u8; TPM_CRB_BUFFER_SIZE]>,
}

impl TpmCrb {
    pub fn new(mut backend: Box<dyn TpmBackend>, base: u64) -> Self {
        let established = backend.established();
        TpmCrb {
            backend,
            base,
            locality_assigned: false,
            idle: true,
            cancel: 0,
            established,
            buffer: Box::new([0; TPM_CRB_BUFFER_SIZE]),
        }
    }

    fn register(&self, offset: u64) -> u32 {
        let buffer = (self.base + CRB_DATA_BUFFER) as u32;
        match offset {
            CRB_LOC_STATE => {
                LOC_STATE_REG_VALID
                    | (u32::from(self.locality_assigned) * LOC_STATE_ASSIGNED)
                    | (u32::from(self.established) * LOC_STATE_ESTABLISHED)
            }
            CRB_LOC_STS => u32::from(self.locality_assigned) * LOC_STS_GRANTED,
            CRB_INTF_ID => INTF_ID,
            CRB_INTF_ID2 => INTF_ID2,
            CRB_CTRL_STS => u32::from(self.idle) * CTRL_STS_IDLE,
            CRB_CTRL_CANCEL => self.cancel,
            CRB_CTRL_CMD_SIZE | CRB_CTRL_RSP_SIZE => TPM_CRB_BUFFER_SIZE as u32,
            CRB_CTRL_CMD_LADDR | CRB_CTRL_RSP_ADDR => buffer,
            CRB_CTRL_RSP_ADDR_HIGH => ((self.base + CRB_DATA_BUFFER) >> 32) as u32,
            // LOC_CTRL, CTRL_REQ and CTRL_START read 0: requests complete within the write.
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            CRB_LOC_CTRL => {
                if value & LOC_CTRL_REQUEST_ACCESS != 0 {
                    self.locality_assigned = true;
                }
                if value & LOC_CTRL_RELINQUISH != 0 {
                    self.locality_assigned = false;
                }
            }
            CRB_CTRL_REQ => {
                if value & CTRL_REQ_CMD_READY != 0 {
                    self.idle = false;
                }
                if value & CTRL_REQ_GO_IDLE != 0 {
                    self.idle = true;
                }
            }
            // Commands run to completion inside the START write: nothing is left to cancel.
            CRB_CTRL_CANCEL => self.cancel = value & 1,
            CRB_CTRL_START if value & CTRL_START != 0 => self.start(),
            _ => log::debug!("tpm: write {value:#x} to register {offset:#x} ignored"),
        }
    }

    /// Runs the command in the buffer and leaves the response there.
    fn start(&mut self) {
        if !self.locality_assigned {
            log::warn!("tpm: CTRL_START without the locality assigned, ignored");
            return;
        }
        self.idle = false;
        let len = u32::from_be_bytes(self.buffer[2..6].try_into().unwrap()) as usize;
        if !(TPM_HEADER_LEN..=TPM_CRB_BUFFER_SIZE).contains(&len) {
            log::warn!("tpm: command size {len} out of range");
            self.error_response(TPM_RC_COMMAND_SIZE);
            return;
        }
        let cmd = self.buffer[..len].to_vec();
        if let Err(e) = self.backend.execute(0, &cmd, &mut self.buffer[..]) {
            log::error!("tpm: command {:#x} failed: {e}", code_of(&cmd));
            self.error_response(TPM_RC_FAILURE);
        }
    }

    fn error_response(&mut self, code: u32) {
        let mut rsp = [0u8; TPM_HEADER_LEN];
        rsp[..2].copy_from_slice(&0x8001u16.to_be_bytes()); // TPM_ST_NO_SESSIONS
        rsp[2..6].copy_from_slice(&(TPM_HEADER_LEN as u32).to_be_bytes());
        rsp[6..].copy_from_slice(&code.to_be_bytes());
        self.buffer[..TPM_HEADER_LEN].copy_from_slice(&rsp);
    }
}

const CRB_CTRL_RSP_ADDR_HIGH: u64 = CRB_CTRL_RSP_ADDR + 4;

fn code_of(cmd: &[u8]) -> u32 {
    u32::from_be_bytes(cmd[6..10].try_into().unwrap())
}

impl BusDevice for TpmCrb {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CRB_DATA_BUFFER {
            let start = (offset - CRB_DATA_BUFFER) as usize;
            match self.buffer.get(start..start + data.len()) {
                Some(src) => data.copy_from_slice(src),
                None => data.fill(0xff),
            }
            return;
        }
        // Registers are 32 bits; a narrower read gets its bytes of the register.
        let reg = offset & !3;
        let shift = (offset & 3) as usize;
        if shift + data.len() > 4 {
            log::debug!("tpm: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0xff);
            return;
        }
        let value = self.register(reg).to_le_bytes();
        data.copy_from_slice(&value[shift..shift + data.len()]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CRB_DATA_BUFFER {
            let start = (offset - CRB_DATA_BUFFER) as usize;
            match self.buffer.get_mut(start..start + data.len()) {
                Some(dst) => dst.copy_from_slice(data),
                None => log::debug!("tpm: write past the buffer at {offset:#x} ignored"),
            }
            return;
        }
        if offset & 3 != 0 || !matches!(data.len(), 1 | 2 | 4) {
            log::debug!("tpm: {}-byte write at {offset:#x} ignored", data.len());
            return;
        }
        let mut value = [0u8; 4];
        value[..data.len()].copy_from_slice(data);
        self.write_register(offset, u32::from_le_bytes(value));
    }
}

#[cfg(test)]
mod tests;
