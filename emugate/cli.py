"""``emugate``: one command with subcommands, as ``vllm serve`` / ``vllm bench serve`` are one command.

    emugate serve --config config.example.toml        the gateway (its backends, real or emulated)
    emugate profile capture|build|inspect|convert-llm-emu|validate ...
    emugate emulate --profile NAME --model DIR ...    one emulated vLLM server, no gateway
    emugate compare A.json B.json                     % difference per metric of two result JSONs

``emugate COMMAND --help`` lists each command's options with their defaults.
The older forms keep working as aliases: ``python -m gateway`` (serve),
``python -m profiles`` (profile), ``python -m emu_executor.serve`` (emulate),
``python -m loadtests.compare`` (compare). Load tests stay Locust's own
command: ``locust -f loadtests/sharegpt.py``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module whose ``main(argv, prog)`` runs it, one-line help)
COMMANDS = {
    "serve": ("gateway.cli", "run the gateway: start a TOML config's backends (real or emulated) and serve them"),
    "profile": ("emugate.profile_cli", "capture, build, inspect, convert or validate latency profiles"),
    "emulate": ("emu_executor.serve", "one emulated vLLM OpenAI server, without the gateway"),
    "compare": ("loadtests.compare", "%% difference per metric between two vLLM-format result JSONs"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emugate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"emugate {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("emugate")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    """Run ``emugate ARGV``; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    if not argv or argv[0] not in COMMANDS:
        ap.parse_args(argv)  # prints help / version / an error naming the commands, and exits
        return 2
    module, _ = COMMANDS[argv[0]]
    rc = importlib.import_module(module).main(argv[1:], prog=f"emugate {argv[0]}")
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
