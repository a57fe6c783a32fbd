"""The documentation cannot drift from the code: every option and config key is described, and the
generated reference pages hold every one of them. (``mkdocs build --strict`` in CI checks links.)"""
from __future__ import annotations

import argparse
import json
import re
import sys

from conftest import ROOT
from emugate.cli import command_parsers
from gateway.config import BackendConfig, Config, GatewaySettings

sys.path.insert(0, str(ROOT / "docs"))
import gen_ref  # noqa: E402


def _options():
    for name, p in command_parsers().items():
        for a in p._actions:
            if a.dest != "help" and not isinstance(a, argparse._SubParsersAction):
                yield name, a


def test_every_cli_option_has_a_description():
    missing = [f"{name}: {a.option_strings or a.dest}" for name, a in _options() if not (a.help or "").strip()]
    assert not missing, f"options without help text (add one; the CLI reference is generated from it): {missing}"


def test_every_config_key_has_a_description():
    missing = [f"{m.__name__}.{k}" for m in (Config, GatewaySettings, BackendConfig)
               for k, f in m.model_fields.items() if not (f.description or "").strip()]
    assert not missing, f"config keys without a description (the config reference is generated from it): {missing}"


def test_generated_reference_names_every_option_key_and_metric():
    cli = gen_ref.cli_page()
    for name, a in _options():
        label = a.option_strings[0] if a.option_strings else a.dest
        assert f"`{label}`" in cli, (name, label)
    cfg = gen_ref.config_page()
    for m in (Config, GatewaySettings, BackendConfig):
        for k in m.model_fields:
            assert f"| `{k}` |" in cfg, k
    metrics = gen_ref.metrics_page()
    from gateway.metrics import GatewayMetrics
    for fam in GatewayMetrics().registry.collect():
        assert f"`{fam.name}`" in metrics
    assert "`latency_us`" in gen_ref.profile_format_page()


def test_the_dashboard_is_valid_grafana_json_and_every_page_in_the_nav_exists():
    dash = json.loads((ROOT / "deploy" / "grafana" / "emugate-fleet.json").read_text())
    assert dash["panels"] and all(t["expr"] for p in dash["panels"] for t in p["targets"])
    nav = re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    generated = set(gen_ref.PAGES)
    assert nav and all((ROOT / "docs" / p).exists() or p in generated for p in nav), nav
    readme = (ROOT / "README.md").read_text().splitlines()
    assert len(readme) <= 150, f"README.md is {len(readme)} lines: it is the front page; move detail to docs/"
