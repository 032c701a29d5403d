"""The torch runtime on a CUDA GPU (skipped without one): same greedy tokens as the CPU, and
speculative decoding with the shipped drafter on the GPU stays the target's own output.

float32 on both devices (TF32 off, torch's default for matmuls): the same maths in another
order, so greedy tokens agree over these lengths; bf16 would not promise that across devices.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.spec_decode import parse_configs, run_spec_decode_benchmark, summarize
from export.repository import drafter_checkpoint
from hub.fetch import default_drafter
from runtimes.loading import load_runner
from test_onnx_export import GREEDY_STEPS, _batched_greedy, _mixed_schedule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")


@pytest.fixture(scope="module")
def smol_cuda(smollm2_dir: Path):
    return load_runner(smollm2_dir, "torch", "float32", device="cuda")


def _prompts(smollm2_dir: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    from test_transformer import PROMPTS

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    return [tok.encode(p).ids for p in PROMPTS[:3]]


def test_cuda_greedy_and_mixed_steps_equal_cpu(smollm2_dir: Path, smollm2_fp32, smol_cuda) -> None:
    prompts = _prompts(smollm2_dir)
    assert _batched_greedy(smol_cuda, prompts, GREEDY_STEPS) == _batched_greedy(smollm2_fp32, prompts, GREEDY_STEPS)
    assert _mixed_schedule(smol_cuda, prompts) == _mixed_schedule(smollm2_fp32, prompts)


def test_cuda_speculative_decoding_is_the_targets_output(smollm2_dir: Path, smollm2_encoder, smol_cuda) -> None:
    checkpoint = drafter_checkpoint(default_drafter(smollm2_dir))
    columns = parse_configs([f"checkpoint={checkpoint}:7"], lambda name: None, smol_cuda, max_context=512)
    prompts = [smollm2_encoder.encode(p, apply_chat_template=True) for p in ("def add(a, b):", "Name three colors.")]
    ar, dspark = summarize(run_spec_decode_benchmark(smol_cuda, smollm2_encoder.tokenizer, prompts, columns, 32))["rows"]
    assert dspark["identical_to_ar"] and dspark["tokens"] == ar["tokens"] > 0
    assert dspark["tokens_per_round"] > 1.0
