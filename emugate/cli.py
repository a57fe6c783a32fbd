"""``emugate``: one command with subcommands, as ``vllm serve`` / ``vllm bench serve`` are one command.

    emugate serve --config config.example.toml        the gateway (its backends, real or emulated)
    emugate profile capture|build|inspect|convert-llm-emu|validate ...
    emugate emulate --profile NAME --model DIR ...    one emulated vLLM server, no gateway
    emugate compare A.json B.json                     % difference per metric of two result JSONs
    emugate simulate --profile NAME --model DIR ...   a load test in virtual time (vLLM's engine, no HTTP)
    emugate plan --profile A --profile B --slo ...    size a fleet under an SLO (goodput by bisection)

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
    "simulate": ("emugate.simulate_cli", "a load test in virtual time on vLLM's own engine core (no HTTP, no waiting)"),
    "plan": ("emugate.plan_cli", "replicas of which GPU for a traffic under an SLO (bisection over simulated runs)"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emugate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"emugate {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return ap


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, by its name as typed (``emugate serve``, ``emugate profile capture``...,
    and the load test's options under ``locust -f loadtests/sharegpt.py``): for the generated CLI
    reference and the test that every option has a description."""
    from emu_executor.serve import build_parser as emulate_parser
    from emugate.profile_cli import build_parser as profile_parser
    from gateway.cli import build_parser as serve_parser
    from loadtests.compare import build_parser as compare_parser
    from loadtests.options import add_workload_args
    out = {"emugate": build_parser(), "emugate serve": serve_parser()}
    prof = profile_parser()
    out["emugate profile"] = prof
    for action in prof._subparsers._group_actions:
        for name, sub in action.choices.items():
            out[f"emugate profile {name}"] = sub
    out["emugate emulate"] = emulate_parser()
    out["emugate compare"] = compare_parser()
    from emugate.simulate_cli import build_parser as simulate_parser
    out["emugate simulate"] = simulate_parser()
    from emugate.plan_cli import build_parser as plan_parser
    out["emugate plan"] = plan_parser()
    locust = argparse.ArgumentParser(prog="locust -f loadtests/sharegpt.py", add_help=False,
                                     description="Locust's own options (locust --help), plus:")
    add_workload_args(locust)
    out["locust -f loadtests/sharegpt.py"] = locust
    return out


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
