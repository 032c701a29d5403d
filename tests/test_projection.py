"""Every projection kernel must give F.linear's values for every shape it is handed; plans dispatch by rows."""
import pytest
import torch
import torch.nn.functional as F

from models.projection import FEW_ROWS, KernelPlan, Linear, measure_kernel_plan, packed_supported

SHAPES = [(1, 96), (2, 96), (7, 96), (FEW_ROWS, 96), (FEW_ROWS + 1, 96), (3, 5, 96), (1, 1, 96)]


def _kernels(dtype: torch.dtype) -> list[str]:
    names = ["linear", "weight_left"]
    return names + ["packed"] if packed_supported(dtype) else names


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_kernel_matches_linear(dtype, shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(300, 96, generator=g).to(dtype)
    b = torch.randn(300, generator=g).to(dtype) if with_bias else None
    expected = F.linear(x.float(), w.float(), None if b is None else b.float())
    for name in _kernels(dtype):
        out = Linear(w, b, KernelPlan((10**6,), (name,)))(x)
        assert out.shape == (*shape[:-1], 300) and out.dtype == dtype, name
        assert out.is_contiguous(), name
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.2)
        torch.testing.assert_close(out.float(), expected, **tol, msg=name)


def test_plan_dispatches_by_row_count():
    plan = KernelPlan((1, 8), ("weight_left", "linear"))
    assert [plan.kernel(n) for n in (1, 2, 8, 9, 1000)] == ["weight_left", "linear", "linear", "linear", "linear"]
    assert KernelPlan.from_json(plan.to_json()) == plan


def test_empty_rows():
    linear = Linear(torch.randn(5, 8), None, KernelPlan((FEW_ROWS,), ("weight_left",)))
    assert linear(torch.zeros(0, 8)).shape == (0, 5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_plan_names_a_candidate_for_every_row_count(dtype):
    weights = [(torch.randn(64, 32).to(dtype), None), (torch.randn(32, 64).to(dtype), torch.zeros(32).to(dtype))]
    plan = measure_kernel_plan(weights, rows=(1, 4), repeats=1)
    assert plan.rows == (1, 4)
    allowed = {"linear", "weight_left"} if dtype == torch.float32 else ({"packed"} if packed_supported(dtype) else {"linear"})
    assert set(plan.kernels) <= allowed
