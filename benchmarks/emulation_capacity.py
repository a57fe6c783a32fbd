"""Emulation capacity: the highest load one CPU host can emulate a GPU at without falling behind.

Starts the gateway with R emulated replicas of a (GPU) profile, drives the Locust
ShareGPT workload (``loadtests/sharegpt.py``, Poisson) at increasing request rates,
and reads each replica's ``emugate:step_lateness_seconds`` histogram (through the
gateway's /metrics) before and after every rate. A rate is *sustained* when the
p99 step lateness of the steps run at that rate stays under ``--p99-ms`` (1 ms):
the engine kept the virtual device's schedule, so its steps took the device's
times. What clients see also includes the host's front end (gateway, vLLM's API
server, Locust on the same cores): compare TTFT/TPOT/ITL with ``emugate simulate``
on the same workload, which has no host path. Prints one row per rate (completed,
failures, output tok/s, TTFT, TPOT, ITL, lateness p50/p99/max), the cores each part of the stack used (gateway, vLLM API
server(s), engine core, the Locust client; psutil CPU times over the rate's wall time),
the mean TTFT where each layer stamps it (client, gateway, vLLM's API server, the scheduler's
queue: :data:`TTFT_LAYERS`), and the highest sustained rate and its output tok/s. With
``--simulate`` a rate is also judged *faithful* (:func:`faithful`): what clients saw matches the
device's (output tok/s and mean TPOT within ``--tol-pct`` of simulate's, mean TTFT within
``--ttft-allowance-ms`` of it), and the highest faithful rate is printed too: a sustained rate
whose TTFT drifted by seconds is sustained by the engine, not faithful to clients.

    python benchmarks/emulation_capacity.py --replicas 1 --rates 5,10,20,30,40
    python benchmarks/emulation_capacity.py --replicas 2 --rates 10,20,40,60
    python benchmarks/emulation_capacity.py --rates 60,100 --extra-args "--api-server-count 2"
    python benchmarks/emulation_capacity.py --trace docs/data/capacity/decode-heavy_28rps.jsonl --spy 15
    python benchmarks/emulation_capacity.py --fixed-lengths 128:512 --rates 16,19,22,28 --seconds 90 --simulate

``--fixed-lengths IN:OUT`` replaces ShareGPT with requests of fixed lengths (a Mooncake trace per
rate: Poisson arrivals over ``--seconds``, numpy ``default_rng(rate)``, unique prefix blocks), a
decode-heavy load that reaches output rates ShareGPT's prefill-bound mix cannot. ``--simulate``
also runs ``emugate simulate`` on each rate's workload (same profile, model, requests and
arrivals, virtual time) and prints emulated against simulated: the difference is what the host adds.
Give runs a minute or more of arrivals (``--seconds 90``): a short burst ends before the host's
backlog shows.

Lateness quantiles are bucket upper bounds (0.1, 0.25, 0.5, 1, 2.5, 5 ... ms).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import ROOT, start_gateway  # noqa: E402
from emu_executor.lateness import BUCKETS_S, quantile_from_counts  # noqa: E402
from gateway.launch import wait_healthy  # noqa: E402


def lateness_counts(url: str) -> list[int]:
    """Per-bucket (non-cumulative) step counts, summed over the gateway's replicas."""
    text = httpx.get(url + "/metrics", timeout=10).text
    cum: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "emugate:step_lateness_seconds":
            continue
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                cum[s.labels["le"]] = cum.get(s.labels["le"], 0.0) + s.value
    keys = [str(b) for b in BUCKETS_S] + ["+Inf"]
    vals = [int(cum.get(k, 0)) for k in keys]
    return [vals[0]] + [vals[i] - vals[i - 1] for i in range(1, len(vals))]


#: Where a request's time to first token is stamped, outermost first: (label, histogram family).
#: The client's own TTFT (Locust, ``vllm bench serve``'s definition) is the outermost layer.
TTFT_LAYERS = (
    ("gateway", "emugate_ttft_seconds"),              # request read by the gateway -> first chunk from the replica
    ("vLLM API server", "vllm:time_to_first_token_seconds"),  # request built in the API server -> first token out
    ("engine queue", "vllm:request_queue_time_seconds"),      # waiting in the engine core's scheduler queue
)


