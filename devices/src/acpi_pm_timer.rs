//! The ACPI power-management timer: a free-running counter at 3.579545 MHz in one 4-byte I/O
//! register, published by the FADT (`X_PM_TMR_BLK`, `TMR_VAL_EXT`: 32 bits). As in the
//! original, it counts from the device's creation on the host's monotonic clock and wraps at
//! 2^32; the original's edk2 firmware spins on it for every delay. A restored timer counts on
//! from the value it was saved with.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::state::check_version;
use crate::{BusDevice, StateError, Stateful};

/// The ACPI PM timer's rate.
pub const PM_TIMER_FREQUENCY_HZ: u64 = 3_579_545;

/// The `PmTimerState` layout this build writes and the only one it restores.
pub const PM_TIMER_STATE_VERSION: u32 = 1;

const NANOS_PER_SECOND: u128 = 1_000_000_000;

pub struct AcpiPmTimer {
    /// When the count from `base` began.
    start: Instant,
    /// The counter at `start`: 0 for a new timer, the saved value for a restored one.
    base: u32,
}

/// The PM timer's state: the counter when it was saved.
///
/// The timer runs on the host's monotonic clock, which means nothing in another process or on
/// another host, so the state is the counter value itself: a restored timer counts on from it
/// at the restore, and the guest sees no jump, forwards or backwards, for the time the VM was
/// away (as the kvmclock, restored to its saved value, does not).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PmTimerState {
    /// [`PM_TIMER_STATE_VERSION`] when written.
    pub version: u32,
    /// The 32-bit counter at the save.
    pub counter: u32,
}

impl AcpiPmTimer {
    pub fn new() -> Self {
        AcpiPmTimer {
            start: Instant::now(),
            base: 0,
        }
    }

    /// The counter `elapsed` after the timer started: whole ticks of 3.579545 MHz, modulo
    /// 2^32. No overflow: `u64::MAX` seconds of nanoseconds times the rate fits a `u128`.
    pub fn counter_at(elapsed: Duration) -> u32 {
        let ticks = elapsed.as_nanos() * u128::from(PM_TIMER_FREQUENCY_HZ) / NANOS_PER_SECOND;
        ticks as u32
    }

    /// The counter now.
    pub fn counter(&self) -> u32 {
        self.base
            .wrapping_add(Self::counter_at(self.start.elapsed()))
    }

    /// Fills `data` as a read at `offset` of the register holding `counter` (little endian):
    /// byte `offset + i` of the register, 0 past its 4 bytes. A 4-byte read at offset 0 is the
    /// counter, as in the original; narrower or unaligned reads (which the original leaves
    /// unanswered) get the bytes they cover.
    fn fill(counter: u32, offset: u64, data: &mut [u8]) {
        let value = counter.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| value.get(at))
                .copied()
                .unwrap_or(0);
        }
    }
}

impl Default for AcpiPmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for AcpiPmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        Self::fill(self.counter(), offset, data);
    }

    /// The counter is read-only.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

impl Stateful for AcpiPmTimer {
    const NAME: &'static str = "acpi-pm-timer";
    type State = PmTimerState;

    fn state(&self) -> PmTimerState {
        PmTimerState {
            version: PM_TIMER_STATE_VERSION,
            counter: self.counter(),
        }
    }

