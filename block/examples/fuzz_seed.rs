// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

//! Turn a vhdx image into a seed for the `vhdx` fuzz target (see
//! `block::fuzz::vhdx_fuzz_input`):
//!
//! `cargo run -p block --example fuzz_seed -- IN.vhdx OUT [--dirty-log]`
//!
//! `--dirty-log` first puts a log entry (rewriting the first BAT sector with
//! its first entry marked zero) in the image's log and sets the log GUID in
//! both headers, so that opening the seed replays the log.

use block::fuzz::{vhdx_fuzz_input, VHDX_FIX_HEADERS, VHDX_FIX_LOG, VHDX_FIX_REGIONS};
use block::vhdx::header::{
    parse_regions, VhdxHeader, HEADER1_OFFSET, HEADER2_OFFSET, HEADER_SIZE, REGION1_OFFSET,
    REGION_SIZE,
};
use block::vhdx::log::{build_entry, Descriptor};
use block::vhdx::PAYLOAD_ZERO;

fn dirty_log(image: &mut [u8]) -> Result<(), String> {
    let at = |o: u64| VhdxHeader::parse(&image[o as usize..o as usize + HEADER_SIZE]);
    let (_, mut h) =
        VhdxHeader::current(at(HEADER1_OFFSET), at(HEADER2_OFFSET)).map_err(|e| e.to_string())?;
    let r = REGION1_OFFSET as usize;
    let regions = parse_regions(&image[r..r + REGION_SIZE]).map_err(|e| e.to_string())?;
    let bat = regions.bat_offset as usize;
    let mut data = Box::new([0u8; 4096]);
    data.copy_from_slice(&image[bat..bat + 4096]);
    data[..8].copy_from_slice(&PAYLOAD_ZERO.to_le_bytes());
    let guid = [0x5a; 16];
    let entry = build_entry(
        &guid,
        1,
        0,
        image.len() as u64,
        &[Descriptor::Data {
            file_offset: bat as u64,
            data,
        }],
    );
    let log = h.log_offset as usize;
    if entry.len() > h.log_length as usize {
        return Err("log too small".into());
    }
    image[log..log + entry.len()].copy_from_slice(&entry);
    h.log_guid = guid;
    for off in [HEADER1_OFFSET, HEADER2_OFFSET] {
        h.sequence += 1;
        let o = off as usize;
        image[o..o + HEADER_SIZE].copy_from_slice(&h.serialize());
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: fuzz_seed IN.vhdx OUT [--dirty-log]");
        std::process::exit(2);
    }
    let mut image = std::fs::read(&args[0]).unwrap_or_else(|e| {
        eprintln!("fuzz_seed: {}: {e}", args[0]);
        std::process::exit(1)
    });
    if args.get(2).map(String::as_str) == Some("--dirty-log") {
        if let Err(e) = dirty_log(&mut image) {
            eprintln!("fuzz_seed: {}: {e}", args[0]);
            std::process::exit(1);
        }
    }
    let seed = vhdx_fuzz_input(&image, VHDX_FIX_HEADERS | VHDX_FIX_REGIONS | VHDX_FIX_LOG);
    if let Err(e) = std::fs::write(&args[1], seed) {
        eprintln!("fuzz_seed: {}: {e}", args[1]);
        std::process::exit(1);
    }
}
