"""The gateway's front door (gateway/guard.py): the path rule, the key check on every route, admission
before the body is read, and secrets kept where they belong.

A real gateway process (``python -m gateway --no-launch``) fronts the scripted raw-socket upstream,
which records the path of every request it receives, so a test can prove what crossed the hop.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import start_gateway, status_of, wait_for
from gateway.config import ConfigError, parse_config
from gateway.guard import FORWARDED_ROUTES, MAX_PATH_BYTES, ApiKeys, PathRefused, normalize_path
from gateway.launch import free_port, vllm_command
from scripted_upstream import ScriptedUpstream

K1, K2 = "guard-key-1", "guard-key-2"
MODEL = "scripted"


@pytest.fixture(scope="module")
def up():
    u = ScriptedUpstream()
    yield u
    u.close()


@pytest.fixture(scope="module")
def gw(up, tmp_path_factory):
    port = free_port()
    cfg = tmp_path_factory.mktemp("guard") / "gw.toml"
    cfg.write_text(f"""
[gateway]
port = {port}
api_keys = ["{K1}", "{K2}"]
queue_limit = 3
max_concurrency_per_key = 2
[[backends]]
name = "scripted"
model = "{MODEL}"
mode = "real"
ports = [{up.port}]
""")
    proc, log = start_gateway("gateway-guard", cfg, "--no-launch")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: status_of(url + "/ready") == 200, 60, what="the gateway to see the scripted upstream")
        yield url, port, log
    finally:
        proc.stop(grace_s=10)


def _raw(port: int, target: bytes, key: str | None = K1, body: bytes = b'{"model": "scripted"}',
         method: bytes = b"POST") -> tuple[int, bytes]:
    """Send one request with the target exactly as given (``curl --path-as-is``); (status, body)."""
    head = b"%s %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" \
           b"connection: close\r\n" % (method, target, len(body))
    if key:
        head += b"authorization: Bearer " + key.encode() + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


#: What the gateway itself asks a replica (its control plane: model list, metric scrapes, health): GETs only.
OWN_REQUESTS = {("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/health")}


def _upstream_paths(up, n0: int) -> list[str]:
    """Paths of the requests forwarded to the upstream since request ``n0`` (the gateway's own GETs left out)."""
    seen = [(r["method"], r["path"].split("?", 1)[0]) for r in up.requests[n0:]]
    assert all(m == "POST" or (m, p) in OWN_REQUESTS for m, p in seen), seen
    return [p for m, p in seen if m == "POST"]


# ---------------------------------------------------------------- the path rule, pure
@pytest.mark.parametrize("raw", [b"/v1/../reset_prefix_cache", b"/v1/%2e%2e/reset_prefix_cache",
                                 b"/v1/chat/../../sleep", b"/v1/completions/../../metrics", b"/v1/./completions",
                                 b"/v1//completions", b"/v1/completions/", b"/v1/%2fsleep", b"/v1/%252e%252e/x",
                                 b"/v1/completions;x=1", b"/v1\\..\\sleep", b"/v1/\x00", b"v1/completions",
                                 b"/v1/%E2%80%AE", b"/v1/caf\xc3\xa9"])
def test_path_rule_refuses_dots_encodings_and_empty_segments(raw):
    with pytest.raises(PathRefused) as e:
        normalize_path(raw)
    assert e.value.status == 400


def test_path_rule_keeps_plain_paths_and_refuses_long_ones():
    for p in FORWARDED_ROUTES | {"/", "/health", "/v1/models", "/v1/a-b_c.d~e"}:
        assert normalize_path(p.encode()) == p
    with pytest.raises(PathRefused) as e:
        normalize_path(b"/" + b"a" * MAX_PATH_BYTES)
    assert e.value.status == 414


# ---------------------------------------------------------------- the reported traversal, end to end
@pytest.mark.parametrize("target", [b"/v1/../reset_prefix_cache", b"/v1/%2e%2e/reset_prefix_cache",
                                    b"/v1/chat/../../sleep", b"/v1/completions/../../metrics",
                                    b"http://replica/v1/../sleep", b"/v1/%2E%2E/collective_rpc"])
def test_traversal_with_a_valid_key_never_reaches_the_replica(gw, up, target):
    _, port, _ = gw
    n0 = len(up.requests)
    status, body = _raw(port, target)
    assert status == 400, (target, status, body)
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    time.sleep(0.05)
    assert _upstream_paths(up, n0) == []


_SEGMENTS = st.sampled_from(["v1", "chat", "completions", "embeddings", "tokenize", "sleep", "wake_up",
                             "reset_prefix_cache", "collective_rpc", "pause", "metrics", "load_lora_adapter",
                             "..", ".", "", "%2e%2e", "%2E%2e", "%2f", "%2F..", "%252e%252e", "%5c", "a;b=1",
                             ";", "\\..", "%00", "x" * 300, "responses", "%", "~", "v1%2fchat"])
_TARGETS = st.builds(
    lambda prefix, segs, query, trailing: (prefix + "/" + "/".join(segs) + ("/" if trailing else "")
                                           + query).encode("latin-1"),
    st.sampled_from(["", "", "", "http://gw", "http://127.0.0.1:1", "//evil"]),
    st.lists(_SEGMENTS, min_size=0, max_size=12),
    st.sampled_from(["", "", "?a=1", "?x=%2e%2e/../y", "?q=%zz", "?a=1#frag"]),
    st.booleans())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=_TARGETS, method=st.sampled_from([b"POST", b"POST", b"GET", b"PUT"]))
