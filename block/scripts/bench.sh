#!/bin/bash
# Compare bench-block (io_uring path) with `qemu-img bench` on the same files,
# same access pattern, same queue depth, O_DIRECT (-t none; qemu with -n,
# Linux native AIO). Each case runs REPS times, the two tools alternating
# (and swapping which goes first), after one untimed warm-up run of each;
# the medians are printed.
# Usage: block/scripts/bench.sh [DIR] [SIZE] [REPS] [CASE-FILTER]
#   (default DIR=/tmp/bench-block, SIZE=1G, REPS=5, filter = all cases)
set -euo pipefail
DIR=${1:-/tmp/bench-block}
SIZE=${2:-1G}
REPS=${3:-5}
FILTER=${4:-}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
command -v qemu-img >/dev/null || { echo "qemu-img missing (apt-get install qemu-utils)"; exit 1; }
cargo build --release -q -p block --bin bench-block --manifest-path "$ROOT/Cargo.toml"
BIN=${BENCH_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-block}
mkdir -p "$DIR"
if [ ! -f "$DIR/ref.raw" ] || [ ! -f "$DIR/ref.qcow2" ]; then
    qemu-img create -q -f raw "$DIR/ref.raw" "$SIZE"
    # Fully allocate so both tools measure the same I/O, not allocation.
    dd if=/dev/urandom of="$DIR/ref.raw" bs=1M count=$(( $(stat -c %s "$DIR/ref.raw") >> 20 )) conv=notrunc status=none
    qemu-img convert -f raw -O qcow2 "$DIR/ref.raw" "$DIR/ref.qcow2"
fi
# qemu-img bench has no random mode: the 4 KiB cases use a large prime
# stride (1021 x 4 KiB), offset = i * step mod size, in both tools.
RAND_STEP=$((4096 * 1021))

ours() { { "$BIN" -f "$1" -d 64 -t none $2 "$3" || echo "?"; } | awk '{print $1}'; }
qemu() {
    local count t out
    count=$(echo "$2" | awk '{print $2}')
    out=$(qemu-img bench -f "$1" -d 64 -t none -n $2 "$3" 2>&1) || { echo "qemu-img bench: $out" >&2; }
    t=$(echo "$out" | awk '/Run completed/ {for(i=1;i<=NF;i++) if($i=="in") t=$(i+1)} END {print t}')
    # qemu prints the elapsed time; turn it into requests/s.
    awk -v n="$count" -v t="$t" 'BEGIN { if (t > 0) printf "%.0f", n / t; else print "?" }'
}
median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.0f\n", (a[NR/2]+a[NR/2+1])/2}'; }

printf "%-6s %-20s %11s %11s %7s   %s\n" format case "ours req/s" "qemu req/s" ratio "runs (ours/qemu)"
for fmt in raw qcow2; do
    img="$DIR/ref.$fmt"
    for c in "4k-scattered-read:-c 100000 -s 4k -S $RAND_STEP" \
             "4k-scattered-write:-c 100000 -s 4k -S $RAND_STEP -w" \
             "64k-seq-read:-c 20000 -s 64k" \
             "64k-seq-write:-c 20000 -s 64k -w"; do
        name=${c%%:*}; args=${c#*:}
        [[ -n "$FILTER" && "$fmt-$name" != *$FILTER* ]] && continue
        ours "$fmt" "$args" "$img" >/dev/null
        qemu "$fmt" "$args" "$img" >/dev/null
        o=(); q=()
        for ((r = 0; r < REPS; r++)); do
            if (( r % 2 == 0 )); then
                o+=("$(ours "$fmt" "$args" "$img")"); q+=("$(qemu "$fmt" "$args" "$img")")
            else
                q+=("$(qemu "$fmt" "$args" "$img")"); o+=("$(ours "$fmt" "$args" "$img")")
            fi
        done
        om=$(printf "%s\n" "${o[@]}" | median)
        qm=$(printf "%s\n" "${q[@]}" | median)
        ratio=$(awk -v a="$om" -v b="$qm" 'BEGIN { printf "%.3f", a / b }')
        printf "%-6s %-20s %11s %11s %7s   %s / %s\n" "$fmt" "$name" "$om" "$qm" "$ratio" "${o[*]}" "${q[*]}"
    done
done
