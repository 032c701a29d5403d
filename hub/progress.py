"""One place to make progress bars, so every long step can be silenced the same way."""
from __future__ import annotations

from tqdm.auto import tqdm


def bar(total: int | None, desc: str, enabled: bool = True, unit: str = "B") -> tqdm:
    """A tqdm bar; byte units scale to MB/GB so large downloads stay readable."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
    )
