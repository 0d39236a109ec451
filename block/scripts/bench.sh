#!/bin/bash
# Compare bench-block (io_uring path) with `qemu-img bench` on the same files,
# same access pattern, same queue depth, O_DIRECT (-t none; qemu with -n,
# Linux native AIO). Each case runs REPS times, the two tools alternating
# (and swapping which goes first), after one untimed warm-up run of each;
# the medians are printed, and the median (range) of the per-repetition
# ratios ours/qemu; also the median CPU time (user + system) per request of each tool, which
# shows the cost where both are bound by the disk.
# Usage: block/scripts/bench.sh [DIR] [SIZE] [REPS] [CASE-FILTER]
#   (default DIR=/tmp/bench-block, SIZE=1G, REPS=5, filter = all cases)
# BENCH_BIN=path uses that bench-block instead of building one; BASE_BIN=path
# adds a third column for another bench-block build (A/B of a change), run
# in the same alternation. OURS_FLAGS / BASE_FLAGS: extra bench-block
# options (default "--one-buffer" for ours: every request from one buffer,
# as qemu-img bench does; none for the base, older builds lack it).
set -euo pipefail
DIR=${1:-/tmp/bench-block}
SIZE=${2:-1G}
REPS=${3:-5}
FILTER=${4:-}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
command -v qemu-img >/dev/null || { echo "qemu-img missing (apt-get install qemu-utils)"; exit 1; }
if [ -z "${BENCH_BIN:-}" ]; then
    cargo build --release -q -p block --bin bench-block --manifest-path "$ROOT/Cargo.toml"
fi
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-block}
mkdir -p "$DIR"
if [ ! -f "$DIR/ref.raw" ] || [ ! -f "$DIR/ref.qcow2" ]; then
    qemu-img create -q -f raw "$DIR/ref.raw" "$SIZE"
    # Fully allocate so both tools measure the same I/O, not allocation.
    dd if=/dev/urandom of="$DIR/ref.raw" bs=1M count=$(( $(stat -c %s "$DIR/ref.raw") >> 20 )) conv=notrunc status=none
    qemu-img convert -f raw -O qcow2 "$DIR/ref.raw" "$DIR/ref.qcow2"
fi
if [ ! -f "$DIR/comp.qcow2" ]; then
    # Compressible data that differs everywhere (numbered 16-byte lines),
    # stored compressed (zlib) as cloud images are.
    seq -f '%015g' 1 $(( $(stat -c %s "$DIR/ref.raw") / 16 )) > "$DIR/comp.raw"
    qemu-img convert -c -f raw -O qcow2 "$DIR/comp.raw" "$DIR/comp.qcow2"
    rm -f "$DIR/comp.raw"
fi
# Writes carry the same data in both tools (byte 0, qemu-img bench's
# default --pattern), from the same amount of memory: qemu-img bench (7.2)
# allocates one buffer per request slot but passes the first to every
# request, so ours runs with --one-buffer.
# qemu-img bench has no random mode: the 4 KiB cases use a large prime
# stride (1021 x 4 KiB), offset = i * step mod size, in both tools.
RAND_STEP=$((4096 * 1021))

OURS_FLAGS=${OURS_FLAGS---one-buffer}
BASE_FLAGS=${BASE_FLAGS-}
ours() { { "$BIN" -f "$1" -d 64 -t none $OURS_FLAGS $2 "$3" || echo "?"; } | awk '{print $1}'; }
base() { { "$BASE_BIN" -f "$1" -d 64 -t none $BASE_FLAGS $2 "$3" || echo "?"; } | awk '{print $1}'; }
BASE_BIN=${BASE_BIN:-}
qemu() {
    local count t out
    count=$(echo "$2" | awk '{print $2}')
    out=$(qemu-img bench -f "$1" -d 64 -t none -n $2 "$3" 2>&1) || { echo "qemu-img bench: $out" >&2; }
    t=$(echo "$out" | awk '/Run completed/ {for(i=1;i<=NF;i++) if($i=="in") t=$(i+1)} END {print t}')
    # qemu prints the elapsed time; turn it into requests/s.
    awk -v n="$count" -v t="$t" 'BEGIN { if (t > 0) printf "%.0f", n / t; else print "?" }'
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.0f\n", (a[NR/2]+a[NR/2+1])/2}'; }
# Per-repetition ratios ours/qemu (the two runs of a repetition are adjacent
# in time, so slow drifts of the machine cancel): "median (min-max)".
paired() {
    paste -d' ' <(printf "%s\n" "${o[@]}") <(printf "%s\n" "${q[@]}") |
        awk '$3 > 0 {printf "%.3f\n", $1 / $3}' | sort -n |
        awk '{a[NR]=$1} END {if (!NR) {print "?"; exit}
             m = (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2
             printf "%.3f (%.2f-%.2f)", m, a[1], a[NR]}'
}

# Prints "REQUESTS/S CPU-SECONDS": the tool's rate and the CPU time (user + system) it used.
# `times` runs in this shell (redirected, not in a pipe or $(...), which would be subshells
# without these children).
run_one() { # tool fmt args img fresh
    local rate
    if [ "$5" = 1 ]; then
        rm -f "$4"
        qemu-img create -q -f "$2" "$4" "$SIZE"
    elif [ "$5" = 2 ]; then
        rm -f "$4"
        qemu-img create -q -f qcow2 -b "$DIR/ref.raw" -F raw "$4"
    elif [ "$5" = 3 ]; then
        rm -f "$4"
        qemu-img create -q -f qcow2 -b "$DIR/comp.qcow2" -F qcow2 "$4"
    fi
    times > "$DIR/.times0"
    rate=$("$1" "$2" "$3" "$4")
    times > "$DIR/.times1"
    echo "$rate $(awk 'FNR == 2 {
            t = 0
            for (i = 1; i <= NF; i++) { split($i, p, "m"); sub("s", "", p[2]); t += p[1] * 60 + p[2] }
            c[++k] = t
        } END { printf "%.3f", c[2] - c[1] }' "$DIR/.times0" "$DIR/.times1")"
}
rates() { printf "%s\n" "$@" | awk '{print $1}' | xargs; }
# Median CPU microseconds per request over runs of COUNT requests: cpu_us COUNT RUN...
cpu_us() {
    local n=$1
    shift
    printf "%s\n" "$@" | awk -v n="$n" '{printf "%.2f\n", $2 / n * 1e6}' | sort -n |
        awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'
}

