//! CMOS/RTC access through ports 0x70 (index) / 0x71 (data).

use crate::svc;

pub fn read(index: u8) -> u8 {
    svc::outb(0x70, index & 0x7f);
    svc::inb(0x71)
}

pub fn write(index: u8, value: u8) {
    svc::outb(0x70, index & 0x7f);
    svc::outb(0x71, value);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Time {
    pub year: u32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

fn bcd(v: u8) -> Option<u8> {
    ((v >> 4) < 10 && (v & 0xf) < 10).then_some((v >> 4) * 10 + (v & 0xf))
}

fn read_raw() -> [u8; 7] {
    [
        read(0x00),
        read(0x02),
        read(0x04),
        read(0x07),
        read(0x08),
        read(0x09),
        read(0x32),
    ]
}

/// Reads the RTC (waiting out an update in progress); None if a field is not valid BCD.
pub fn read_time() -> Option<Time> {
    let mut raw = [0u8; 7];
    for _ in 0..10 {
        let mut spins = 0;
        while read(0x0a) & 0x80 != 0 && spins < 10_000 {
            spins += 1;
        }
        raw = read_raw();
        if raw == read_raw() {
            break;
        }
    }
    let status_b = read(0x0b);
    let binary = status_b & 0x04 != 0;
    let h24 = status_b & 0x02 != 0;
    let conv = |v: u8| if binary { Some(v) } else { bcd(v) };
    let pm = !h24 && raw[2] & 0x80 != 0;
    let mut hour = conv(raw[2] & 0x7f)?;
    if !h24 {
        hour %= 12;
        if pm {
            hour += 12;
        }
    }
    let century = conv(raw[6]).filter(|c| (19..=30).contains(c)).unwrap_or(20);
    Some(Time {
        second: conv(raw[0])?,
        minute: conv(raw[1])?,
        hour,
        day: conv(raw[3])?,
        month: conv(raw[4])?,
        year: u32::from(century) * 100 + u32::from(conv(raw[5])?),
    })
}
