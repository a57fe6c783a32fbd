"""``emugate emulate --profile NAME [vLLM server args...]`` (alias ``python -m emu_executor.serve``)

Starts vLLM's OpenAI server in emulate mode: sets ``EMUGATE_PROFILE`` (and
``EMUGATE_ORACLE``/``EMUGATE_SEED``), adds
``--distributed-executor-backend emu_executor.EmulatedExecutor`` and
``HF_HUB_OFFLINE=1``, then replaces itself with
``python -m vllm.entrypoints.openai.api_server`` (so signals reach vLLM).
A bundled model name given to ``--model`` is resolved to its directory and served under that name
(``--served-model-name``, unless given), and
``--tokenizer-mode mistral`` is added when that directory has a tekken.json. ``GET /ready`` answers as
``/health`` (:mod:`emu_executor.ready`), for a readiness probe. Bad input (no profile, an unknown
profile, a model directory without config.json) exits 2 with a message, before vLLM starts.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser(prog: str = "emugate emulate") -> argparse.ArgumentParser:
    """The command line of ``emugate emulate`` (unknown options are vLLM's and pass through)."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_Help,
                                 epilog="Every other option goes to vLLM's OpenAI server "
                                        "(python -m vllm.entrypoints.openai.api_server --help lists them). "
                                        "In a container, everything can come from the environment: "
                                        "EMUGATE_PROFILE, EMUGATE_MODEL, EMUGATE_HOST, EMUGATE_PORT, EMUGATE_SEED, "
                                        "EMUGATE_ORACLE, and vLLM's own VLLM_API_KEY.")
    ap.add_argument("--profile", default=os.environ.get("EMUGATE_PROFILE"),
                    help="profile file or bundled name (see profiles/bundled; env EMUGATE_PROFILE)")
    ap.add_argument("--step-ms", type=float, default=None, help="fixed step latency instead of a profile (ms)")
    ap.add_argument("--oracle", default=os.environ.get("EMUGATE_ORACLE", "feature"), choices=["feature", "grid2d"],
                    help="latency oracle: feature, or LLM-Emu's grid2d baseline (env EMUGATE_ORACLE)")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("EMUGATE_SEED", "0") or 0),
                    help="seed of latency and token draws (env EMUGATE_SEED)")
    return ap


def _has_flag(args: list[str], flag: str) -> bool:
    """Whether ``flag`` is among ``args``, as ``--flag VALUE`` or ``--flag=VALUE``."""
    return flag in args or any(a.startswith(flag + "=") for a in args)


def _fail(msg: str) -> None:
    print(f"emugate emulate: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None, prog: str = "emugate emulate") -> None:
    ap = build_parser(prog)
    args, rest = ap.parse_known_args(argv)
    if not args.profile and args.step_ms is None:
        _fail("give --profile NAME_OR_FILE (or EMUGATE_PROFILE, or --step-ms)")
    from profiles.assets import resolve_model_dir, resolve_profile
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               EMUGATE_ORACLE=args.oracle, EMUGATE_SEED=str(args.seed))
    if args.profile:
        try:
            env["EMUGATE_PROFILE"] = str(resolve_profile(args.profile))
        except FileNotFoundError as e:
            _fail(str(e))
    if args.step_ms is not None:
        env["EMUGATE_STEP_MS"] = str(args.step_ms)
    for flag, var in (("--model", "EMUGATE_MODEL"), ("--host", "EMUGATE_HOST"), ("--port", "EMUGATE_PORT")):
        if not _has_flag(rest, flag) and os.environ.get(var):
            rest += [flag, os.environ[var]]
    if "--model" not in rest:
        _fail("give --model DIR (a directory with config.json and a tokenizer, or a bundled model name; "
              "env EMUGATE_MODEL)")
    i = rest.index("--model") + 1
    given = rest[i]
    try:
        rest[i] = str(resolve_model_dir(given))
    except FileNotFoundError:
        pass
    if rest[i] != given and not _has_flag(rest, "--served-model-name"):
        rest += ["--served-model-name", given]  # clients (and a gateway's urls backend) ask for the name given
    model = Path(rest[i])
    if model.exists() and not (model / "config.json").exists():
        _fail(f"{model} has no config.json: emulate mode needs the model's config.json and tokenizer files")
    if (model / "tekken.json").exists() and "--tokenizer-mode" not in rest:
        rest += ["--tokenizer-mode", "mistral"]
    if "--distributed-executor-backend" not in rest:
        rest += ["--distributed-executor-backend", "emu_executor.EmulatedExecutor"]
    rest += ["--middleware", "emu_executor.ready.ReadyMiddleware"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *rest]
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
