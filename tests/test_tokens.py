"""The emulated executor's token model (emu_executor.tokens) on the bundled model's real tokenizer (no vLLM)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

from conftest import MODEL
from emu_executor.tokens import SyntheticTokens
from profiles.assets import resolve_model_dir


class _SP:
    ignore_eos, min_tokens, logprobs, structured_outputs = True, 0, None, None

    def __init__(self, seed=None, prompt_logprobs=None):
        self.seed, self.prompt_logprobs = seed, prompt_logprobs


@pytest.fixture(scope="module")
def tek():
    return Tekkenizer.from_file(resolve_model_dir(MODEL) / "tekken.json")


def _tokens(tek, encode: bool) -> SyntheticTokens:
    special = set(range(tek.num_special_tokens))
    dec = lambda i: tek.decode([i], special_token_policy=SpecialTokenPolicy.IGNORE)  # noqa: E731
    return SyntheticTokens(tek.n_words, tek.eos_id, dec, np.array([150, 400]), seed=0, special_ids=special,
                           encode=(lambda s: tek.encode(s, bos=False, eos=False)) if encode else None)


def test_synthetic_text_re_encodes_to_the_emitted_token_count(tek):
    st = _tokens(tek, encode=True)
    assert len(st.pool) >= 1000 and not (set(st.pool) & st.special)
    rng = random.Random(3)
    for k in range(100):
        state = st.new_request(_SP(seed=k))
        ids = [st.next_token(state, i) for i in range(rng.randint(1, 600))]
        text = tek.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
        assert len(tek.encode(text, bos=False, eos=False)) == len(ids)
    # the check matters: without it, glued word pieces re-tokenize differently
    loose = _tokens(tek, encode=False)
    state = loose.new_request(_SP(seed=1))
    ids = [loose.next_token(state, i) for i in range(300)]
    text = tek.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
    assert len(tek.encode(text, bos=False, eos=False)) != len(ids)


def test_prompt_logprob_rows_follow_vllms_layout(tek):
    st = _tokens(tek, encode=True)
    prompt = [1, 22, 333, 4444, 5555]
    state = st.new_request(_SP(seed=2, prompt_logprobs=3), prompt)
    ids, lps, ranks = st.prompt_logprob_rows(state)
    # [P-1, k+1]: one row per prompt token after the first
    assert ids.shape == (4, 4) and lps.shape == (4, 4) and ranks.shape == (4,)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and ranks.dtype == np.int32
    assert list(ids[:, 0]) == prompt[1:] and (ranks > 3).all()  # the prompt token itself, ranked beyond the top-k
    assert (np.diff(lps[:, 1:], axis=1) < 0).all() and (lps[:, 0] < lps[:, -1]).all() and (lps <= 0).all()
    assert st.new_request(_SP(seed=2), prompt).prompt_ids is None  # kept only when asked for
