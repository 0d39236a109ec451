use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::*;

const BASE: u64 = 0xfed4_0000;

/// Records the commands it gets and answers each with a fixed response.
struct Fake {
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    response: Vec<u8>,
}

impl TpmBackend for Fake {
    fn execute(&mut self, _locality: u8, cmd: &[u8], rsp: &mut [u8]) -> Result<usize, String> {
        self.seen.lock().unwrap().push(cmd.to_vec());
        rsp[..self.response.len()].copy_from_slice(&self.response);
        Ok(self.response.len())
    }
    fn established(&mut self) -> bool {
        false
    }
}

fn read32(dev: &mut TpmCrb, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write32(dev: &mut TpmCrb, offset: u64, value: u32) {
    dev.write(offset, &value.to_le_bytes());
}

/// Runs `cmd` as a guest driver would: locality, cmdReady, the buffer, START; the response.
fn run(dev: &mut TpmCrb, cmd: &[u8]) -> Vec<u8> {
    write32(dev, CRB_LOC_CTRL, LOC_CTRL_REQUEST_ACCESS);
    assert_eq!(read32(dev, CRB_LOC_STS) & LOC_STS_GRANTED, 1);
    write32(dev, CRB_CTRL_REQ, CTRL_REQ_CMD_READY);
    assert_eq!(read32(dev, CRB_CTRL_STS) & CTRL_STS_IDLE, 0);
    dev.write(CRB_DATA_BUFFER, cmd);
    write32(dev, CRB_CTRL_START, CTRL_START);
    assert_eq!(read32(dev, CRB_CTRL_START), 0, "START clears when done");
    let mut header = [0u8; TPM_HEADER_LEN];
    dev.read(CRB_DATA_BUFFER, &mut header);
    let len = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut rsp = vec![0u8; len];
    dev.read(CRB_DATA_BUFFER, &mut rsp);
    rsp
}

fn rc(rsp: &[u8]) -> u32 {
    u32::from_be_bytes(rsp[6..10].try_into().unwrap())
}

const STARTUP_CLEAR: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0];
const GET_RANDOM_16: [u8; 12] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];

fn fake() -> (TpmCrb, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let response = vec![0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0];
    let dev = TpmCrb::new(
        Box::new(Fake {
            seen: seen.clone(),
            response,
        }),
        BASE,
    );
    (dev, seen)
}

#[test]
fn registers_describe_a_crb_interface_for_locality_0() {
    let (mut dev, _) = fake();
    assert_eq!(read32(&mut dev, CRB_INTF_ID) & 0xf, 1, "CRB active");
    assert_eq!(read32(&mut dev, CRB_INTF_ID) >> 17 & 3, 1, "CRB selected");
    assert_eq!(read32(&mut dev, CRB_INTF_ID2) & 0xffff, 0x1014);
    assert_eq!(read32(&mut dev, CRB_CTRL_CMD_LADDR), 0xfed4_0080);
    assert_eq!(read32(&mut dev, CRB_CTRL_RSP_ADDR), 0xfed4_0080);
    assert_eq!(read32(&mut dev, CRB_CTRL_RSP_ADDR + 4), 0);
    assert_eq!(read32(&mut dev, CRB_CTRL_CMD_SIZE), 0xf80);
    assert_eq!(read32(&mut dev, CRB_CTRL_RSP_SIZE), 0xf80);
    assert_eq!(read32(&mut dev, CRB_CTRL_STS), CTRL_STS_IDLE);
    assert_eq!(read32(&mut dev, CRB_LOC_STATE), LOC_STATE_REG_VALID);
    write32(&mut dev, CRB_LOC_CTRL, LOC_CTRL_REQUEST_ACCESS);
    assert_eq!(
        read32(&mut dev, CRB_LOC_STATE),
        LOC_STATE_REG_VALID | LOC_STATE_ASSIGNED
    );
    // A byte read gets that byte of the register.
    let mut b = [0u8; 1];
    dev.read(CRB_LOC_STATE, &mut b);
    assert_eq!(b[0], (LOC_STATE_REG_VALID | LOC_STATE_ASSIGNED) as u8);
    write32(&mut dev, CRB_LOC_CTRL, LOC_CTRL_RELINQUISH);
    assert_eq!(read32(&mut dev, CRB_LOC_STS), 0);
    write32(&mut dev, CRB_CTRL_REQ, CTRL_REQ_CMD_READY);
    assert_eq!(read32(&mut dev, CRB_CTRL_STS), 0);
    write32(&mut dev, CRB_CTRL_REQ, CTRL_REQ_GO_IDLE);
    assert_eq!(read32(&mut dev, CRB_CTRL_STS), CTRL_STS_IDLE);
}