def test_fuzzed_request_targets_never_reach_a_route_outside_the_allowlist(gw, up, target, method):
    _, port, _ = gw
    n0 = len(up.requests)
    status, _ = _raw(port, target, method=method)
    seen = _upstream_paths(up, n0)
    assert status in (200, 400, 401, 404, 405, 414), (target, status)
    assert all(p in FORWARDED_ROUTES for p in seen), (target, seen)
    if status == 200 and method == b"POST":
        assert seen, target


# ---------------------------------------------------------------- one key check for every route
def test_no_route_skips_the_key_check(gw):
    url, port, _ = gw
    public = {("GET", "/health"), ("GET", "/ready"), ("HEAD", "/health"), ("HEAD", "/ready")}
    paths = sorted(FORWARDED_ROUTES | {"/health", "/ready", "/metrics", "/v1/models", "/nope", "/v1/nope",
                                       "/sleep", "/"})
    client = httpx.Client(timeout=10)
    for path in paths:
        for method in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"):
            for hdr in ({}, {"authorization": "Bearer wrong"}, {"authorization": K1}):
                r = client.request(method, url + path, headers=hdr, content=b"{}")
                if (method, path) in public:
                    assert r.status_code in (200, 503), (method, path, r.status_code)
                else:
                    assert r.status_code == 401, (method, path, hdr, r.status_code)
                    if method != "HEAD":
                        assert r.json()["error"]["type"] == "authentication_error"


# ---------------------------------------------------------------- admission before the body
def _hold(port: int, key: str) -> socket.socket:
    """A request the scripted upstream never answers (kept open until the socket closes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"model": MODEL, "prompt": "hold"}).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\nx-script: hang\r\nauthorization: Bearer "
              + key.encode() + b"\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    return s


def _declared_only(port: int, key: str, size: int = 30 * 2**20) -> tuple[int, dict, float]:
    """Headers declaring a ``size``-byte body and not one byte of it: (status, headers, seconds to answer)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0 = time.perf_counter()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nauthorization: "
              b"Bearer " + key.encode() + b"\r\ncontent-length: %d\r\n\r\n" % size)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    dt = time.perf_counter() - t0
    s.close()
    head = data.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:])}
    return int(head[0].split()[1]), headers, dt


def test_queue_limit_and_per_key_limit_answer_429_before_the_body_is_read(gw, up):
    url, port, _ = gw
    n0 = len(up.requests)
    held = [_hold(port, K1), _hold(port, K1)]
    try:
        wait_for(lambda: len(up.requests) >= n0 + 2, 10, what="two held requests to reach the upstream")
        status, headers, _ = _declared_only(port, K1)  # K1 is at max_concurrency_per_key = 2
        assert status == 429 and headers["retry-after"] == "1", (status, headers)
        held.append(_hold(port, K2))
        wait_for(lambda: len(up.requests) >= n0 + 3, 10, what="the third held request")
        status, headers, _ = _declared_only(port, K2)  # 3 in flight = queue_limit
        assert status == 429 and "retry-after" in headers
    finally:
        for s in held:
            s.close()
    # the held requests are released when their clients leave; the gateway admits again
    wait_for(lambda: httpx.post(url + "/v1/completions", json={"model": MODEL}, headers={
        "authorization": f"Bearer {K1}"}).status_code == 200, 10, what="admission after the clients left")


def test_invalid_utf8_body_is_a_400_that_never_reaches_the_replica(gw, up):
    """Invalid UTF-8 in a field the router does not parse (the prompt) is refused at the gateway
    with OpenAI's error JSON; the replica never sees it."""
    _, port, _ = gw
    n0 = len(up.requests)
    status, body = _raw(port, b"/v1/completions", body=b'{"model": "scripted", "prompt": "caf\xe9 \xff"}')
    err = json.loads(body)["error"]
    assert status == 400 and err["type"] == "BadRequestError" and "UTF-8" in err["message"], (status, body)
    assert _upstream_paths(up, n0) == []
    # the same body, valid UTF-8, is forwarded
    status, _ = _raw(port, b"/v1/completions", body='{"model": "scripted", "prompt": "café"}'.encode())
    assert status == 200 and _upstream_paths(up, n0) == ["/v1/completions"]


