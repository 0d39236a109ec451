//! CMOS RAM and real-time clock (MC146818) at ports 0x70/0x71: the host's wall-clock time in
//! UTC, the memory size registers firmware-less guests read, and NVRAM that survives a guest
//! reboot because the VMM carries it into the rebuilt VM.

use serde::{Deserialize, Serialize};

use crate::state::{check_version, invalid};
use crate::{BusDevice, StateError, Stateful};

pub const CMOS_NVRAM_SIZE: usize = 128;

/// The `CmosState` layout this build writes and the only one it restores.
pub const CMOS_STATE_VERSION: u32 = 1;

const INDEX_MASK: u8 = 0x7f;
const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_C: u8 = 0x0c;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate; update-in-progress never set.
const STATUS_A_DEFAULT: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B_DEFAULT: u8 = 0x02;
const STATUS_B_BINARY: u8 = 0x04;
const STATUS_B_24H: u8 = 0x02;
/// Valid RAM and time (battery good).
const STATUS_D_VRT: u8 = 0x80;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

pub struct Cmos {
    index: u8,
    data: [u8; CMOS_NVRAM_SIZE],
    now: fn() -> i64,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Civil date from days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

impl Cmos {
    /// `low_mem` is RAM below 4 GiB, `high_mem` RAM above it, in bytes. `nvram` is the content
    /// carried over from the VM this one replaces (a reboot); the memory-size bytes are rewritten.
    pub fn new(low_mem: u64, high_mem: u64, nvram: Option<[u8; CMOS_NVRAM_SIZE]>) -> Self {
        Self::with_clock(low_mem, high_mem, nvram, unix_now)
    }

    fn with_clock(
        low_mem: u64,
        high_mem: u64,
        nvram: Option<[u8; CMOS_NVRAM_SIZE]>,
        now: fn() -> i64,
    ) -> Self {
        let mut data = nvram.unwrap_or([0; CMOS_NVRAM_SIZE]);
        data[REG_STATUS_A as usize] = STATUS_A_DEFAULT;
        data[REG_STATUS_B as usize] = STATUS_B_DEFAULT;
        data[REG_STATUS_D as usize] = STATUS_D_VRT;
        // Base memory (KiB) and extended memory between 1 MiB and 64 MiB (KiB).
        let put16 = |data: &mut [u8; CMOS_NVRAM_SIZE], at: usize, v: u64| {
            let v = v.min(0xffff) as u16;
            data[at] = v as u8;
            data[at + 1] = (v >> 8) as u8;
        };
        put16(&mut data, 0x15, 640);
        let ext = low_mem.saturating_sub(MIB).min(63 * MIB) / KIB;
        put16(&mut data, 0x17, ext);
        put16(&mut data, 0x30, ext);
        // RAM above 16 MiB and below 4 GiB, in 64 KiB units.
        put16(
            &mut data,
            0x34,
            low_mem.saturating_sub(16 * MIB) / (64 * KIB),
        );
        // RAM above 4 GiB, in 64 KiB units, 24 bits.
        let high = (high_mem / (64 * KIB)).min(0xff_ffff);
        data[0x5b] = high as u8;
        data[0x5c] = (high >> 8) as u8;
        data[0x5d] = (high >> 16) as u8;
        Cmos {
            index: 0,
            data,
            now,
        }
    }

    /// The CMOS contents to carry into a rebuilt VM.
    pub fn nvram(&self) -> [u8; CMOS_NVRAM_SIZE] {
        self.data
    }