#[test]
fn start_sends_the_command_and_stores_the_response() {
    let (mut dev, seen) = fake();
    let rsp = run(&mut dev, &GET_RANDOM_16);
    assert_eq!(rsp, [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]);
    assert_eq!(*seen.lock().unwrap(), vec![GET_RANDOM_16.to_vec()]);
}

#[test]
fn hostile_accesses_are_ignored() {
    let (mut dev, seen) = fake();
    // START without the locality: nothing is sent.
    dev.write(CRB_DATA_BUFFER, &GET_RANDOM_16);
    write32(&mut dev, CRB_CTRL_START, CTRL_START);
    assert!(seen.lock().unwrap().is_empty());
    // Sizes below a header and beyond the buffer: TPM_RC_COMMAND_SIZE, nothing sent.
    for size in [0u32, 9, 0xf81, u32::MAX] {
        let mut cmd = GET_RANDOM_16;
        cmd[2..6].copy_from_slice(&size.to_be_bytes());
        assert_eq!(rc(&run(&mut dev, &cmd)), TPM_RC_COMMAND_SIZE, "{size}");
    }
    assert!(seen.lock().unwrap().is_empty());
    // Past the page, straddling registers, odd widths: no panic, reads give 0xff.
    let mut b = [0u8; 8];
    dev.read(0xffc, &mut b);
    assert_eq!(b, [0xff; 8]);
    dev.read(0x2000, &mut b[..4]);
    dev.write(0xffc, &[1; 8]);
    dev.write(u64::MAX - 3, &[1; 4]);
    dev.read(0x3e, &mut b[..4]);
    assert_eq!(b[..4], [0xff; 4]);
    dev.write(0x4d, &[1]);
    dev.write(0x4c, &[1; 3]);
    assert!(seen.lock().unwrap().is_empty());
}

#[test]
fn connecting_to_nothing_says_so() {
    let e = Swtpm::connect(std::path::Path::new("/nonexistent/swtpm.sock"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("cannot connect: "), "{e}");
}

/// A swtpm process in its own state directory, killed on drop.
pub struct SwtpmProcess {
    child: Child,
    dir: PathBuf,
    pub ctrl: PathBuf,
}

impl SwtpmProcess {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("swtpm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ctrl = dir.join("ctrl.sock");
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", ctrl.display()))
            .arg("--tpm2")
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run swtpm ({e}): install the Debian package `swtpm` (scripts/test does)")
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ctrl.exists() {
            assert!(Instant::now() < deadline, "swtpm made no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        SwtpmProcess { child, dir, ctrl }
    }
}

impl Drop for SwtpmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn startup_and_get_random_through_swtpm() {
    let swtpm = SwtpmProcess::start("device");
    let mut dev = TpmCrb::new(Box::new(Swtpm::connect(&swtpm.ctrl).unwrap()), BASE);
    assert_eq!(rc(&run(&mut dev, &STARTUP_CLEAR)), 0);
    // A second startup: TPM_RC_INITIALIZE.
    assert_eq!(rc(&run(&mut dev, &STARTUP_CLEAR)), 0x100);
    let a = run(&mut dev, &GET_RANDOM_16);
    let b = run(&mut dev, &GET_RANDOM_16);
    for r in [&a, &b] {
        assert_eq!(rc(r), 0);
        assert_eq!(r.len(), 12 + 16);
        assert_eq!(u16::from_be_bytes([r[10], r[11]]), 16);
    }
    assert_ne!(a[12..], b[12..]);
}
