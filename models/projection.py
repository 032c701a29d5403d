"""``x @ weight.T`` laid out for few-row CPU matmuls, the shape of decode and verify steps.

Measured on fp32 CPU weights (AVX2, 2 threads), ``F.linear`` is slow at exactly the sizes
speculative decoding uses: for 2-16 rows the BLAS repacks the whole weight on every call (the
49k-row LM head of SmolLM2 took 30-40 ms instead of ~10), and for one row it runs a GEMV on a
single thread. Passing the row-major weight as the GEMM's untransposed left operand,
``(weight @ x.T).T``, streams it once on all threads; a single row is doubled to take that path.
Beyond ``FEW_ROWS`` (prefill) ``F.linear`` is as fast or faster, and other dtypes keep it too
(bf16 goes through different kernels there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


FEW_ROWS = 64  # measured crossover with F.linear: 32 rows 2x faster, 128 rows equal


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same values as ``F.linear(x, weight, bias)``: [..., in] -> contiguous [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not 0 < rows <= FEW_ROWS:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()
    y = (weight @ flat.t()).t()[:rows].contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])
