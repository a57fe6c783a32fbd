"""Generate the reference pages of the docs site from the code, so they cannot drift from it.

Run by ``mkdocs-gen-files`` during ``mkdocs build`` (``mkdocs.yml``, ``plugins: gen-files``):

* ``reference/cli.md``: every command's options, from the argparse parsers (:func:`emugate.cli.command_parsers`);
* ``reference/config.md``: every TOML key, its type, default, bounds and description, from the
  pydantic models (:mod:`gateway.config`);
* ``reference/metrics.md``: the gateway's own metrics (from its registry) and the emulated
  server's, plus how replicas' ``vllm:*`` families are merged;
* ``reference/profile-format.md``: the profile's step columns (:data:`profiles.format.STEP_COLUMNS`);
* ``fidelity/index.md``: the current fidelity tables, from the committed ``validate`` outputs in
  ``docs/data/fidelity/*/validate.json``;
* ``design/calibration.md``: its cross-validation table filled in from ``profiles/reference/crossval.json``.

``python docs/gen_ref.py OUT_DIR`` writes the same pages into a folder (for a look without mkdocs).
"""
from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ------------------------------------------------------------------ CLI
def _help_text(a: argparse.Action) -> str:
    """An option's help as ``--help`` prints it (``%(default)s`` expanded, ``%%`` as ``%``)."""
    h = a.help or ""
    if "%" in h:
        try:
            return h % {**vars(a), "prog": ""}
        except (KeyError, ValueError, TypeError):
            return h.replace("%%", "%")
    return h


def cli_page() -> str:
    from emugate.cli import command_parsers
    out = ["# Command line", "",
           "Generated from the argparse parsers (`emugate COMMAND --help` prints the same). "
           "Defaults are shown as the parser holds them.", ""]
    for name, p in command_parsers().items():
        out += [f"## `{name}`", ""]
        if p.description and name != "emugate":
            first = p.description.strip().split("\n\n")[0].replace("\n", " ")
            out += [first, ""]
        out += ["```text", p.format_usage().strip(), "```", ""]
        rows = []
        for group in p._action_groups:
            for a in group._group_actions:
                if a.dest == "help":
                    continue
                if isinstance(a, argparse._SubParsersAction):
                    helps = {c.dest: c.help for c in a._choices_actions}
                    rows += [(f"`{choice}`", "", helps.get(choice, "")) for choice in a.choices]
                    continue
                flags = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.dest}`"
                default = "" if a.default in (None, argparse.SUPPRESS, False) or not a.option_strings \
                    else f"`{a.default}`"
                choices = f" (one of {', '.join(map(str, a.choices))})" if a.choices else ""
                rows.append((flags, default, _help_text(a) + choices))
        if rows:
            out += ["| option | default | what |", "|---|---|---|"]
            out += [f"| {f} | {d} | {_cell(h)} |" for f, d, h in rows]
            out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ config
def _type_name(t) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' for a in typing.get_args(t))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(t))}]"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(t) if a is not type(None)) + " (optional)"
    return getattr(t, "__name__", str(t))


def _bounds(field) -> str:
    parts = []
    for m in field.metadata:
        for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "min items")):
            v = getattr(m, k, None)
            if v is not None:
                parts.append(f"{sym} {v}")
        if getattr(m, "pattern", None):
            parts.append(f"pattern `{m.pattern}`")
    return ", ".join(parts)


def _default(field) -> str:
    from pydantic_core import PydanticUndefined
    if field.default_factory is not None:
        return f"`{field.default_factory()!r}`" if field.default_factory in (list, dict) else "(built)"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{json.dumps(field.default)}`" if isinstance(field.default, (str, int, float, bool, type(None))) \
        else "(table)"


