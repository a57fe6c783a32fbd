"""Fuzz the gateway's HTTP surface in front of a real emulated vLLM replica.

Hypothesis generates (1) OpenAI-shaped request bodies, starting from a valid
chat or completions request (``max_tokens`` 1-8 so each is quick) and
replacing, dropping or adding fields with arbitrary JSON values, sent to the
gateway's routes with arbitrary end-to-end and hop-by-hop headers; (2)
arbitrary bytes, sent as JSON bodies; (3) malformed HTTP on a raw socket
(junk request lines, bad header syntax, bad chunked framing, a wrong
Content-Length); (4) request targets sent as-is (``curl --path-as-is``):
dot segments, percent-encoded dots and slashes, double encoding, ``;``
parameters, absolute-form targets, very long paths, mixed with vLLM's
routes the gateway does not expose (``/sleep``, ``/reset_prefix_cache``...).
For (4) the replica's own access log (vLLM's uvicorn, in the gateway's log)
lists every path that reached it: each must be on the gateway's allowlist
(plus the gateway's own ``/health``, ``/metrics`` and ``/v1/models`` GETs).
Each answer is classified:

* 5xx from the gateway: its own error types (``BadGatewayError``,
  ``GatewayTimeoutError``, ``ServiceUnavailableError``) or a non-JSON 500;
* 5xx passed through from vLLM (a vLLM bug, not the gateway's; listed);
* dropped: the connection closed with no HTTP answer.

Then the gateway must still serve a plain request.

    python benchmarks/gateway_fuzz.py --examples 2000 --raw 300 --targets 2000
"""
from __future__ import annotations

import argparse
import json
import re
import socket
from collections import Counter

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _common import MODEL, PROFILE, start_gateway, wait_healthy
from gateway.guard import FORWARDED_ROUTES

GATEWAY_TYPES = {"BadGatewayError", "GatewayTimeoutError", "ServiceUnavailableError"}
PATHS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/responses",
         "/v1/embeddings", "/v1/models", "/v1/nope"]
FIELDS = ["model", "messages", "prompt", "max_tokens", "stream", "n", "temperature", "top_p", "logprobs",
          "top_logprobs", "stop", "seed", "ignore_eos", "response_format", "tools", "tool_choice", "echo",
          "stream_options", "min_tokens", "best_of", "prompt_logprobs", "structured_outputs", "tokens"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=12)


@st.composite
def bodies(draw):
    chat = draw(st.booleans())
    base = {"model": MODEL, "max_tokens": draw(st.integers(1, 8)), "ignore_eos": draw(st.booleans())}
    if chat:
        base["messages"] = [{"role": "user", "content": draw(st.text(max_size=60))}]
    else:
        base["prompt"] = draw(st.text(max_size=60))
    for _ in range(draw(st.integers(0, 3))):
        k = draw(st.sampled_from(FIELDS) | st.text(max_size=12))
        if draw(st.booleans()) and k in base and k not in ("max_tokens",):
            del base[k]
        elif k != "max_tokens":
            base[k] = draw(json_values)
    if draw(st.booleans()):
        base["stream"] = True
    return json.dumps(base, allow_nan=True).encode()


