"""Screenshot pages of the built docs site with headless Chromium (DevTools protocol).

    mkdocs build --strict -d /tmp/site
    python scripts/screenshot_docs.py --chromium /path/to/chromium --site /tmp/site \\
        --out docs/img/screenshots / guides/plan-capacity/

Serves ``--site`` on a local port, starts Chromium headless with ``--remote-debugging-port``,
opens each page at 1280 x 900 CSS px and writes ``<page>.png`` (``index.png`` for ``/``) with
``Page.captureScreenshot``. Any Chromium 110+ works; this host has none in its package
registries' reach, so the committed screenshots used ``@sparticuz/chromium`` from npm (its
``bin/*.br`` brotli-unpacked; run with ``LD_LIBRARY_PATH`` = the unpacked ``lib`` and
``FONTCONFIG_PATH`` = a fonts.conf that lists a font directory).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import http.server
import socket
import subprocess
import threading
import time
from pathlib import Path

import aiohttp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _shoot(devtools_port: int, base: str, pages: list[str], out: Path, wait_s: float) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.put(f"http://127.0.0.1:{devtools_port}/json/new?about:blank") as r:
            tab = await r.json()
        async with s.ws_connect(tab["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            ids = iter(range(1, 1 << 30))

            async def call(method: str, **params):
                mid = next(ids)
                await ws.send_json({"id": mid, "method": method, "params": params})
                while True:
                    m = await ws.receive_json()
                    if m.get("id") == mid:
                        if "error" in m:
                            raise RuntimeError(f"{method}: {m['error']}")
                        return m["result"]

            await call("Page.enable")
            await call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1,
                       mobile=False)
            for page in pages:
                await call("Page.navigate", url=base + page.lstrip("/"))
                await asyncio.sleep(wait_s)
                shot = await call("Page.captureScreenshot", format="png")
                name = (page.strip("/").replace("/", "_") or "index") + ".png"
                (out / name).write_bytes(base64.b64decode(shot["data"]))
                print(f"wrote {out / name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chromium", required=True, help="path to a Chromium or Chrome binary")
    ap.add_argument("--site", default="site", help="the built site (mkdocs build -d DIR)")
    ap.add_argument("--out", default="docs/img/screenshots")
    ap.add_argument("--wait", type=float, default=3.0, help="seconds to let a page render")
    ap.add_argument("pages", nargs="+", help="site paths, e.g. / guides/plan-capacity/")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    web_port, dt_port = _free_port(), _free_port()
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=a.site)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", web_port), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    chrome = subprocess.Popen([a.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--remote-debugging-port={dt_port}", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", dt_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or chrome.poll() is not None:
                    raise SystemExit("Chromium did not open its DevTools port in 30 s (try it by hand with "
                                     "--headless=new --no-sandbox about:blank)") from None
                time.sleep(0.2)
        asyncio.run(_shoot(dt_port, f"http://127.0.0.1:{web_port}/", a.pages, out, a.wait))
    finally:
        chrome.terminate()
        httpd.shutdown()


if __name__ == "__main__":
    main()
