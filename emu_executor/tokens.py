"""Synthetic output tokens: what the emulated forward pass "samples".

Rules:

* never a special or control id: tokens come from a *pool* of ordinary,
  word-like vocabulary entries (decoded text matching ``_WORD``), built once
  from the model's real tokenizer, so detokenized output reads as words;
* text that round-trips: with the tokenizer's ``encode`` at hand, the pool
  keeps only words that start with a space and encode back to exactly their
  own single id (``_SPACE_WORD``), so the detokenized completion re-tokenizes
  to as many tokens as were emitted (tools that count tokens from text agree
  with ``usage.completion_tokens``; ``benchmarks/token_roundtrip.py``);
* a request without ``ignore_eos`` ends with EOS at an output length drawn
  from the profile's recorded output-length distribution (capped by vLLM at
  ``max_tokens``; never before ``min_tokens``); with ``ignore_eos`` it runs
  to ``max_tokens`` as on real hardware;
* structured outputs: when vLLM passes a grammar bitmask the token is picked
  among the ids the bitmask allows, preferring pool words; once the drawn
  length is reached it prefers EOS, then ids that close a JSON value
  (``"``, ``}``, ``]``), so ``response_format`` JSON comes back complete;
* logprobs/top_logprobs: synthetic values in vLLM's ``LogprobsLists`` layout
  (sampled token first, rank 1);
* prompt logprobs (``prompt_logprobs``, and ``echo`` with ``logprobs`` in
  completions): one row per prompt token after the first, emitted once, in the
  step whose prefill completes the prompt, as vLLM's GPU runner does
  (``_get_prompt_logprobs_dict`` in vllm/v1/worker/gpu_model_runner.py): the
  prompt token itself first with a rank beyond the top-k (a model rarely ranks
  an arbitrary prompt token in its top few), then k pool words with
  descending log-probabilities.

Randomness: one ``random.Random`` per request, seeded from the request's
``SamplingParams.seed`` when given (reproducible outputs), otherwise from
the executor's seeded stream.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"^ ?[A-Za-z]{2,12}$")
_SPACE_WORD = re.compile(r"^ [a-z]{2,12}$")
_CLOSER = re.compile(r'^\s*["}\]]+\s*$')
_WS = re.compile(r"^\s+$")

#: Output length drawn when a profile recorded none (tokens): ShareGPT's
#: median completion is ~200 tokens; a geometric law with that mean.
DEFAULT_MEAN_OUTPUT_LEN = 200
#: Cap on synthetic lengths for grammar-constrained requests (tokens): keeps
#: structured replies short enough to close well inside typical max_tokens.
STRUCTURED_MAX_LEN = 48
#: Max logprobs columns emitted when a request asks for "all" (-1).
MAX_LOGPROBS = 20


@dataclass
class TokenState:
    """Per-request synthetic-token state."""

    rng: random.Random
    target_len: int | None  # None: no EOS (ignore_eos)
    num_logprobs: int | None
    eos_allowed_after: int  # min_tokens
    prompt_ids: list[int] | None = None  # kept only when prompt logprobs are asked for, until they are sent
    num_prompt_logprobs: int | None = None


class SyntheticTokens:
    """Picks synthetic token ids for emulated steps.

    Args:
        vocab_size: the model's vocabulary size (bitmask width is ceil(vocab/32) words).
        eos_id: end-of-sequence id (None: never emit EOS).
        decode: id -> text (from the tokenizer); None builds the pool from
            ``fallback_range`` without text checks.
        output_lengths: recorded natural output lengths (tokens), may be empty.
        seed: seeds the pool choice and the per-request stream.
        special_ids: ids that must never be emitted.
        encode: text -> ids without special tokens (from the tokenizer); when
            given, pool words must start with a space and encode back to their
            own single id, so emitted text round-trips (module docstring).
    """

    def __init__(self, vocab_size: int, eos_id: int | None, decode=None,
                 output_lengths: np.ndarray | None = None, seed: int = 0,
                 special_ids: set[int] | None = None, pool_size: int = 4096, encode=None):
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self._rng = random.Random(seed)
        special = set(special_ids or ())
        if eos_id is not None:
            special.add(eos_id)
        self.output_lengths = (np.asarray(output_lengths, dtype=np.int64)
                               if output_lengths is not None and len(output_lengths) else None)
        pool, closers, ws = [], [], []
        if decode is not None:
            cand = list(range(vocab_size))
            for i in cand:
                if i in special:
                    continue
                try:
                    text = decode(i)
                except Exception:
                    continue
                if not text:
                    continue
                if _WORD.match(text):
                    pool.append((i, text))
                elif _CLOSER.match(text):
                    closers.append(i)
                elif _WS.match(text):
                    ws.append(i)
        else:
            lo = min(1000, vocab_size // 4)
            pool = [(i, None) for i in range(lo, vocab_size) if i not in special]
        if not pool:
            raise ValueError("no ordinary (word-like) token found in the vocabulary")
        self._shuffled = len(pool)
        self._rng.shuffle(pool)
        if encode is not None:
            pool = self._round_trip_words(pool, encode, pool_size) or pool
        self.pool = [i for i, _ in pool[:pool_size]]
        self.pool_arr = np.array(self.pool, dtype=np.int64)
        self.closers = np.array(closers, dtype=np.int64)
        self.whitespace = np.array(ws, dtype=np.int64)
        self.special = special
        self._special_arr = np.array(sorted(i for i in special if 0 <= i < vocab_size), dtype=np.int64)

    @staticmethod
    def _round_trip_words(pool: list[tuple[int, str]], encode, limit: int) -> list[tuple[int, str]]:
        """The first ``limit`` words of ``pool`` that start with a space and encode back to their own id alone.

        A space-led word is a pre-tokenizer boundary for BPE (tiktoken, tekken) and SentencePiece
        tokenizers alike, so a sequence of such words re-encodes word by word.
        """
        out = []
        for i, text in pool:
            if text is None or not _SPACE_WORD.match(text):
                continue
            try:
                if list(encode(text)) != [i] or list(encode(text + text)) != [i, i]:
                    continue
            except Exception:
                continue
            out.append((i, text))
            if len(out) >= limit:
                break
        return out

    def reseed(self, seed: int) -> None:
        """Restart the per-request stream as a fresh instance built with ``seed`` would have it
        (the pool keeps its words: only which request draws which length changes). ``shuffle``
        consumes the same random draws for any list of the pool's length, so replaying it on a
        placeholder list reproduces the generator's state exactly."""
        self._rng = random.Random(seed)
        self._rng.shuffle([None] * self._shuffled)

    # ----------------------------------------------------------- requests
    def new_request(self, sampling_params, prompt_ids: list[int] | None = None) -> TokenState:
        """State for a request entering the batch (reads ignore_eos, min_tokens, seed, logprobs, prompt_logprobs).

        ``prompt_ids``: the request's prompt token ids (kept only if it asks for prompt logprobs).
        """
        sp = sampling_params
        seed = getattr(sp, "seed", None)
        rng = random.Random(seed if seed is not None else self._rng.getrandbits(63))
        target = None
        if not getattr(sp, "ignore_eos", False) and self.eos_id is not None:
            target = self.draw_length(rng)
            if getattr(sp, "structured_outputs", None) is not None:
                target = min(target, STRUCTURED_MAX_LEN)
            target = max(target, int(getattr(sp, "min_tokens", 0) or 0) + 1)
        nlp = getattr(sp, "logprobs", None)
        if nlp is not None and nlp < 0:
            nlp = MAX_LOGPROBS
        npl = getattr(sp, "prompt_logprobs", None)
        if npl is not None and npl < 0:
            npl = MAX_LOGPROBS
        return TokenState(rng, target, nlp, int(getattr(sp, "min_tokens", 0) or 0),
                          list(prompt_ids) if npl is not None and prompt_ids is not None else None, npl)

    def prompt_logprob_rows(self, st: TokenState) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompt logprobs of a request: (token ids [P-1, k+1] int32, logprobs [P-1, k+1] float32 (nats),
        ranks of the prompt tokens [P-1] int32), P the prompt length and k ``num_prompt_logprobs``.

        Row j describes prompt token j+1: column 0 is that token with its logprob and rank (> k), columns
        1..k the top-k (pool words, log-probabilities descending, all above column 0's).
        """
        ids_in = st.prompt_ids or []
        k = int(st.num_prompt_logprobs or 0)
        n = max(0, len(ids_in) - 1)
        rng = st.rng
        ids = np.zeros((n, k + 1), dtype=np.int32)
        lps = np.zeros((n, k + 1), dtype=np.float32)
        ranks = np.zeros(n, dtype=np.int32)
        for j in range(n):
            top = -rng.expovariate(2.0)
            row_lps = [top]
            for _ in range(k - 1):
                row_lps.append(row_lps[-1] - rng.expovariate(1.0) - 0.01)
            target_lp = (row_lps[-1] if k else top) - rng.expovariate(0.5) - 0.01
            ids[j, 0], lps[j, 0], ranks[j] = ids_in[j + 1], target_lp, k + 1 + int(rng.expovariate(0.01))
            for c in range(k):
                ids[j, c + 1] = self.pool[int(rng.random() * len(self.pool))]
                lps[j, c + 1] = row_lps[c]
        return ids, lps, ranks

    def draw_length(self, rng: random.Random) -> int:
        """An output length (tokens, >= 1) from the profile's distribution."""
        if self.output_lengths is not None:
            return max(1, int(self.output_lengths[int(rng.random() * len(self.output_lengths))]))
        return max(1, int(rng.expovariate(1.0 / DEFAULT_MEAN_OUTPUT_LEN)) + 1)

    # ------------------------------------------------------------- tokens
    def next_token(self, st: TokenState, index: int, allowed: np.ndarray | None = None) -> int:
        """Token for output position ``index`` (0-based).

        ``allowed``: optional bool array [vocab] from the grammar bitmask.
        """
        wrap_up = st.target_len is not None and index + 1 >= st.target_len and index >= st.eos_allowed_after
        if allowed is None:
            if wrap_up:
                return self.eos_id  # type: ignore[return-value]
            return self.pool[int(st.rng.random() * len(self.pool))]
        return self._constrained(st, allowed, wrap_up or index >= 4 * STRUCTURED_MAX_LEN)

    def _constrained(self, st: TokenState, allowed: np.ndarray, wrap_up: bool) -> int:
        rng = st.rng
        if wrap_up:
            if self.eos_id is not None and allowed[self.eos_id]:
                return self.eos_id
            ok = self.closers[allowed[self.closers]] if len(self.closers) else self.closers
            if len(ok):
                return int(ok[int(rng.random() * len(ok))])
        ok = self.pool_arr[allowed[self.pool_arr]]
        if len(ok) and rng.random() < 0.9:
            return int(ok[int(rng.random() * len(ok))])
        mask = allowed.copy()
        if len(self._special_arr):
            mask[self._special_arr] = False
        if len(self.whitespace):
            ws_mask = mask[self.whitespace]
            mask[self.whitespace] = False
        ids = np.flatnonzero(mask)
        if not len(ids) and len(self.whitespace):
            ids = self.whitespace[ws_mask]
        if not len(ids):
            ids = np.flatnonzero(allowed)  # only special ids allowed (e.g. EOS): grammar decides
        return int(ids[int(rng.random() * len(ids))])

    def logprob_row(self, st: TokenState | None, token: int, width: int) -> tuple[list[int], list[float]]:
        """One LogprobsLists row: ([sampled, top1..], [logprob...]) of ``width`` entries.

        The sampled token is the top-1 (rank 1); values are log-probabilities (nats).
        """
        rng = st.rng if st is not None else self._rng
        lp = -rng.expovariate(4.0)
        ids, lps = [token, token], [lp, lp]
        while len(ids) < width:
            ids.append(self.pool[int(rng.random() * len(self.pool))])
            lps.append(lps[-1] - rng.expovariate(1.0) - 0.01)
        return ids[:width], lps[:width]


def bitmask_rows(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Unpack an xgrammar int32 bitmask [rows, ceil(V/32)] to bool [rows, V]."""
    bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=-1, bitorder="little")
    return bits[:, :vocab_size].astype(bool)
