"""``emugate emulate --profile NAME [vLLM server args...]`` (alias ``python -m emu_executor.serve``)

Starts vLLM's OpenAI server in emulate mode: sets ``EMUGATE_PROFILE`` (and
``EMUGATE_ORACLE``/``EMUGATE_SEED``), adds
``--distributed-executor-backend emu_executor.EmulatedExecutor`` and
``HF_HUB_OFFLINE=1``, then replaces itself with
``python -m vllm.entrypoints.openai.api_server`` (so signals reach vLLM).
A bundled model name given to ``--model`` is resolved to its directory, and
``--tokenizer-mode mistral`` is added when that directory has a tekken.json.
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
                                        "(python -m vllm.entrypoints.openai.api_server --help lists them).")
    ap.add_argument("--profile", help="profile file or bundled name (see profiles/bundled)")
    ap.add_argument("--step-ms", type=float, default=None, help="fixed step latency instead of a profile (ms)")
    ap.add_argument("--oracle", default="feature", choices=["feature", "grid2d"],
                    help="latency oracle: feature, or LLM-Emu's grid2d baseline")
    ap.add_argument("--seed", type=int, default=0, help="seed of latency and token draws")
    return ap


def main(argv: list[str] | None = None, prog: str = "emugate emulate") -> None:
    ap = build_parser(prog)
    args, rest = ap.parse_known_args(argv)
    if not args.profile and args.step_ms is None:
        ap.error("give --profile NAME_OR_FILE (or --step-ms)")
    from profiles.assets import resolve_model_dir, resolve_profile
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
               EMUGATE_ORACLE=args.oracle, EMUGATE_SEED=str(args.seed))
    if args.profile:
        env["EMUGATE_PROFILE"] = str(resolve_profile(args.profile))
    if args.step_ms is not None:
        env["EMUGATE_STEP_MS"] = str(args.step_ms)
    if "--model" in rest:
        i = rest.index("--model") + 1
        try:
            rest[i] = str(resolve_model_dir(rest[i]))
        except FileNotFoundError:
            pass
        if (Path(rest[i]) / "tekken.json").exists() and "--tokenizer-mode" not in rest:
            rest += ["--tokenizer-mode", "mistral"]
    if "--distributed-executor-backend" not in rest:
        rest += ["--distributed-executor-backend", "emu_executor.EmulatedExecutor"]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *rest]
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main()