    /// Any counter value is one the timer can hold.
    fn restore(&mut self, state: &PmTimerState) -> Result<(), StateError> {
        check_version(Self::NAME, state.version, PM_TIMER_STATE_VERSION)?;
        self.start = Instant::now();
        self.base = state.counter;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::test_util::{check_refusals_with, json_round_trip};
    use crate::Bus;

    fn read32(t: &mut AcpiPmTimer) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn counts_at_3_579545_mhz() {
        assert_eq!(AcpiPmTimer::counter_at(Duration::ZERO), 0);
        assert_eq!(AcpiPmTimer::counter_at(Duration::from_nanos(279)), 0);
        // One tick is 279.365 ns.
        assert_eq!(AcpiPmTimer::counter_at(Duration::from_nanos(280)), 1);
        assert_eq!(AcpiPmTimer::counter_at(Duration::from_millis(1)), 3579);
        assert_eq!(AcpiPmTimer::counter_at(Duration::from_secs(1)), 3_579_545);
        assert_eq!(
            AcpiPmTimer::counter_at(Duration::from_secs(100)),
            357_954_500
        );
    }

    #[test]
    fn wraps_at_32_bits() {
        // 2^32 ticks are 1199.86 s: the last value before the wrap, then 0.
        let wrap_ns = ((1u128 << 32) * NANOS_PER_SECOND).div_ceil(PM_TIMER_FREQUENCY_HZ.into());
        let wrap = Duration::from_nanos(wrap_ns as u64);
        assert_eq!(
            AcpiPmTimer::counter_at(wrap - Duration::from_nanos(1)),
            u32::MAX
        );
        assert_eq!(AcpiPmTimer::counter_at(wrap), 0);
        // 1200 s: 4_295_454_000 ticks, modulo 2^32.
        assert_eq!(
            AcpiPmTimer::counter_at(Duration::from_secs(1200)),
            4_295_454_000u64.wrapping_sub(1 << 32) as u32
        );
        // Far beyond: no overflow, still the low 32 bits.
        let long = Duration::from_secs(u64::MAX);
        let want = u128::from(u64::MAX) * u128::from(PM_TIMER_FREQUENCY_HZ);
        assert_eq!(AcpiPmTimer::counter_at(long), want as u32);
        let _ = AcpiPmTimer::counter_at(Duration::MAX);
    }

    /// Reads around a sleep: the ticks counted lie between the rate times the time certainly
    /// inside the two reads and the time certainly around them (the host's monotonic clock
    /// on both sides, so this holds however the test threads are scheduled).
    #[test]
    fn advances_with_the_monotonic_clock() {
        let mut t = AcpiPmTimer::new();
        let before_first = Instant::now();
        let first = read32(&mut t);
        let after_first = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let before_second = Instant::now();
        let second = read32(&mut t);
        let after_second = Instant::now();
        let ticks = second.wrapping_sub(first);
        let least = AcpiPmTimer::counter_at(before_second - after_first);
        let most = AcpiPmTimer::counter_at(after_second - before_first);
        assert!(
            least.saturating_sub(1) <= ticks && ticks <= most + 1,
            "{ticks} ticks, expected {least}..={most}"
        );
        // 30 ms at 3.579545 MHz.
        assert!(ticks >= 107_386 - 1, "{ticks} ticks in at least 30 ms");
    }

    #[test]
    fn narrow_and_odd_reads_get_the_bytes_they_cover() {
        let c = 0x1234_5678;
        let mut b1 = [0xffu8; 1];
        AcpiPmTimer::fill(c, 0, &mut b1);
        assert_eq!(b1, [0x78]);
        AcpiPmTimer::fill(c, 3, &mut b1);
        assert_eq!(b1, [0x12]);
        let mut b2 = [0xffu8; 2];
        AcpiPmTimer::fill(c, 0, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 0x5678);
        AcpiPmTimer::fill(c, 2, &mut b2);
        assert_eq!(u16::from_le_bytes(b2), 0x1234);
        // Past the register: zeros, whatever the offset or length.
        AcpiPmTimer::fill(c, 3, &mut b2);
        assert_eq!(b2, [0x12, 0]);
        let mut b4 = [0xffu8; 4];
        AcpiPmTimer::fill(c, 1, &mut b4);
        assert_eq!(b4, [0x56, 0x34, 0x12, 0]);
        for offset in [4, 0x1000, u64::MAX] {
            AcpiPmTimer::fill(c, offset, &mut b4);
            assert_eq!(b4, [0; 4], "offset {offset:#x}");
        }
        let mut wide = [0xffu8; 16];
        AcpiPmTimer::fill(c, 0, &mut wide);
        assert_eq!(&wide[..4], &c.to_le_bytes());
        assert!(wide[4..].iter().all(|&b| b == 0));
        AcpiPmTimer::fill(c, 0, &mut []);
    }

    /// Through the bus, as a vCPU reaches it: 1, 2 and 4-byte reads of a running counter
    /// agree with each other, and writes change nothing.
    #[test]
    fn bus_reads_of_every_width_and_writes_ignored() {
        let bus = Bus::new();
        let timer = Arc::new(Mutex::new(AcpiPmTimer::new()));
        bus.insert(timer, 0x608, 4).unwrap();
        let read = |port: u64, len: usize| {
            let mut b = [0u8; 4];
            assert!(bus.read(port, &mut b[..len]));
            u32::from_le_bytes(b)
        };
        let before = read(0x608, 4);
        let low = read(0x608, 2);
        let byte = read(0x608, 1);
        let high = read(0x60a, 2);
        let after = read(0x608, 4);
        // The counter only moves forwards (no 32-bit wrap within this test: it started at 0);
        // each narrow read saw the counter somewhere between the two wide ones.
        assert!(before <= after);
        let span = after - before;
        assert!(u32::from((low as u16).wrapping_sub(before as u16)) <= span);
        assert!(u32::from((byte as u8).wrapping_sub(before as u8)) <= span);
        assert!(((before >> 16)..=(after >> 16)).contains(&high));
        for data in [&[0u8; 4][..], &[0xff], &[1, 2]] {
            assert!(bus.write(0x608, data));
        }
        assert!(read(0x608, 4) >= after, "writes do not reset the counter");
    }

    /// Saved after 20 ms, kept 50 ms, restored into a new timer on the bus: the guest's next
    /// read is the saved count plus only the time since the restore (not the 50 ms away, and
    /// not a restart from 0).
    #[test]
    fn a_restored_timer_counts_on_from_the_saved_value() {
        let bus = Bus::new();
        let timer = Arc::new(Mutex::new(AcpiPmTimer::new()));
        bus.insert(timer.clone(), 0x608, 4).unwrap();
        let read = |bus: &Bus| {
            let mut b = [0u8; 4];
            assert!(bus.read(0x608, &mut b));
            u32::from_le_bytes(b)
        };
        std::thread::sleep(Duration::from_millis(20));
        let before_save = read(&bus);
        let state = json_round_trip(&*timer.lock().unwrap());
        let after_save = read(&bus);
        assert!(before_save <= state.counter && state.counter <= after_save);
        assert!(state.counter >= AcpiPmTimer::counter_at(Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(50));

        let restored_bus = Bus::new();
        let fresh = Arc::new(Mutex::new(AcpiPmTimer::new()));
        restored_bus.insert(fresh.clone(), 0x608, 4).unwrap();
        let before_restore = Instant::now();
        fresh.lock().unwrap().restore(&state).unwrap();
        let first = read(&restored_bus);
        let most = AcpiPmTimer::counter_at(before_restore.elapsed());
        let moved = first.wrapping_sub(state.counter);
        assert!(
            moved <= most + 1,
            "{moved} ticks after the restore, at most {most} expected"
        );
        // Counting on at the rate.
        std::thread::sleep(Duration::from_millis(10));
        let second = read(&restored_bus);
        assert!(second.wrapping_sub(first) >= AcpiPmTimer::counter_at(Duration::from_millis(10)));
    }

    /// A counter saved just short of 2^32 wraps to 0 and on, as it would have.
    #[test]
    fn a_restored_timer_wraps_at_32_bits() {
        let mut t = AcpiPmTimer::new();
        let near = u32::MAX - 100;
        t.restore(&PmTimerState {
            version: PM_TIMER_STATE_VERSION,
            counter: near,
        })
        .unwrap();
        let first = read32(&mut t);
        assert!(first >= near || first < 1 << 24, "{first:#x}");
        // 101 ticks are 28.2 us.
        std::thread::sleep(Duration::from_millis(1));
        let c = read32(&mut t);
        assert!(c < 1 << 24, "wrapped: {c:#x}");
        assert_eq!(t.state().counter.wrapping_sub(near) >> 24, 0);
        // Refused states leave it counting on from where it was (within a second).
        check_refusals_with(&mut t, |before, now| {
            now.version == before.version
                && now.counter.wrapping_sub(before.counter) < PM_TIMER_FREQUENCY_HZ as u32
        });
    }
}
