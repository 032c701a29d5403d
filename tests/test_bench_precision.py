"""`bench precision`: the quality a dtype costs, measured against float32 on human-written text."""
from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from benchmarks.precision import reference_texts, run_precision_benchmark
from export.quantize import calibration_texts


def test_w8a8_calibrates_on_text_the_benchmark_does_not_score() -> None:
    scored, calibration = reference_texts(), calibration_texts()
    assert len(calibration) == 12 and all(len(t) > 500 for t in calibration)
    assert not any(a in b or b in a for a in scored for b in calibration)


def test_float32_agrees_with_itself_and_bf16_costs_little(smollm2_dir) -> None:
    texts = reference_texts()
    assert len(texts) == 8 and all(len(t) > 1000 for t in texts)
    result = run_precision_benchmark(smollm2_dir, [("torch", "float32"), ("torch", "bfloat16"), ("torch", "float32")],
                                     texts[::4], max_tokens=128, threads=1)
    ref, bf16, again = result["rows"]
    assert result["tokens"] == 2 * 127
    assert again["agreement"] == 1.0 and again["nll"] == pytest.approx(ref["nll"], abs=1e-6)
    assert math.exp(ref["nll"]) == pytest.approx(ref["perplexity"])
    # bf16 rounds the weights and activations: its loss moves, by well under 2% (measured: 0.1%)
    assert bf16["nll"] != ref["nll"] and abs(bf16["perplexity"] / ref["perplexity"] - 1) < 0.02
    assert bf16["agreement"] >= 0.9


def test_a_runtime_that_cannot_run_a_dtype_is_refused_by_name() -> None:
    import cli

    result = CliRunner().invoke(cli.cli, ["bench", "precision", "--runtime", "torch/int8"])
    assert result.exit_code == 2 and "'torch/int8': int8 graphs are for the onnxruntime runtime" in result.output
    result = CliRunner().invoke(cli.cli, ["bench", "precision", "--runtime", "torch"])
    assert result.exit_code == 2 and "'torch': expected RUNTIME/DTYPE" in result.output


def test_texts_fed_in_steps_score_what_one_prefill_does_in_float32(smollm2_dir) -> None:
    """--step-tokens reads each text back through the cache (what decoding does); in float32 that is the same
    model as one prefill, so the scores agree to rounding."""
    texts = reference_texts()[::4]
    runs = [run_precision_benchmark(smollm2_dir, [("torch", "float32")], texts, max_tokens=48, threads=1,
                                    step_tokens=step) for step in (None, 1, 5)]
    assert [r["tokens"] for r in runs] == [2 * 47] * 3 and [r["step_tokens"] for r in runs] == [None, 1, 5]
    prefill, steps, blocks = (r["rows"][0]["nll"] for r in runs)
    assert steps == pytest.approx(prefill, abs=1e-4) and blocks == pytest.approx(prefill, abs=1e-4)
