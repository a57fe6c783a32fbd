"""``emugate profile validate``: real vs emulated, side by side, with the real system's own noise.

For a real backend and an emulated backend of the same model and engine
settings (both from one gateway config):

1. capture a profile from the real backend (:mod:`emugate.capture`, seed
   1000) unless the emulated backend's profile exists or ``--profile`` is given;
2. start the emulated server and *two* real servers (two starts of the same
   backend), warm each up (requests of another seed, not measured);
3. for every (request rate, burstiness) in the sweep, drive the same ShareGPT
   plan (``loadtests`` sampler and schedule, ``--seed``, ``ignore_eos``)
   with the Locust workload against the first real server, the emulated
   one, then the second real server. The emulated run sits between the two
   real ones, so slow drift of the host shows in the noise rather than in
   the error; and the two real runs come from different server starts,
   because the profile comes from yet another start (the capture's), and a
   start's own speed is part of the real system's spread (measured with
   ``benchmarks/restart_noise.py``: up to 5% between warm starts for small
   decode batches, on top of run-to-run noise). Only the server being
   driven runs: the other two are paused (SIGSTOP of their process groups,
   :meth:`gateway.launch.ServerProcess.pause`) from the warm-up on, because
   idle neighbours slow a real server's decode steps by 1.0-3.8% on a
   2-core host (``benchmarks/idle_neighbours.py``) while the profile's
   capture ran alone;
4. every server records a step trace (``capture_trace``: the
   ProfilingExecutor on the real ones, the EmulatedProfilingExecutor on the
   emulated one), and each run's window of it gives the engine-side figures
   (:mod:`emugate.engine_trace`: steps, mean batch, preemptions, recomputed
   and prefix-cached tokens), stored in the run's JSON under ``"engine"``;
5. write ``validate.csv``, ``validate.md`` and ``validate.png``: per rate,
   the % error of emulated vs real (the mean of the two real runs) for mean,
   p50 and p99 TTFT, TPOT, ITL, E2EL and output throughput, with the real
   runs' own difference beside each, and the engine figures of all three
   runs (``--report-only`` rebuilds them).

No request, seed or rate is both in the profile and in the validation: the
capture uses seeds 1000-1002 and workload rates 0.4/1.1/2.0 req/s, the
validation seed 7 and, in the README's sweep, rates between and beyond those
(a rate the profile's capture ran at is reported with a warning).

Same hardware: on a CPU host the real backend's device *is* the
host CPU, and CPUs that vLLM all calls ``cpu`` differ by up to 2.7x per
prefill token (:mod:`profiles.hostinfo`). A profile recorded on another CPU
(or one whose fingerprint does not name its CPU) is not compared with this
host's real backend: validate captures a profile here first, as when none
exists.
"""
from __future__ import annotations

import contextlib
import csv
import json
import time
from collections.abc import Iterator
from pathlib import Path

from emugate.engine_trace import ENGINE_KEYS, engine_figures
from loadtests.runner import run_locust

