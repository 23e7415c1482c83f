#!/usr/bin/env bash
# Installs what the end-to-end tests need (when missing), builds the release
# artifacts the tests preload, and runs every test in the workspace.
# .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package providing it. The real-program tests skip a
# missing tool, so a machine without root still runs everything else.
declare -A packages=(
    [cc]=gcc [c++]=g++ [sqlite3]=sqlite3 [git]=git [python3]=python3 [java]=default-jdk-headless
    # `go tool pprof` reads the pprof export back in tests/export.rs.
    [go]=golang-go
    # tests/sampled.rs runs glibc's rewritten free under Valgrind.
    [valgrind]=valgrind
)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
# library -> Debian package: the allocators tests/allocators.rs preloads
# beside the tracer.
declare -A libraries=(
    [/usr/lib/x86_64-linux-gnu/libjemalloc.so.2]=libjemalloc2
    [/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4]=libtcmalloc-minimal4
)
for lib in "${!libraries[@]}"; do
    [[ -e $lib ]] || missing+=("${libraries[$lib]}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "test.sh: missing ${missing[*]} (not root: the tests that need them will skip)" >&2
    fi
fi

# The tests run target/release/libmtrace_rs.so and mtrace-analyze: build
# them first, with the same profile.
cargo build --release --workspace
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?
# One closing line for the whole suite: cargo's own last line is that of its
# last test binary (often a crate's empty doc-test run).
awk '/^test result:/ { p += $4; f += $6; i += $8 }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
exit "$status"