    fn time_register(&self, reg: u8) -> u8 {
        let t = (self.now)();
        let days = t.div_euclid(86_400);
        let secs = t.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        let value = match reg {
            REG_SECONDS => (secs % 60) as u8,
            REG_MINUTES => (secs / 60 % 60) as u8,
            REG_HOURS => (secs / 3600) as u8,
            // 1 = Sunday; 1970-01-01 was a Thursday.
            REG_WEEKDAY => ((days + 4).rem_euclid(7) + 1) as u8,
            REG_DAY => day as u8,
            REG_MONTH => month as u8,
            REG_YEAR => year.rem_euclid(100) as u8,
            REG_CENTURY => (year / 100) as u8,
            _ => unreachable!("not a time register"),
        };
        let status_b = self.data[REG_STATUS_B as usize];
        let value = if reg == REG_HOURS && status_b & STATUS_B_24H == 0 {
            // 12-hour mode: 1-12 with bit 7 for PM.
            let pm = value >= 12;
            let h = match value % 12 {
                0 => 12,
                h => h,
            };
            let h = if status_b & STATUS_B_BINARY != 0 {
                h
            } else {
                to_bcd(h)
            };
            return h | if pm { 0x80 } else { 0 };
        } else {
            value
        };
        if status_b & STATUS_B_BINARY != 0 {
            value
        } else {
            to_bcd(value)
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            0 => self.index,
            1 => match self.index {
                REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
                | REG_YEAR | REG_CENTURY => self.time_register(self.index),
                // Reading status C clears pending interrupt flags; we raise none.
                REG_STATUS_C => 0,
                i => self.data[i as usize],
            },
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else {
            return;
        };
        match offset {
            // Bit 7 of the index port is the NMI mask on real hardware; we have no NMI source.
            0 => self.index = value & INDEX_MASK,
            1 => match self.index {
                // The clock follows the host; writes to it and to read-only status are dropped.
                REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
                | REG_YEAR | REG_CENTURY | REG_STATUS_C | REG_STATUS_D => {}
                // Update-in-progress (bit 7) is read-only.
                REG_STATUS_A => self.data[REG_STATUS_A as usize] = value & 0x7f,
                i => self.data[i as usize] = *value,
            },
            _ => {}
        }
    }
}

/// The CMOS/RTC's state: the selected register and the 128 bytes of CMOS RAM (NVRAM, the
/// status registers the guest set, such as binary or 12-hour mode in status B, and the memory
/// sizes, which the guest may have overwritten).
///
/// There is no clock here: the time registers read the host's UTC wall clock, and the guest's
/// writes to them are dropped (as in the original), so there is no offset of the guest's to
/// keep. A restored clock reads the host's time at the restore: it goes on from where it was
/// by the time the VM was away, as a battery-backed clock does, and never goes back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmosState {
    /// [`CMOS_STATE_VERSION`] when written.
    pub version: u32,
    /// The register port 0x70 selected (0..=0x7f; the NMI-mask bit is not kept).
    pub index: u8,
    /// CMOS RAM, [`CMOS_NVRAM_SIZE`] bytes.
    pub data: Vec<u8>,
}

impl Stateful for Cmos {
    const NAME: &'static str = "cmos";
    type State = CmosState;

    fn state(&self) -> CmosState {
        CmosState {
            version: CMOS_STATE_VERSION,
            index: self.index,
            data: self.data.to_vec(),
        }
    }

