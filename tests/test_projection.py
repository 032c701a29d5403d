"""The few-row projection must give F.linear's values for every shape and dtype it is handed."""
import pytest
import torch
import torch.nn.functional as F

from models.projection import FEW_ROWS, project


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (7, 96), (FEW_ROWS, 96), (FEW_ROWS + 1, 96), (3, 5, 96), (1, 1, 96)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_project_matches_linear(shape, with_bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(300, 96, generator=g)
    b = torch.randn(300, generator=g) if with_bias else None
    out = project(x, w, b)
    assert out.shape == (*shape[:-1], 300)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-4)


def test_project_bf16_is_linear_exactly():
    x = torch.randn(4, 64).bfloat16()
    w = torch.randn(32, 64).bfloat16()
    assert torch.equal(project(x, w), F.linear(x, w))


def test_project_empty_rows():
    assert project(torch.zeros(0, 8), torch.randn(5, 8)).shape == (0, 5)
