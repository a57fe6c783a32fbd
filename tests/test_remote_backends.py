"""Backends by URL (unit tier: small HTTP servers in-process stand in for remote vLLM servers, whose
API surface here is only /health, /v1/models and one completion route)."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from aiohttp import web

from gateway.config import ConfigError, parse_config
from gateway.launch import free_port


SEEN = web.AppKey("seen", list)


def fake_vllm(model: str, key: str | None = "remote-key", healthy: bool = True) -> web.Application:
    """A stand-in for a vLLM OpenAI server: keys on /v1, its model list, and a completion that echoes what it got."""
    seen: list[dict] = []

    @web.middleware
    async def auth(request, handler):
        if key and request.path.startswith("/v1") and request.headers.get("Authorization") != f"Bearer {key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def health(_):
        return web.Response(status=200 if healthy else 503)

    async def models(_):
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    async def chat(request):
        body = await request.json()
        seen.append({"auth": request.headers.get("Authorization"), "headers": dict(request.headers), "body": body})
        return web.json_response({"id": "x", "object": "chat.completion", "model": body["model"],
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]})

    app = web.Application(middlewares=[auth])
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app[SEEN] = seen
    return app


async def _serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def test_url_backend_config_rules(monkeypatch):
    b = {"name": "r", "model": "m", "urls": ["http://10.0.0.5:8000", "https://pod-1:8443/"]}
    cfg = parse_config({"backends": [b]})
    assert cfg.backends[0].replicas == 2
    for bad, msg in (({"urls": ["ftp://x:1"]}, "http://HOST:PORT"), ({"urls": ["http://x:1/v1"]}, "no path"),
                     ({"urls": ["http://u:p@x:1"]}, "credentials"), ({"urls": []}, "no server"),
                     ({"urls": ["http://x:1"], "profile": "p"}, "profile configures"),
                     ({"urls": ["http://x:1"], "replicas": 3}, "for 3 replicas"),
                     ({"urls": ["http://x:1"], "faults": {"engine": [{"kind": "hang"}]}}, "engine"),
                     ({"api_key_env": "K", "profile": "p"}, "apply to backends with urls")):
        with pytest.raises(ConfigError, match=msg):
            parse_config({"backends": [{"name": "r", "model": "m", **bad}]})
    cfg = parse_config({"backends": [{**b, "api_key_env": "REMOTE_KEY"}]})
    monkeypatch.delenv("REMOTE_KEY", raising=False)
    with pytest.raises(ConfigError, match="REMOTE_KEY is unset"):
        cfg.backends[0].remote_key()
    monkeypatch.setenv("REMOTE_KEY", "s3cret")
    assert cfg.backends[0].remote_key().get_secret_value() == "s3cret"


def test_gateway_fronts_running_servers_and_says_why_others_are_not_ready(monkeypatch):
    monkeypatch.setenv("REMOTE_KEY", "remote-key")
    good, wrong_model, wrong_key, dead = free_port(), free_port(), free_port(), free_port()

    async def go():
        apps = [fake_vllm("m"), fake_vllm("other-model"), fake_vllm("m", key="something-else")]
        runners = [await _serve(a, p) for a, p in zip(apps, (good, wrong_model, wrong_key))]
        cfg = parse_config({"gateway": {"api_keys": ["client-key"]}, "backends": [{
            "name": "remote", "model": "m", "api_key_env": "REMOTE_KEY",
            "urls": [f"http://127.0.0.1:{p}" for p in (good, wrong_model, wrong_key, dead)]}]})
        from gateway.proxy import create_app
        app = create_app(cfg)
        gw = app.gateway
        await gw.startup()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
                for _ in range(60):
                    if (await c.get("/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(1.5)  # the others' checks have run (and backed off)
                r = await c.get("/ready")
                assert r.status_code == 200
                m = r.json()["models"]["m"]
                assert m["ready"] == 1 and m["replicas"][0] == "ready"
                why = m["not_ready"]
                assert "serves ['other-model'], not 'm'" in why["remote/1"]
                assert "refused the backend's key" in why["remote/2"]
                assert "unreachable" in why["remote/3"]
                hdr = {"Authorization": "Bearer client-key"}
                for _ in range(4):  # every request goes to the one ready server
                    r = await c.post("/v1/chat/completions", json={"model": "m", "messages": []}, headers=hdr)
                    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
                seen = apps[0][SEEN]
                assert len(seen) == 4
                assert all(s["auth"] == "Bearer remote-key" for s in seen)  # its own key, never the client's
                assert not any("client-key" in json.dumps(s["headers"]) for s in seen)
                assert not apps[1][SEEN] and not apps[2][SEEN]
        finally:
            await gw.shutdown()
            for rn in runners:
                await rn.cleanup()
        # the gateway never starts or stops the servers it was given
        assert gw.supervisor.all_replicas()[0].process is None
    asyncio.run(go())


def test_a_remote_server_that_goes_away_is_marked_down_and_comes_back():
    port = free_port()

    async def go():
        runner = await _serve(fake_vllm("m", key=None), port)
        cfg = parse_config({"backends": [{"name": "remote", "model": "m", "urls": [f"http://127.0.0.1:{port}"]}]})
        from gateway import supervisor as sup_mod
        sup_mod.HEALTH_INTERVAL_S = 0.1
        from gateway.proxy import create_app
        app = create_app(cfg)
        gw = app.gateway
        await gw.startup()
        r = gw.supervisor.all_replicas()[0]
        try:
            for _ in range(50):
                if r.ready:
                    break
                await asyncio.sleep(0.1)
            assert r.ready
            await runner.cleanup()
            for _ in range(80):
                if not r.ready:
                    break
                await asyncio.sleep(0.1)
            assert r.state == "down" and ("unreachable" in r.reason or "failed" in r.reason)
            runner = await _serve(fake_vllm("m", key=None), port)
            for _ in range(100):
                if r.ready:
                    break
                await asyncio.sleep(0.1)
            assert r.ready and r.process is None
        finally:
            sup_mod.HEALTH_INTERVAL_S = 1.0
            await gw.shutdown()
            await runner.cleanup()
    asyncio.run(go())
