#!/usr/bin/env python3
"""Pinned pairs: the CPU-time cost of one configuration against another, to a
few tenths of a percent on a noisy 2-core machine.

Sequential runs of the churn vary by 3-4% a round here, as the host takes
the CPU away in spells; a difference of a few tenths never shows. This runs
the two configurations at the same time, each pinned to one of the two
cores (swapped every round), on a 1-thread churn: both see the same spells,
and the ratio of their CPU times (the process's, the tracer's writer thread
included, which inherits the pin) varies by 1-2% a round. It prints the
median, mean and standard deviation of the per-round ratios B / A.

With --same-core, each round runs two pairs at once, each pair on one core
with both of its configurations pinned to that core, so that the kernel
time-slices them: every few milliseconds each sees the same host, and the
ratio of their CPU times varies by about 0.5% a pair (1-2% the other way on
a quiet host, 4-8% on a busy one). Each pair gives a ratio: 10 rounds give
20, a standard error of about 0.1%. The time-slicing also costs each of
them some cache refills; it is the difference between A and B that this
measures. Set MTRACE_RS_SEED in both (e.g. `A:...,MTRACE_RS_SEED=7`) so
that a sampled run draws the same samples in both.

    benches/pair.py [--same-core] [--rounds N] [--iters N] [--churn PATH] A B

A and B are NAME or NAME:VAR=VALUE,VAR=VALUE, e.g.

    benches/pair.py bare: sampled:LD_PRELOAD=target/release/libmtrace_rs.so
    benches/pair.py floor:LD_PRELOAD=bench-out/bin/libforward.so \\
        nosamples:LD_PRELOAD=target/release/libmtrace_rs.so,MTRACE_RS_SAMPLE_BYTES=1152921504606846976

Needs taskset, two cores, and bench-out/bin/churn (scripts/bench.sh builds
it). Trace files go to a temporary directory, removed at the end. Not part
of the test suite.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile


def config(spec, tmp):
    name, _, assignments = spec.partition(":")
    env = dict(os.environ)
    for a in filter(None, assignments.split(",")):
        key, sep, value = a.partition("=")
        if not sep:
            sys.exit(f"pair.py: {a!r} in {spec!r} is not VAR=VALUE")
        if key == "LD_PRELOAD":
            value = os.path.abspath(value)
        env[key] = value
    env["MTRACE_RS_OUT"] = os.path.join(tmp, name + ".%p.bin")
    return name, env


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--iters", type=int, default=12_000_000,
                    help="churn iterations (one thread; about 1 s bare)")
    ap.add_argument("--churn", default=os.path.join(root, "bench-out", "bin", "churn"))
    ap.add_argument("--same-core", action="store_true",
                    help="pin both configurations of a pair to one core (two pairs a round)")
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args()
    if not os.access(args.churn, os.X_OK):
        sys.exit(f"pair.py: {args.churn} missing: run scripts/bench.sh --quick once to build it")
    if shutil.which("taskset") is None:
        sys.exit("pair.py: taskset is needed")
    if args.rounds < 2:
        sys.exit("pair.py: --rounds must be at least 2")
    tmp = tempfile.mkdtemp(prefix="mtrace-pair.")
    try:
        cfgs = [config(args.a, tmp), config(args.b, tmp)]
        if cfgs[0][0] == cfgs[1][0]:
            sys.exit("pair.py: give the two configurations different names")
        ratios = []
        for r in range(args.rounds):
            # (config index, cpu) for every process of the round; a pair's
            # ratio is B's CPU time over A's on the same core (same-core) or
            # in the same round (default).
            if args.same_core:
                runs = [(i, cpu) for cpu in (0, 1)
                        for i in ((0, 1) if (r + cpu) % 2 == 0 else (1, 0))]
            else:
                runs = [(i, (i + r) % 2) for i in (0, 1)]
            procs = []
            for i, cpu in runs:
                cmd = ["taskset", "-c", str(cpu), args.churn, "1", str(args.iters)]
                procs.append((i, cpu, subprocess.Popen(cmd, env=cfgs[i][1],
                                                        stdout=subprocess.DEVNULL)))
            cpu_time = {}
            for i, cpu, p in procs:
                _, status, usage = os.wait4(p.pid, 0)
                if status != 0:
                    sys.exit(f"pair.py: churn failed (status {status})")
                cpu_time[(i, cpu)] = usage.ru_utime + usage.ru_stime
            if args.same_core:
                ratios += [cpu_time[(1, c)] / cpu_time[(0, c)] for c in (0, 1)]
            else:
                ratios.append(sum(cpu_time[(1, c)] for c in (0, 1) if (1, c) in cpu_time)
                              / sum(cpu_time[(0, c)] for c in (0, 1) if (0, c) in cpu_time))
            for f in os.listdir(tmp):
                os.unlink(os.path.join(tmp, f))
        sd = statistics.stdev(ratios)
        print(f"{cfgs[1][0]} / {cfgs[0][0]}, CPU time, {len(ratios)} "
              f"{'pairs' if args.same_core else 'rounds'}: "
              f"median {statistics.median(ratios):.4f}, mean {statistics.mean(ratios):.4f}, "
              f"sd {sd:.4f}, standard error {sd / len(ratios) ** 0.5:.4f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
