"""Sequential temperature scaling (STS) of the confidence head, with ECE and a reliability diagram.

Positions are calibrated one after another (k = 0, 1, ...): each gets the temperature on a grid
that minimises its expected calibration error on held-out blocks, measured against the
observed acceptance 1 - TV(p_draft, p_target) of that position.
"""
from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_GRID = tuple(float(t) for t in torch.linspace(0.25, 4.0, 61))


def expected_calibration_error(conf: torch.Tensor, outcome: torch.Tensor, bins: int = 10) -> float:
    """ECE of predicted probabilities against outcomes in [0, 1] (binary or soft), equal-width bins."""
    conf, outcome = conf.flatten().float(), outcome.flatten().float()
    idx = (conf * bins).long().clamp(max=bins - 1)
    total = torch.zeros(bins).index_add_(0, idx, torch.ones_like(conf))
    gap = (torch.zeros(bins).index_add_(0, idx, conf) - torch.zeros(bins).index_add_(0, idx, outcome)).abs()
    return float(gap.sum() / max(conf.numel(), 1)) if total.sum() else 0.0


def sequential_temperature_scaling(logits: torch.Tensor, outcome: torch.Tensor,
                                   grid: tuple[float, ...] = DEFAULT_GRID) -> torch.Tensor:
    """Per-position temperatures [W] for confidence logits [N, W] against outcomes [N, W]."""
    temps = []
    for k in range(logits.shape[1]):
        errors = [expected_calibration_error(torch.sigmoid(logits[:, k] / t), outcome[:, k]) for t in grid]
        temps.append(grid[min(range(len(grid)), key=errors.__getitem__)])
    return torch.tensor(temps)


def reliability_diagram(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
                        path: Path, bins: int = 10) -> None:
    """PNG: mean outcome per confidence bin, before and after calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
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
        ece = expected_calibration_error(conf, outcome, bins)
        ax.plot(xs, ys, "o-", label=f"{label} (ECE {ece:.3f})")
    ax.set_xlabel("predicted confidence")
    ax.set_ylabel("observed acceptance (1 - TV)")
    ax.set_title("DSpark confidence reliability")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
