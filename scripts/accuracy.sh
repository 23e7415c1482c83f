#!/usr/bin/env bash
# Sampling accuracy over many seeds: a program leaks N blocks of SIZE bytes at
# one call site (and allocates and frees four times as much at another),
# traced at the default rate with seeds 1..RUNS; prints the relative error
# of each estimate at the leak site, their mean and spread, how many fell
# within 10%, the mean sample count, and the analyzer's own reported
# standard error. Usage: scripts/accuracy.sh [N] [SIZE] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-204800}" size="${2:-256}" runs="${3:-40}"
target="${CARGO_TARGET_DIR:-target}/release"
[[ -f $target/libmtrace_rs.so && -x $target/mtrace-analyze ]] ||
    { echo "accuracy.sh: run cargo build --release --workspace first" >&2; exit 2; }
lib="$(cd "$target" && pwd)/libmtrace_rs.so"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cc -O2 -g -o "$work/accuracy" benches/accuracy.c
for seed in $(seq 1 "$runs"); do
    rm -f "$work"/t.*.bin
    truth="$(MTRACE_RS_SEED=$seed MTRACE_RS_OUT="$work/t.%p.bin" LD_PRELOAD="$lib" "$work/accuracy" "$n" "$size")"
    "$target/mtrace-analyze" "$work"/t.*.bin --format json | python3 -c '
import json, sys
d = json.load(sys.stdin); truth = int(sys.argv[1])
leak = [c for c in d["callers"] if c["function"] == "leak_site"]
churn = [c for c in d["callers"] if c["function"] == "churn_site"]
est = leak[0]["bytes"] if leak else 0
print(est / truth - 1, leak[0]["samples"] if leak else 0,
      leak[0]["rel_error"] or 0 if leak else 0, churn[0]["bytes"] if churn else 0)' "$truth"
done > "$work/results"
python3 - "$work/results" "$n" "$size" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
err = [float(r[0]) for r in rows]
print(f"{len(err)} runs, {sys.argv[2]} blocks of {sys.argv[3]} B leaked at one site")
print(f"mean relative error {st.mean(err):+.4f}, spread (sd) {st.pstdev(err):.4f}")
print(f"within 10% of the truth: {sum(abs(e) <= 0.10 for e in err)} of {len(err)}")
print(f"samples per run: {st.mean(int(r[1]) for r in rows):.1f}; "
      f"reported standard error: {st.mean(float(r[2]) for r in rows):.4f}")
print(f"largest estimate at the churn site (freed blocks): {max(int(r[3]) for r in rows)} B")
PY
