"""`bench decode`'s maths: our engine's columns and transformers' assisted generation side by side."""
from __future__ import annotations

import pytest
import torch

from benchmarks.spec_decode import format_table, parse_configs, run_spec_decode_benchmark, summarize

PROMPTS = ["def add(a, b):", "List three colors."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_columns_are_lossless_and_report_where_time_goes(smollm2_dir, smollm2_fp32, smollm2_encoder):
    from transformers import AutoModelForCausalLM

    def load_hf(name):
        return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

    prompts = [smollm2_encoder.encode(p, apply_chat_template=True) for p in PROMPTS]
    columns = parse_configs(["prompt_lookup:3", "hf_assisted=self:3"], lambda name: None, smollm2_fp32,
                            max_context=512, load_hf_model=load_hf)
    summary = summarize(run_spec_decode_benchmark(smollm2_fp32, smollm2_encoder.tokenizer, prompts, columns, 16))
    ar, lookup, hf = summary["rows"]
    assert [r["config"] for r in summary["rows"]] == ["off", "prompt_lookup:3", "hf_assisted=self:3"]
    assert ar["tokens"] == lookup["tokens"] == hf["tokens"] > 0
    assert lookup["identical_to_ar"] and hf["identical_to_ar"]  # fp32 greedy: same tokens in all three
    # the target drafting for itself is always right: more than one token per verification round
    # (transformers 5.x proposes fewer than K after its first round, so not K + 1)
    assert hf["tokens_per_round"] > 1.5
    assert 0 < ar["forward_share"] <= 1 and ar["draft_share"] == 0
    assert lookup["draft_share"] > 0 and lookup["forward_share"] + lookup["draft_share"] <= 1
    assert hf["forward_share"] is None  # transformers' loop is not split
    for row in (ar, lookup, hf):  # the prefill to the first token is a real, smaller part of the wall time
        assert 0 < row["ttft_s"] * len(PROMPTS) < row["seconds"] and row["decode_tokens_per_s"] > 0
    assert ar["tokens_per_step"] == 1.0  # AR: one token per decode forward, exactly
    # a step that drafted nothing counts here but not in tokens per round
    assert 1.0 <= lookup["tokens_per_step"] <= (lookup["tokens_per_round"] or 1.0)
    assert hf["tokens_per_step"] > 1.5
    # a label longer than the default column (a checkpoint path) keeps the figures aligned under the header
    summary["rows"][1]["config"] = "checkpoint=" + "/very/long/path" * 4 + ":7"
    header, _, *rows, _ = format_table(summary).splitlines()
    assert all(row.index(f"{r['tokens_per_s']:.2f}") + len(f"{r['tokens_per_s']:.2f}") == header.index("tok/s") + 5
               for row, r in zip(rows, summary["rows"]))


def test_a_failing_configuration_stops_the_benchmark(smollm2_dir, smollm2_encoder):
    """A column whose requests fail must not print as a (nonsense) measurement: here the ONNX
    Runtime target was exported without the layers the trained drafter reads."""
    from export.repository import drafter_checkpoint
    from hub.fetch import default_drafter
    from runtimes.loading import load_runner

    target = load_runner(smollm2_dir, "onnxruntime", "float32", num_threads=1)  # no taps exported
    checkpoint = drafter_checkpoint(default_drafter(smollm2_dir))
    columns = parse_configs([f"checkpoint={checkpoint}:4"], lambda name: None, target, max_context=512,
                            runtime="onnxruntime")
    prompts = [smollm2_encoder.encode(PROMPTS[0], apply_chat_template=True)]
    with pytest.raises(RuntimeError, match="request failed: .*were not exported"):
        run_spec_decode_benchmark(target, smollm2_encoder.tokenizer, prompts, columns, 8)


def test_dspark_columns_plan_with_the_step_cost(smollm2_dir, smollm2_fp32, smollm2_encoder):
    """A ``:dspark`` column runs the server's dspark mode: lossless, and what it verifies follows the
    step-cost profile (a nearly flat verify step admits more draft tokens per round than a steep one)."""
    from export.repository import drafter_checkpoint
    from hub.fetch import default_drafter
    from orchestrator.policies import SpeculationParams
    from orchestrator.step_cost import StepCostProfile

    checkpoint = drafter_checkpoint(default_drafter(smollm2_dir))
    with pytest.raises(ValueError, match="no block size"):
        parse_configs(["prompt_lookup:dspark"], lambda name: None, smollm2_fp32, max_context=512)
    with pytest.raises(ValueError, match="must be a number"):
        parse_configs(["prompt_lookup:four"], lambda name: None, smollm2_fp32, max_context=512)
    with pytest.raises(ValueError, match="goes after a model drafter"):
        parse_configs(["prompt_lookup+prompt_lookup:4"], lambda name: None, smollm2_fp32, max_context=512)
    columns = parse_configs([f"checkpoint={checkpoint}:dspark", "prompt_lookup:dspark=5",
                             f"checkpoint={checkpoint}+prompt_lookup:dspark"], lambda name: None,
                            smollm2_fp32, max_context=512)
    assert [c.spec for c in columns[1:]] == [SpeculationParams("dspark", 7), SpeculationParams("dspark", 5),
                                             SpeculationParams("dspark", 7)]
    assert columns[3].drafter.name == "dspark+prompt_lookup"
    prompts = [smollm2_encoder.encode(PROMPTS[0], apply_chat_template=True)]
    with pytest.raises(ValueError, match="step-cost profile"):
        run_spec_decode_benchmark(smollm2_fp32, smollm2_encoder.tokenizer, prompts, columns, 16)
    flat = summarize(run_spec_decode_benchmark(smollm2_fp32, smollm2_encoder.tokenizer, prompts, columns, 24,
                                               step_cost=StepCostProfile((1, 64), (0.05, 0.052))))
    steep = summarize(run_spec_decode_benchmark(smollm2_fp32, smollm2_encoder.tokenizer, prompts, columns, 24,
                                                step_cost=StepCostProfile((1, 64), (0.01, 0.64))))
    for summary in (flat, steep):
        assert all(row["identical_to_ar"] for row in summary["rows"])  # fp32 greedy: the same tokens as AR
    for row_flat, row_steep in zip(flat["rows"][1:], steep["rows"][1:]):  # nearly free verification admits more
        assert row_flat["verified_per_round"] > (row_steep["verified_per_round"] or 0)
