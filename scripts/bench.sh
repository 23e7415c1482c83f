#!/usr/bin/env bash
# What mtrace-rs costs: runs each workload bare, under a forwarding-only
# LD_PRELOAD interposer (the floor), under mtrace-rs sampled (default rate)
# and exact (MTRACE_RS_SAMPLE_BYTES=1), and under heaptrack, in rotating
# order; counts instructions per malloc+free pair under callgrind; times
# mtrace-analyze against heaptrack_print. Prints a Markdown table and writes
# it to bench-out/latest.md, with the raw numbers in bench-out/latest.json
# and the workloads' stderr in bench-out/latest.log.
#
#   scripts/bench.sh [--quick] [--reps N] [--light-reps N]
#                    [--only churn,gcc,...,callgrind,pairs]
#                    [--no-big-trace] [--keep] [--update-benchmarks]
#
#   --quick              about a minute: smaller inputs, no gcc or java
#   --reps N             repetitions per mode (default 3)
#   --light-reps N       then N more rounds of bare, floor and sampled alone, for
#                        the workloads of at most 2 s bare (default 2 x reps):
#                        their differences are a few percent, as is the noise
#   --only LIST          run only these workloads: churn, microbench, gcc,
#                        python, sort, java, callgrind, pairs (same-core pairs
#                        of bare with the floor and with sampled mode,
#                        benches/pair.py: CPU-time ratios to ~0.1%)
#   --no-big-trace       skip tracing churn in exact mode into a file of >= 2 GB
#                        and timing mtrace-analyze on it (default mode only;
#                        it takes ~2 minutes and ~2.5 GB of scratch disk)
#   --keep               keep the scratch directory (traces, inputs)
#   --update-benchmarks  also write BENCHMARKS.md from this run
#
# Needs `cargo build --release --workspace` first; it does not build the
# Rust code itself, so it measures exactly what is in the target directory
# ($CARGO_TARGET_DIR or target/). Default mode takes under 15 minutes on
# 2 cores. Not part of the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

quick=0 keep=0 update=0 big=1 reps="" light="" only=""
args=("$@")
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --keep) keep=1 ;;
        --no-big-trace) big=0 ;;
        --update-benchmarks) update=1 ;;
        --reps) reps="${2:?--reps needs a number}"; shift ;;
        --light-reps) light="${2:?--light-reps needs a number}"; shift ;;
        --only) only="${2:?--only needs a list}"; shift ;;
        -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "bench.sh: $*" >&2; exit 1; }

target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
lib="$target/release/libmtrace_rs.so"
analyzer="$target/release/mtrace-analyze"
for f in "$lib" "$analyzer"; do
    [ -e "$f" ] || die "missing $f: run \`cargo build --release --workspace\` first"
done
command -v gcc >/dev/null || die "gcc is needed to build the benchmarks"
command -v python3 >/dev/null || die "python3 is needed"

# heaptrack is the comparison; install Debian's package when we can.
if ! command -v heaptrack >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "bench.sh: installing heaptrack from Debian" >&2
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q heaptrack >&2 \
        || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q heaptrack >&2; }; } \
        || echo "bench.sh: could not install heaptrack; its cells will read n/a" >&2
fi

out="$root/bench-out"
bin="$out/bin"
mkdir -p "$bin"
gcc -O2 -g -pthread -o "$bin/churn" benches/churn.c
gcc -O2 -g -o "$bin/microbench" benches/microbench.c
gcc -O2 -shared -fPIC -o "$bin/libforward.so" benches/forward.c
if command -v javac >/dev/null && command -v java >/dev/null; then
    mkdir -p "$bin/java"
    javac -nowarn -d "$bin/java" benches/NativeChurn.java 2>"$bin/javac.log" \
        || { cat "$bin/javac.log" >&2; die "javac failed on benches/NativeChurn.java"; }
fi

# Scratch space for traces (gigabytes in exact mode): removed on exit.
scratch="$(mktemp -d "${TMPDIR:-/tmp}/mtrace-bench.XXXXXX")"
cleanup() {
    if [ "$keep" = 1 ]; then
        echo "bench.sh: kept $scratch" >&2
    else
        rm -rf "$scratch"
    fi
}
trap cleanup EXIT

# Measure a snapshot: a `cargo build` finishing mid-run must not swap the
# tracer or the analyzer under us.
mkdir -p "$scratch/artifacts"
cp "$lib" "$analyzer" "$scratch/artifacts/"
lib_shown="$lib"
lib="$scratch/artifacts/libmtrace_rs.so"
analyzer="$scratch/artifacts/mtrace-analyze"

# A tracer that cannot load, or an analyzer that cannot read its traces,
# would turn every row into a failure: check once, up front.
smoke="$scratch/smoke"
mkdir -p "$smoke"
if ! LD_PRELOAD="$lib" MTRACE_RS_OUT="$smoke/t.%p.bin" MTRACE_RS_SAMPLE_BYTES=1 \
        "$bin/microbench" 1000 2>"$smoke/stderr"; then
    cat "$smoke/stderr" >&2
    die "$bin/microbench fails under the tracer (rebuild with \`cargo build --release --workspace\`?)"
fi
traces=("$smoke"/t.*.bin)
[ -e "${traces[0]}" ] || die "the tracer wrote no trace file (MTRACE_RS_OUT ignored?): $(cat "$smoke/stderr")"
if ! "$analyzer" "${traces[0]}" --format json >/dev/null 2>"$smoke/stderr"; then
    cat "$smoke/stderr" >&2
    die "mtrace-analyze cannot read the tracer's trace: rebuild both with \`cargo build --release --workspace\`"
fi
rm -rf "$smoke"

cmdline="scripts/bench.sh${args[*]:+ ${args[*]}}"
py_args=(--bin "$bin" --tmp "$scratch" --out "$out" --lib "$lib" --analyzer "$analyzer"
         --command "$cmdline" --lib-shown "$lib_shown")
[ "$quick" = 1 ] && py_args+=(--quick)
[ -n "$reps" ] && py_args+=(--reps "$reps")
[ -n "$light" ] && py_args+=(--light-reps "$light")
[ -n "$only" ] && py_args+=(--only "$only")
[ "$big" = 1 ] && [ "$quick" = 0 ] && [ -z "$only" ] && py_args+=(--big-trace)
[ "$update" = 1 ] && py_args+=(--benchmarks-md "$root/BENCHMARKS.md")
python3 benches/bench.py "${py_args[@]}"
