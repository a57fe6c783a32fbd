"""The gateway's TOML configuration: schema, defaults and validation.

One file describes the gateway (``[gateway]``) and its fleet
(``[[backends]]``), real and emulated alike; ``config.example.toml``
documents every key. Validation (pydantic) rejects unknown keys and names
the key and the file in every error::

    config.toml: backends[1].mode: Input should be 'real' or 'emulate' (got 'emu')
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from gateway.faults import EngineFault, FaultsConfig, HttpFault, StreamFault


class ConfigError(ValueError):
    """A configuration file is missing, unparsable or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySettings(_Strict):
    """``[gateway]``: where the gateway listens, how it routes, its limits and its keys.

    Times are in seconds, sizes in bytes. Defaults are sized for long-context
    prompts (32 MiB bodies: a 128k-token prompt is ~0.5 MiB of text, a chat
    with images as data URLs a few MiB) and for multi-minute generations.
    """

    host: str = Field("127.0.0.1", description="address the gateway listens on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port the gateway listens on")
    api_keys: list[SecretStr] = Field(default_factory=list, description="accepted Bearer keys; empty: no auth "
                                      "(held as secrets: never logged, echoed or shown in repr)")
    api_keys_env: str | None = Field(None, description="environment variable holding more keys (comma-separated)")
    api_keys_file: str | None = Field(None, description="file holding more keys, one per line ('#' comments)")
    metrics_require_key: bool = Field(True, description="with keys set, /metrics needs one too")
    routing: Literal["least_outstanding", "kv_aware", "prefix_affinity", "session_affinity"] = Field(
        "least_outstanding", description="how a request's replica is chosen among a model's ready replicas "
                                         "(gateway/routing.py)")
    connect_timeout_s: float = Field(5.0, gt=0, description="to open a connection to a replica (s)")
    request_timeout_s: float = Field(600.0, gt=0, description="whole request, from its first byte to its last (s)")
    idle_timeout_s: float = Field(300.0, gt=0, description="longest silence from a replica mid-response (s)")
    header_timeout_s: float = Field(10.0, gt=0, description="client must send its request headers within this (s)")
    body_timeout_s: float = Field(60.0, gt=0, description="client must send its whole request body within this (s)")
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies get 413 (bytes)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, let in-flight requests finish this long (s)")
    startup_timeout_s: float = Field(900.0, gt=0, description="a replica not healthy this long after its start "
                                                              "is stopped and marked failed (s)")
    max_start_failures: int = Field(3, ge=1, description="a replica that exits this many times in a row "
                                                         "without becoming ready is marked failed")
    queue_limit: int = Field(0, ge=0, description="max requests in flight through the gateway, counted from "
                                                  "arrival (before the body is read); more get 429; 0: unlimited")
    max_concurrency_per_key: int = Field(0, ge=0, description="max requests in flight per client key, counted "
                                                              "from arrival; more get 429; 0: unlimited")
    metrics_poll_s: float = Field(1.0, gt=0, description="how often backends' /metrics are read (kv_aware; s)")
    log_requests: bool = Field(False, description="log one line per request (id, model, replica, status, ms)")
    record_trace: str | None = Field(None, description="record the traffic as a replayable trace in this JSONL file "
                                                       "(timestamps, lengths, prefix-block hash ids; never text or "
                                                       "token ids): gateway/recorder.py")
    record_trace_block_size: int = Field(64, ge=16, description="prefix-block size of recorded hash ids (tokens)")
    record_trace_max_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="rotate the recorded trace past "
                                                                                  "this size (bytes)")
    record_trace_keep: int = Field(3, ge=1, description="rotated trace files kept (FILE.1, FILE.2...)")
    admin_keys: list[SecretStr] = Field(default_factory=list, description="keys of the admin API (/admin/faults); "
                                        "none: the admin API does not exist. Client keys never open it")
    admin_keys_env: str | None = Field(None, description="environment variable holding more admin keys "
                                                         "(comma-separated)")
    admin_keys_file: str | None = Field(None, description="file holding more admin keys, one per line")

    def resolved_api_keys(self) -> list[SecretStr]:
        """Every accepted key (as secrets): ``api_keys`` plus those in ``api_keys_env`` and ``api_keys_file``.

        Raises:
            ConfigError: the variable is unset or empty, or the file cannot be read.
        """
        return _resolve_keys("api_keys", self.api_keys, self.api_keys_env, self.api_keys_file)

    def resolved_admin_keys(self) -> list[SecretStr]:
        """The admin API's keys: ``admin_keys`` plus ``admin_keys_env`` and ``admin_keys_file`` (as above)."""
        return _resolve_keys("admin_keys", self.admin_keys, self.admin_keys_env, self.admin_keys_file)


