#!/usr/bin/env bash
# Builds the tracer and the analyzer, traces the bundled leaking example
# (examples/leaky.c) in exact mode and prints the analyzer's report.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --workspace
target="${CARGO_TARGET_DIR:-target}"
out="$target/examples"
mkdir -p "$out"
cc -g -O2 -pthread -o "$out/leaky" examples/leaky.c

# A fresh directory per run, so the report is of this run only.
traces="$(mktemp -d "$out/leaky-traces.XXXXXX")"
LD_PRELOAD="$(cd "$target" && pwd)/release/libmtrace_rs.so" \
    MTRACE_RS_OUT="$traces/leaky.%p.bin" \
    MTRACE_RS_SAMPLE_BYTES=1 \
    "$out/leaky"
for trace in "$traces"/leaky.*.bin; do
    echo
    echo "\$ mtrace-analyze $trace"
    "$target/release/mtrace-analyze" "$trace"
done