headers_st = st.dictionaries(
    st.sampled_from(["x-request-id", "content-type", "x-session-id", "connection", "te", "upgrade",
                     "x-custom", "accept", "accept-encoding", "authorization"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40), max_size=4)

RAW_TEMPLATES = [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{JUNK}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{JUNK}\r\n0\r\n\r\n",
    b"{JUNK} /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST {JUNK} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\n{JUNK}: y\r\nContent-Length: 0\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {JUNK}\r\n\r\n{}",
    b"{JUNK}\r\n\r\n",
]


TARGET_SEGMENTS = ["v1", "chat", "completions", "embeddings", "tokenize", "responses", "models", "sleep", "wake_up",
                   "reset_prefix_cache", "collective_rpc", "pause", "metrics", "load_lora_adapter", "start_profile",
                   "..", ".", "", "%2e%2e", "%2E%2e", "%2e", ".%2e", "%2f", "%2F..", "%252e%252e", "%5c", "%00",
                   "a;b=1", ";", "\\..", "..\\", "%c0%ae%c0%ae", "\u2025", "x" * 700, "~", "v1%2fchat", "*"]
TARGET_PREFIXES = ["", "", "", "http://gw", "http://127.0.0.1:1", "//evil", "https://x:443"]
TARGET_QUERIES = ["", "", "?a=1", "?x=%2e%2e/../y", "?q=%zz", "?a=1#frag", "?\x01"]
#: Paths the gateway itself sends to a replica (health checks, model list, metric scrapes).
OWN_PATHS = {"/health", "/metrics", "/v1/models"}


def classify(status: int, body: bytes, counts: Counter, examples: dict, sent=None) -> None:
    if status < 500:
        if status >= 300:
            counts[f"{status // 100}xx"] += 1
        return
    try:
        etype = json.loads(body)["error"]["type"]
    except Exception:
        etype = None
    key = "5xx from the gateway" if etype in GATEWAY_TYPES or etype is None else "5xx passed through from vLLM"
    counts[key] += 1
    examples.setdefault(key, (status, body[:200], sent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=2000, help="generated HTTP requests (bodies + headers)")
    ap.add_argument("--raw", type=int, default=300, help="malformed raw-socket requests")
    ap.add_argument("--targets", type=int, default=2000, help="raw request targets sent as-is (path rule)")
    a = ap.parse_args()
    url, gw, log = start_gateway("fuzz", f'header_timeout_s = 2.0\nbody_timeout_s = 3.0\n[[backends]]\nname = "emu"\n'
                                       f'model = "{MODEL}"\nmode = "emulate"\nprofile = "{PROFILE}"\n'
                                       'max_model_len = 2048\n')
    port = int(url.rsplit(":", 1)[1])
    counts: Counter = Counter()
    examples: dict = {}
    try:
        wait_healthy(url, gw, timeout_s=300, path="/ready")
        client = httpx.Client(timeout=120)

        @settings(max_examples=a.examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(body=st.one_of(bodies(), st.binary(max_size=200)), path=st.sampled_from(PATHS), hdrs=headers_st)
        def http_case(body, path, hdrs):
            counts["requests"] += 1
            try:
                r = client.post(url + path, content=body, headers={"content-type": "application/json", **hdrs})
            except (httpx.RemoteProtocolError, httpx.ReadError) as e:
                counts["dropped"] += 1
                examples.setdefault("dropped", (repr(e), body[:200]))
                return
            except httpx.TimeoutException:
                counts["client timeout"] += 1
                return
            classify(r.status_code, r.content, counts, examples, (path, hdrs, body[:300]))
            if counts["requests"] % 250 == 0:
                print(f"  {counts['requests']} requests: {dict(counts)}", flush=True)
            if r.status_code == 200:
                counts["2xx"] += 1

        @settings(max_examples=a.raw, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(tmpl=st.sampled_from(RAW_TEMPLATES), junk=st.binary(min_size=0, max_size=60))
        def raw_case(tmpl, junk):
            counts["raw requests"] += 1
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(10)
            s.sendall(tmpl.replace(b"{JUNK}", junk))
            try:
                data = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                data = b""
            s.close()
            if not data:
                counts["raw: closed without an answer"] += 1
                examples.setdefault("raw: closed without an answer", tmpl.replace(b"{JUNK}", junk)[:200])
            elif data.startswith(b"HTTP/1.1 5"):
                counts["raw: 5xx"] += 1
                examples.setdefault("raw: 5xx", (junk, data[:200]))
            else:
                counts[f"raw: {data[9:12].decode(errors='replace')}"] += 1

        @settings(max_examples=a.targets, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(prefix=st.sampled_from(TARGET_PREFIXES), segs=st.lists(st.sampled_from(TARGET_SEGMENTS), max_size=12),
               query=st.sampled_from(TARGET_QUERIES), trailing=st.booleans(),
               method=st.sampled_from([b"POST", b"POST", b"GET", b"PUT", b"DELETE"]))
        def target_case(prefix, segs, query, trailing, method):
            counts["targets"] += 1
            target = (prefix + "/" + "/".join(segs) + ("/" if trailing else "") + query).encode("utf-8")
            body = json.dumps({"model": MODEL, "prompt": "t", "max_tokens": 1}).encode()
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(30)
            s.sendall(b"%s %s HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\nconnection: close\r\n"
                      b"content-length: %d\r\n\r\n%s" % (method, target, len(body), body))
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except (socket.timeout, ConnectionResetError):
                pass
            s.close()
            status = data[9:12].decode(errors="replace") if data.startswith(b"HTTP/1.1 ") else "no answer"
            counts[f"target: {status}"] += 1

        http_case()
        raw_case()
        target_case()
        after = client.post(url + "/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 2})
        alive = gw.poll() is None
    finally:
        gw.stop()
    print(f"requests tried: {counts['requests']} HTTP + {counts['raw requests']} raw")
    for k, v in sorted(counts.items()):
        if k not in ("requests", "raw requests"):
            print(f"  {k}: {v}")
    for k, v in examples.items():
        print(f"  e.g. {k}: {v}")
    print(f"gateway afterwards: process {'running' if alive else 'GONE'}, a plain request -> {after.status_code}")
    # what reached the replica: vLLM's uvicorn access log lines, prefixed with the replica's name
    seen = Counter(m.split("?", 1)[0] for m in re.findall(r'\[emu/0\] .*"[A-Z]+ (\S+) HTTP/1\.1" \d+',
                                                          log.read_text(errors="replace")))
    outside = {p: n for p, n in seen.items() if p not in FORWARDED_ROUTES | OWN_PATHS}
    print(f"paths the replica received ({sum(seen.values())} requests): " +
          ", ".join(f"{p} x{n}" for p, n in sorted(seen.items())))
    print(f"  outside the allowlist: {sum(outside.values())} {outside or ''}")


if __name__ == "__main__":
    main()