METRIC_KEYS = [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p99")]
METRIC_KEYS.append("output_throughput")
BOUNDS = {"ttft": 10.4, "tpot": 4.8, "itl": 4.8, "e2el": 5.3, "output_throughput": 1.9}  # LLM-Emu, max |err| %


def add_validate_args(p) -> None:
    p.add_argument("--config", required=True, help="gateway TOML with both backends")
    p.add_argument("--real", default=None, help="real backend name (default: the config's first real one)")
    p.add_argument("--emulated", default=None, help="emulated backend name (default: the first emulated one)")
    p.add_argument("--profile", default=None, help="use this profile instead of the emulated backend's")
    p.add_argument("--rates", default="0.5,1,2,3", help="request rates (req/s), comma-separated")
    p.add_argument("--burstiness", default="1,0.25", help="gamma shapes, comma-separated (1 = Poisson)")
    p.add_argument("--points", default=None,
                   help="explicit RATE:BURSTINESS pairs, e.g. 0.5:1,1:1,1.5:1,1:0.25 (overrides the two above)")
    p.add_argument("--num-prompts", type=int, default=60, help="ShareGPT requests per run (each point runs 3)")
    p.add_argument("--seed", type=int, default=7, help="validation seed (the capture uses 1000)")
    p.add_argument("--warmup-prompts", type=int, default=40,
                   help="unmeasured requests (4 req/s) that warm each server up before the sweep")
    p.add_argument("--oracle", default=None, choices=["feature", "grid2d"], help="override the backend's oracle")
    p.add_argument("--out", default="runs/validate", help="output folder")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild validate.csv/.md/.png from the run JSONs already in --out")
    from emugate.profile_cli import _add_start_args
    _add_start_args(p, prefix="capture-")  # when validate has to capture a profile first (another CPU)


def warm_up(url: str, model: str, tokenizer: str, out: Path, num_prompts: int, seed: int) -> dict:
    """Unmeasured requests at 4 req/s (JIT shapes, allocator, caches) before a server is measured."""
    return run_locust(url, model, out, rate=4.0, num_prompts=num_prompts, seed=seed, tokenizer=tokenizer)


def _err(a: float, b: float) -> float:
    return (b - a) / a * 100.0 if a else float("nan")


def compare_runs(real: dict, real2: dict, emu: dict) -> dict[str, tuple[float, float]]:
    """{metric: (emulated vs real %, real-vs-real noise %)}.

    The reference is the mean of the two real runs (on this machine one real
    run can differ from the next by ~20%: BASELINES.md and our runs), the
    error is (emulated - reference) / reference, and the noise is
    (real2 - real1) / reference, the real system's own spread (two runs on
    two server starts, in ``main_validate``).
    """
    out = {}
    for k in METRIC_KEYS:
        ref = (real[k] + real2[k]) / 2
        out[k] = (_err(ref, emu[k]), _err(ref, real2[k]) - _err(ref, real[k]))
    return out


#: A point is flagged when the profile's oracle times that point's real steps off by more than this (%).
BIAS_FLAG_PCT = 2.0


def bias_flag(bias_pct: float | None) -> str | None:
    """The flag for a point whose real steps the profile over- or under-times by more than
    :data:`BIAS_FLAG_PCT` (``bias_pct``: :func:`profiles.spread.oracle_bias` on them), else None."""
    if bias_pct is None or not abs(bias_pct) > BIAS_FLAG_PCT:
        return None
    return (f"the capture ran {abs(bias_pct):.1f}% {'slower' if bias_pct > 0 else 'faster'} than these real "
            f"starts (the profile's oracle on their own steps: {bias_pct:+.1f}%)")


def write_reports(rows: list[dict], out: Path) -> None:
    """CSV (one row per rate, burstiness, metric), markdown table and PNG.

    When ``out/profile.json`` holds the profile's ``start_spread`` it heads the table, and a
    point whose runs carry ``oracle_bias_pct`` gets a column with it and, beyond
    :data:`BIAS_FLAG_PCT`, a flag under the table.
    """
    from profiles.spread import describe_spread
    info = json.loads((out / "profile.json").read_text()) if (out / "profile.json").exists() else {}
    with open(out / "validate.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_rate", "burstiness", "metric", "real", "real_again", "emulated", "error_pct", "noise_pct"])
        for r in rows:
            for k in METRIC_KEYS:
                e, n = r["cmp"][k]
                w.writerow([r["rate"], r["burst"], k, r["real"][k], r["real2"][k], r["emu"][k], f"{e:.2f}", f"{n:.2f}"])
    cols = ["mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
            "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "median_e2el_ms", "p99_e2el_ms",
            "output_throughput"]
    short = {c: c.replace("_ms", "").replace("median", "p50").replace("output_throughput", "out tok/s") for c in cols}
    lines = ["Emulated vs real (mean of two real runs on two server starts), % error; in brackets the real "
             "system's own difference (real2 - real1, same reference). "
             "LLM-Emu's published max |error|: TTFT 10.4%, TPOT/ITL 4.8%, E2EL 5.3%, throughput 1.9%."]
    if info:
        lines += ["", f"Profile `{info.get('profile')}`: {describe_spread(info.get('start_spread'))}."]
    has_bias = any("oracle_bias_pct" in r["real"] for r in rows)
    lines += ["", "| rate (req/s) | burstiness | " + " | ".join(short[c] for c in cols)
              + (" | oracle on real steps (real / real2) |" if has_bias else " |"),
              "|---|---|" + "---:|" * (len(cols) + has_bias)]
    flags = []
    for r in rows:
        cells = [f"{r['cmp'][c][0]:+.1f} ({r['cmp'][c][1]:+.1f})" for c in cols]
        if has_bias:
            b1, b2 = r["real"].get("oracle_bias_pct"), r["real2"].get("oracle_bias_pct")
            cells.append(" / ".join("n/a" if b is None else f"{b:+.1f}" for b in (b1, b2)))
            both = [b for b in (b1, b2) if b is not None]
            flag = bias_flag(sum(both) / len(both) if both else None)
            if flag:
                flags.append(f"- **{r['rate']} req/s, burstiness {r['burst']}**: {flag}")
        lines.append(f"| {r['rate']} | {r['burst']} | " + " | ".join(cells) + " |")
    if flags:
        lines += ["", f"Flagged points (the profile times these real steps off by more than {BIAS_FLAG_PCT:g}%: "
                      "the emulator's error there is mostly the capture's offset, not the scheduler):", *flags]
    lines += engine_lines(rows)
    (out / "validate.md").write_text("\n".join(lines) + "\n")
    (out / "validate.json").write_text(json.dumps(summary_doc(rows, info), indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for ax, m in zip(axes, ("ttft", "tpot", "itl", "e2el", "output_throughput")):
        key = f"mean_{m}_ms" if m != "output_throughput" else m
        for burst in sorted({r["burst"] for r in rows}):
            sel = [r for r in rows if r["burst"] == burst]
            xs = [r["rate"] for r in sel]
            ax.plot(xs, [r["real"][key] for r in sel], "o-", label=f"real b={burst}")
            ax.plot(xs, [r["emu"][key] for r in sel], "x--", label=f"emulated b={burst}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "validate.png", dpi=90)
    plt.close(fig)


def summary_doc(rows: list[dict], info: dict) -> dict:
    """``validate.json``: what the fidelity docs page is generated from (no per-request data).

    ``{"profile", "start_spread", "points": [{"rate", "burstiness", "metrics": {key: {"real", "real2",
    "emulated", "error_pct", "noise_pct"}}, "engine": {run: figures}, "oracle_bias_pct": {run: %}}]}``
    """
    points = []
    for r in rows:
        points.append({
            "rate": r["rate"], "burstiness": r["burst"],
            "metrics": {k: {"real": r["real"][k], "real2": r["real2"][k], "emulated": r["emu"][k],
                            "error_pct": round(r["cmp"][k][0], 3), "noise_pct": round(r["cmp"][k][1], 3)}
                        for k in METRIC_KEYS},
            "engine": {n: r[n].get("engine") for n in ("real", "emu", "real2") if r[n].get("engine")},
            "oracle_bias_pct": {n: r[n]["oracle_bias_pct"] for n in ("real", "real2") if "oracle_bias_pct" in r[n]},
        })
    return {"profile": info.get("profile"), "start_spread": info.get("start_spread"), "points": points}


def fidelity_markdown(doc: dict, title: str) -> list[str]:
    """Markdown of a ``validate.json`` (:func:`summary_doc`): the error table with the real pair's
    difference, the oracle's bias on the real steps and the flags, against LLM-Emu's bounds."""
    from profiles.spread import describe_spread
    means = ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "output_throughput")
    short = {"mean_ttft_ms": "TTFT", "mean_tpot_ms": "TPOT", "mean_itl_ms": "ITL", "mean_e2el_ms": "E2EL",
             "output_throughput": "out tok/s"}
    bound = {k: BOUNDS[k.replace("mean_", "").replace("_ms", "")] for k in means}
    lines = [f"## {title}", "", f"Profile `{Path(str(doc.get('profile'))).name}`: "
             f"{describe_spread(doc.get('start_spread'))}.", "",
             "Each cell: % error of the emulated run's mean against the mean of two real runs on two server starts; "
             "in brackets the real runs' own difference (real2 - real1). **Bold**: beyond LLM-Emu's published "
             "bound (TTFT 10.4, TPOT/ITL 4.8, E2EL 5.3, throughput 1.9 %).", "",
             "| rate (req/s) | burstiness | " + " | ".join(short[k] for k in means)
             + " | oracle on real steps | preemptions (real / emu / real2) |",
             "|---:|---:|" + "---:|" * len(means) + "---:|---:|"]
    within = total = 0
    flags = []
    for p in doc["points"]:
        cells = []
        for k in means:
            e, n = p["metrics"][k]["error_pct"], p["metrics"][k]["noise_pct"]
            ok = abs(e) <= bound[k]
            within += ok
            total += 1
            cells.append(f"{'' if ok else '**'}{e:+.1f}{'' if ok else '**'} ({n:+.1f})")
        b = p.get("oracle_bias_pct", {})
        bias = " / ".join(f"{b[n]:+.1f}" for n in ("real", "real2") if n in b) or "n/a"
        pre = " / ".join(f"{p['engine'][n]['preemptions']:.0f}" for n in ("real", "emu", "real2")
                         if n in p.get("engine", {})) or "n/a"
        lines.append(f"| {p['rate']} | {p['burstiness']} | " + " | ".join(cells) + f" | {bias} | {pre} |")
        if b:
            f = bias_flag(sum(b.values()) / len(b))
            if f:
                flags.append(f"- {p['rate']} req/s, burstiness {p['burstiness']}: {f}")
    lines += ["", f"{within} of {total} means within LLM-Emu's bounds."]
    if flags:
        lines += ["", "Flagged points:", *flags]
    return lines


#: Engine figures shown per point in validate.md (the JSONs hold all of ``ENGINE_KEYS``).
ENGINE_SHOWN = ("steps", "mean_batch", "preemptions", "recomputed_tokens", "cached_tokens", "busy_s")


def engine_lines(rows: list[dict]) -> list[str]:
    """Markdown table of the engine figures per point: real / emulated / real2 in each cell."""
    have = [r for r in rows if all("engine" in r[n] for n in ("real", "emu", "real2"))]
    if not have:
        return []
    label = {k: lab for k, lab, _ in ENGINE_KEYS}
    lines = ["", "Engine side, from each server's step trace (real / emulated / real again):", "",
             "| rate (req/s) | burstiness | " + " | ".join(label[k] for k in ENGINE_SHOWN) + " |",
             "|---|---|" + "---:|" * len(ENGINE_SHOWN)]
    for r in have:
        cells = []
        for k in ENGINE_SHOWN:
            vals = [r[n]["engine"][k] for n in ("real", "emu", "real2")]
            fmt = "{:.1f}" if k in ("mean_batch", "busy_s") else "{:.0f}"
            cells.append(" / ".join(fmt.format(v) for v in vals))
        lines.append(f"| {r['rate']} | {r['burst']} | " + " | ".join(cells) + " |")
    return lines


def profile_problem(profile_fp: dict, here: dict) -> str | None:
    """Why a profile cannot be compared with this host's real backend, or None.

    ``profile_fp``: the profile's fingerprint; ``here``: :func:`profiles.hostinfo.host_cpu`.
    Only CPU profiles are checked (a GPU profile's device is named by ``device_name``).
    """
    from profiles.hostinfo import same_cpu
    if profile_fp.get("device_type") != "cpu":
        return None
    theirs = profile_fp.get("host_cpu")
    if theirs is None:
        return "its fingerprint does not name the CPU it was recorded on"
    if not same_cpu(theirs, here):
        return (f"it was recorded on {theirs.get('model_name')} x{theirs.get('logical_cpus')} "
                f"({', '.join(theirs.get('isa', []))}), this host is {here['model_name']} "
                f"x{here['logical_cpus']} ({', '.join(here['isa'])})")
    return None


def bundled_cpu_profile(backend, here: dict):
    """A bundled CPU profile recorded on this host's CPU for ``backend``'s model (its path), or None.

    ``here``: :func:`profiles.hostinfo.host_cpu`. The model must match the backend's model directory
    name (profiles are named ``<hardware>_<model>``), and the fingerprint must name this CPU.
    """
    from profiles.assets import BUNDLED_DIR
    from profiles.format import ProfileError, read_header
    model = Path(str(backend.model)).name
    for path in sorted(BUNDLED_DIR.glob(f"cpu-*_{model}.emuprof.zst")):
        try:
            fp = read_header(path.read_bytes()[:1 << 20], str(path))["fingerprint"]
        except ProfileError:
            continue
        if profile_problem(fp, here) is None:
            return path
    return None


def shared_rates(profile_meta: dict, rates: list[float]) -> list[float]:
    """Validation rates (req/s) the profile's capture workload also ran at."""
    plan = (profile_meta.get("capture") or {}).get("plan") or {}
    cap = {round(float(x), 6) for x in plan.get("workload_rates", [])}
    return sorted({r for r in rates if round(r, 6) in cap})


def rows_from_dir(out: Path) -> list[dict]:
    """Rows (rate, burstiness, runs, comparison) from r{rate}-b{burst}-{real,real2,emu}.json files."""
    rows = []
    for f in sorted(out.glob("r*-b*-emu.json")):
        tag = f.name.removesuffix("-emu.json")
        rate, burst = (float(x) for x in tag[1:].split("-b"))
        res = {n: json.loads((out / f"{tag}-{n}.json").read_text()) for n in ("real", "real2", "emu")}
        rows.append({"rate": rate, "burst": burst, **res, "cmp": compare_runs(res["real"], res["real2"], res["emu"])})
    return sorted(rows, key=lambda r: (-r["burst"], r["rate"]))


def traced_run(url: str, backend, trace: Path, n0: int, out_json: Path, oracle=None, **load) -> dict:
    """One Locust run (``loadtests.runner.run_locust`` keyword arguments) against a traced server
    whose trace holds ``n0`` steps before it; the result JSON gains ``"engine"``:
    :func:`emugate.engine_trace.engine_figures` of the steps recorded after those, and
    ``"trace_window"``: [trace path, first step, end step], and is rewritten with them.
    The server is idle between runs, so the end step is the next run's ``n0`` (one trace read per run).
    With ``oracle`` (a real server's run), ``"oracle_bias_pct"``: :func:`profiles.spread.oracle_bias`
    of that oracle on the run's steps."""
    from emugate.capture import steps_since
    from profiles.spread import oracle_bias
    res = run_locust(url, backend.model_name, out_json, **load)
    cols = steps_since(trace, n0)
    res["engine"] = engine_figures(cols)
    if oracle is not None:
        res["oracle_bias_pct"] = round(oracle_bias(oracle, cols), 3)
    res["trace_window"] = [str(trace), n0, n0 + len(cols["latency_us"])]
    out_json.write_text(json.dumps(res))
    return res


@contextlib.contextmanager
def driven_alone(url: str, proc) -> Iterator[None]:
    """Resume a paused server (:meth:`gateway.launch.ServerProcess.pause`), check it answers
    ``/health``, and pause it again after the block, so it runs only while it is being driven.

    Raises:
        RuntimeError, TimeoutError: from :func:`gateway.launch.wait_healthy` (the server died
            while paused, or does not answer within 60 s of resuming).
    """
    from gateway.launch import wait_healthy
    proc.resume()
    wait_healthy(url, proc, timeout_s=60)
    yield
    proc.pause()


def main_validate(args) -> int:
    if args.report_only:
        out = Path(args.out).resolve()
        rows = rows_from_dir(out)
        if not rows:
            raise FileNotFoundError(f"no r*-b*-emu.json runs in {out}")
        write_reports(rows, out)
        print((out / "validate.md").read_text())
        return 0
    from gateway.config import load_config
    from emugate.capture import steps_since, with_trace
    from gateway.launch import resolve_model, started_backend, wait_healthy
    from profiles.assets import resolve_profile
    cfg = load_config(args.config)
    real_b = cfg.backend(args.real) if args.real else next(b for b in cfg.backends if b.mode == "real")
    emu_b = cfg.backend(args.emulated) if args.emulated else next(b for b in cfg.backends
                                                                   if b.mode == "emulate" and b.profile)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    profile = args.profile or emu_b.profile
    from profiles.format import Profile
    from profiles.hostinfo import host_cpu
    try:
        profile = str(resolve_profile(profile))
        prof = Profile.load(profile)
        why = profile_problem(prof.fingerprint, host_cpu())
    except FileNotFoundError:
        why = "it does not exist"
    if why and not args.profile:
        mine = bundled_cpu_profile(real_b, host_cpu())
        if mine is not None:
            print(f"[validate] not comparing with profile {profile!r}: {why}. Using the bundled profile "
                  f"{mine.name} recorded on this CPU instead")
            profile, prof, why = str(mine), Profile.load(mine), None
    if why:
        from emugate.capture import SweepPlan, capture
        print(f"[validate] not comparing with profile {profile!r}: {why}. Capturing one from {real_b.name} "
              f"on this host (server starts pooled until their offsets agree, seeds from 1000, workload rates "
              f"{SweepPlan().workload_rates} req/s)")
        profile = str(out / "captured.emuprof.zst")
        prof = capture(real_b, profile, SweepPlan(), log_file=out / "capture.log", starts=args.capture_starts,
                       min_starts=args.capture_min_starts, max_starts=args.capture_max_starts,
                       tolerance_pct=args.capture_start_tolerance)
    emu_b = emu_b.model_copy(update={"profile": profile, **({"oracle": args.oracle} if args.oracle else {})})
    from profiles.oracle import build_oracle
    from profiles.spread import describe_spread
    oracle = build_oracle(prof, emu_b.oracle)
    (out / "profile.json").write_text(json.dumps({"profile": profile, "start_spread": prof.meta.get("start_spread")}))
    print(f"[validate] profile {profile}: {describe_spread(prof.meta.get('start_spread'))}")
    rates = [float(x) for x in args.rates.split(",")]
    bursts = [float(x) for x in args.burstiness.split(",")]
    points = ([(float(b_), float(r_)) for r_, b_ in (x.split(":") for x in args.points.split(","))]
              if args.points else [(b_, r_) for b_ in bursts for r_ in rates])
    shared = shared_rates(prof.meta, [r_ for _, r_ in points])
    if shared:
        print(f"[validate] warning: the profile's capture workload also ran at {shared} req/s; figures at those "
              "rates are not out-of-sample (capture with other --workload-rates)")
    tokenizer = resolve_model(real_b.model)
    rows = []
    runs = {"real": real_b, "emu": emu_b, "real2": real_b}  # run name -> backend, in the order they run
    traces = {name: out / "traces" / f"{name}.trace.jsonl" for name in runs}
    runs = {name: with_trace(b, traces[name]) for name, b in runs.items()}
    with contextlib.ExitStack() as stack:
        # all three servers boot at once, then each is paused except while it is driven
        # (warm-up and its runs); each is stopped (continued first) when the sweep ends or fails
        servers = {name: stack.enter_context(started_backend(b, out / f"{name}-{b.name}.log",
                                                             name=f"{name}/{b.name}", grace_s=60))
                   for name, b in runs.items()}
        for url, proc in servers.values():
            wait_healthy(url, proc)
        for _url, proc in servers.values():
            proc.pause()
        seen: dict[str, int] = {}  # run name -> steps in its trace so far
        for name, b in runs.items():
            print(f"[validate] {name}: {b.name} ({b.mode}) healthy; warming up (the other servers paused)")
            with driven_alone(*servers[name]):
                warm_up(servers[name][0], b.model_name, tokenizer, out / f"warmup-{name}.json",
                        args.warmup_prompts, args.seed + 500)
                seen[name] = len(steps_since(traces[name])["latency_us"])  # warm-up steps (read before pausing)
        total = len(points)
        for i, (burst, rate) in enumerate(points):
            tag = f"r{rate}-b{burst}"
            res = {}
            for name, b in runs.items():
                with driven_alone(*servers[name]):
                    res[name] = traced_run(servers[name][0], b, traces[name], seen[name], out / f"{tag}-{name}.json",
                                           oracle=oracle if b.mode == "real" else None,
                                           rate=rate, burstiness=burst, num_prompts=args.num_prompts,
                                           seed=args.seed, tokenizer=tokenizer)
                seen[name] = res[name]["trace_window"][2]
            cmp = compare_runs(res["real"], res["real2"], res["emu"])
            rows.append({"rate": rate, "burst": burst, **res, "cmp": cmp})
            c = rows[-1]["cmp"]
            print(f"[validate] {i + 1}/{total} rate {rate} burstiness {burst}: "
                  + ", ".join(f"{k.replace('_ms', '')} {c[k][0]:+.1f}% (noise {c[k][1]:+.1f}%)"
                              for k in ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms",
                                        "output_throughput"))
                  + "; preemptions " + " / ".join(f"{res[n]['engine']['preemptions']:.0f}" for n in runs)
                  + ", recomputed tokens " + " / ".join(f"{res[n]['engine']['recomputed_tokens']:.0f}"
                                                        for n in runs)
                  + f"; the profile's oracle on the real steps {res['real']['oracle_bias_pct']:+.1f}% / "
                    f"{res['real2']['oracle_bias_pct']:+.1f}%", flush=True)
            flag = bias_flag((res["real"]["oracle_bias_pct"] + res["real2"]["oracle_bias_pct"]) / 2)
            if flag:
                print(f"[validate] flag: {flag}", flush=True)
            write_reports(rows, out)
    print((out / "validate.md").read_text())
    print(f"[validate] wrote {out}/validate.csv, validate.md, validate.png in {(time.time() - t_start) / 60:.1f} min")
    return 0
