"""Gateway config validation, routing policies and metrics relabelling (no servers needed)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.config import ConfigError, load_config, parse_config
from gateway.metrics import merge_vllm_metrics, scrape_value
from gateway.routing import affinity_key, pick
from gateway.supervisor import Replica
from conftest import ROOT

GOOD = {"backends": [{"name": "a", "model": "mistral-h1024-l8", "mode": "emulate",
                      "profile": "cpu-epyc-2c_mistral-h1024-l8"}]}


def test_example_config_is_valid():
    cfg = load_config(ROOT / "config.example.toml")
    assert cfg.backends[0].mode == "emulate" and cfg.gateway.port == 8000


def test_check_cli_accepts_example_and_rejects_bad(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "gateway", "--config", str(ROOT / "config.example.toml"), "--check"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout and "mode emulate" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nport = 8000\nrouting = "random"\n[[backends]]\nname = "x"\nmodel = "m"\n'
                   'mode = "emulate"\nprofile = "p"\nbogus = 1\n')
    r = subprocess.run([sys.executable, "-m", "gateway", "--config", str(bad), "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert f"{bad}: line 3: gateway.routing" in r.stderr and "line 9: backends[0].bogus: unknown key" in r.stderr


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["backends"][0].update(mode="emu"), "backends[0].mode"),
    (lambda d: d["backends"][0].pop("profile"), "needs `profile`"),
    (lambda d: d["backends"][0].update(replicas=2, ports=[9001]), "ports lists 1 ports for 2 replicas"),
    (lambda d: d.update(gateway={"port": 70000}), "gateway.port"),
    (lambda d: d.update(gateway={"prot": 1}), "gateway.prot: unknown key"),
    (lambda d: d["backends"].append(dict(d["backends"][0])), "backend names must be unique"),
    (lambda d: d.update(backends=[]), "backends"),
])
def test_validation_errors_name_the_key(mutate, needle):
    import copy
    d = copy.deepcopy(GOOD)
    mutate(d)
    with pytest.raises(ConfigError) as e:
        parse_config(d, "f.toml")
    assert needle in str(e.value) and str(e.value).startswith("f.toml: ")


def test_toml_syntax_and_missing_file(tmp_path):
    p = tmp_path / "x.toml"
    p.write_text("[gateway\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(p)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")


def _reps(n: int) -> list[Replica]:
    cfg = parse_config({"backends": [{**GOOD["backends"][0], "replicas": n}]})
    reps = [Replica(cfg.backends[0], i, 9000 + i) for i in range(n)]
    for r in reps:
        r.state = "ready"
    return reps


def test_least_outstanding_picks_idlest_and_skips_not_ready():
    reps = _reps(3)
    reps[0].outstanding, reps[1].outstanding, reps[2].outstanding = 5, 1, 3
    assert pick(reps) is reps[1]
    reps[1].state = "down"
    assert pick(reps) is reps[2]
    assert pick(reps, exclude={id(reps[2])}) is reps[0]
    for r in reps:
        r.state = "starting"
    assert pick(reps) is None


def test_least_outstanding_spreads_ties():
    reps = _reps(3)
    chosen = {pick(reps).index for _ in range(30)}
    assert chosen == {0, 1, 2}


def test_kv_aware_prefers_short_queue_and_free_kv():
    reps = _reps(2)
    reps[0].num_waiting, reps[1].num_waiting = 3, 0
    assert pick(reps, "kv_aware") is reps[1]
    reps[0].num_waiting = 0
    reps[0].kv_usage, reps[1].kv_usage = 0.1, 0.95
    reps[0].outstanding = reps[1].outstanding = 2
    assert pick(reps, "kv_aware") is reps[0]


def test_prefix_affinity_is_sticky_until_imbalanced():
    reps = _reps(4)
    key = affinity_key("prefix_affinity", {"messages": [{"role": "user", "content": "shared system prompt"}]}, {})
    first = pick(reps, "prefix_affinity", key)
    assert all(pick(reps, "prefix_affinity", key) is first for _ in range(10))
    first.outstanding = 20
    assert pick(reps, "prefix_affinity", key) is not first


def test_session_affinity_key_from_header_or_user():
    assert affinity_key("session_affinity", {"user": "u1"}, {}) == "u1"
    assert affinity_key("session_affinity", {"user": "u1"}, {"x-session-id": "s"}) == "s"
    assert affinity_key("least_outstanding", {"user": "u1"}, {}) is None


def test_merged_vllm_metrics_keep_each_family_in_one_block():
    from prometheus_client.parser import text_string_to_metric_families
    text = ('# HELP vllm:num_requests_running Running\n# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
            '# HELP vllm:e2e Latency\n# TYPE vllm:e2e histogram\n'
            'vllm:e2e_bucket{le="1.0"} 1.0\nvllm:e2e_bucket{le="+Inf"} 2.0\nvllm:e2e_count 2.0\nvllm:e2e_sum 1.5\n'
            '# HELP process_cpu_seconds_total cpu\n# TYPE process_cpu_seconds_total counter\n'
            'process_cpu_seconds_total 9\n')
    out = merge_vllm_metrics([({"backend": "b", "replica": str(i), "mode": "emulate"}, text) for i in range(2)]
                             + [({"backend": "c", "replica": "0", "mode": "real"}, "not { exposition")])
    out = out.decode()
    fams = list(text_string_to_metric_families(out))
    assert [f.name for f in fams] == ["vllm:num_requests_running", "vllm:e2e"]  # once each, nothing else
    assert out.count("# TYPE vllm:e2e histogram") == 1
    running = fams[0].samples
    assert [(s.labels["replica"], s.labels["engine"], s.value) for s in running] == [("0", "0", 3.0), ("1", "0", 3.0)]
    # a histogram's samples of both replicas follow its one TYPE line
    lines = out.splitlines()
    first = lines.index("# TYPE vllm:e2e histogram")
    last = max(i for i, ln in enumerate(lines) if ln.startswith("vllm:e2e"))
    assert all(ln.startswith("vllm:e2e") for ln in lines[first + 1:last + 1]) and last - first == 8
    assert scrape_value(text, "vllm:num_requests_running") == 3.0
    assert scrape_value(text, "vllm:absent") is None


def test_lora_module_names_from_vllm_command_lines():
    """Adapter names the gateway routes to a backend, from its vLLM ``--lora-modules`` (every form vLLM takes)."""
    from gateway.proxy import lora_module_names
    assert lora_module_names(["--enable-lora", "--lora-modules", "a=/x", "b=/y", "--max-loras", "2"]) == ["a", "b"]
    assert lora_module_names(['--lora-modules={"name": "c", "path": "/z"}']) == ["c"]
    assert lora_module_names(["--lora-modules", '{"name": "d", "path": "/z"}', "e=/q", "--x", "f=/no"]) == ["d", "e"]
    assert lora_module_names(["--max-loras", "2", "--served-model-name", "m"]) == []
