"""The torch runtime: the runner *is* our Transformer; on the CPU its projections use a measured kernel plan."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from models.hardware import measurement_path
from models.projection import KernelPlan
from models.transformer import Transformer


def cached_kernel_plan(model: Transformer, model_dir: Path) -> KernelPlan:
    """The projection kernels for this model, dtype, thread count and machine: measured once, then read."""
    from hub.fetch import cache_dir

    dtype = str(model.dtype).removeprefix("torch.")
    path = measurement_path(cache_dir(), model_dir, f"kernels-{dtype}-{torch.get_num_threads()}t")
    if path.exists():
        return KernelPlan.from_json(json.loads(path.read_text()))
    plan = model.measure_kernel_plan()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_json()))
    return plan
