//! `test=debugcon`: the debug console (`--debug-console`), an I/O port (`debugcon_port=`, hex,
//! 0xe9 by default) that reads back its own low byte and sends every byte written to it to the
//! host. The guest checks the read, writes `DEBUGCON hello <port>` and a newline one `outb` at
//! a time, and the host test finds that line in the console's file.

use crate::bootinfo::BootInfo;
use crate::{check, fail, parse_hex, pass, println, svc};

pub fn scenario_debugcon(boot: &BootInfo) {
    let port = match boot.arg("debugcon_port").map(parse_hex) {
        None => 0xe9,
        Some(Some(p)) if p <= 0xffff => p as u16,
        Some(_) => {
            fail(
                "debugcon-port",
                format_args!("debugcon_port= wants hex up to ffff"),
            );
            return;
        }
    };
    let got = svc::inb(port);
    check!(
        "debugcon-read",
        got == port as u8,
        "port {port:#x} reads {got:#x}, want its low byte {:#x}",
        port as u8
    );
    let line = alloc::format!("DEBUGCON hello {port:#x}\n");
    for b in line.bytes() {
        svc::outb(port, b);
    }
    println!("DEBUGCON wrote {} bytes to port {port:#x}", line.len());
}
