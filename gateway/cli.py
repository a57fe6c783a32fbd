"""``python -m gateway`` / ``emugate``: start the backends of a config and serve them.

    python -m gateway --config config.example.toml          # run
    python -m gateway --config config.toml --check          # validate only

The gateway starts every ``[[backends]]`` replica as a vLLM server process,
waits until each model has a healthy replica, then listens on
``[gateway].host:port``. Ctrl-C (SIGINT) or SIGTERM stops the gateway and
every vLLM process it started.
"""
from __future__ import annotations

import argparse
import logging
import sys

from gateway.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gateway", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", "-c", default="config.example.toml", help="TOML config (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="validate the config, print the plan, and exit")
    ap.add_argument("--host", default=None, help="override [gateway].host")
    ap.add_argument("--port", type=int, default=None, help="override [gateway].port")
    ap.add_argument("--no-launch", action="store_true",
                    help="do not start vLLM: attach to servers already listening on the configured ports")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return ap


def describe(cfg) -> str:
    """One line per backend: what would be started."""
    lines = [f"gateway on http://{cfg.gateway.host}:{cfg.gateway.port} (routing: {cfg.gateway.routing})"]
    for b in cfg.backends:
        what = f"profile {b.profile}, oracle {b.oracle}" if b.mode == "emulate" else \
            f"load_format {b.load_format or 'auto'}" + (f", capturing to {b.capture_trace}" if b.capture_trace else "")
        lines.append(f"  {b.name}: model '{b.model_name}' <- {b.model}, mode {b.mode} ({what}), "
                     f"{b.replicas} replica(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.host or args.port:
            g = cfg.gateway.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
            cfg = cfg.model_copy(update={"gateway": g})
        if any(b.mode == "emulate" for b in cfg.backends):
            from profiles.format import resolve_profile
            for b in cfg.backends:
                if b.mode == "emulate":
                    resolve_profile(b.profile)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK\n{describe(cfg)}")
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn
    from gateway.proxy import create_app
    print(describe(cfg), file=sys.stderr)
    app = create_app(cfg, launch=not args.no_launch)
    uvicorn.run(app, host=cfg.gateway.host, port=cfg.gateway.port, loop="uvloop", http="httptools",
                access_log=False, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
