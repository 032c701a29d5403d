"""Sequential temperature scaling (STS) of the confidence head, with ECE and reliability diagrams.

The scheduler multiplies confidences: the survival of draft prefix k is c_1 * ... * c_k. So, as in
the DSpark paper, what gets calibrated is that product: positions left to right, each position's
temperature is the grid value whose cumulative product (earlier temperatures fixed) has the
smallest expected calibration error against the observed prefix acceptance on held-out blocks.
One set of temperatures per regime, since acceptance differs: at T=0 a prefix survives when every
draft token is the target's argmax; at T=1 its survival probability is prod (1 - TV).
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_GRID = tuple(float(t) for t in torch.linspace(0.25, 4.0, 61))


def expected_calibration_error(conf: torch.Tensor, outcome: torch.Tensor, bins: int = 10) -> float:
    """ECE of predicted probabilities against outcomes in [0, 1] (binary or soft), equal-width bins."""
    conf, outcome = conf.flatten().float(), outcome.flatten().float()
    idx = (conf * bins).long().clamp(max=bins - 1)
    gap = (torch.zeros(bins).index_add_(0, idx, conf) - torch.zeros(bins).index_add_(0, idx, outcome)).abs()
    return float(gap.sum() / max(conf.numel(), 1))


def cumulative_survival(logits: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """Survival of each draft prefix [N, W]: the running product of the tempered confidences."""
    return torch.sigmoid(logits / temps).cumprod(-1)


def sequential_temperature_scaling(logits: torch.Tensor, prefix_outcome: torch.Tensor,
                                   grid: tuple[float, ...] = DEFAULT_GRID) -> torch.Tensor:
    """Per-position temperatures [W] for confidence logits [N, W] against prefix acceptance [N, W]."""
    temps: list[float] = []
    survival = torch.ones(logits.shape[0])
    for k in range(logits.shape[1]):
        errors = [expected_calibration_error(survival * torch.sigmoid(logits[:, k] / t), prefix_outcome[:, k])
                  for t in grid]
        best = grid[min(range(len(grid)), key=errors.__getitem__)]
        temps.append(best)
        survival = survival * torch.sigmoid(logits[:, k] / best)
    return torch.tensor(temps)


def reliability_diagram(panels: dict[str, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]],
                        path: Path, bins: int = 10) -> None:
    """PNG, one panel per regime: mean prefix acceptance per survival bin, before and after STS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (regime, (before, after)) in zip(axes[0], panels.items()):
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
        for (conf, outcome), label in ((before, "before STS"), (after, "after STS")):
            conf, outcome = conf.flatten(), outcome.flatten()
            idx = (conf * bins).long().clamp(max=bins - 1)
            xs, ys = [], []
            for b in range(bins):
                sel = idx == b
                if sel.any():
                    xs.append(float(conf[sel].mean()))
                    ys.append(float(outcome[sel].mean()))
            ax.plot(xs, ys, "o-", label=f"{label} (ECE {expected_calibration_error(conf, outcome, bins):.3f})")
        ax.set_xlabel("predicted prefix survival (product of confidences)")
        ax.set_ylabel("observed prefix acceptance")
        ax.set_title(f"DSpark confidence reliability, {regime}")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
