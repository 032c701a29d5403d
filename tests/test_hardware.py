"""What the server reads about its CPU: the cores it may use and the dtype it serves in."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.hardware import default_dtype, native_bf16, resolve_dtype


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity API on this platform")
def test_usable_cores_follow_the_affinity_not_the_machine() -> None:
    first = min(os.sched_getaffinity(0))
    code = "from models.hardware import usable_cores; print(usable_cores())"
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {first}))
    assert pinned.stdout.strip() == "1"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads the CPU flags from /proc/cpuinfo")
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it() -> None:
    """Checked against the kernel's own list of CPU flags, not torch's probe that native_bf16 reads."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M).group(1).split())
    hardware_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert native_bf16() == hardware_bf16
    assert resolve_dtype("auto") == default_dtype() == ("bfloat16" if hardware_bf16 else "float32")
    assert resolve_dtype("float32") == "float32"
