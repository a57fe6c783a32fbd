"""The gateway's admin API: faults at runtime (``/admin/faults``).

Exists only when ``[gateway] admin_keys`` are configured, and only admin keys open it
(:class:`gateway.guard.Guard`). Every answer is JSON; every refusal OpenAI's error JSON with a 4xx,
and a refused call changes nothing.

``GET /admin/faults``
    Per backend: the configured faults (client keys shown as ``**********``), the faults added
    here (with their ids), and per emulated replica the engine faults on now.
``PUT /admin/faults``
    Body ``{"backend": NAME, "http": {...}}``, ``{"backend": NAME, "stream": {...}}`` or
    ``{"backend": NAME, "engine": {...}}``, the object being one fault as in the config
    (:mod:`gateway.faults`; an engine fault's ``at_s`` counts from this call). Answers
    ``{"id": N}``. Engine faults need the backend to be emulated and to have a
    ``[backends.faults]`` table (its replicas read their faults file only then).
``DELETE /admin/faults?backend=NAME[&id=N][&kind=KIND]``
    Removes faults added here (and, for engine faults, configured ones of that kind too when
    ``kind`` is given); answers ``{"removed": N}``. Without ``backend``: every added fault.
"""
from __future__ import annotations

import json
import time

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import error_body, request_id
from gateway.faults import EngineFault, HttpFault, StreamFault

#: Largest admin request body (bytes).
MAX_ADMIN_BODY = 64 * 1024


def _err(request: Request, status: int, message: str, param: str | None = None) -> Response:
    rid = request_id(request.scope["headers"]).decode()
    return Response(error_body(message, "invalid_request_error", status, param, rid), status,
                    media_type="application/json", headers={"x-request-id": rid})


def create_admin_app(gw) -> Starlette:
    """The admin routes over the :class:`gateway.proxy.Gateway` ``gw``."""

    async def get_faults(request: Request) -> Response:
        now = time.monotonic()
        out = {}
        for b in gw.config.backends:
            fd = gw.front_doors.get(b.name)
            ef = gw.engine_faults.get(b.name)
            entry: dict = {"configured": json.loads(b.faults.model_dump_json()) if b.faults else None,
                           "added": [], "engine_now": {}}
            if fd is not None:
                entry["added"] += [{"id": i, "kind": "http" if isinstance(f, HttpFault) else "stream",
                                    **json.loads(f.model_dump_json())} for i, f in fd.extra]
            if ef is not None:
                entry["added"] += [{"id": i, **json.loads(f.model_dump_json()), "starts_in_s": round(t - now, 3)}
                                   for i, f, t in ef.items if i > 0]
                entry["engine_now"] = {str(r): ef.state(r, now) for r in range(b.replicas)}
            out[b.name] = entry
        return JSONResponse({"backends": out, "uptime_s": round(now - gw.started, 3)})

    async def put_faults(request: Request) -> Response:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_ADMIN_BODY:
                return _err(request, 413, f"admin request body over {MAX_ADMIN_BODY} bytes")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return _err(request, 400, f"the body is not valid JSON: {e}")
        if not isinstance(doc, dict) or not isinstance(doc.get("backend"), str):
            return _err(request, 400, 'send {"backend": NAME, "http"|"stream"|"engine": {...one fault...}}',
                        "backend")
        kinds = [k for k in ("http", "stream", "engine") if k in doc]
        if len(kinds) != 1 or set(doc) != {"backend", kinds[0]}:
            return _err(request, 400, 'give exactly one of "http", "stream" or "engine" beside "backend"')
        name, kind = doc["backend"], kinds[0]
        try:
            b = gw.config.backend(name)
        except KeyError as e:
            return _err(request, 404, str(e).strip("'\""), "backend")
        model = {"http": HttpFault, "stream": StreamFault, "engine": EngineFault}[kind]
        try:
            fault = model.model_validate(doc[kind])
        except ValidationError as e:
            msg = "; ".join(f"{kind}.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}".replace(f"{kind}.: ",
                                                                                                 f"{kind}: ")
                            for err in e.errors())
            return _err(request, 400, msg, kind)
        bad = [i for i in (fault.replicas or []) if not 0 <= i < b.replicas]
        if bad:
            return _err(request, 400, f"replica indices {bad} out of range (0..{b.replicas - 1})", "replicas")
        fid = next(gw._fault_ids)
        if kind == "engine":
            ef = gw.engine_faults.get(name)
            if ef is None:
                return _err(request, 400, f"backend {name!r} takes no engine faults: they act inside an emulated "
                                          "engine whose replicas were started with a [backends.faults] table")
            ef.add(fid, fault)
        else:
            if b.mode == "real" and not (b.faults and b.faults.allow_on_real):
                return _err(request, 400, f"backend {name!r} is real: set faults.allow_on_real = true to inject "
                                          "front-door and mid-stream faults there")
            fd = gw.front_doors.get(name)
            if fd is None:
                from gateway.faults import FrontDoor
                fd = gw.front_doors[name] = FrontDoor(None, gw.api_keys.index_of, gw.started)
            fd.add(fid, fault)
        return JSONResponse({"id": fid, "backend": name, "kind": kind})

    async def delete_faults(request: Request) -> Response:
        q = request.query_params
        name = q.get("backend")
        fid = q.get("id")
        kind = q.get("kind")
        if fid is not None and not fid.isdigit():
            return _err(request, 400, "id must be a fault id from PUT /admin/faults", "id")
        if name is not None and name not in {b.name for b in gw.config.backends}:
            return _err(request, 404, f"no backend named {name!r}", "backend")
        removed = 0
        for bname in ([name] if name else [b.name for b in gw.config.backends]):
            fd = gw.front_doors.get(bname)
            ef = gw.engine_faults.get(bname)
            if fd is not None and kind in (None, "http", "stream"):
                if fid is not None:
                    removed += fd.remove(int(fid))
                elif kind is None:
                    removed += fd.remove(None)
                else:
                    before = len(fd.extra)
                    fd.extra = [(i, f) for i, f in fd.extra
                                if (kind == "http") != isinstance(f, HttpFault)]
                    removed += before - len(fd.extra)
            if ef is not None:
                if fid is not None:
                    removed += ef.remove(int(fid))
                elif kind not in (None, "http", "stream"):
                    removed += ef.remove(None, kind)
                elif kind is None:
                    before = len(ef.items)
                    ef.items = [(i, f, t) for i, f, t in ef.items if i < 0]
                    removed += before - len(ef.items)
        return JSONResponse({"removed": removed})

    return Starlette(routes=[
        Route("/admin/faults", get_faults, methods=["GET"]),
        Route("/admin/faults", put_faults, methods=["PUT"]),
        Route("/admin/faults", delete_faults, methods=["DELETE"]),
    ], exception_handlers={404: lambda r, e: _err(r, 404, f"No admin route {r.method} {r.url.path}"),
                           405: lambda r, e: _err(r, 405, f"Method {r.method} is not allowed on {r.url.path}")})
