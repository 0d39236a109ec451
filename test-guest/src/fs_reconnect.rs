//! `fs_reconnect` (after `fs_crash`'s checks: the backend is gone and the device needs a reset):
//! the driver resets the device and starts it again, which makes the device connect to its
//! socket afresh, and speaks a new FUSE session to whichever virtiofsd listens there by then
//! (the host starts one when it sees `FS device reset, waiting for a new backend`): INIT (`fs-reinit`,
//! answered within 30 s), LOOKUP of the file (`fs-relookup`: its size now includes the first
//! session's write), OPEN, READ of the pattern and of what the first session wrote
//! (`fs-reread`), RELEASE (`fs-rerelease`).

use crate::bootinfo::BootInfo;
use crate::fs::{
    le32, le64, ok, pattern, Fuse, FUSE_INIT, FUSE_LOOKUP, FUSE_OPEN, FUSE_READ, FUSE_RELEASE,
    ROOT_ID, WRITE_AT, WRITTEN,
};
use crate::rawq::{Layout, VERSION_1};
use crate::{check, fail, parse_u64, pass, println};

/// How long the first request of the new session may wait for a backend (ms).
const NEW_BACKEND_WAIT_MS: u32 = 30_000;

pub fn new_session(boot: &BootInfo, layout: &Layout) {
    // Reset (status 0) and the whole initialisation again, as a driver does on NEEDS_RESET.
    let Some(mut qs) = layout.start("fs-reset", VERSION_1, &[0, 1]) else {
        return;
    };
    let status = layout.status();
    check!(
        "fs-reset",
        status & 0x40 == 0 && status & 0x04 != 0,
        "status {status:#x} after the reset"
    );
    let Some(q) = qs.pop() else { return };
    let mut fuse = Fuse::new(q);
    fuse.wait_ms = NEW_BACKEND_WAIT_MS;
    println!("FS device reset, waiting for a new backend");
    let mut init = [0u8; 16];
    init[0..4].copy_from_slice(&7u32.to_le_bytes());
    init[4..8].copy_from_slice(&31u32.to_le_bytes());
    let Some(b) = ok("fs-reinit", fuse.call(FUSE_INIT, 0, &init, 64)) else {
        return;
    };
    let major = if b.len() >= 8 { le32(&b, 0) } else { 0 };
    check!(
        "fs-reinit",
        major == 7,
        "a {}-byte reply, major {major}",
        b.len()
    );
    fuse.wait_ms = 5000;

    let name = boot.arg("fs_file").unwrap_or("data.bin");
    let mut lookup = alloc::vec::Vec::from(name.as_bytes());
    lookup.push(0);
    let Some(b) = ok("fs-relookup", fuse.call(FUSE_LOOKUP, ROOT_ID, &lookup, 128)) else {
        return;
    };
    if b.len() < 128 {
        fail_short("fs-relookup", b.len());
        return;
    }
    let (node, size) = (le64(&b, 0), le64(&b, 48));
    let want = WRITE_AT + WRITTEN.len() as u64;
    check!(
        "fs-relookup",
        node != 0 && size == want,
        "node {node}, size {size} (want {want})"
    );
    let Some(b) = ok("fs-reopen", fuse.call(FUSE_OPEN, node, &[0u8; 8], 16)) else {
        return;
    };
    if b.len() < 8 {
        fail_short("fs-reopen", b.len());
        return;
    }
    let fh = le64(&b, 0);
    let mut read = |offset: u64, len: usize| {
        let mut r = [0u8; 40];
        r[0..8].copy_from_slice(&fh.to_le_bytes());
        r[8..16].copy_from_slice(&offset.to_le_bytes());
        r[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        fuse.call(FUSE_READ, node, &r, len)
    };
    let len = boot.arg("fs_size").and_then(parse_u64).unwrap_or(0) as usize;
    let Some(data) = ok("fs-reread", read(0, len)) else {
        return;
    };
    let Some(written) = ok("fs-reread", read(WRITE_AT, WRITTEN.len())) else {
        return;
    };
    let bad = data.iter().enumerate().position(|(i, &b)| b != pattern(i));
    println!("FS reread {} bytes", data.len());
    check!(
        "fs-reread",
        data.len() == len && bad.is_none() && written == WRITTEN,
        "{} bytes (want {len}), first difference at {bad:?}, then {:?}",
        data.len(),
        core::str::from_utf8(&written)
    );
    let mut rel = [0u8; 24];
    rel[0..8].copy_from_slice(&fh.to_le_bytes());
    if ok("fs-rerelease", fuse.call(FUSE_RELEASE, node, &rel, 0)).is_some() {
        pass("fs-rerelease");
    }
}

fn fail_short(name: &str, len: usize) {
    fail(name, format_args!("a {len}-byte reply"));
}