def config_page() -> str:
    from gateway.config import BackendConfig, Config, GatewaySettings
    out = ["# Configuration file", "",
           "One TOML file describes the gateway and its fleet: `emugate serve --config FILE` "
           "(`--check` validates it without starting anything; unknown keys are errors that name the key). "
           "Generated from the schema in `gateway/config.py`; `config.example.toml` shows every key in context. "
           "Times are in seconds, sizes in bytes.", ""]
    for title, model in (("Top level", Config), ("`[gateway]`", GatewaySettings), ("`[[backends]]`", BackendConfig)):
        out += [f"## {title}", "", (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "), "",
                "| key | type | default | bounds | description |", "|---|---|---|---|---|"]
        for name, f in model.model_fields.items():
            out.append(f"| `{name}` | {_type_name(f.annotation)} | {_default(f)} | {_bounds(f)} | "
                       f"{_cell(f.description or '')} |")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------ metrics
def metrics_page() -> str:
    from emu_executor.lateness import BUCKETS_S, METRIC
    from gateway.metrics import GatewayMetrics
    reg = GatewayMetrics().registry
    out = ["# Metrics", "",
           "The gateway's `GET /metrics` serves its own families and, merged into one valid exposition, "
           "every ready replica's `vllm:*` (and `emugate:*`) families with the labels `backend`, `replica` "
           "and `mode` added. Generated from the gateway's registry (`gateway/metrics.py`).", "",
           "## The gateway's own", "", "| family | type | labels | help |", "|---|---|---|---|"]
    for fam in reg.collect():
        labels = sorted({k for s in fam.samples for k in s.labels} - {"le"})
        if not labels:  # families without children yet: read the label names off the collector
            col = next((c for c in reg._collector_to_names if fam.name in reg._collector_to_names[c]), None)
            labels = list(getattr(col, "_labelnames", ()))
        names = ", ".join(f"`{x}`" for x in labels)
        out.append(f"| `{fam.name}` | {fam.type} | {names} | {_cell(fam.documentation)} |")
    out += ["", "## Emulated replicas", "",
            f"Beside vLLM's own `vllm:*` families (unchanged: the engine is vLLM's), an emulated replica exports "
            f"`{METRIC}` (histogram, seconds, buckets {', '.join(f'{b:g}' for b in BUCKETS_S)}): how late each "
            "step's output reached the engine after its virtual end. Above ~1 ms at p99 the host cannot keep up "
            "with the emulated device and latencies are no longer the device's (see the emulation capacity guide).",
            "", "## Replicas' `vllm:*` families", "",
            "Passed through as vLLM 0.32 exports them (`vllm/v1/metrics/loggers.py`), e.g. "
            "`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, "
            "`vllm:num_preemptions_total`, `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`, "
            "`vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`, "
            "`vllm:e2e_request_latency_seconds`, `vllm:generation_tokens_total`, `vllm:prompt_tokens_total`. "
            "The Grafana dashboard (`deploy/grafana/emugate-fleet.json`) uses these; its test checks every "
            "family it queries against a live gateway.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------ profile format
def profile_format_page() -> str:
    import profiles.format as pf
    doc = pf.__doc__.strip().split("\n\n")
    out = ["# Profile format", "", "Generated from `profiles/format.py`.", "", *doc, "",
           f"Format version: {pf.FORMAT_VERSION}.", "", "## Step columns", "",
           "| column | dtype | meaning |", "|---|---|---|"]
    out += [f"| `{n}` | `{d}` | {_cell(m)} |" for n, d, m in pf.STEP_COLUMNS]
    out += ["", f"Columns a reader fills with zeros when a file lacks them: "
                f"{', '.join(f'`{c}`' for c in pf.OPTIONAL_COLUMNS)}.", ""]
    return "\n".join(out)


# ------------------------------------------------------------------ fidelity
def fidelity_page(data_dir: Path = ROOT / "docs" / "data" / "fidelity") -> str:
    from emugate.validate import fidelity_markdown
    out = ["# Fidelity: emulated against real vLLM", "",
           "Generated from the committed `emugate profile validate` outputs in `docs/data/fidelity/`. "
           "How these runs are made and how to read them: [Validating a profile](../guides/validate.md). "
           "How the figures were reached: [History](history.md).", ""]
    runs = sorted(data_dir.glob("*/validate.json"))
    if not runs:
        out.append("No committed validate outputs yet.")
    for f in runs:
        out += fidelity_markdown(json.loads(f.read_text()), title=f.parent.name)
        out.append("")
    return "\n".join(out)


def calibration_page() -> str:
    """``design/calibration.md`` with its cross-validation table (``profiles/reference/crossval.json``) filled in."""
    from profiles.calibration import crossval_markdown
    src = (ROOT / "docs" / "design" / "calibration.md").read_text()
    rows = json.loads((ROOT / "profiles" / "reference" / "crossval.json").read_text())
    return src.replace("<!-- crossval-table -->", crossval_markdown(rows))


PAGES = {"reference/cli.md": cli_page, "reference/config.md": config_page, "reference/metrics.md": metrics_page,
         "reference/profile-format.md": profile_format_page, "fidelity/index.md": fidelity_page,
         "design/calibration.md": calibration_page}


def main(gen_files: bool) -> None:
    if gen_files:
        import mkdocs_gen_files
        for path, fn in PAGES.items():
            with mkdocs_gen_files.open(path, "w") as f:
                f.write(fn())
        return
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-ref")
    for path, fn in PAGES.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_text(fn())


if __name__ == "<run_path>":  # mkdocs-gen-files runs this file with runpy.run_path
    main(gen_files=True)
elif __name__ == "__main__":
    main(gen_files=False)
