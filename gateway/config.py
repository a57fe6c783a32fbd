"""The gateway's TOML configuration: schema, defaults and validation.

One file describes the gateway (``[gateway]``) and its fleet
(``[[backends]]``), real and emulated alike; ``config.example.toml``
documents every key. Validation (pydantic) rejects unknown keys and names
the key and the file in every error::

    config.toml: backends[1].mode: Input should be 'real' or 'emulate' (got 'emu')
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator


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

    def resolved_api_keys(self) -> list[SecretStr]:
        """Every accepted key (as secrets): ``api_keys`` plus those in ``api_keys_env`` and ``api_keys_file``.

        Raises:
            ConfigError: the variable is unset or empty, or the file cannot be read.
        """
        keys = list(self.api_keys)
        if self.api_keys_env:
            val = os.environ.get(self.api_keys_env, "")
            more = [SecretStr(k.strip()) for k in val.split(",") if k.strip()]
            if not more:
                raise ConfigError(f"gateway.api_keys_env: the environment variable {self.api_keys_env} "
                                  "is unset or empty (set it to one or more comma-separated keys)")
            keys += more
        if self.api_keys_file:
            try:
                lines = Path(self.api_keys_file).expanduser().read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"gateway.api_keys_file: cannot read {self.api_keys_file}: {e.strerror}") from None
            more = [SecretStr(ln.strip()) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
            if not more:
                raise ConfigError(f"gateway.api_keys_file: {self.api_keys_file} holds no key")
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

    @field_validator("ports")
    @classmethod
    def _ports_unique(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError("ports must be distinct")
        return v

    @model_validator(mode="after")
    def _mode_rules(self):
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


def _secret_loc(loc: tuple) -> bool:
    """Whether a config location holds a secret (a key, an environment value): its value is never echoed."""
    return (len(loc) >= 2 and loc[0] == "gateway" and str(loc[1]).startswith("api_keys")) or \
        (len(loc) >= 3 and loc[0] == "backends" and loc[2] == "env")


def parse_config(data: dict, source: str = "<config>") -> Config:
    """Validate a parsed TOML document.

    Error messages quote a bad value, except where it may be a secret
    (``api_keys*``, a backend's ``env``).

    Raises:
        ConfigError: one line per problem, ``source: key.path: message``.
    """
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (see config.example.toml for the keys)"
            elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict) \
                    and not _secret_loc(err["loc"]):
                msg += f" (got {err['input']!r})"
            lines.append(f"{source}: {_loc(err['loc'])}: {msg}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file.

    Raises:
        ConfigError: missing file, TOML syntax error (with line), or invalid content.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file (start from config.example.toml)") from None
    try:
        data = tomllib.loads(raw.decode())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: TOML syntax error: {e}") from None
    return parse_config(data, str(p))
