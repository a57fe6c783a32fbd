"""The gateway's TOML configuration: schema, defaults and validation.

One file describes the gateway (``[gateway]``) and its fleet
(``[[backends]]``), real and emulated alike; ``config.example.toml``
documents every key. Validation (pydantic) rejects unknown keys and names
the key and the file in every error::

    config.toml: backends[1].mode: Input should be 'real' or 'emulate' (got 'emu')
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file is missing, unparsable or invalid; the message says where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GatewaySettings(_Strict):
    """``[gateway]``: where the gateway listens and how it routes."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; empty: no auth")
    routing: Literal["least_outstanding", "kv_aware", "prefix_affinity", "session_affinity"] = "least_outstanding"
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0, description="whole upstream request, seconds")
    startup_timeout_s: float = Field(900.0, gt=0, description="max wait for a backend's /health at start")
    queue_limit: int = Field(0, ge=0, description="max in-flight requests through the gateway; 0: unlimited")
    metrics_poll_s: float = Field(1.0, gt=0, description="how often backends' /metrics are read (kv_aware)")
    log_requests: bool = False


class BackendConfig(_Strict):
    """``[[backends]]``: one served model, real or emulated, with its replicas."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    model: str = Field(description="model directory, bundled model name, or hub id (real mode)")
    served_model_name: str | None = None
    mode: Literal["real", "emulate"] = "emulate"
    profile: str | None = Field(None, description="emulate: profile file or bundled name")
    oracle: Literal["feature", "grid2d"] = "feature"
    seed: int = 0
    capture_trace: str | None = Field(
        None, description="record a step trace here: real steps (ProfilingExecutor) or, in emulate mode, the "
                          "emulated steps as served (EmulatedProfilingExecutor), for step-by-step comparison")
    replicas: int = Field(1, ge=1, le=64)
    ports: list[int] | None = Field(None, description="one per replica; default: free ports")
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_ids: list[str] | None = Field(None, description="CUDA_VISIBLE_DEVICES per replica, e.g. ['0', '1']")
    tokenizer_mode: str | None = Field(None, description="default: 'mistral' when the model dir has tekken.json")
    load_format: str | None = Field(None, description="real: e.g. 'dummy' for random weights")
    dtype: str | None = None
    extra_args: list[str] = Field(default_factory=list, description="appended to vLLM's command line")
    env: dict[str, str] = Field(default_factory=dict)

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
        if self.gpu_ids is not None and len(self.gpu_ids) != self.replicas:
            raise ValueError(f"gpu_ids lists {len(self.gpu_ids)} entries for {self.replicas} replicas")
        return self

    @property
    def model_name(self) -> str:
        """The name clients put in ``model`` (served_model_name, else the model string)."""
        return self.served_model_name or self.model


class Config(_Strict):
    """A whole gateway configuration file."""

    gateway: GatewaySettings = GatewaySettings()
    backends: list[BackendConfig] = Field(min_length=1)

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


def parse_config(data: dict, source: str = "<config>") -> Config:
    """Validate a parsed TOML document.

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
            elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
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
