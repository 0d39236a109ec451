#!/bin/bash
# Compare bench-block (io_uring path) with `qemu-img bench` on the same files,
# same access pattern, same queue depth, O_DIRECT (-t none; qemu with -n).
# Usage: block/scripts/bench.sh [DIR] [SIZE]   (default DIR=/tmp/bench-block, SIZE=1G)
set -euo pipefail
DIR=${1:-/tmp/bench-block}
SIZE=${2:-1G}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
command -v qemu-img >/dev/null || { echo "qemu-img missing (apt-get install qemu-utils)"; exit 1; }
cargo build --release -q -p block --bin bench-block --manifest-path "$ROOT/Cargo.toml"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/bench-block
mkdir -p "$DIR"
if [ ! -f "$DIR/ref.raw" ]; then
    qemu-img create -q -f raw "$DIR/ref.raw" "$SIZE"
    # Fully allocate so both tools measure the same I/O, not allocation.
    dd if=/dev/urandom of="$DIR/ref.raw" bs=1M count=$(( $(stat -c %s "$DIR/ref.raw") >> 20 )) conv=notrunc status=none
    qemu-img convert -f raw -O qcow2 "$DIR/ref.raw" "$DIR/ref.qcow2"
fi
# A large prime stride makes the 4 KiB pattern scattered (qemu-img bench
# has no random mode; both tools use offset = i * step mod size).
RAND_STEP=$((4096 * 1021))
printf "%-8s %-22s %14s %14s\n" format case "ours req/s" "qemu req/s"
for fmt in raw qcow2; do
    img="$DIR/ref.$fmt"
    for c in "4k-scattered-read:-c 100000 -s 4k -S $RAND_STEP" \
             "4k-scattered-write:-c 100000 -s 4k -S $RAND_STEP -w" \
             "64k-seq-read:-c 20000 -s 64k" \
             "64k-seq-write:-c 20000 -s 64k -w"; do
        name=${c%%:*}; args=${c#*:}
        ours=$("$BIN" -f "$fmt" -d 64 -t none $args "$img" | awk '{print $1}')
        qemu=$(qemu-img bench -f "$fmt" -d 64 -t none -n $args "$img" 2>&1 | \
               awk '/Run completed/ {for(i=1;i<=NF;i++) if($i=="in") t=$(i+1)} END {print t}')
        # qemu prints the elapsed time; turn it into requests/s.
        count=$(echo "$args" | awk '{print $2}')
        qrps=$(awk -v n="$count" -v t="$qemu" 'BEGIN { if (t > 0) printf "%.0f", n / t; else print "?" }')
        printf "%-8s %-22s %14s %14s\n" "$fmt" "$name" "$ours" "$qrps"
    done
done
