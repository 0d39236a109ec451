// Copyright 2025 The cloud-hypervisor authors.
// SPDX-License-Identifier: Apache-2.0

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    block::fuzz::fuzz_vhd(data);
});
