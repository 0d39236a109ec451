#!/bin/bash
# Fuzz the block crate's image parsers (block::fuzz::{fuzz_qcow2, fuzz_vhdx, fuzz_vhd}) with
# libFuzzer for a bounded time per target (scripts/fuzz-run says how; exit status 0: no
# finding, 1: a finding, reproducer in block/fuzz/artifacts/TARGET/, 2: a tool is missing).
#
# Usage: block/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60; targets default to: qcow2 vhdx vhd
#
# Largest input per target: qcow2 seeds are images with 512-byte clusters (a few KiB); vhdx
# inputs are sparse descriptions of an image (see block::fuzz::fuzz_vhdx); vhd inputs are a
# footer with some data in front.
here=$(dirname "$0")
exec "$here/../../scripts/fuzz-run" "$here" "qcow2:65536 vhdx:32768 vhd:8192" "${1:-60}" "${@:2}"
