//! `test=blk-resize`: a disk that grows under a running driver (`vm.resize-disk`). The guest
//! brings the first virtio-blk disk up with `virtio-drivers`, prints `BLKRESIZE waiting
//! capacity=<sectors>` and watches the device's configuration space (read by hand: the driver
//! keeps the capacity it read at start) for up to 60 s. Once the capacity grows it checks
//! that the configuration generation moved (`blkresize-generation`), then writes the new last
//! sector with `0x6b` and reads it back through the driver (`blkresize-new-sector`), and prints
//! `BLKRESIZE capacity=<sectors>`.

use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::DeviceType;

use crate::rawq::{r32, r8, Layout};
use crate::virtio::{find, transport, GuestHal};
use crate::{check, fail, pass, println, smp};

/// The common configuration's `config_generation` byte.
const CONFIG_GENERATION: u64 = 0x15;
const WAIT_MS: u32 = 60_000;

pub fn scenario_blk_resize() {
    let Some(df) = find(DeviceType::Block).into_iter().next() else {
        fail("blkresize-disk", format_args!("no virtio-blk function"));
        return;
    };
    let Some(l) = Layout::find(df) else {
        fail(
            "blkresize-disk",
            format_args!("{df}: no virtio capabilities"),
        );
        return;
    };
    let Some(t) = transport(df) else { return };
    let mut blk = match VirtIOBlk::<GuestHal, _>::new(t) {
        Ok(b) => b,
        Err(e) => {
            fail("blkresize-disk", format_args!("{df}: {e}"));
            return;
        }
    };
    let before = blk.capacity();
    let generation = r8(l.common + CONFIG_GENERATION);
    println!("BLKRESIZE waiting capacity={before}");
    let capacity = || u64::from(r32(l.device)) | u64::from(r32(l.device + 4)) << 32;
    let mut now = before;
    for _ in 0..WAIT_MS {
        now = capacity();
        if now != before {
            break;
        }
        smp::delay_us(1000);
    }
    check!(
        "blkresize-capacity",
        now > before,
        "the capacity stayed {before} sectors"
    );
    if now <= before {
        return;
    }
    check!(
        "blkresize-generation",
        r8(l.common + CONFIG_GENERATION) != generation,
        "the configuration generation stayed {generation}"
    );
    let last = (now - 1) as usize;
    let want = [0x6bu8; 512];
    let mut back = [0u8; 512];
    let r = blk
        .write_blocks(last, &want)
        .and_then(|()| blk.flush())
        .and_then(|()| blk.read_blocks(last, &mut back));
    check!(
        "blkresize-new-sector",
        matches!(r, Ok(())) && back == want,
        "sector {last}: {r:?}"
    );
    println!("BLKRESIZE capacity={now}");
}
