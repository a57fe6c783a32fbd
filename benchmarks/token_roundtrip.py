"""Do synthetic completions re-tokenize to the number of tokens emulate mode reported?

Tools that count tokens from the text (genai-perf, llmperf, guidellm in text
mode) decode nothing: they re-encode the completion text. This builds the
emulated executor's token model (:class:`emu_executor.tokens.SyntheticTokens`)
on a bundled model's real tokenizer, draws ``--completions`` completions with
ShareGPT-like lengths (the bundled profile's recorded output lengths), decodes
each as vLLM does (``skip_special_tokens``), re-encodes the text, and compares
the counts; ``--before`` also runs the pool as it was before round-tripping
(any word-like token, no re-encode check).

    python benchmarks/token_roundtrip.py --completions 1000
"""
from __future__ import annotations

import argparse
import random
import time

import numpy as np

from _common import MODEL, PROFILE
from emu_executor.tokens import SyntheticTokens
from profiles.assets import resolve_model_dir, resolve_profile
from profiles.format import Profile


class _SP:  # the sampling parameters the token model reads
    ignore_eos = True
    min_tokens = 0
    logprobs = None
    prompt_logprobs = None
    structured_outputs = None

    def __init__(self, seed):
        self.seed = seed


def run(tok, lengths: np.ndarray, n: int, encode_check: bool) -> tuple[float, int, float]:
    special = set(getattr(tok, "all_special_ids", []) or [])
    t0 = time.perf_counter()
    st = SyntheticTokens(len(tok), tok.eos_token_id, lambda i: tok.decode([i]), lengths, seed=0, special_ids=special,
                         encode=(lambda s: tok.encode(s, add_special_tokens=False)) if encode_check else None)
    build_s = time.perf_counter() - t0
    rng = random.Random(1)
    diffs = []
    for k in range(n):
        length = int(lengths[rng.randrange(len(lengths))])
        state = st.new_request(_SP(k))
        ids = [st.next_token(state, i) for i in range(length)]
        text = tok.decode(ids, skip_special_tokens=True)
        diffs.append(len(tok.encode(text, add_special_tokens=False)) - len(ids))
    d = np.abs(np.array(diffs))
    return float((d == 0).mean()), int(d.max()), build_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--completions", type=int, default=1000)
    ap.add_argument("--before", action="store_true", help="also measure the pool without the round-trip check")
    a = ap.parse_args()
    from vllm.tokenizers import get_tokenizer
    tok = get_tokenizer(str(resolve_model_dir(MODEL)), tokenizer_mode="mistral")
    lengths = Profile.load(resolve_profile(PROFILE)).output_lengths
    lengths = lengths[lengths > 0]
    print(f"{MODEL} (tekken tokenizer), {a.completions} completions, lengths from {PROFILE}'s recorded outputs "
          f"(median {int(np.median(lengths))}, max {int(lengths.max())} tokens)")
    for label, check in ([("before: any word-like token", False)] if a.before else []) + [
            ("now: space-led words that re-encode to themselves", True)]:
        exact, worst, build_s = run(tok, lengths, a.completions, check)
        print(f"  {label}: re-encoded count exact for {exact * 100:.1f}%, worst |difference| {worst} tokens "
              f"(pool built in {build_s:.1f} s)")


if __name__ == "__main__":
    main()
