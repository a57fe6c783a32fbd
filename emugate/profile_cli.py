"""``emugate profile``: capture, build, synth, calibrate, inspect, convert-llm-emu, validate.

Run ``emugate profile COMMAND --help`` for each command's options
(``python -m profiles ...`` is the same command).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _backend_from_args(args):
    """A BackendConfig from --config/--backend, or from --model and engine flags."""
    from gateway.config import BackendConfig, load_config
    if args.config:
        cfg = load_config(args.config)
        if args.backend:
            return cfg, cfg.backend(args.backend)
        return cfg, cfg.backends[0]
    if not args.model:
        sys.exit("error: give --config FILE [--backend NAME], or --model DIR")
    b = BackendConfig(name="capture", model=args.model, mode="real", load_format=args.load_format,
                      dtype=args.dtype, max_model_len=args.max_model_len, extra_args=args.extra_args or [])
    return None, b


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which real backend (a gateway config, or a model and engine flags)")
    g.add_argument("--config", help="gateway TOML config")
    g.add_argument("--backend", help="backend name in --config (default: the first)")
    g.add_argument("--model", help="model directory or bundled model name")
    g.add_argument("--load-format", default=None, help="e.g. dummy (random weights)")
    g.add_argument("--dtype", default=None, help="vLLM's --dtype, e.g. bfloat16")
    g.add_argument("--max-model-len", type=int, default=None, help="vLLM's --max-model-len (tokens)")
    g.add_argument("--extra-args", nargs=argparse.REMAINDER, help="passed to vLLM (put last)")


def cmd_capture(args) -> int:
    from emugate.capture import SweepPlan, capture
    _, b = _backend_from_args(args)
    if b.mode != "real":
        b = b.model_copy(update={"mode": "real", "profile": None})
    if args.quick:
        return _quick_capture(args, b)
    plan = SweepPlan(token_budget=args.token_budget, workload_requests=args.workload_requests,
                     workload_rates=[float(x) for x in args.workload_rates.split(",") if x],
                     capture_seed=args.seed, grid_output=args.grid_output, repeats=args.repeats,
                     warmup_requests=args.warmup_requests,
                     grid_temperatures=[float(x) for x in args.grid_temperatures.split(",") if x])
    if args.max_concurrency:
        plan.concurrency = [c for c in plan.concurrency if c <= args.max_concurrency]
    capture(b, args.out, plan, warmup_steps=args.warmup_steps, log_file=args.log, starts=args.starts,
            min_starts=args.min_starts, max_starts=args.max_starts, tolerance_pct=args.start_tolerance)
    return 0


def _quick_capture(args, b) -> int:
    """``capture --quick``: one server start over QUICK_PLAN's shapes; then an anchored synthesized profile
    (``--hardware``: a GPU aiconfigurator-core has tables for), or a profile of the recorded steps."""
    import time

    from emugate.capture import QUICK_PLAN, capture
    from profiles.build import read_trace_columns
    from profiles.format import Profile
    from profiles.oracle import heldout_errors
    t0 = time.perf_counter()
    trace_out = str(args.out) + ".quick-steps.emuprof.zst" if args.hardware else args.out
    prof = capture(b, trace_out, QUICK_PLAN, warmup_steps=args.warmup_steps, log_file=args.log, starts=1)
    minutes = (time.perf_counter() - t0) / 60
    if not args.hardware:
        errs = heldout_errors(prof, "feature") if prof.num_steps >= 50 else {}
        band = ", ".join(f"{ph} median {e['median']:.1f} % / p90 {e['p90']:.1f} %" for ph, e in errs.items())
        prof.meta.update({"quick_capture": {"steps": prof.num_steps, "minutes": round(minutes, 1),
                                            "heldout_errors": errs},
                          "label": f"ANCHORED: a quick capture of {prof.num_steps} steps on this host (one server "
                                   f"start, {minutes:.1f} min); held-out oracle |error| on its steps: {band}"})
        prof.save(args.out)
        print(prof.meta["label"])
        return 0
    from profiles.anchored import anchored_profile
    from profiles.assets import resolve_model_dir
    from profiles.synth import SynthSpec
    steps = read_trace_columns(Path(trace_out).with_suffix(".trace.jsonl"))[1]
    warm = prof.meta["warmup_steps"][0] if isinstance(prof.meta["warmup_steps"], list) else prof.meta["warmup_steps"]
    steps = {k: v[warm:] for k, v in steps.items()}
    spec = SynthSpec(hardware=args.hardware, model_dir=str(resolve_model_dir(b.model)), aic_model=args.aic_model,
                     dtype=args.weight_dtype, tp=args.tp)
    out, model = anchored_profile(steps, spec, output_lengths=Profile.load(trace_out).output_lengths)
    out.meta["anchored"]["capture_minutes"] = round(minutes, 1)
    out.save(args.out)
    print(f"{out.meta['label']}\n-> {args.out} (capture {minutes:.1f} min)")
    return 0


def _warmup_counts(text: str) -> int | list[int]:
    """``--warmup-steps`` of ``profile build``: one count for every trace, or one per trace (comma-separated)."""
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or comma-separated counts, got {text!r}") from None
    if any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"step counts cannot be negative: {text!r}")
    return vals[0] if len(vals) == 1 else vals


def cmd_build(args) -> int:
    from profiles.build import build_profile
    from profiles.format import ProfileError
    try:
        prof = build_profile(args.traces, warmup_steps=args.warmup_steps)
    except ProfileError as e:
        sys.exit(f"error: {e}")
    prof.save(args.out)
    print(f"{prof.num_steps} steps -> {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from profiles.summary import inspect_profile
    print(inspect_profile(args.profile, png=args.png, heldout=not args.no_heldout))
    return 0


def cmd_convert(args) -> int:
    from profiles.llm_emu import convert_llm_emu
    prof = convert_llm_emu(args.pack)
    prof.save(args.out)
    print(f"{prof.num_steps} samples from {args.pack} -> {args.out}")
    return 0


def cmd_synth(args) -> int:
    """Synthesize a GPU profile (aiconfigurator-core + the step-time model), print its summary."""
    import numpy as np
    from rich.progress import Progress

    from profiles.assets import resolve_model_dir
    from profiles.format import Profile
    from profiles.stepmodel import StepModel, shipped_model
    from profiles.synth import SynthSpec, synthesize
    model_dir = resolve_model_dir(args.model)
    spec = SynthSpec(hardware=args.hardware, model_dir=str(model_dir), aic_model=args.aic_model,
                     dtype=args.dtype, tp=args.tp, gpu_memory_utilization=args.gpu_memory_utilization,
                     max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
                     max_num_seqs=args.max_num_seqs, num_steps=args.steps, seed=args.seed,
                     expert_parallel=args.enable_expert_parallel)
    model = StepModel.raw() if args.raw else shipped_model()
    lens = None
    if args.output_lengths_from:
        lens = np.asarray(Profile.load(args.output_lengths_from).output_lengths)
    with Progress(transient=True) as bar:
        task = bar.add_task(f"synthesizing {args.hardware} / {model_dir.name}", total=args.steps)
        prof, kv = synthesize(spec, model, lens, progress=lambda i, n: bar.update(task, completed=i, total=n))
    if args.raw:
        prof.meta["label"] = "ESTIMATE: raw aiconfigurator-core kernel sums, no step-time model"
    prof.meta["command"] = " ".join(sys.argv)
    prof.save(args.out)
    print(f"{prof.num_steps} synthesized steps -> {args.out}")
    for w in prof.meta.get("coverage_warnings", []):
        print(f"warning: outside what the step-time model was fitted on: {w}", file=sys.stderr)
    print(f"KV capacity: {kv.arithmetic()}")
    from profiles.summary import synth_table
    from profiles.stepmodel import AicBreakdown, Deployment
    d = prof.fingerprint
    dep = Deployment(d["hardware"], d["aic_model"], args.dtype, args.tp, int(d["max_num_seqs"]),
                     d["model_dims"]["num_layers"], d["model_dims"]["hidden_size"], bool(d.get("expert_parallel")))
    aic = AicBreakdown(dep)
    print(synth_table(args.out, exact=lambda s: model.step_ms(aic.parts(s), dep)))
    return 0


def cmd_calibrate(args) -> int:
    """Print the cross-validation table by configuration; with --write, refit and ship the model."""
    from profiles.calibration import calibration_table, crossval_rows, default_model, observations
    from profiles.stepmodel import CROSSVAL, SHIPPED
    obs = observations()
    print(calibration_table(obs))
    if args.write:
        m = default_model(obs)
        SHIPPED.write_text(json.dumps(m.to_dict(), indent=1) + "\n")
        CROSSVAL.write_text(json.dumps(crossval_rows(obs), indent=1) + "\n")
        print(f"wrote {SHIPPED} and {CROSSVAL}")
    return 0


def cmd_validate(args) -> int:
    from emugate.validate import main_validate
    return main_validate(args)


_DEFAULTS = argparse.ArgumentDefaultsHelpFormatter


def _add_start_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """How many server starts a capture pools (``capture``; ``validate`` with ``prefix="capture-"``)."""
    from emugate.capture import MAX_STARTS, MIN_STARTS, TOLERANCE_PCT
    g = p.add_argument_group("server starts pooled into the profile (each warmed up and swept in full, ~20 min "
                             "on a 2-core host; seeds shift by 10 per start)")
    g.add_argument(f"--{prefix}starts", type=int, default=None,
                   help="a fixed number of starts (default: as many as the evidence asks for, below)")
    g.add_argument(f"--{prefix}min-starts", type=int, default=MIN_STARTS, help="starts before the first check")
    g.add_argument(f"--{prefix}max-starts", type=int, default=MAX_STARTS,
                   help="cap: stop here even if the pooled offset is still uncertain (said so)")
    g.add_argument(f"--{prefix}start-tolerance", type=float, default=TOLERANCE_PCT,
                   help="stop adding starts once the standard error of the pooled profile's offset (sd of the "
                        "per-start offsets / sqrt(starts)) is within this many %%")


def build_parser(prog: str = "emugate profile") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("capture", formatter_class=_DEFAULTS,
                       help="run real vLLM with the ProfilingExecutor, sweep, build a profile")
    _add_backend_args(p)
    p.add_argument("-o", "--out", required=True, help="profile file to write (.emuprof.zst)")
    p.add_argument("--token-budget", type=int, default=16384, help="max concurrency x prompt tokens per grid cell")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap the grid's concurrency levels")
    p.add_argument("--grid-output", type=int, default=24, help="tokens decoded per grid request")
    p.add_argument("--repeats", type=int, default=1, help="passes over the grid")
    p.add_argument("--grid-temperatures", default="0,1",
                   help="sampling temperatures the grid runs at, one pass each (0: greedy; vLLM's sampler "
                        "costs differ between all-greedy and random-sampling batches)")
    p.add_argument("--workload-requests", type=int, default=100,
                   help="ShareGPT requests per workload rate, driven by the Locust workload (0: none)")
    p.add_argument("--workload-rates", default="0.4,1.1,2.0",
                   help="Poisson request rates (req/s) of the workload phase, light load to beyond saturation; "
                        "validate at other rates (validate warns about shared ones)")
    p.add_argument("--seed", type=int, default=1000, help="capture seed (validation must use others)")
    p.add_argument("--warmup-requests", type=int, default=60,
                   help="Locust requests (2 req/s, seed SEED+500) that warm the server up before recording")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="leading steps dropped (default: exactly the warm-up's steps, counted from the trace)")
    p.add_argument("--log", default=None, help="file for the vLLM server log")
    _add_start_args(p)
    g = p.add_argument_group("quick capture (a few minutes of device time; ANCHORED profile)")
    g.add_argument("--quick", action="store_true",
                   help="one server start over a small designed set of step shapes (~120 steps) instead of the full "
                        "sweep; with --hardware, anchor the GPU step-time model on them and synthesize the profile")
    g.add_argument("--hardware", default=None,
                   help="with --quick: the GPU (h100-sxm, h200, a100-sxm, l40s, rtx-pro-6000, b200) to anchor on")
    g.add_argument("--aic-model", default=None, help="with --quick --hardware: the model id AIC knows")
    g.add_argument("--weight-dtype", default="bf16", choices=["bf16", "fp8"], help="with --quick --hardware")
    g.add_argument("--tp", type=int, default=1, help="with --quick --hardware: tensor parallel size")
    p.set_defaults(fn=cmd_capture)

    p = sub.add_parser("build", formatter_class=_DEFAULTS,
                       help="build a profile from ProfilingExecutor traces")
    p.add_argument("traces", nargs="+", help="ProfilingExecutor trace files (JSONL), one per server start")
    p.add_argument("-o", "--out", required=True, help="profile file to write (.emuprof.zst)")
    p.add_argument("--warmup-steps", type=_warmup_counts, default=50,
                   help="leading steps dropped from each trace: one count, or one per trace (comma-separated)")
    p.set_defaults(fn=cmd_build)

    p = sub.add_parser("synth", formatter_class=_DEFAULTS,
                       help="synthesize a GPU profile from aiconfigurator-core, calibrated (an estimate)")
    p.add_argument("--hardware", required=True,
                   help="GPU: h100-sxm, h200, a100-sxm, l40s, rtx-pro-6000, b200 (or an AIC system name)")
    p.add_argument("--model", required=True, help="model directory with config.json (or a bundled model name)")
    p.add_argument("--aic-model", default=None,
                   help="the model id AIC knows (it ships e.g. meta-llama/Meta-Llama-3.1-8B); default: --model")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8"], help="weight dtype (KV cache stays bf16)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: experts split whole over the TP ranks, as vLLM's flag (default: each expert "
                        "sharded by TP)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="as vLLM's flag")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM 0.32's for that GPU")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: vLLM 0.32's for that GPU")
    p.add_argument("--steps", type=int, default=12000, help="step shapes in the table")
    p.add_argument("--seed", type=int, default=0, help="seed of the step shapes drawn")
    p.add_argument("--raw", action="store_true", help="no step-time model (raw AIC kernel sums)")
    p.add_argument("--output-lengths-from", default="cpu-epyc-2c_mistral-h1024-l8",
                   help="profile whose natural output lengths to reuse for EOS draws ('' for none)")
    p.add_argument("-o", "--out", required=True, help="profile file to write (.emuprof.zst)")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("calibrate", formatter_class=_DEFAULTS,
                       help="the GPU step-time model's error by configuration, each scored by a fit that never saw it "
                            "(profiles/reference)")
    p.add_argument("--write", action="store_true",
                   help="refit on every reference observation and write profiles/reference/stepmodel.json (what "
                        "synth uses) and crossval.json (the table, for the docs)")
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("inspect", formatter_class=_DEFAULTS,
                       help="summary, held-out oracle accuracy and a PNG latency heatmap")
    p.add_argument("profile", help="profile file or bundled name")
    p.add_argument("--png", default=None, help="write the heatmap here")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out accuracy table")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("convert-llm-emu", formatter_class=_DEFAULTS,
                       help="convert an LLM-Emu serving_step_cycle_2d JSON pack")
    p.add_argument("pack", help="LLM-Emu serving_step_cycle_2d JSON pack")
    p.add_argument("-o", "--out", required=True, help="profile file to write (.emuprof.zst)")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("validate", formatter_class=_DEFAULTS,
                       help="real vs emulated side by side over a rate sweep (fidelity table)")
    from emugate.validate import add_validate_args
    add_validate_args(p)
    p.set_defaults(fn=cmd_validate)
    return ap


def main(argv: list[str] | None = None, prog: str = "emugate profile") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
