"""How fast ``emugate simulate`` runs, how much memory it holds, and where its wall time goes.

    python benchmarks/simulate_speed.py                       # 1 h of ShareGPT at 10 req/s on the emulated H100
    python benchmarks/simulate_speed.py --seconds 600 --no-spy

One replica of the bundled H100 Llama-3.1-8B profile, ShareGPT chat requests at ``--rate`` req/s for
``--seconds`` of arrivals (``rate x seconds`` prompts), in virtual time. Prints the simulated
seconds per wall second, steps per wall second, CPU microseconds per step, the resident memory at
every tenth of the run (to show it stays bounded: it grows only with the per-request results kept
for the result JSON), and, with py-spy (``pip install py-spy``), the share of wall-time samples per
part: vLLM's scheduler, its KV-cache manager, the engine core loop, the front end (chat template and
tokenizer), the emulated executor, the latency oracle, and the simulator's own bookkeeping.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: (category, path fragments): a sample is charged to the first category, in this order, that any of its
#: frames belongs to (the most specific part that was running).
CATEGORIES = [
    ("latency oracle (profiles/oracle.py)", ("profiles/oracle.py",)),
    ("emulated executor (emu_executor: features, tokens, outputs)", ("emu_executor/",)),
    ("front end: chat template, tokenizer, request objects (vLLM renderers, transformers)",
     ("vllm/renderers/", "vllm/entrypoints/", "transformers/", "tokenizers/", "jinja2/",
      "vllm/v1/engine/input_processor.py", "vllm/tokenizers/")),
    ("vLLM KV-cache manager (vllm/v1/core/kv_cache_*, block_pool)", ("vllm/v1/core/kv_cache", "vllm/v1/core/block_pool",
                                                                    "vllm/v1/core/single_type")),
    ("vLLM scheduler (vllm/v1/core/sched)", ("vllm/v1/core/sched/",)),
    ("vLLM request objects (vllm/v1/request.py, outputs)", ("vllm/v1/request.py", "vllm/v1/outputs.py",
                                                            "vllm/v1/engine/__init__.py")),
    ("vLLM engine core loop (vllm/v1/engine/core.py)", ("vllm/v1/engine/core.py",)),
    ("simulator bookkeeping (emugate/simulate.py)", ("emugate/simulate.py",)),
]


def rss_mib() -> float:
    """This process's resident set (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def categorize(raw: Path) -> dict[str, float]:
    """Share (%) of py-spy's raw samples per category (module docstring)."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        cat = "other (Python runtime, gc, imports)"
        for name, frags in CATEGORIES:
            if any(f in stack for f in frags):
                cat = name
                break
        counts[cat] += int(n)
    return {k: 100.0 * v / total for k, v in counts.most_common()} if total else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100-sxm_llama-3.1-8b")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s")
    ap.add_argument("--seconds", type=float, default=3600.0, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-spy", action="store_true", help="skip the py-spy breakdown")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()

    from emugate.simulate import Fleet, quiet_vllm, sharegpt_workload
    from emugate.simulate_cli import build_parser, fleet_config, prepare_env
    from profiles.assets import resolve_model_dir
    quiet_vllm()
    cfg = fleet_config(build_parser().parse_args(["--profile", args.profile, "--model", args.model]))
    prepare_env(cfg)
    n = int(args.rate * args.seconds)
    t0 = time.perf_counter()
    wl = sharegpt_workload(str(resolve_model_dir(args.model)), num_prompts=n, request_rate=args.rate, seed=args.seed)
    print(f"workload: {n} requests in {time.perf_counter() - t0:.1f} s (plan cached on disk after the first run)")
    t0 = time.perf_counter()
    fleet = Fleet(cfg)
    print(f"engine built in {time.perf_counter() - t0:.1f} s; RSS {rss_mib():.0f} MiB")

    rss = []
    tenth = max(1, n // 10)
    orig_enqueue = fleet.replicas[0].enqueue

    def enqueue(at, index, plen, rendered):
        if index % tenth == 0:
            rss.append((round(at), round(rss_mib())))
        orig_enqueue(at, index, plen, rendered)

    fleet.replicas[0].enqueue = enqueue
    spy = None
    raw = ROOT / "runs" / "simulate_speed.pyspy.txt"
    if not args.no_spy and shutil.which("py-spy"):
        raw.parent.mkdir(exist_ok=True)
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(os.getpid()), "--format", "raw", "--rate", "100",
                                "--nonblocking", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
    c0 = time.process_time()
    run = fleet.run(wl, seed=args.seed, progress=True)
    cpu = time.process_time() - c0
    if spy is not None:
        spy.send_signal(2)
        spy.wait(timeout=60)
    rss.append((round(run.duration_s), round(rss_mib())))
    tot = run.totals()
    fig = {"requests": n, "rate": args.rate, "simulated_s": run.duration_s, "wall_s": run.wall_s,
           "speedup": run.speedup, "steps": tot["steps"], "steps_per_wall_s": tot["steps"] / run.wall_s,
           "cpu_us_per_step": cpu / tot["steps"] * 1e6, "preemptions": tot["preemptions"],
           "completed": sum(r.success for r in run.results), "rss_mib_by_simulated_s": rss,
           "host": f"{os.cpu_count()} cores"}
    print(f"\n{n} requests at {args.rate:g} req/s: {run.duration_s:.0f} s simulated in {run.wall_s:.1f} s wall = "
          f"{run.speedup:.1f}x real time; {tot['steps']} steps ({fig['steps_per_wall_s']:.0f}/s wall, "
          f"{fig['cpu_us_per_step']:.0f} us CPU each incl. the front end); {fig['completed']} completed")
    print("RSS (MiB) at simulated second: " + ", ".join(f"{s}: {m}" for s, m in rss))
    if spy is not None and raw.exists():
        fig["wall_share_pct"] = categorize(raw)
        print("\nwhere the wall time goes (py-spy samples of the whole run):")
        for k, v in fig["wall_share_pct"].items():
            print(f"  {v:5.1f} %  {k}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    fleet.shutdown()


if __name__ == "__main__":
    main()
