"""genai-perf 0.0.16, unchanged, against the test server's `ensemble`: both Triton conventions over gRPC
(TensorRT-LLM's and the vLLM backend's inputs) and the HTTP generate route, streaming. Its output-token
counts (it re-tokenizes the streamed text) must agree with the server's own counts."""
from __future__ import annotations

import pytest

from clients.genai_perf import run_genai_perf

pytestmark = pytest.mark.server

OUTPUT_TOKENS = 8
REQUESTS = 3
# genai-perf counts tokens of the concatenated text, re-tokenized; the server counts generated ids.
# Merges across chunk boundaries can move the count a little either way.
TOLERANCE = 0.15


@pytest.mark.parametrize("backend", ["tensorrtllm", "vllm", "generate"])
def test_genai_perf_profile_runs_and_counts_agree(triton, smollm2_dir, tmp_path, backend):
    url = triton.http if backend == "generate" else triton.grpc
    result = run_genai_perf(url, backend, smollm2_dir, tmp_path / "artifacts", input_tokens=24,
                            output_tokens=OUTPUT_TOKENS, num_prompts=REQUESTS, request_count=REQUESTS)
    assert result.stats["request_count"]["avg"] == REQUESTS
    # the deterministic-length inputs (min_length / min_tokens) took effect: every answer is exactly that long
    assert result.our_output_tokens == [OUTPUT_TOKENS] * REQUESTS
    assert result.genai_perf_output_tokens == pytest.approx(result.our_mean_output_tokens, rel=TOLERANCE)
