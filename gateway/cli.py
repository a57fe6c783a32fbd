"""``emugate serve`` (alias ``python -m gateway``): start the backends of a config and serve them.

    emugate serve --config config.example.toml          # run
    emugate serve --config config.toml --check          # validate only

The gateway listens on ``[gateway].host:port`` at once and starts every
``[[backends]]`` replica as a vLLM server process; ``/health`` (liveness) is
200 from the start, ``/ready`` (readiness) once every model has a ready
replica, and a request for a model still starting gets 503 with Retry-After.
Ctrl-C (SIGINT) or SIGTERM stops taking new connections, lets requests in
flight finish for up to ``drain_timeout_s``, then stops every vLLM process
it started. If every replica fails to start, the gateway exits with code 1
after logging each one's last log lines.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from gateway.config import ConfigError, load_config


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser(prog: str = "emugate serve") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=_Help)
    ap.add_argument("--config", "-c", default="config.example.toml", help="TOML config")
    ap.add_argument("--check", action="store_true", help="validate the config, print the plan, and exit")
    ap.add_argument("--host", default=None, help="override [gateway].host")
    ap.add_argument("--port", type=int, default=None, help="override [gateway].port")
    ap.add_argument("--no-launch", action="store_true",
                    help="do not start vLLM: attach to servers already listening on the configured ports")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                    help="the gateway's log level (its replicas log at vLLM's own)")
    return ap


def describe(cfg) -> str:
    """One line per backend: what would be started."""
    lines = [f"gateway on http://{cfg.gateway.host}:{cfg.gateway.port} (routing: {cfg.gateway.routing})"]
    for b in cfg.backends:
        what = f"profile {b.profile}, oracle {b.oracle}" if b.mode == "emulate" else \
            f"load_format {b.load_format or 'auto'}" + (f", capturing to {b.capture_trace}" if b.capture_trace else "")
        if b.urls:
            what = f"running servers {', '.join(b.urls)}" + (", with a key" if (b.api_key_env or b.api_key_file)
                                                              else "")
        lines.append(f"  {b.name}: model '{b.model_name}' <- {b.model}, mode {b.mode} ({what}), "
                     f"{b.replicas} replica(s)")
        f = b.faults
        if f is not None:
            parts = [f"{len(f.http)} front-door", f"{len(f.stream)} mid-stream", f"{len(f.engine)} engine"]
            if f.cold_start:
                parts.append("cold start")
            if f.allow_header:
                parts.append("X-Emugate-Fault header honoured")
            lines.append(f"    faults: {', '.join(parts)}")
            for e in f.engine:
                reps = "every replica" if e.replicas is None else f"replicas {e.replicas}"
                dur = f" for {e.duration_s:g} s" if e.duration_s else ""
                lines.append(f"      at {e.at_s:g} s: {e.kind} on {reps}{dur}")
    if cfg.gateway.admin_keys or cfg.gateway.admin_keys_env or cfg.gateway.admin_keys_file:
        lines.append("  admin API: /admin/faults (admin keys)")
    return "\n".join(lines)


async def _check_remotes(cfg) -> list[tuple[str, str]]:
    """(replica name, problem or "") for every server in a backend's ``urls``."""
    from gateway.supervisor import Supervisor
    sup = Supervisor(cfg, launch=False)
    try:
        reps = [r for r in sup.all_replicas() if r.remote]
        whys = await asyncio.gather(*(sup.check_remote(r) for r in reps))
        return [(f"{r.name} {r.url}", w) for r, w in zip(reps, whys)]
    finally:
        await sup.sessions.close()


def main(argv: list[str] | None = None, prog: str = "emugate serve") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config)
        if args.host or args.port:
            g = cfg.gateway.model_copy(update={k: v for k, v in (("host", args.host), ("port", args.port)) if v})
            cfg = cfg.model_copy(update={"gateway": g})
        if any(b.mode == "emulate" and not b.urls for b in cfg.backends):
            from profiles.assets import resolve_profile
            for b in cfg.backends:
                if b.mode == "emulate" and not b.urls:
                    resolve_profile(b.profile)
        cfg.gateway.resolved_api_keys()
        cfg.gateway.resolved_admin_keys()
        for b in cfg.backends:
            b.remote_key()
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK\n{describe(cfg)}")
        if any(b.urls for b in cfg.backends):
            problems = asyncio.run(_check_remotes(cfg))
            for name, why in problems:
                print(f"  {name}: {why or 'reachable, serves its model'}")
            if any(why for _, why in problems):
                print("error: some servers in urls cannot serve (the gateway would start and mark them not "
                      "ready)", file=sys.stderr)
                return 2
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn
    from gateway.proxy import create_app
    from gateway.server import deadline_protocol
    print(describe(cfg), file=sys.stderr)
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(msg: str) -> None:
        fatal.append(msg)
        if server is not None:
            server.should_exit = True

    app = create_app(cfg, launch=not args.no_launch, on_fatal=on_fatal)
    g = cfg.gateway
    server = uvicorn.Server(uvicorn.Config(
        app, host=g.host, port=g.port, loop="uvloop", http=deadline_protocol(g.header_timeout_s),
        access_log=False, log_level=args.log_level, timeout_graceful_shutdown=g.drain_timeout_s,
        proxy_headers=False, server_header=False))  # the gateway reads no X-Forwarded-*; no "server: uvicorn"
    server.run()
    if fatal:
        print(f"error: {fatal[0]}; see the log lines above. Fix the backend's settings "
              f"(`python -m gateway --config {args.config} --check` validates the file).", file=sys.stderr)
        return 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
