"""Synthesized GPU profiles (unit tier): KV arithmetic, vLLM's scheduler defaults and
CUDA-graph padding, the calibration fit, the bundled Llama-3.1 model directories and
profiles. Uses aiconfigurator-core (the ``synth`` extra, installed by
scripts/install-cpu.sh); no GPU and no vLLM server."""
from __future__ import annotations

import json

import numpy as np
import pytest

from profiles.assets import resolve_model_dir
from profiles.calibration import (Calibration, RefDataset, RefPoint, aic_estimators, cross_validate, errors, fit,
                                  reference_datasets)
from profiles.format import Profile
from profiles.oracle import FeatureOracle
from profiles.synth import (AicStepModel, ModelDims, StepShape, SynthSpec, cudagraph_sizes, hardware, kv_capacity,
                            padded_tokens, shape_features, synthesize, vllm_scheduler_defaults)

BUNDLED_GPU = ["h100-sxm_llama-3.1-8b", "h100-sxm_llama-3.1-70b_tp4", "h200_llama-3.1-8b",
               "a100-sxm_llama-3.1-8b", "l40s_llama-3.1-8b"]


def test_llama_dims_give_the_published_parameter_count():
    d8 = ModelDims.from_config(resolve_model_dir("llama-3.1-8b"))
    d70 = ModelDims.from_config(resolve_model_dir("llama-3.1-70b"))
    # Meta's model cards: 8.03B and 70.6B parameters
    assert d8.linear_params() + d8.embedding_params() == pytest.approx(8.03e9, rel=0.002)
    assert d70.linear_params() + d70.embedding_params() == pytest.approx(70.55e9, rel=0.002)
    assert d8.kv_bytes_per_token(1) == 2 * 32 * 8 * 128 * 2
    assert d70.kv_bytes_per_token(4) == 2 * 80 * 2 * 128 * 2


def test_kv_capacity_matches_the_measured_h200_pool():
    """Dynamo's H200 Llama-3.1-8B FP8 run reports max_kv_tokens 945,029 (profiles/reference)."""
    dims = ModelDims.from_config(resolve_model_dir("llama-3.1-8b"))
    h200 = hardware("h200")
    mnbt, mns = vllm_scheduler_defaults(h200)
    kv = kv_capacity(h200, dims, "fp8", 1, 0.9, mnbt, mns)
    assert kv.tokens == pytest.approx(945_029, rel=0.02)
    assert "blocks x 16" in kv.arithmetic() and kv.tokens % 16 == 0
    with pytest.raises(ValueError, match="no KV-cache memory"):
        kv_capacity(hardware("l40s"), ModelDims.from_config(resolve_model_dir("llama-3.1-70b")), "bf16", 1, 0.9,
                    2048, 256)


def test_scheduler_defaults_and_graph_padding_follow_vllm():
    assert vllm_scheduler_defaults(hardware("h100-sxm")) == (8192, 1024)
    assert vllm_scheduler_defaults(hardware("a100-sxm")) == (2048, 256)  # vLLM excludes A100 on purpose
    assert vllm_scheduler_defaults(hardware("l40s")) == (2048, 256)
    assert vllm_scheduler_defaults(hardware("b200")) == (16384, 1024)
    sizes = cudagraph_sizes(1024)
    assert sizes[:4] == [1, 2, 4, 8] and sizes[-1] == 512 and 264 not in sizes and 272 in sizes
    assert cudagraph_sizes(8) == [1, 2, 4, 8, 16]
    assert [padded_tokens(n, sizes) for n in (1, 3, 9, 255, 257, 512, 513)] == [1, 4, 16, 256, 272, 512, 513]
    with pytest.raises(ValueError, match="h100-sxm"):
        hardware("tpu-v5")


def test_aic_step_model_pads_and_orders():
    m = AicStepModel(hardware("h100-sxm"), "meta-llama/Meta-Llama-3.1-8B", "bf16", 1, 1024)
    d = [m.raw_ms(StepShape(0, 0, 0, b, b * 1024)) for b in (1, 32, 256)]
    assert 1.0 < d[0] < d[1] < d[2] < 100.0
    # 33 requests run as the 40-request CUDA graph: same cost as 40 at equal KV
    assert m.raw_ms(StepShape(0, 0, 0, 33, 33 * 512)) == pytest.approx(m.raw_ms(StepShape(0, 0, 0, 40, 33 * 512)),
                                                                       rel=0.02)
    p = [m.raw_ms(StepShape(1, n, 0, 0, 0)) for n in (512, 2048, 8192)]
    assert p[0] < p[1] < p[2]
    assert m.raw_ms(StepShape(0, 0, 0, 0, 0)) == 0.0


