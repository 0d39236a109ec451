#!/bin/bash
# Fuzz the API's request path (api::fuzz::fuzz_requests: framing, routing, VmConfig decoding,
# answers) with libFuzzer for a bounded time (scripts/fuzz-run says how; exit status 0: no
# finding, 1: a finding, reproducer in api/fuzz/artifacts/requests/, 2: a tool is missing).
#
# Usage: api/fuzz/run.sh [SECONDS]   (default 60)
here=$(dirname "$0")
exec "$here/../../scripts/fuzz-run" "$here" "requests:16384" "${1:-60}" requests