if [ -n "$BASE_BIN" ]; then
    printf "%-6s %-20s %11s %11s %11s %7s  %-20s %-17s %s\n" format case "base req/s" "ours req/s" "qemu req/s" ratio "paired ratio" "CPU us/req (b/o/q)" "runs (base/ours/qemu)"
else
    printf "%-6s %-20s %11s %11s %7s  %-20s %-15s %s\n" format case "ours req/s" "qemu req/s" ratio "paired ratio" "CPU us/req (o/q)" "runs (ours/qemu)"
fi
# name:formats:fresh:args. "fresh" cases start every run on a new, empty
# image (allocating writes); COUNT x 64 KiB = 1 GiB fills it exactly once.
# Format "overlay" is a new qcow2 over ref.raw for every run (fresh = 2), as
# a VM booted from a cloud image writes to: reads of clusters it has not
# written come from the backing file, 4 KiB writes copy the rest of their
# 64 KiB cluster from it. Format "compressed" is the same over comp.qcow2,
# whose clusters are all compressed (fresh = 3).
CASES=(
    "4k-scattered-read:raw qcow2:0:-c 100000 -s 4k -S $RAND_STEP"
    "4k-scattered-write:raw qcow2:0:-c 100000 -s 4k -S $RAND_STEP -w"
    "64k-seq-read:raw qcow2:0:-c 20000 -s 64k"
    "64k-seq-write:raw qcow2:0:-c 20000 -s 64k -w"
    "64k-alloc-write:qcow2:1:-c $(( $(stat -c %s "$DIR/ref.raw") >> 16 )) -s 64k -w"
    "4k-scattered-read:overlay:2:-c 100000 -s 4k -S $RAND_STEP"
    "4k-scattered-write:overlay:2:-c 20000 -s 4k -S $RAND_STEP -w"
    "64k-seq-read:overlay:2:-c 20000 -s 64k"
    "4k-scattered-read:compressed:3:-c 50000 -s 4k -S $RAND_STEP"
    "64k-seq-read:compressed:3:-c 20000 -s 64k"
)
for fmt in raw qcow2 overlay compressed; do
    for c in "${CASES[@]}"; do
        IFS=: read -r name fmts fresh args <<< "$c"
        [[ " $fmts " == *" $fmt "* ]] || continue
        [[ -n "$FILTER" && "$fmt-$name" != *$FILTER* ]] && continue
        img="$DIR/ref.$fmt"
        [ "$fresh" = 1 ] && img="$DIR/fresh.$fmt"
        tfmt=$fmt
        if [ "$fresh" -ge 2 ]; then
            img="$DIR/overlay.qcow2"
            tfmt=qcow2
        fi
        run_one ours "$tfmt" "$args" "$img" "$fresh" >/dev/null
        run_one qemu "$tfmt" "$args" "$img" "$fresh" >/dev/null
        o=(); q=(); b=()
        for ((r = 0; r < REPS; r++)); do
            [ -n "$BASE_BIN" ] && b+=("$(run_one base "$tfmt" "$args" "$img" "$fresh")")
            if (( r % 2 == 0 )); then
                o+=("$(run_one ours "$tfmt" "$args" "$img" "$fresh")")
                q+=("$(run_one qemu "$tfmt" "$args" "$img" "$fresh")")
            else
                q+=("$(run_one qemu "$tfmt" "$args" "$img" "$fresh")")
                o+=("$(run_one ours "$tfmt" "$args" "$img" "$fresh")")
            fi
        done
        om=$(printf "%s\n" "${o[@]}" | median)
        qm=$(printf "%s\n" "${q[@]}" | median)
        ratio=$(awk -v a="$om" -v b="$qm" 'BEGIN { printf "%.3f", a / b }')
        pr=$(paired)
        count=$(echo "$args" | awk '{for (i = 1; i < NF; i++) if ($i == "-c") print $(i + 1)}')
        cpu="$(cpu_us "$count" "${o[@]}")/$(cpu_us "$count" "${q[@]}")"
        if [ -n "$BASE_BIN" ]; then
            bm=$(printf "%s\n" "${b[@]}" | median)
            cpu="$(cpu_us "$count" "${b[@]}")/$cpu"
            printf "%-6s %-20s %11s %11s %11s %7s  %-20s %-17s %s / %s / %s\n" "$fmt" "$name" "$bm" "$om" "$qm" "$ratio" "$pr" "$cpu" "$(rates "${b[@]}")" "$(rates "${o[@]}")" "$(rates "${q[@]}")"
        else
            printf "%-6s %-20s %11s %11s %7s  %-20s %-15s %s / %s\n" "$fmt" "$name" "$om" "$qm" "$ratio" "$pr" "$cpu" "$(rates "${o[@]}")" "$(rates "${q[@]}")"
        fi
    done
done
rm -f "$DIR"/fresh.* "$DIR"/overlay.qcow2 "$DIR"/.times0 "$DIR"/.times1
