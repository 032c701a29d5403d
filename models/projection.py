"""``x @ weight.T`` on the kernel that is fastest for the row count at hand, chosen by measurement.

Decode and verify steps multiply a few rows (1-16 tokens) by every weight of the model: on a CPU
that is a stream of the weights through memory, and the step should cost about the same for 1
row as for 8. Which torch kernel achieves that differs by CPU and dtype, and measured here the
differences are 2-3x:
- ``linear``: ``F.linear`` (BLAS / oneDNN, repacks the weight for small M on some CPUs);
- ``weight_left``: ``(weight @ x.T).T``, the row-major weight as the GEMM's untransposed left
  operand, one row doubled to avoid a single-threaded GEMV (fastest for fp32 on AVX2 CPUs,
  2x slower than ``linear`` on AVX-512 ones);
- ``packed``: bf16 weights reordered once into oneDNN's blocked layout
  (``torch.ops.mkldnn._linear_pointwise``), one row doubled: bandwidth-bound and flat over
  1-16 rows where the CPU has bf16 instructions (AVX512-BF16 / AMX).
``measure_kernel_plan`` times the candidates on the model's own weights (streamed from memory,
as in a real step) for each row count; ``Linear`` then dispatches by rows.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.hardware import native_bf16

FEW_ROWS = 64  # beyond this (prefill) every kernel is compute-bound and F.linear is used
PLAN_ROWS = (1, 2, 4, 8, 16, 32, FEW_ROWS)  # row counts a plan is measured at


def weight_left(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` values via ``(weight @ x.T).T``: [..., in] -> contiguous [..., out]."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()
    y = (weight @ flat.t()).t()[:rows].contiguous()
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], weight.shape[0])


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for modules without a kernel plan (drafters, training, export)."""
    return F.linear(x, weight, bias)


def packed_supported(dtype: torch.dtype) -> bool:
    """oneDNN's prepacked linear: bf16 on a CPU with native bf16 (else it emulates and is slow)."""
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and native_bf16()


@dataclass(frozen=True)
class KernelPlan:
    """Which kernel serves each row count: ``kernels[i]`` for rows <= ``rows[i]``; F.linear beyond."""

    rows: tuple[int, ...]
    kernels: tuple[str, ...]

    def kernel(self, num_rows: int) -> str:
        for limit, name in zip(self.rows, self.kernels):
            if num_rows <= limit:
                return name
        return "linear"

    @property
    def uses_packed(self) -> bool:
        return "packed" in self.kernels

    def to_json(self) -> dict:
        return {"rows": list(self.rows), "kernels": list(self.kernels)}

    @classmethod
    def from_json(cls, data: dict) -> "KernelPlan":
        return cls(tuple(data["rows"]), tuple(data["kernels"]))


class Linear:
    """One weight matrix (and bias) served through a kernel plan; not a module, holds no parameters."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: KernelPlan) -> None:
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.plan = plan
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, 16) if plan.uses_packed else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        kernel = self.plan.kernel(rows) if rows else "linear"
        if kernel == "packed":
            return self._packed(x, rows)
        if kernel == "weight_left":
            return weight_left(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _packed(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:  # oneDNN's one-row path is a slow GEMV; two rows take the blocked GEMM
            flat = flat.expand(2, -1)
        y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, self.bias, "none", [], "")
        return y[:rows].view(*x.shape[:-1], self.weight.shape[0])


def candidate_kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """Kernels worth timing for a dtype. Native bf16 needs no contest: prepacked oneDNN was as fast
    as or faster than F.linear at every row count measured (2-1.4x at 1-16 rows, AMX CPU)."""
    if dtype == torch.float32:
        return ("linear", "weight_left")
    return ("packed",) if packed_supported(dtype) else ("linear",)


@torch.inference_mode()
def measure_kernel_plan(
    weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    rows: Sequence[int] = PLAN_ROWS,
    repeats: int = 3,
) -> KernelPlan:
    """Times each candidate kernel on all the given (weight, bias) pairs per row count; picks the fastest.

    Candidates are interleaved within each repeat and the median kept, so a noisy neighbour slows
    all of them alike. The weights should be the whole model's: small matrices that stay in cache
    time very differently from a real step, which streams every weight from memory.
    """
    dtype = weights[0][0].dtype
    names = candidate_kernels(dtype)
    if len(names) == 1:
        return KernelPlan(tuple(rows), names * len(rows))
    everything = KernelPlan(tuple(rows), ("packed",) * len(rows))
    layers = {
        name: [Linear(w, b, everything if name == "packed" else KernelPlan((FEW_ROWS,), (name,))) for w, b in weights]
        for name in names
    }
    chosen = []
    for m in rows:
        inputs = [torch.randn(m, w.shape[1], dtype=dtype) for w, _ in weights]
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(repeats + 1):
            for name in names:
                started = time.perf_counter()
                for linear, x in zip(layers[name], inputs):
                    linear(x)
                if rep:  # the first pass warms up
                    times[name].append(time.perf_counter() - started)
        chosen.append(min(names, key=lambda name: sorted(times[name])[len(times[name]) // 2]))
    return KernelPlan(tuple(rows), tuple(chosen))
