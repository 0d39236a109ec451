#!/bin/bash
# Fuzz the block crate's image parsers (block::fuzz::{fuzz_qcow2, fuzz_vhdx,
# fuzz_vhd}) with libFuzzer for a bounded time per target.
#
# Usage: block/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#   SECONDS_PER_TARGET  default 60; targets default to: qcow2 vhdx vhd
# Environment:
#   FUZZ_SANITIZER  address (default) or none
#   FUZZ_WORK       where new inputs are kept between runs, relative to
#                   block/fuzz (default target/corpus); the committed seeds
#                   in block/fuzz/corpus are read, never written
#
# Works on a stable toolchain: cargo-fuzz passes nightly-only rustc flags
# (-Zsanitizer=address, the sancov passes), which RUSTC_BOOTSTRAP=1 accepts;
# stable ships the sanitizer runtimes. Needs cargo-fuzz (installed from
# crates.io when missing) and a C++ compiler (libfuzzer-sys builds libFuzzer
# from source). Targets are built optimized with debug assertions and
# overflow checks (cargo-fuzz's default); the first build takes a minute or
# two.
#
# Exit status: 0 when every target ran its full time without a finding;
# 1 when any target found a crash (panic, overflow, sanitizer report), leak,
# timeout (-timeout, seconds per input) or out-of-memory (-rss_limit_mb,
# -malloc_limit_mb); the others still run. The input is written to
# block/fuzz/artifacts/TARGET/; replay it with
#   (cd block/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET artifacts/TARGET/FILE)
# 2: a tool is missing or the arguments are wrong.
set -uo pipefail

SECS=${1:-60}
shift || true
if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    TARGETS=(qcow2 vhdx vhd)
fi
SANITIZER=${FUZZ_SANITIZER:-address}

cd "$(dirname "$0")" || exit 2
WORK=${FUZZ_WORK:-target/corpus}

case "$SECS" in
'' | *[!0-9]*)
    echo "run.sh: SECONDS_PER_TARGET must be a number, got '$SECS'" >&2
    exit 2
    ;;
esac

# cargo-fuzz passes -Zsanitizer=... and -Cpasses=sancov-module; on a stable
# rustc these need RUSTC_BOOTSTRAP. Harmless on nightly.
export RUSTC_BOOTSTRAP=1

if ! command -v "${CXX:-c++}" >/dev/null 2>&1; then
    echo "run.sh: no C++ compiler (${CXX:-c++}); libfuzzer-sys needs one:" \
        "apt-get install g++" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: cargo-fuzz missing; installing it from crates.io" >&2
    if ! cargo install cargo-fuzz --locked --version '^0.13'; then
        echo "run.sh: could not install cargo-fuzz; run: cargo install cargo-fuzz" >&2
        exit 2
    fi
fi

# Largest input libFuzzer generates, per target. qcow2 seeds are images
# with 512-byte clusters (a few KiB); vhdx inputs are sparse descriptions
# of an image (see block::fuzz::fuzz_vhdx); vhd inputs are a footer with
# some data in front.
max_len() {
    case "$1" in
    qcow2) echo 65536 ;;
    vhdx) echo 32768 ;;
    *) echo 8192 ;;
    esac
}

failed=()
for t in "${TARGETS[@]}"; do
    if [ ! -d "corpus/$t" ]; then
        echo "run.sh: unknown target '$t' (no corpus/$t)" >&2
        exit 2
    fi
    mkdir -p "$WORK/$t" "artifacts/$t"
    echo "=== fuzz $t for ${SECS}s (sanitizer $SANITIZER)" >&2
    # The first corpus directory receives new inputs; the committed seeds
    # are only read. -timeout: seconds one input may take. -rss_limit_mb and
    # -malloc_limit_mb: a hostile image must not make us allocate without
    # bound. Leak detection is on with ASan.
    if ! cargo fuzz run -s "$SANITIZER" "$t" "$WORK/$t" "corpus/$t" -- \
        -max_total_time="$SECS" -max_len="$(max_len "$t")" -timeout=10 \
        -rss_limit_mb=1024 -malloc_limit_mb=1024 -print_final_stats=1; then
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "run.sh: FAILED: ${failed[*]} (reproducers in block/fuzz/artifacts/)" >&2
    exit 1
fi
echo "run.sh: all targets ran ${SECS}s without findings: ${TARGETS[*]}" >&2