def test_fit_recovers_known_parameters():
    """A fake estimator and 'measurements' made with c0=0.5 ms, factors 1.2/1.1/1.3: fit finds them."""
    est = lambda s: 0.01 * s.num_tokens + 0.001 * (s.decode_kv + s.prefill_kv) + 2.0  # noqa: E731
    truth = Calibration(0.5, {"decode": 1.2, "prefill": 1.1, "mixed": 1.3})
    pts = []
    for i, s in enumerate([StepShape(0, 0, 0, b, b * 700) for b in (1, 8, 64, 200)]
                          + [StepShape(1, p, 0, 0, 0) for p in (64, 900, 4000)]
                          + [StepShape(1, p, 0, b, b * 300) for p, b in ((100, 10), (2000, 50), (30, 200))]):
        pts.append(RefPoint("fake", s.phase, (s,), truth.apply(est(s), s.phase), label=str(i)))
    ds = RefDataset("fake", "h100-sxm", "bf16", 1024, tuple(pts), "test")
    got = fit([ds], {"fake": est})
    assert got.c0_ms == pytest.approx(0.5, abs=1e-6)
    assert got.factor == pytest.approx({"decode": 1.2, "prefill": 1.1, "mixed": 1.3}, abs=1e-6)
    assert all(e["median"] < 1e-6 for e in errors(got, ds, est).values())


def test_cross_validation_on_the_reference_measurements():
    ds = reference_datasets()
    assert {d.name for d in ds} == {"h200-dynamo", "rtxpro6000-llmservingsim"}
    assert all(p.real_ms > 0 for d in ds for p in d.points)
    rows = cross_validate(ds, aic_estimators(ds))
    got = {(r["dataset"], r["phase"]): r for r in rows}
    assert set(got) >= {("h200-dynamo", "decode"), ("h200-dynamo", "prefill"),
                        ("rtxpro6000-llmservingsim", "decode"), ("rtxpro6000-llmservingsim", "mixed")}
    for r in rows:
        assert r["fitted_on"] != r["dataset"] and np.isfinite(r["cal_median"]) and r["n"] >= 10
    # raw AIC underestimates real steps (kernel sums only); the calibration fitted on the
    # H200 data roughly halves the RTX PRO 6000 mixed-step error (25% -> 16% when written)
    mixed = got[("rtxpro6000-llmservingsim", "mixed")]
    assert mixed["cal_median"] < mixed["raw_median"] * 0.8


def test_synthesize_small_profile(tmp_path):
    spec = SynthSpec(hardware="h100-sxm", model_dir=str(resolve_model_dir("llama-3.1-8b")),
                     aic_model="meta-llama/Meta-Llama-3.1-8B", num_steps=3000, max_model_len=32768)
    cal = Calibration(0.2, {"decode": 1.2, "prefill": 1.05, "mixed": 1.3})
    prof, kv = synthesize(spec, cal)
    path = prof.save(tmp_path / "h100.emuprof.zst")
    back = Profile.load(path)
    fp = back.fingerprint
    assert fp["source"] == "synthesized" and fp["aic_system"] == "h100_sxm" and fp["num_kv_blocks"] == kv.num_blocks
    assert fp["max_num_batched_tokens"] == 8192 and fp["max_num_seqs"] == 1024 and fp["async_scheduling"]
    assert back.meta["estimate"] is True and "ESTIMATE" in back.meta["label"]
    s = back.steps
    assert s["num_tokens"].max() <= 8192 and s["num_reqs"].max() <= 1024 and (s["host_gap_us"] == 0).all()
    # the oracle built from the table reproduces the calibrated AIC model at unseen shapes
    aic = AicStepModel(hardware("h100-sxm"), "meta-llama/Meta-Llama-3.1-8B", "bf16", 1, 1024)
    oracle = FeatureOracle(back)
    for shape in (StepShape(0, 0, 0, 48, 48 * 1500), StepShape(1, 3000, 0, 0, 0), StepShape(1, 1000, 0, 20, 20 * 900)):
        exact = cal.apply(aic.raw_ms(shape), shape.phase)
        got = oracle.predict_us(shape_features(shape)) / 1000
        assert got == pytest.approx(exact, rel=0.15), shape


@pytest.mark.parametrize("name", BUNDLED_GPU)
def test_bundled_gpu_profiles_are_labelled_estimates(name):
    prof = Profile.load(name)
    fp = prof.fingerprint
    assert fp["source"] == "synthesized" and prof.meta["estimate"] is True and "ESTIMATE" in prof.meta["label"]
    assert fp["num_kv_blocks"] > 1000 and fp["block_size"] == 16 and fp["async_scheduling"] is True
    assert fp["tensor_parallel_size"] == (4 if name.endswith("_tp4") else 1)
    cal = prof.meta["calibration"]
    assert cal["fitted_on"] and any(k.endswith("/decode") for k in cal["errors"])
    dims = ModelDims.from_config(resolve_model_dir(fp["model"]))
    assert fp["model_dims"]["num_layers"] == dims.num_layers
    lat = prof.steps["latency_us"]
    assert lat.min() > 1000 and np.median(lat) < 1_000_000  # GPU steps: ms, not the CPU's 30-100 ms


def test_llama_tokenizer_and_chat_template_are_the_real_models():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir("llama-3.1-8b")))
    assert len(tok) == 128256 and tok.eos_token == "<|eot_id|>"
    assert tok.encode("Hello world, how are you?", add_special_tokens=False) == [9906, 1917, 11, 1268, 527, 499, 30]
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user"
                    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    cfg = json.loads((resolve_model_dir("llama-3.1-70b") / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 80 and cfg["num_key_value_heads"] == 8
