"""Speculative decoding in emulate mode: how many drafted tokens a verification step accepts, and
what drafting costs.

With ``--speculative-config`` vLLM's scheduler schedules 1 + k tokens for a decoding request (its k
draft tokens: real ids from ``take_draft_token_ids`` under sync scheduling, placeholders under async
scheduling), and the model runner answers with 1..k+1 tokens: the accepted drafts plus one sampled
token. vLLM's scheduler then rolls back the rejected drafts and counts ``vllm:spec_decode_*``. The
emulated executor plays the model runner's part:

* **Accepted drafts**: position i (1-based) is accepted with the conditional probability
  ``acceptance[i-1]`` given that all earlier ones were (the chain rejection sampling vLLM does); the
  first rejection ends the run. Drawn from the emulation's seed.
* **Step time**: the verification step is the target model's forward over 1 + k tokens per request
  (the profile's oracle sees those tokens). Drafting adds, per draft token, the step's time scaled
  by ``draft layers / target layers``: EAGLE/EAGLE-3 heads are one decoder layer (Li et al., EAGLE-3,
  arXiv 2503.01840) and DeepSeek's MTP module one Transformer block per predicted token (DeepSeek-V3
  technical report, arXiv 2412.19437, sec. 2.2); a separate draft model counts its own layers; the
  n-gram proposer runs on the host (no device time).

Acceptance rates (``EMUGATE_SPEC_ACCEPTANCE="0.8,0.6,0.5"`` sets them, one per draft position; the
last repeats for further positions). Defaults, stated as what they are:

* ``mtp`` / ``deepseek_mtp``: 0.87 for the first draft (DeepSeek-V3 report, sec. 5.4.3: "between
  85 % and 90 %" for the second predicted token), 0.87 again for later positions (assumed);
* every other method: 0.7, 0.55, 0.45 (assumed, no published per-position figure used): set them from
  your own fleet's ``vllm:spec_decode_num_accepted_tokens_per_pos`` /
  ``vllm:spec_decode_num_drafts``.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass

logger = logging.getLogger("vllm.emugate.specdecode")

#: Conditional acceptance per draft position by method, and whether it is published (see module docstring).
DEFAULT_ACCEPTANCE: dict[str, tuple[tuple[float, ...], str]] = {
    "mtp": ((0.87,), "DeepSeek-V3 report sec. 5.4.3 (85-90 % for the 2nd token); later positions assumed equal"),
    "deepseek_mtp": ((0.87,), "DeepSeek-V3 report sec. 5.4.3 (85-90 % for the 2nd token); later positions assumed"),
}
FALLBACK_ACCEPTANCE = ((0.7, 0.55, 0.45), "assumed (no published per-position rate used): set EMUGATE_SPEC_ACCEPTANCE")


@dataclass
class SpecEmulation:
    """One engine's speculative-decoding emulation.

    Args:
        method: vLLM's ``speculative_config.method`` (``ngram``, ``eagle``, ``eagle3``, ``mtp``...).
        k: ``num_speculative_tokens``.
        acceptance: conditional acceptance per draft position (len >= 1; the last repeats).
        draft_cost: device time per draft token as a fraction of the verification step's time.
        seed: the emulation's seed.
        source: where ``acceptance`` comes from (logged at start).
    """

    method: str
    k: int
    acceptance: tuple[float, ...]
    draft_cost: float
    seed: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if not self.acceptance or any(not 0.0 <= a <= 1.0 for a in self.acceptance):
            raise ValueError(f"spec-decode acceptance rates must be in [0, 1] (got {self.acceptance})")
        self._rng = random.Random(self.seed + 7919)

    @classmethod
    def from_vllm(cls, vllm_config, seed: int = 0) -> "SpecEmulation":
        """From vLLM's ``speculative_config`` and ``EMUGATE_SPEC_ACCEPTANCE``.

        Raises:
            ValueError: a malformed ``EMUGATE_SPEC_ACCEPTANCE``.
        """
        sc = vllm_config.speculative_config
        method = str(sc.method or "draft_model")
        env = os.environ.get("EMUGATE_SPEC_ACCEPTANCE", "").strip()
        if env:
            try:
                acc = tuple(float(x) for x in env.split(","))
            except ValueError:
                raise ValueError(f"EMUGATE_SPEC_ACCEPTANCE={env!r}: give comma-separated rates in [0, 1], one per "
                                 "draft position, e.g. 0.8,0.6,0.5") from None
            source = "EMUGATE_SPEC_ACCEPTANCE"
        else:
            acc, source = DEFAULT_ACCEPTANCE.get(method, FALLBACK_ACCEPTANCE)
        target_layers = vllm_config.model_config.get_total_num_hidden_layers()
        if method == "ngram" or sc.draft_model_config is None:
            draft_layers = 0  # host-side proposer
        elif "mtp" in method:
            draft_layers = 1  # one MTP block per predicted token
        else:
            draft_layers = int(getattr(sc.draft_model_config.hf_config, "num_hidden_layers", 1) or 1)
        return cls(method, int(sc.num_speculative_tokens), acc, draft_layers / max(target_layers, 1), seed, source)

    def rate(self, pos: int) -> float:
        """Conditional acceptance of draft position ``pos`` (0-based)."""
        return self.acceptance[min(pos, len(self.acceptance) - 1)]

    def accepted(self, num_drafts: int) -> int:
        """Drafts accepted out of ``num_drafts`` (0..num_drafts): the run up to the first rejection."""
        n = 0
        while n < num_drafts and self._rng.random() < self.rate(n):
            n += 1
        return n

    def expected_tokens_per_step(self) -> float:
        """Mean tokens a verification step emits per request: 1 + sum over i of prod_{j<=i} rate(j)."""
        total, p = 1.0, 1.0
        for i in range(self.k):
            p *= self.rate(i)
            total += p
        return total

    def describe(self) -> str:
        """One line for the start-up log."""
        rates = ", ".join(f"{self.rate(i):.2f}" for i in range(self.k))
        return (f"speculative decoding emulated: method {self.method}, k={self.k}, acceptance per position "
                f"[{rates}] ({self.source}); expected {self.expected_tokens_per_step():.2f} tokens per step; "
                f"draft cost {self.draft_cost:.3f} of a step per draft token")
