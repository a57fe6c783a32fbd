"""The emugate profile format: step latencies recorded on real hardware.

A profile holds, for one (hardware, model, engine configuration):

* a **fingerprint** (JSON): vLLM version, device, model dimensions, dtype,
  tensor parallel size, block_size, KV block count, max_num_batched_tokens,
  max_num_seqs, chunked prefill, async scheduling, attention backend;
* a **step table**: one row per recorded engine step (see ``STEP_COLUMNS``):
  the step's features as the scheduler saw them and its device service time
  in microseconds (us);
* the **output lengths** (tokens) of the requests that finished naturally
  (EOS) during capture, used to draw realistic lengths in emulate mode.

Binary layout (all integers little-endian)::

    offset 0   8 bytes   magic  b"EMUPROF\\0"
           8   u16       format version (FORMAT_VERSION)
          10   u32       header length H (bytes)
          14   H bytes   header, UTF-8 JSON: {"fingerprint": {...},
                         "meta": {...}, "columns": [[name, dtype, count], ...]}
        14+H   rest      one zstandard frame holding the columns' raw bytes,
                         concatenated in header order

The fingerprint sits uncompressed in the header so ``inspect`` and the
executor's compatibility check read it without decompressing the body.
Raw per-step rows (rather than pre-bucketed cells, as LLM-Emu's JSON packs
store) let the oracle choose its own bucketing at load time, and columnar
integer arrays compress far better than JSON text (see
``benchmarks/profile_size.py``).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from profiles.assets import resolve_profile

MAGIC = b"EMUPROF\0"
FORMAT_VERSION = 1

#: Columns of the step table: (name, numpy dtype, meaning).
STEP_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("num_tokens", "<u4", "total scheduled tokens in the step"),
    ("num_reqs", "<u4", "requests scheduled in the step (running batch)"),
    ("prefill_tokens", "<u4", "scheduled tokens of requests still in prefill"),
    ("decode_reqs", "<u4", "requests scheduled for exactly one decode token"),
    ("prefill_reqs", "<u4", "requests with prefill (incl. chunked) tokens"),
    ("context_tokens", "<u8", "sum over requests of tokens already in KV cache"),
    ("attn_work", "<u8", "sum over requests of scheduled*(computed+scheduled/2): attention cost proxy"),
    ("random_rows", "<u4", "rows of the sampler's random path: the step's requests if any of them samples "
                           "with temperature > 0, else 0 (all greedy: argmax only)"),
    ("latency_us", "<u4", "device service time of the step, microseconds"),
    ("host_gap_us", "<u4", "host time between the previous step's end and this step's submit, us "
                           "(sync scheduling; 0 when overlapped or idle)"),
)
STEP_DTYPES = {name: dtype for name, dtype, _ in STEP_COLUMNS}
#: Columns a reader fills with zeros when a file lacks them (added after version 1 files existed).
OPTIONAL_COLUMNS = ("host_gap_us", "random_rows")


class ProfileError(ValueError):
    """A file is not a readable emugate profile (bad magic, version or body)."""


@dataclass
class Profile:
    """An in-memory profile.

    Attributes:
        fingerprint: where and how it was recorded (see module docstring).
        steps: column name -> 1-D array, all of equal length N (one per step),
            dtypes as in ``STEP_COLUMNS``; ``latency_us`` in microseconds.
        output_lengths: 1-D uint32 array of natural output lengths (tokens).
        meta: free-form provenance (capture command, seed, source file...).
    """

    fingerprint: dict[str, Any]
    steps: dict[str, np.ndarray]
    output_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = None
        for name, dtype, _ in STEP_COLUMNS:
            if name not in self.steps and name in OPTIONAL_COLUMNS:
                self.steps[name] = np.zeros(len(self.steps.get("latency_us", ())), dtype=dtype)
            if name not in self.steps:
                raise ProfileError(f"profile step table lacks column {name!r}")
            arr = np.ascontiguousarray(self.steps[name], dtype=np.dtype(dtype))
            self.steps[name] = arr
            if n is None:
                n = len(arr)
            elif len(arr) != n:
                raise ProfileError(f"column {name!r} has {len(arr)} rows, expected {n}")
        self.output_lengths = np.ascontiguousarray(self.output_lengths, dtype="<u4")

    @property
    def num_steps(self) -> int:
        return len(self.steps["latency_us"])

    # ---------------------------------------------------------------- I/O
    def to_bytes(self, level: int = 19) -> bytes:
        """Serialise to the binary layout above (zstd level ``level``)."""
        arrays = [(n, d, self.steps[n]) for n, d, _ in STEP_COLUMNS]
        arrays.append(("output_lengths", "<u4", self.output_lengths))
        header = {
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "columns": [[n, d, int(len(a))] for n, d, a in arrays],
        }
        hbytes = json.dumps(header, sort_keys=True).encode()
        body = b"".join(np.ascontiguousarray(a, dtype=d).tobytes() for _, d, a in arrays)
        frame = zstandard.ZstdCompressor(level=level).compress(body)
        return MAGIC + struct.pack("<HI", FORMAT_VERSION, len(hbytes)) + hbytes + frame

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "Profile":
        """Parse bytes written by :meth:`to_bytes`.

        Raises:
            ProfileError: wrong magic, unsupported version, or a body whose
                size does not match its header.
        """
        header = read_header(data, source)
        body = zstandard.ZstdDecompressor().decompress(data[14 + header["_hlen"]:])
        arrays: dict[str, np.ndarray] = {}
        pos = 0
        for name, dtype, count in header["columns"]:
            nbytes = np.dtype(dtype).itemsize * count
            if pos + nbytes > len(body):
                raise ProfileError(f"{source}: body truncated in column {name!r}")
            arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=pos)
            pos += nbytes
        out_lens = arrays.pop("output_lengths", np.zeros(0, np.uint32))
        return cls(header["fingerprint"], arrays, out_lens, header.get("meta", {}))

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) so no half-written profile is left."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        """Load a profile file, or a bundled profile by name (see :func:`resolve_profile`)."""
        p = resolve_profile(path)
        return cls.from_bytes(p.read_bytes(), str(p))


def read_header(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """Parse only the uncompressed header (fingerprint, meta, column list).

    Raises:
        ProfileError: not a profile, or a version this code cannot read.
    """
    if data[:8] != MAGIC:
        raise ProfileError(f"{source}: not an emugate profile (bad magic)")
    version, hlen = struct.unpack_from("<HI", data, 8)
    if version != FORMAT_VERSION:
        raise ProfileError(
            f"{source}: profile format version {version}, this emugate reads {FORMAT_VERSION}; "
            "rebuild it with `python -m profiles build`"
        )
    header = json.loads(data[14:14 + hlen])
    header["_hlen"] = hlen
    return header