def histogram_sums(url: str) -> dict[str, tuple[float, float]]:
    """{family: (sum in s, count)} of each :data:`TTFT_LAYERS` histogram, summed over the
    gateway's replicas and label sets (the gateway's /metrics merges its replicas' vllm:* metrics)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    wanted = {name for _, name in TTFT_LAYERS}
    out: dict[str, list[float]] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name not in wanted:
            continue
        acc = out.setdefault(fam.name, [0.0, 0.0])
        for s in fam.samples:
            if s.name.endswith("_sum"):
                acc[0] += s.value
            elif s.name.endswith("_count"):
                acc[1] += s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def ttft_by_layer(before: dict, after: dict) -> dict[str, float | None]:
    """Mean (ms) of each :data:`TTFT_LAYERS` histogram over the requests between two
    :func:`histogram_sums` scrapes; None where no request was counted."""
    means: dict[str, float | None] = {}
    for label, name in TTFT_LAYERS:
        s0, c0 = before.get(name, (0.0, 0.0))
        s1, c1 = after.get(name, (0.0, 0.0))
        means[label] = round((s1 - s0) / (c1 - c0) * 1000, 1) if c1 > c0 else None
    return means


def fixed_length_trace(rate: float, seconds: float, input_len: int, output_len: int, path: Path) -> int:
    """Write a Mooncake JSONL of Poisson arrivals at ``rate`` req/s over ``seconds`` s (timestamps in
    ms, numpy ``default_rng(rate)``), each request ``input_len`` prompt and ``output_len`` output
    tokens with a prefix block of its own; returns the number of requests."""
    import numpy as np
    rng = np.random.default_rng(int(rate))
    t, rows = 0.0, []
    while True:
        t += rng.exponential(1.0 / rate)
        if t > seconds:
            break
        rows.append(json.dumps({"timestamp": int(round(t * 1000)), "input_length": input_len,
                                "output_length": output_len, "hash_ids": [3_000_000 + int(rate) * 10_000 + len(rows)]}))
    path.write_text("\n".join(rows) + "\n")
    return len(rows)


def simulate(args, workload: list[str], out: Path) -> dict:
    """``emugate simulate`` on the same workload (flags as given to Locust) with the benchmark's
    profile, model and max_model_len; its result JSON (vLLM's keys), or {} when it failed."""
    cmd = [sys.executable, "-m", "emugate", "simulate", "--profile", args.profile, "--model", args.model,
           "--max-model-len", "32768", "--quiet", *workload, "--result-json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0 or not out.exists():
        print(f"simulate failed ({proc.returncode}): {proc.stderr[-500:]}", file=sys.stderr)
        return {}
    return json.loads(out.read_text())


def faithful(row: dict, sim: dict, tol_pct: float, ttft_allowance_ms: float) -> bool:
    """True when an emulated rate's client-side figures match simulate's on the same workload:
    output tok/s and mean TPOT within ``tol_pct`` % and mean TTFT at most ``ttft_allowance_ms`` ms
    above (the host path's allowance: the gateway, vLLM's API server and the client, which virtual
    time leaves out). False when either side is missing."""
    try:
        e_tp, m_tp = row["out_tok_s"], sim["output_throughput"]
        e_tpot, m_tpot = row["mean_tpot_ms"], sim["mean_tpot_ms"]
        e_ttft, m_ttft = row["mean_ttft_ms"], sim["mean_ttft_ms"]
        return (abs(e_tp - m_tp) <= m_tp * tol_pct / 100 and abs(e_tpot - m_tpot) <= m_tpot * tol_pct / 100
                and e_ttft - m_ttft <= ttft_allowance_ms)
    except (KeyError, TypeError):
        return False


def _role(p: psutil.Process) -> str:
    """The part of the serving stack a process of the gateway's tree plays, from its title
    (vLLM names its processes ``VLLM::EngineCore``, ``VLLM::APIServer_N`` with setproctitle)
    or its command line."""
    try:
        title = " ".join(p.cmdline()) or p.name()
    except psutil.Error:
        return "gone"
    if "EngineCore" in title:
        return "engine core"
    if "APIServer" in title or "vllm.entrypoints" in title or "emu_executor" in title or " emulate" in title:
        return "vLLM API server"
    if "-m gateway" in title:
        return "gateway"
    return "other"


def cpu_by_role(pid: int) -> dict[int, tuple[str, float]]:
    """{pid: (role, user+system CPU seconds so far)} for ``pid`` and all its descendants."""
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = (_role(p), t.user + t.system)
        except psutil.Error:
            pass
    return out


def cpu_split(before: dict, after: dict, client_s: float, wall_s: float) -> dict[str, float]:
    """Cores used per role over a rate's run (CPU seconds / wall seconds), the client's included."""
    split: dict[str, float] = {}
    for pid, (role, t) in after.items():
        split[role] = split.get(role, 0.0) + (t - before.get(pid, (role, 0.0))[1]) / wall_s
    split["load generator (Locust)"] = client_s / wall_s
    return {k: round(v, 2) for k, v in split.items() if k != "other" or v > 0.01}


#: py-spy frame fragments per category, first match wins (the frames are vLLM 0.32's, uvicorn's,
#: starlette's and emu_executor's; read from ``py-spy record -f raw`` of a replica under load).
SPY_CATEGORIES = {
    "vLLM API server": [
        ("engine outputs: msgpack decode, socket", ("MsgpackDecoder", "process_outputs_socket")),
        ("output processing: detokenize", ("Detokenizer", "detokenizer.py")),
        ("output processing: stats, request outputs", ("OutputProcessor", "output_processor.py", "stats.py")),
        ("OpenAI stream generator: chunks, JSON", ("stream_generator", "model_dump_json", "pydantic")),
        ("request intake: tokenize, chat template", ("tokeniz", "render", "chat_template", "preprocess")),
        ("ASGI: uvicorn, starlette, middlewares, sends", ("uvicorn", "starlette", "fastapi", "middleware", "anyio")),
    ],
    "engine core": [
        ("emulated executor: step wait, tokens, features", ("emu_executor",)),
        ("scheduler: KV cache manager", ("kv_cache", "KVCache", "single_type_kv")),
        ("scheduler: schedule, update", ("scheduler.py", "Scheduler")),
        ("outputs and inputs: serialize, sockets", ("sockets", "serial_utils", "zmq")),
    ],
}


def spy_breakdown(pid: int, role: str, seconds: float) -> dict[str, float] | None:
    """Share (%) of py-spy's on-CPU samples of ``pid`` per :data:`SPY_CATEGORIES` category over
    ``seconds`` (100 Hz, ``--nonblocking``); None without py-spy. Sampling costs CPU on a loaded
    2-core host: the rate's other figures are perturbed when it runs."""
    if not shutil.which("py-spy"):
        return None
    raw = Path(tempfile.mkstemp(suffix=".pyspy")[1])
    subprocess.run(["py-spy", "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100", "-f", "raw",
                    "-o", str(raw), "--nonblocking"], capture_output=True, timeout=seconds + 60)
    counts: collections.Counter = collections.Counter()
    text = raw.read_text()
    raw.unlink()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            cat = next((name for name, frags in SPY_CATEGORIES[role] if any(f in stack for f in frags)), "other")
            counts[cat] += int(n)
    total = sum(counts.values())
    return {k: round(100.0 * v / total, 1) for k, v in counts.most_common()} if total else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100-sxm_llama-3.1-8b")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--rates", default="5,10,20,30,40", help="request rates to try, req/s (ascending)")
    ap.add_argument("--seconds", type=float, default=30, help="arrivals per rate: rate x seconds prompts")
    ap.add_argument("--p99-ms", type=float, default=1.0, help="lateness p99 bound that counts as sustained")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--extra-args", default="", help="vLLM flags for every replica, one string, "
                    "e.g. '--api-server-count 2' (the backend's extra_args)")
    ap.add_argument("--spy", type=float, default=0, metavar="SECONDS",
                    help="with py-spy installed: sample the API server and the engine core for SECONDS, "
                    "starting 5 s into each rate, and print where their CPU goes (perturbs the run)")
    ap.add_argument("--trace", help="replay this trace (Mooncake JSONL, ...) instead of ShareGPT at --rates; "
                    "one run, its own arrival times")
    ap.add_argument("--fixed-lengths", metavar="IN:OUT", help="requests of these fixed prompt and output "
                    "lengths (tokens) instead of ShareGPT: a Poisson trace per rate over --seconds")
    ap.add_argument("--simulate", action="store_true", help="also run emugate simulate on each rate's "
                    "workload and print emulated against simulated")
    ap.add_argument("--tol-pct", type=float, default=5.0, help="with --simulate: output tok/s and TPOT "
                    "within this %% of simulate's count as faithful")
    ap.add_argument("--ttft-allowance-ms", type=float, default=100.0, help="with --simulate: mean TTFT "
                    "at most this much (ms) above simulate's counts as faithful (the host path)")
    args = ap.parse_args()
    if args.trace and args.fixed_lengths:
        ap.error("--trace and --fixed-lengths exclude each other")
    fixed = None
    if args.fixed_lengths:
        try:
            fixed = tuple(int(x) for x in args.fixed_lengths.split(":"))
            assert len(fixed) == 2 and min(fixed) > 0
        except (ValueError, AssertionError):
            ap.error(f"--fixed-lengths wants IN:OUT in tokens, e.g. 128:512, not {args.fixed_lengths!r}")
    if args.trace:
        args.rates = "0"
    cfg = (f'[[backends]]\nname = "emu"\nmodel = "{args.model}"\nmode = "emulate"\nprofile = "{args.profile}"\n'
           f'replicas = {args.replicas}\nmax_model_len = 32768\n'
           f'extra_args = {json.dumps(args.extra_args.split())}\n')
    url, proc, log = start_gateway("capacity", cfg)
    rows, best, best_faithful = [], None, None
    try:
        wait_healthy(url, proc, timeout_s=600, path="/ready")
        out = Path(tempfile.mkdtemp())
        for rate in [float(r) for r in args.rates.split(",") if r]:
            n = max(10, int(rate * args.seconds))
            if fixed:
                trace = out / f"fixed{rate:g}.jsonl"
                n = fixed_length_trace(rate, args.seconds, *fixed, trace)
                workload = ["--trace", str(trace)]
            elif args.trace:
                workload = ["--trace", args.trace]
            else:
                workload = ["--request-rate", str(rate), "--num-prompts", str(n), "--seed", str(args.seed)]
            before, hist0 = lateness_counts(url), histogram_sums(url)
            res = out / f"r{rate}.json"
            cpu0, kids0 = cpu_by_role(proc.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.time()
            spies = []
            if args.spy:
                roles = {r: pid for pid, (r, _) in cpu0.items() if r in SPY_CATEGORIES}
                pool = cf.ThreadPoolExecutor(len(roles) or 1)
                spies = [(r, pool.submit(lambda p=pid, r=r: (time.sleep(5), spy_breakdown(p, r, args.spy))[1]))
                         for r, pid in roles.items()]
            subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "--headless",
                            "-H", url, *workload, "--result-json", str(res)],
                           cwd=ROOT, capture_output=True, timeout=1800)
            wall = time.time() - t0
            kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            cores = cpu_split(cpu0, cpu_by_role(proc.pid), (kids1.ru_utime + kids1.ru_stime)
                              - (kids0.ru_utime + kids0.ru_stime), wall)
            after, hist1 = lateness_counts(url), histogram_sums(url)
            delta = [a - b for a, b in zip(after, before)]
            d = json.loads(res.read_text()) if res.exists() else {}
            p50, p99, mx = (quantile_from_counts(delta, q) * 1000 for q in (0.5, 0.99, 1.0))
            ok = p99 < args.p99_ms and d.get("failed", 1) == 0
            row = {"rate": "trace" if args.trace else f"{rate:g}", "prompts": None if args.trace else n,
                   "workload": f"fixed {fixed[0]}:{fixed[1]}" if fixed else "trace" if args.trace else "ShareGPT",
                   "completed": d.get("completed"), "failed": d.get("failed"),
                   "out_tok_s": d.get("output_throughput"), "mean_ttft_ms": d.get("mean_ttft_ms"),
                   "mean_tpot_ms": d.get("mean_tpot_ms"), "mean_itl_ms": d.get("mean_itl_ms"),
                   "steps": sum(delta), "late_p50_ms": p50,
                   "late_p99_ms": p99, "late_max_ms": mx, "sustained": ok, "wall_s": round(wall, 1), "cores": cores,
                   "ttft_ms_by_layer": {"client (Locust)": d.get("mean_ttft_ms") and round(d["mean_ttft_ms"], 1),
                                        **ttft_by_layer(hist0, hist1)}}
            row["spy"] = {r: f.result() for r, f in spies}
            if args.simulate:
                sim = simulate(args, workload, out / f"sim{rate}.json")
                row["simulate"] = {k: sim.get(k) for k in ("completed", "output_throughput", "mean_ttft_ms",
                                                         "mean_tpot_ms", "mean_itl_ms")}
                row["faithful"] = faithful(row, sim, args.tol_pct, args.ttft_allowance_ms)
                if row["faithful"]:
                    best_faithful = row
            rows.append(row)
            print(json.dumps(row), flush=True)
            if ok:
                best = row
    finally:
        proc.stop()
    print(f"\nreplicas {args.replicas}, profile {args.profile}, extra args {args.extra_args.split()}")
    print("| rate | completed | failed | out tok/s | mean TTFT ms | mean TPOT ms | mean ITL ms | steps "
          "| lateness p50 / p99 / max ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['rate']} | {r['completed']} | {r['failed']} | {r['out_tok_s'] or 0:.0f} | "
              f"{r['mean_ttft_ms'] or 0:.1f} | {r['mean_tpot_ms'] or 0:.2f} | {r['mean_itl_ms'] or 0:.2f} | "
              f"{r['steps']} | "
              f"{r['late_p50_ms']:g} / {r['late_p99_ms']:g} / {r['late_max_ms']:g} |")
    if args.simulate:
        print("\nemulated (simulate) on the same requests and arrivals; difference in brackets:")
        print("| rate | out tok/s | mean TTFT ms | mean TPOT ms | mean ITL ms | faithful |")
        print("|---:|---:|---:|---:|---:|---|")
        for r in rows:
            sim = r.get("simulate") or {}
            cells = []
            for ours, theirs, fmt in (("out_tok_s", "output_throughput", ",.0f"),
                                      ("mean_ttft_ms", "mean_ttft_ms", ",.1f"),
                                      ("mean_tpot_ms", "mean_tpot_ms", ".2f"), ("mean_itl_ms", "mean_itl_ms", ".2f")):
                e, m = r.get(ours), sim.get(theirs)
                cells.append(f"{e:{fmt}} ({m:{fmt}}) [{(e - m) / m * 100:+.1f} %]" if e and m else "-")
            print(f"| {r['rate']} | " + " | ".join(cells) + f" | {'yes' if r.get('faithful') else 'no'} |")
    print("\ncores used per process role (CPU s / wall s over each rate's run, the Locust client included):")
    for r in rows:
        print(f"  {r['rate']} req/s: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["cores"].items())))
    print("\nmean TTFT (ms) where each layer stamps it, outermost first (client > gateway > vLLM's API "
          "server > the engine's queue; the gap between two layers is what the outer one adds):")
    for r in rows:
        print(f"  {r['rate']} req/s: " + ", ".join(f"{k} {v}" for k, v in r["ttft_ms_by_layer"].items()))
    for r in rows:
        for role, cats in (r["spy"] or {}).items():
            if cats:
                shares = ", ".join(f"{k} {v}%" for k, v in cats.items())
                print(f"  {r['rate']} req/s, {role}, py-spy samples: {shares}")
    if best:
        print(f"highest sustained (lateness p99 < {args.p99_ms} ms): {best['rate']} req/s, "
              f"{best['out_tok_s']:.0f} output tok/s")
    else:
        print("no rate sustained")
    if args.simulate:
        crit = (f"output tok/s and TPOT within {args.tol_pct:g} % of simulate's, TTFT at most "
                f"+{args.ttft_allowance_ms:g} ms")
        if best_faithful:
            print(f"highest faithful ({crit}): {best_faithful['rate']} req/s, "
                  f"{best_faithful['out_tok_s']:.0f} output tok/s")
        else:
            print(f"no rate faithful ({crit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