def _resolve_keys(name: str, keys: list[SecretStr], env: str | None, file: str | None) -> list[SecretStr]:
    keys = list(keys)
    if env:
        val = os.environ.get(env, "")
        more = [SecretStr(k.strip()) for k in val.split(",") if k.strip()]
        if not more:
            raise ConfigError(f"gateway.{name}_env: the environment variable {env} "
                              "is unset or empty (set it to one or more comma-separated keys)")
        keys += more
    if file:
        try:
            lines = Path(file).expanduser().read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"gateway.{name}_file: cannot read {file}: {e.strerror}") from None
        more = [SecretStr(ln.strip()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not more:
            raise ConfigError(f"gateway.{name}_file: {file} holds no key")
        keys += more
    return keys


class BackendConfig(_Strict):
    """``[[backends]]``: one served model, real or emulated, with its replicas."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="the backend's name in logs and metric labels")
    model: str = Field(description="model directory, bundled model name, or hub id (real mode)")
    served_model_name: str | None = Field(None, description="the name clients put in `model` (default: `model`)")
    mode: Literal["real", "emulate"] = Field("emulate", description="real: vLLM's own forward pass on the "
                                             "accelerator; emulate: step times from `profile`, synthetic tokens")
    profile: str | None = Field(None, description="emulate: profile file or bundled name")
    oracle: Literal["feature", "grid2d"] = Field("feature", description="emulate: the latency oracle "
                                                 "(profiles/oracle.py); grid2d is LLM-Emu's baseline")
    seed: int = Field(0, description="emulate: seed of latency and token draws (replica i uses seed + i)")
    capture_trace: str | None = Field(
        None, description="record a step trace here: real steps (ProfilingExecutor) or, in emulate mode, the "
                          "emulated steps as served (EmulatedProfilingExecutor), for step-by-step comparison")
    replicas: int = Field(1, ge=1, le=64, description="vLLM servers of this backend, behind the routing policy")
    ports: list[int] | None = Field(None, description="one loopback TCP port per replica; default: each replica "
                                                      "listens on a Unix socket in the gateway's private directory")
    max_model_len: int | None = Field(None, ge=16, description="vLLM's --max-model-len (tokens)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM's --tensor-parallel-size (GPUs per replica)")
    gpu_ids: list[str] | None = Field(None, description="CUDA_VISIBLE_DEVICES per replica, e.g. ['0', '1']")
    tokenizer_mode: str | None = Field(None, description="default: 'mistral' when the model dir has tekken.json")
    load_format: str | None = Field(None, description="real: e.g. 'dummy' for random weights")
    dtype: str | None = Field(None, description="vLLM's --dtype, e.g. bfloat16")
    extra_args: list[str] = Field(default_factory=list, description="appended to vLLM's command line")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of this backend's "
                                "replicas (values are never echoed in errors nor written into profiles)")
    faults: FaultsConfig | None = Field(None, description="fault injection for staging: front-door, mid-stream and "
                                                          "engine faults, cold start (gateway/faults.py)")
    urls: list[str] | None = Field(None, description="running vLLM OpenAI servers to front instead of starting "
                                                     "replicas (http://host:port or https://...; one replica each; "
                                                     "the gateway health-checks them but never starts or stops them)")
    api_key_env: str | None = Field(None, description="urls: environment variable holding the servers' API key "
                                                      "(sent as Bearer; never the gateway's client keys)")
    api_key_file: str | None = Field(None, description="urls: file holding the servers' API key (first line)")
    tls_verify: bool = Field(True, description="urls: verify https servers' certificates")
    ca_file: str | None = Field(None, description="urls: CA bundle for https servers (default: the system's)")
    connect_timeout_s: float | None = Field(None, gt=0, description="urls: connect timeout to these servers (s; "
                                                                    "default: [gateway].connect_timeout_s)")

    @model_validator(mode="before")
    @classmethod
    def _replicas_from_urls(cls, data):
        if isinstance(data, dict) and isinstance(data.get("urls"), list) and "replicas" not in data:
            data = {**data, "replicas": max(1, len(data["urls"]))}
        return data

    @field_validator("urls")
    @classmethod
    def _urls_ok(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("urls lists no server")
        from urllib.parse import urlsplit
        for u in v:
            p = urlsplit(u)
            if p.scheme not in ("http", "https") or not p.hostname or p.path not in ("", "/") or p.query \
                    or p.username or p.password:
                raise ValueError(f"{u!r}: write http://HOST:PORT or https://HOST:PORT (no path, query or "
                                 "credentials; the key goes in api_key_env / api_key_file)")
        if len(set(v)) != len(v):
            raise ValueError("urls must be distinct")
        return v

    @field_validator("ports")
    @classmethod
    def _ports_unique(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError("ports must be distinct")
        return v

    @model_validator(mode="after")
    def _mode_rules(self):
        f = self.faults
        if f is not None:
            if (self.mode == "real" or self.urls is not None) and (f.engine or f.cold_start):
                raise ValueError("faults.engine and faults.cold_start act inside an emulated engine the gateway "
                                 "starts (a real backend, or one with urls, takes front-door and mid-stream faults)")
            if self.mode == "real" and (f.http or f.stream or f.allow_header) and not f.allow_on_real:
                raise ValueError("faults on a real backend need faults.allow_on_real = true (front-door and "
                                 "mid-stream kinds only)")
            for t in [*f.http, *f.stream, *f.engine]:
                bad = [i for i in (t.replicas or []) if not 0 <= i < self.replicas]
                if bad:
                    raise ValueError(f"faults: replica indices {bad} out of range (this backend has "
                                     f"{self.replicas} replicas: 0..{self.replicas - 1})")
        if self.urls is not None:
            if len(self.urls) != self.replicas:
                raise ValueError(f"urls lists {len(self.urls)} servers for {self.replicas} replicas (leave replicas "
                                 "out: one per url)")
            for key in ("ports", "gpu_ids", "capture_trace", "profile", "load_format"):
                if getattr(self, key):
                    raise ValueError(f"{key} configures replicas the gateway starts; a backend with urls fronts "
                                     "servers already running")
            return self
        if self.api_key_env or self.api_key_file or self.ca_file or not self.tls_verify or self.connect_timeout_s:
            raise ValueError("api_key_env, api_key_file, tls_verify, ca_file and connect_timeout_s apply to "
                             "backends with urls")
        if self.mode == "emulate" and not self.profile:
            raise ValueError("mode = 'emulate' needs `profile` (a profile file or bundled name)")
        if self.mode == "real" and self.profile:
            raise ValueError("`profile` applies to mode = 'emulate' only (use capture_trace to record one)")
        if self.ports is not None and len(self.ports) != self.replicas:
            raise ValueError(f"ports lists {len(self.ports)} ports for {self.replicas} replicas")
        if any(a == "--api-key" or a.startswith("--api-key=") for a in self.extra_args):
            raise ValueError("extra_args must not set --api-key: the gateway gives each replica its own "
                             "generated key; set client keys in [gateway].api_keys")
        if self.gpu_ids is not None and len(self.gpu_ids) != self.replicas:
            raise ValueError(f"gpu_ids lists {len(self.gpu_ids)} entries for {self.replicas} replicas")
        return self

    @property
    def model_name(self) -> str:
        """The name clients put in ``model`` (served_model_name, else the model string)."""
        return self.served_model_name or self.model

    def remote_key(self) -> SecretStr | None:
        """The API key of the servers in ``urls`` (from ``api_key_env`` or ``api_key_file``), or None.

        Raises:
            ConfigError: the variable is unset or the file unreadable or empty.
        """
        if self.api_key_env:
            v = os.environ.get(self.api_key_env, "").strip()
            if not v:
                raise ConfigError(f"backends.{self.name}.api_key_env: the environment variable {self.api_key_env} "
                                  "is unset or empty")
            return SecretStr(v)
        if self.api_key_file:
            try:
                lines = [ln.strip() for ln in Path(self.api_key_file).expanduser().read_text().splitlines()
                         if ln.strip() and not ln.lstrip().startswith("#")]
            except OSError as e:
                raise ConfigError(f"backends.{self.name}.api_key_file: cannot read {self.api_key_file}: "
                                  f"{e.strerror}") from None
            if not lines:
                raise ConfigError(f"backends.{self.name}.api_key_file: {self.api_key_file} holds no key")
            return SecretStr(lines[0])
        return None


class Config(_Strict):
    """A whole gateway configuration file."""

    gateway: GatewaySettings = Field(GatewaySettings(), description="the `[gateway]` table")
    backends: list[BackendConfig] = Field(min_length=1, description="one `[[backends]]` table per served model")

    @model_validator(mode="after")
    def _unique(self):
        names = [b.name for b in self.backends]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"backend names must be unique; repeated: {sorted(dup)}")
        models = [b.model_name for b in self.backends]
        dupm = {m for m in models if models.count(m) > 1}
        if dupm:
            raise ValueError(f"two backends serve the same model name {sorted(dupm)}: use replicas, "
                             "or give each a distinct served_model_name")
        ports = [p for b in self.backends for p in (b.ports or [])] + [self.gateway.port]
        dupp = {p for p in ports if ports.count(p) > 1}
        if dupp:
            raise ValueError(f"ports used twice (backends or gateway.port): {sorted(dupp)}")
        return self

    def backend(self, name: str) -> BackendConfig:
        """The backend called ``name``; KeyError lists the names."""
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(f"no backend named {name!r}; have {[b.name for b in self.backends]}")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _line_of(text: str, loc: tuple) -> int | None:
    """The 1-based line of the TOML ``text`` that a validation error's ``loc`` points at (best effort):
    the key's own line inside its table, else the table's header line; None when neither is found."""
    counts: dict[tuple, int] = {}
    sections: list[tuple[tuple, int]] = [((), 0)]
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _HEADER.match(line)
        if not m:
            continue
        names = [n.strip().strip('"') for n in m.group(2).split(".")]
        path: list = []
        for j, n in enumerate(names):
            path.append(n)
            key = tuple(path)
            if j == len(names) - 1 and m.group(1) == "[[":
                counts[key] = counts.get(key, -1) + 1
                path.append(counts[key])
            elif key in counts:
                path.append(counts[key])
        sections.append((tuple(path), i))
    best = None
    for k, (sec, start) in enumerate(sections):
        if loc[:len(sec)] == sec and (best is None or len(sec) > len(best[0])):
            end = sections[k + 1][1] if k + 1 < len(sections) else len(lines)
            best = (sec, start, end)
    if best is None:
        return None
    sec, start, end = best
    rest = loc[len(sec):]
    if rest and isinstance(rest[0], str):
        pat = re.compile(rf"^\s*\"?{re.escape(rest[0])}\"?\s*=")
        for i in range(start, end):
            if pat.match(lines[i]):
                return i + 1
    return start + 1 if sec else None


def _secret_loc(loc: tuple) -> bool:
    """Whether a config location holds a secret (a key, an environment value): its value is never echoed."""
    return (len(loc) >= 2 and loc[0] == "gateway" and str(loc[1]).startswith(("api_keys", "admin_keys"))) or \
        (len(loc) >= 3 and loc[0] == "backends" and loc[2] == "env") or "keys" in loc


def _errors(e: ValidationError, source: str, text: str | None, prefix: tuple = ()) -> list[str]:
    lines = []
    for err in e.errors():
        msg = err["msg"]
        loc = prefix + tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see config.example.toml for the keys)"
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict) \
                and not _secret_loc(loc):
            msg += f" (got {err['input']!r})"
        line = _line_of(text, tuple(err["loc"])) if text else None
        where = f"{source}: line {line}" if line else source
        lines.append(f"{where}: {_loc(loc)}: {msg}")
    return lines


def parse_config(data: dict, source: str = "<config>", text: str | None = None) -> Config:
    """Validate a parsed TOML document (``text``: its source, for line numbers in messages).

    Error messages quote a bad value, except where it may be a secret
    (``api_keys*``, ``admin_keys*``, a backend's ``env``, a fault's ``keys``).

    Raises:
        ConfigError: one line per problem, ``source: line N: key.path: message``.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(_errors(e, source, text))) from None


class _Scenario(_Strict):
    """A scenario file (``faults.scenario``): more fault tables for one backend."""

    http: list[HttpFault] = Field(default_factory=list)
    stream: list[StreamFault] = Field(default_factory=list)
    engine: list[EngineFault] = Field(default_factory=list)


def _merge_scenarios(data: dict, base: Path) -> None:
    """Append each backend's ``faults.scenario`` file's tables to its faults (in place).

    Raises:
        ConfigError: the file is missing, not TOML, or holds other tables (its own line numbers).
    """
    for b in data.get("backends", []) if isinstance(data.get("backends"), list) else []:
        faults = b.get("faults") if isinstance(b, dict) else None
        if not isinstance(faults, dict) or not isinstance(faults.get("scenario"), str):
            continue
        sp = (base / faults["scenario"]).expanduser()
        try:
            text = sp.read_text()
            doc = tomllib.loads(text)
        except OSError as e:
            raise ConfigError(f"{sp}: cannot read the fault scenario ({e.strerror}); faults.scenario is relative "
                              f"to the config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{sp}: TOML syntax error: {e}") from None
        try:
            _Scenario.model_validate(doc)
        except ValidationError as e:
            raise ConfigError("\n".join(_errors(e, str(sp), text))) from None
        for kind in ("http", "stream", "engine"):
            if doc.get(kind):
                faults[kind] = list(faults.get(kind, [])) + list(doc[kind])


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file (and the fault scenario files it names).

    Raises:
        ConfigError: missing file, TOML syntax error (with line), or invalid content (with line).
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file (start from config.example.toml)") from None
    text = raw.decode()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: TOML syntax error: {e}") from None
    _merge_scenarios(data, p.parent)
    return parse_config(data, str(p), text)
