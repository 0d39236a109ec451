#!/bin/bash
# Run each fuzz target for a bounded time (default 60 s each).
# Needs a nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
# Without them, the same entry points run as a bounded mutation test in
# `cargo test -p block --test hostile`.
set -euo pipefail
SECS=${1:-60}
cd "$(dirname "$0")"
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz on nightly not found; run: rustup toolchain install nightly && cargo install cargo-fuzz" >&2
    exit 1
fi
# vhdx seeds are 8 MiB of mostly zeroes: generate rather than commit them.
if command -v qemu-img >/dev/null && [ -z "$(ls corpus/vhdx 2>/dev/null)" ]; then
    qemu-img create -q -f vhdx -o subformat=dynamic,block_size=1M,log_size=1M corpus/vhdx/dynamic.vhdx 2M
    qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M,log_size=1M corpus/vhdx/fixed.vhdx 1M
fi
for t in qcow2 vhdx vhd; do
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$SECS" -max_len=9437184 -rss_limit_mb=1024
done