    /// Refuses what the device cannot hold: an index past the RAM, RAM of another size,
    /// update-in-progress set in status A, status D without valid RAM and time.
    fn restore(&mut self, state: &CmosState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, CMOS_STATE_VERSION)?;
        if state.index > INDEX_MASK {
            return Err(invalid(
                Self::NAME,
                format!("register index {:#x} is past the RAM", state.index),
            ));
        }
        let data: [u8; CMOS_NVRAM_SIZE] = state.data.as_slice().try_into().map_err(|_| {
            invalid(
                Self::NAME,
                format!("{} bytes of RAM, not {CMOS_NVRAM_SIZE}", state.data.len()),
            )
        })?;
        let status_a = data[REG_STATUS_A as usize];
        if status_a & !0x7f != 0 {
            return Err(invalid(
                Self::NAME,
                format!("status A {status_a:#04x} has update-in-progress set"),
            ));
        }
        let status_d = data[REG_STATUS_D as usize];
        if status_d != STATUS_D_VRT {
            return Err(invalid(
                Self::NAME,
                format!("status D {status_d:#04x} is not {STATUS_D_VRT:#04x} (valid RAM and time)"),
            ));
        }
        self.index = state.index;
        self.data = data;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{check_refusals, json_round_trip};

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reports_time_in_bcd_and_binary() {
        // 2026-11-24 19:36:19 UTC, a Tuesday.
        let mut c = Cmos::with_clock(256 * MIB, 0, None, || 1_795_548_979);
        assert_eq!(read(&mut c, REG_SECONDS), 0x19);
        assert_eq!(read(&mut c, REG_MINUTES), 0x36);
        assert_eq!(read(&mut c, REG_HOURS), 0x19);
        assert_eq!(read(&mut c, REG_DAY), 0x24);
        assert_eq!(read(&mut c, REG_MONTH), 0x11);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_WEEKDAY), 3);
        c.write(0, &[REG_STATUS_B]);
        c.write(1, &[STATUS_B_BINARY]); // binary, 12-hour
        assert_eq!(read(&mut c, REG_YEAR), 26);
        assert_eq!(read(&mut c, REG_HOURS), 0x80 | 7);
    }

    #[test]
    fn memory_size_registers() {
        let mut c = Cmos::new(3 << 30, 2 << 30, None);
        let low = u16::from_le_bytes([read(&mut c, 0x34), read(&mut c, 0x35)]);
        assert_eq!(u64::from(low), ((3 << 30) - 16 * MIB) / (64 * KIB));
        let high = u32::from_le_bytes([
            read(&mut c, 0x5b),
            read(&mut c, 0x5c),
            read(&mut c, 0x5d),
            0,
        ]);
        assert_eq!(u64::from(high), (2 << 30) / (64 * KIB));
    }

    #[test]
    fn nvram_survives_a_rebuild_and_time_is_read_only() {
        let mut c = Cmos::new(256 * MIB, 0, None);
        c.write(0, &[0x50 | 0x80]);
        c.write(1, &[0xa5]);
        c.write(0, &[REG_SECONDS]);
        c.write(1, &[0x99]);
        let mut c2 = Cmos::new(256 * MIB, 0, Some(c.nvram()));
        assert_eq!(read(&mut c2, 0x50), 0xa5);
        assert_ne!(read(&mut c2, REG_SECONDS), 0x99);
        assert_eq!(read(&mut c2, REG_STATUS_D), STATUS_D_VRT);
        // Out-of-range and wide accesses are harmless.
        c2.write(7, &[1]);
        c2.write(1, &[1, 2]);
        let mut wide = [0u8; 4];
        c2.read(1, &mut wide);
        assert_eq!(wide, [0xff; 4]);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    /// 2026-11-24 19:36:19 UTC.
    const T0: i64 = 1_795_548_979;

    /// A guest sets binary 12-hour mode, a rate in status A, NVRAM bytes and an index: the
    /// restored device reads the same at every register, and its clock is the host's at the
    /// restore (later, never earlier).
    #[test]
    fn state_round_trip() {
        let mut c = Cmos::with_clock(256 * MIB, 0, None, || T0);
        c.write(0, &[REG_STATUS_B]);
        c.write(1, &[STATUS_B_BINARY]);
        c.write(0, &[REG_STATUS_A]);
        c.write(1, &[0x2f]);
        c.write(0, &[0x50]);
        c.write(1, &[0xa5]);
        c.write(0, &[0x7f]);
        c.write(1, &[0x5a]);
        c.write(0, &[0x17]);
        c.write(1, &[0x12]); // the guest may overwrite a memory size
        c.write(0, &[0x80 | REG_HOURS]); // the NMI-mask bit is dropped
        let state = json_round_trip(&c);
        assert_eq!(state.index, REG_HOURS);

        let mut fresh = Cmos::with_clock(256 * MIB, 0, None, || T0);
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), state);
        assert_eq!(fresh.nvram(), c.nvram());
        // The selected register first, as the guest would read it without selecting again.
        for port in [0, 1] {
            let (mut a, mut b) = ([0u8], [0u8]);
            c.read(port, &mut a);
            fresh.read(port, &mut b);
            assert_eq!(a, b, "port {port}");
        }
        for reg in 0..=INDEX_MASK {
            assert_eq!(
                read(&mut fresh, reg),
                read(&mut c, reg),
                "register {reg:#x}"
            );
        }
        assert_eq!(read(&mut fresh, REG_HOURS), 0x80 | 7, "binary, 12-hour");

        // Restored an hour and a minute later: the clock reads then, in the guest's format.
        let mut later = Cmos::with_clock(256 * MIB, 0, None, || T0 + 3660);
        later.restore(&state).unwrap();
        assert_eq!(read(&mut later, REG_HOURS), 0x80 | 8);
        assert_eq!(read(&mut later, REG_MINUTES), 37);
        assert_eq!(read(&mut later, REG_SECONDS), 19);
        assert_eq!(read(&mut later, 0x50), 0xa5);
    }

    #[test]
    fn refuses_states_it_cannot_hold() {
        let mut c = Cmos::with_clock(256 * MIB, 0, None, || T0);
        c.write(0, &[0x50]);
        c.write(1, &[0xa5]);
        let good = c.state();
        let mut bad = Vec::new();
        bad.push(CmosState {
            index: 0x80,
            ..good.clone()
        });
        bad.push(CmosState {
            index: 0xff,
            ..good.clone()
        });
        for len in [0, 127, 129, 4096] {
            let mut data = good.data.clone();
            data.resize(len, 0);
            bad.push(CmosState {
                data,
                ..good.clone()
            });
        }
        let mut data = good.data.clone();
        data[REG_STATUS_A as usize] |= 0x80;
        bad.push(CmosState {
            data,
            ..good.clone()
        });
        let mut data = good.data.clone();
        data[REG_STATUS_D as usize] = 0;
        bad.push(CmosState {
            data,
            ..good.clone()
        });
        for s in bad {
            let e = c.restore(&s).unwrap_err();
            assert!(
                matches!(e, StateError::Invalid { device: "cmos", .. }),
                "{e}"
            );
            assert_eq!(c.state(), good);
        }
        check_refusals(&mut c);
    }
}
