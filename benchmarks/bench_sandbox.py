"""HumanEval through the code sandbox: every canonical solution must pass, a mutated copy must fail.

Runs the 164 canonical solutions (prompt + canonical_solution against the problem's test) and two
mutated copies of each: a body that raises, and a body that returns None. Prints the isolation layers
in use, the verdict counts and throughput in programs per second (median over ``--reps`` runs of the
whole set, ``--workers`` parallel sandboxes). Also times a stream of tiny programs, as in RL rewards.

    PYTHONPATH=src python benchmarks/bench_sandbox.py --json /tmp/sandbox.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter

from onelayer import sandbox
from onelayer.tasks.code import HumanEvalTask


def timed(jobs, workers, reps):
    times, results = [], None
    for _ in range(reps):
        start = time.perf_counter()
        results = sandbox.check_programs(jobs, timeout_s=10.0, workers=workers)
        times.append(time.perf_counter() - start)
    return statistics.median(times), results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    iso = sandbox.detect_isolation()
    print(f"isolation: {iso.describe()}")
    for missing in iso.missing():
        print(f"  missing: {missing}")
    items = HumanEvalTask().items("eval")
    canonical = [(it["prompt"] + it["solution"], it["test"], it["entry_point"]) for it in items]
    raising = [(it["prompt"] + "    raise NotImplementedError\n", it["test"], it["entry_point"]) for it in items]
    none = [(it["prompt"] + "    return None\n", it["test"], it["entry_point"]) for it in items]
    out = {"isolation": iso.describe(), "missing": iso.missing(), "workers": args.workers, "n": len(items)}
    for name, jobs in (("canonical", canonical), ("raises", raising), ("returns_none", none)):
        seconds, results = timed(jobs, args.workers, args.reps)
        counts = Counter(r.status for r in results)
        out[name] = {"counts": dict(counts), "seconds": seconds, "programs_per_s": len(jobs) / seconds}
        print(f"{name:13s} {dict(counts)}  {seconds:.2f} s  {len(jobs) / seconds:.0f} programs/s")
    tiny = [(f"def f(x):return x*{k % 9 + 2}", f"assert f(3) == {3 * (k % 9 + 2)}", "f") for k in range(512)]
    tiny = [(p + f"  # {k}", t, e) for k, (p, t, e) in enumerate(tiny)]  # distinct, so none is deduplicated
    seconds, results = timed(tiny, args.workers, args.reps)
    out["tiny"] = {"n": len(tiny), "seconds": seconds, "programs_per_s": len(tiny) / seconds,
                   "all_passed": all(r.ok for r in results)}
    print(f"{'tiny':13s} {len(tiny)} one-line programs  {seconds:.2f} s  {len(tiny) / seconds:.0f} programs/s")
    ok = out["canonical"]["counts"] == {"passed": len(items)} and "passed" not in out["raises"]["counts"] \
        and "passed" not in out["returns_none"]["counts"]
    out["ok"] = ok
    print("OK: all canonical pass, no mutated copy passes" if ok else "FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
