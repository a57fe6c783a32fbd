"""Fault injection without servers (unit tier): the schema and its errors, triggers, the header,
the engine-fault timeline, vLLM's error bodies, the replica-side state file and KV ballast, and the
admin API's refusals (through the gateway's real ASGI app, no replica started)."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from emu_executor.faults import FaultState, _Ballast
from gateway.config import ConfigError, load_config, parse_config
from gateway.faults import (EngineFault, EngineFaults, FaultsConfig, FrontDoor, HttpFault, StreamFault,
                            parse_header, vllm_error, write_state)


def _cfg(faults: dict, mode: str = "emulate", replicas: int = 2, **gw) -> dict:
    b = {"name": "b", "model": "m", "mode": mode, "replicas": replicas, "faults": faults}
    if mode == "emulate":
        b["profile"] = "p"
    return {"gateway": gw, "backends": [b]}


# ------------------------------------------------------------------ schema
def test_engine_fault_parameters_are_checked_per_kind():
    assert EngineFault(kind="slow", factor=3).factor == 3
    with pytest.raises(ValueError, match="needs factor"):
        EngineFault(kind="slow")
    with pytest.raises(ValueError, match="needs factor, probability"):
        EngineFault(kind="spikes")
    with pytest.raises(ValueError, match="takes no fraction"):
        EngineFault(kind="hang", fraction=0.5)
    with pytest.raises(ValueError):
        EngineFault(kind="kv_pressure", fraction=1.5)
    assert EngineFault(kind="crash", after_requests=10).after_requests == 10


def test_config_rules_for_real_backends_and_replica_indices():
    with pytest.raises(ConfigError, match="act inside an emulated engine the gateway starts"):
        parse_config(_cfg({"engine": [{"kind": "hang"}], "allow_on_real": True}, mode="real"))
    with pytest.raises(ConfigError, match="allow_on_real"):
        parse_config(_cfg({"http": [{"status": 503}]}, mode="real"))
    assert parse_config(_cfg({"http": [{"status": 503}], "allow_on_real": True}, mode="real"))
    with pytest.raises(ConfigError, match=r"replica indices \[2\] out of range"):
        parse_config(_cfg({"engine": [{"kind": "hang", "replicas": [2]}]}))
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(_cfg({"engine": [{"kind": "hang", "severity": 3}]}))


def test_config_errors_name_the_line_and_never_echo_keys(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[gateway]\napi_keys = ["sk-secret-1"]\n\n[[backends]]\nname = "b"\nmodel = "m"\nprofile = "p"\n\n'
                 '[backends.faults]\nseed = 1\n\n[[backends.faults.http]]\nstatus = 418\n'
                 'keys = ["sk-secret-1", 5]\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "line 13: backends[0].faults.http[0].status" in msg
    assert "line 14" in msg and "sk-secret-1" not in msg


def test_scenario_file_is_merged_and_its_errors_name_its_own_lines(tmp_path):
    (tmp_path / "s.toml").write_text('[[engine]]\nkind = "kv_pressure"\nfraction = 0.3\nat_s = 10\n')
    (tmp_path / "c.toml").write_text('[[backends]]\nname = "b"\nmodel = "m"\nprofile = "p"\n[backends.faults]\n'
                                     'scenario = "s.toml"\n[[backends.faults.engine]]\nkind = "hang"\n')
    cfg = load_config(tmp_path / "c.toml")
    assert [f.kind for f in cfg.backends[0].faults.engine] == ["hang", "kv_pressure"]
    (tmp_path / "s.toml").write_text('[[engine]]\nkind = "slow"\n\n[[engine]]\nkind = "melt"\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "c.toml")
    assert "s.toml: line 1: engine[0]" in str(e.value) or "s.toml: line 4" in str(e.value)
    (tmp_path / "c.toml").write_text('[[backends]]\nname = "b"\nmodel = "m"\nprofile = "p"\n[backends.faults]\n'
                                     'scenario = "missing.toml"\n')
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_config(tmp_path / "c.toml")


# ------------------------------------------------------------------ vLLM's bodies and the header
def test_http_faults_answer_with_vllms_bodies():
    st, body, hdrs = vllm_error(HttpFault(status=503))
    doc = json.loads(body)["error"]
    assert st == 503 and doc["type"] == "Service Unavailable" and doc["code"] == 503 and "busy" in doc["message"]
    assert (b"retry-after", b"1") in hdrs
    st, body, hdrs = vllm_error(HttpFault(status=400), max_model_len=4096)
    doc = json.loads(body)["error"]
    assert doc["param"] == "input_tokens" and "maximum context length is 4096 tokens" in doc["message"]
    assert hdrs == []
    assert (b"retry-after", b"3") in vllm_error(HttpFault(status=429, retry_after_s=2.5))[2]
    assert json.loads(vllm_error(HttpFault(status=500))[1])["error"]["type"] == "InternalServerError"


def test_header_forms():
    assert parse_header(b"http=429;retry_after=2") == HttpFault(status=429, retry_after_s=2)
    assert parse_header(b"stream=cut;after=3") == StreamFault(action="cut", after_chunks=3)
    assert parse_header(b" stream=stall ; s=0.5 ") == StreamFault(action="stall", stall_s=0.5)
    for bad in (b"http=418", b"stream=melt", b"http=429;after=2", b"nonsense", b"stream=cut;after=-1", b"\xff"):
        with pytest.raises(ValueError, match="X-Emugate-Fault"):
            parse_header(bad)


# ------------------------------------------------------------------ triggers
def test_triggers_first_n_every_n_window_model_key_replica():
    t0 = time.monotonic()
    fd = FrontDoor(FaultsConfig(http=[HttpFault(status=503, first_n=2, models=["a"])],
                                stream=[StreamFault(action="cut", every_n=3, replicas=[1])]), lambda k: None, t0)
    got = [fd.pick("a", None, 0)[0] is not None for _ in range(4)]
    assert got == [True, True, False, False]
    assert fd.pick("b", None, 0) == (None, None)  # another model: no HTTP fault, replica 0: no stream fault
    cuts = [fd.pick("b", None, 1)[1] is not None for _ in range(6)]
    assert cuts == [False, False, True, False, False, True]
    keyed = FrontDoor(FaultsConfig(http=[HttpFault(status=429, keys=["k2"])]),
                      lambda k: {"k1": 0, "k2": 1}.get(k.get_secret_value()), t0)
    assert keyed.pick("a", 1, 0)[0] is not None and keyed.pick("a", 0, 0)[0] is None
    windowed = FrontDoor(FaultsConfig(http=[HttpFault(status=500, window_s=(100, 200))]), lambda k: None, t0)
    assert windowed.pick("a", None, 0)[0] is None
    windowed.started = t0 - 150
    assert windowed.pick("a", None, 0)[0] is not None


def test_probability_draws_are_seeded():
    def run(seed):
        fd = FrontDoor(FaultsConfig(seed=seed, http=[HttpFault(status=500, probability=0.3)]), lambda k: None, 0.0)
        return [fd.pick("a", None, 0)[0] is not None for _ in range(200)]
    a, b = run(7), run(7)
    assert a == b and 30 < sum(a) < 90 and run(8) != a


# ------------------------------------------------------------------ engine timeline
def test_engine_timeline_composes_faults_and_crash_fires_once():
    cfg = FaultsConfig(engine=[EngineFault(kind="slow", factor=3, replicas=[1], at_s=10, duration_s=20),
                               EngineFault(kind="kv_pressure", fraction=0.5, at_s=5),
                               EngineFault(kind="kv_pressure", fraction=0.3, at_s=15, duration_s=1),
                               EngineFault(kind="crash", replicas=[0], at_s=40)])
    ef = EngineFaults("b", 2, cfg, started=1000.0)
    assert ef.state(1, 1004.0) == {}
    assert ef.state(1, 1011.0) == {"slow": 3, "kv_fraction": 0.5}
    assert ef.state(1, 1015.5) == {"slow": 3, "kv_fraction": 0.3}
    assert ef.state(1, 1031.0) == {"kv_fraction": 0.5}
    assert ef.state(0, 1041.0) == {"kv_fraction": 0.5, "crash": True}
    assert ef.mark_crashed(0, 1041.0)
    assert "crash" not in ef.state(0, 1050.0)  # fired once: the restarted replica does not crash again
    ef.add(7, EngineFault(kind="hang", duration_s=2), now=2000.0)
    assert ef.state(1, 2001.0)["hang"] is True and "hang" not in ef.state(1, 2003.0)
    assert ef.remove(kind="kv_pressure") == 2 and ef.state(1, 2001.0) == {"hang": True}


# ------------------------------------------------------------------ replica side
def test_fault_state_reads_the_file_when_it_changes(tmp_path):
    p = tmp_path / "f.json"
    write_state(p, {"slow": 2.0})
    st = FaultState(str(p), seed=1)
    assert st.latency_factor() == 2.0 and not st.hung() and st.kv_fraction() == 1.0
    time.sleep(0.06)
    write_state(p, {"spikes": [1.0, 5.0], "hang": True, "kv_fraction": 0.25})
    assert st.refresh(now=time.monotonic() + 1) and st.latency_factor() == 5.0
    assert st.hung() and st.kv_fraction() == 0.25
    p.write_text("{not json")
    st._next = 0
    assert st.refresh(now=time.monotonic() + 2)["hang"] is True  # a torn file keeps the previous faults
    assert (p.stat().st_mode & 0o777) in (0o600, 0o644)


class _Pool:
    def __init__(self, n):
        self.num_gpu_blocks, self.free = n, list(range(1, n))

    def get_num_free_blocks(self):
        return len(self.free)

    def get_new_blocks(self, n):
        out, self.free = self.free[:n], self.free[n:]
        return out

    def free_blocks(self, blocks):
        self.free += list(blocks)


class _Sched:
    def __init__(self, n):
        self.kv_cache_manager = type("M", (), {"block_pool": _Pool(n)})()


def test_kv_ballast_holds_the_missing_share_and_gives_it_back():
    s, b = _Sched(101), _Ballast()  # 100 usable blocks
    b.adjust(s, 0.3)
    assert len(b.blocks) == 70 and s.kv_cache_manager.block_pool.get_num_free_blocks() == 30
    s.kv_cache_manager.block_pool.free = s.kv_cache_manager.block_pool.free[:10]  # requests hold 20 more
    b.adjust(s, 0.1)
    assert len(b.blocks) == 80  # takes what is free now; the rest as requests finish (or are preempted)
    b.adjust(s, 1.0)
    assert b.blocks == [] and s.kv_cache_manager.block_pool.get_num_free_blocks() == 80  # 20 with requests


# ------------------------------------------------------------------ admin API refusals (the real ASGI app)
def _client(cfg_dict):
    from gateway.proxy import create_app
    app = create_app(parse_config(cfg_dict), launch=False)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw"), app


def test_admin_api_needs_its_own_key_and_refuses_bad_bodies():
    async def go():
        c, app = _client(_cfg({"engine": []}, admin_keys=["adm"], api_keys=["cli"]))
        async with c:
            assert (await c.get("/admin/faults")).status_code == 401
            r = await c.get("/admin/faults", headers={"Authorization": "Bearer cli"})
            assert r.status_code == 401 and "admin" in r.json()["error"]["message"]
            adm = {"Authorization": "Bearer adm"}
            assert (await c.get("/admin/faults", headers=adm)).status_code == 200
            for body, status in ((b"{", 400), (b"[]", 400), (b'{"backend": "b"}', 400),
                                 (b'{"backend": "zz", "engine": {"kind": "hang"}}', 404),
                                 (b'{"backend": "b", "engine": {"kind": "slow"}}', 400),
                                 (b'{"backend": "b", "engine": {"kind": "hang", "replicas": [5]}}', 400),
                                 (b'{"backend": "b", "http": {"status": 418}}', 400),
                                 (b'{"backend": "b", "http": {"status": 503}, "x": 1}', 400)):
                r = await c.put("/admin/faults", content=body, headers=adm)
                assert r.status_code == status, (body, r.text)
                assert "error" in r.json()
            gw = app.gateway
            assert all(not ef.items for ef in gw.engine_faults.values())  # nothing was added by a refused call
            r = await c.put("/admin/faults", json={"backend": "b", "engine": {"kind": "slow", "factor": 2}},
                            headers=adm)
            assert r.status_code == 200 and r.json()["id"] >= 1
            assert gw.engine_faults["b"].state(0, time.monotonic() + 0.01) == {"slow": 2}
            r = await c.delete("/admin/faults?backend=b&id=x", headers=adm)
            assert r.status_code == 400
            r = await c.delete("/admin/faults?backend=b", headers=adm)
            assert r.json() == {"removed": 1}
    asyncio.run(go())


def test_admin_api_does_not_exist_without_admin_keys():
    async def go():
        c, _ = _client(_cfg({"engine": []}))
        async with c:
            r = await c.get("/admin/faults", headers={"Authorization": "Bearer adm"})
            assert r.status_code == 404 and "error" in r.json()
    asyncio.run(go())