# ---------------------------------------------------------------- secrets
def test_keys_are_secrets_in_config_errors_and_repr():
    with pytest.raises(ConfigError) as e:
        parse_config({"gateway": {"api_keys": "sk-typo-secret-123"}, "backends": [
            {"name": "b", "model": "m", "mode": "real", "env": {"HF_TOKEN": ["hf-secret-456"]}}]})
    assert "sk-typo-secret-123" not in str(e.value) and "hf-secret-456" not in str(e.value)
    assert "gateway.api_keys" in str(e.value) and "backends[0].env.HF_TOKEN" in str(e.value)
    cfg = parse_config({"gateway": {"api_keys": ["sk-real-789"]}, "backends": [{"name": "b", "model": "m",
                                                                              "mode": "real"}]})
    assert "sk-real-789" not in repr(cfg) and "sk-real-789" not in str(cfg.model_dump())
    assert "sk-real-789" not in repr(ApiKeys(cfg.gateway.resolved_api_keys()))
    assert ApiKeys(cfg.gateway.resolved_api_keys()).check([(b"authorization", b"Bearer sk-real-789")])


def test_replica_environment_is_an_allowlist(monkeypatch, tmp_path):
    monkeypatch.setenv("GW_CLIENT_KEYS", "sk-client-1")
    monkeypatch.setenv("VLLM_GW_KEYS", "sk-client-2")  # withheld even where a prefix would pass it
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("VLLM_API_KEY", "someone-elses")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    cfg = parse_config({"gateway": {"api_keys_env": "VLLM_GW_KEYS"}, "backends": [
        {"name": "b", "model": "m", "mode": "real", "env": {"MY_SETTING": "1"}}]})
    b = cfg.backends[0]
    argv, env = vllm_command(b, None, uds=str(tmp_path / "r.sock"), api_key="replica-own",
                             withhold_env={"VLLM_GW_KEYS"}, runtime_dir=str(tmp_path))
    assert "--uds" in argv and "--port" not in argv
    values = set(env.values())
    assert {"sk-client-1", "sk-client-2", "aws-secret", "someone-elses"}.isdisjoint(values)
    assert env["VLLM_API_KEY"] == "replica-own" and env["MY_SETTING"] == "1" and env["OMP_NUM_THREADS"] == "2"
    assert env["EMUGATE_RUNTIME_DIR"] == str(tmp_path) and "PATH" in env
    assert not {"GW_CLIENT_KEYS", "VLLM_GW_KEYS", "AWS_SECRET_ACCESS_KEY"} & set(env)


def test_profiles_never_carry_environment_values():
    from emugate.capture import shareable_backend
    cfg = parse_config({"backends": [{"name": "b", "model": "m", "mode": "real", "env": {"HF_TOKEN": "hf-abc"},
                                      "extra_args": ["--hf-token", "hf-def", "--hf-token=hf-ghi", "--seed", "3"]}]})
    d = shareable_backend(cfg.backends[0])
    text = json.dumps(d)
    assert "hf-abc" not in text and "hf-def" not in text and "hf-ghi" not in text
    assert d["env_names"] == ["HF_TOKEN"] and d["extra_args"][-2:] == ["--seed", "3"]


def test_lateness_file_is_private(monkeypatch, tmp_path):
    from emu_executor import lateness
    monkeypatch.delenv(lateness.RUNTIME_ENV, raising=False)
    assert lateness.stats_path(1) is None  # no private directory: memory only, never a guessable /tmp path
    d = lateness.runtime_dir(create=True)
    try:
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
        path = lateness.stats_path(os.getpid())
        assert path.parent == d
        st_ = lateness.LatenessStats(path, warn_ms=None)
        st_.observe(0.002)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and st_.count == 1
        os.symlink(tmp_path / "victim", d / "lateness-7.f64")  # a planted link is not followed
        with pytest.raises(OSError):
            lateness._private_memmap(d / "lateness-7.f64")
        assert not (tmp_path / "victim").exists()
        st_.close()
    finally:
        os.environ.pop(lateness.RUNTIME_ENV, None)


# ---------------------------------------------------------------- dependency bounds
def test_uvicorn_private_api_the_header_deadline_hooks_is_there():
    from gateway import server
    server.check_private_api()  # raises, naming the version, if uvicorn moved what the subclass overrides
    proto = server.deadline_protocol(1.0)
    assert all(m in proto.__dict__ for m in server.HOOKED_METHODS)

    # the attributes it uses exist on a live connection (a protocol instance given a socket-like transport)
    import asyncio
    import uvicorn
    from uvicorn.server import ServerState

    class Transport(asyncio.Transport):
        def get_extra_info(self, name, default=None):
            return {"sockname": ("127.0.0.1", 1), "peername": ("127.0.0.1", 2)}.get(name, default)

        def is_closing(self):
            return False

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

        def write(self, data):
            pass

        def close(self):
            pass

    async def live():
        async def app(scope, receive, send):
            pass
        config = uvicorn.Config(app, http=proto)
        config.load()
        p = proto(config=config, server_state=ServerState(), app_state={})
        p.connection_made(Transport())
        missing = [a for a in server.USED_ATTRIBUTES if getattr(p, a, None) is None]
        p.connection_lost(None)
        return missing
    assert asyncio.run(live()) == []

    class Moved:
        connection_made = connection_lost = on_message_begin = None

    with pytest.raises(RuntimeError, match="on_headers_complete"):
        server.check_private_api(Moved)
    import tomllib
    deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("uvicorn") and "<" in d for d in deps)
