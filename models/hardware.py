"""What the CPU offers: native bf16, an identity for measurements, the default serving dtype."""
from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch


def native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX); elsewhere torch emulates it, slowly."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def default_dtype() -> str:
    """The serving dtype: bf16 where native (measured: half the bytes per step and a flat verify curve
    with prepacked weights), fp32 elsewhere (bf16 emulation is slower than fp32)."""
    return "bfloat16" if native_bf16() and torch.backends.mkldnn.is_available() else "float32"


def resolve_dtype(name: str) -> str:
    """``auto`` -> the CPU's default dtype; any other name unchanged."""
    return default_dtype() if name == "auto" else name


def usable_cores() -> int:
    """CPUs this process may run on (its affinity: a pinned or containerised server gets fewer than the
    machine has, and more torch threads than cores stall every op)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS)
        return os.cpu_count() or 1


def machine_id() -> str:
    """CPU model and count: a kernel choice or cost profile measured on one machine does not hold on another."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|{os.cpu_count()}"


def measurement_path(root: Path, model_dir: Path, label: str, revision: str = "") -> Path:
    """Where a measurement of this model (``label``: what was measured, e.g. its dtype and threads) is
    cached: keyed by the model directory, this machine and torch's version, plus the measuring code's
    ``revision``, since a measurement taken elsewhere or by older code does not hold here."""
    ident = f"{Path(model_dir).resolve()}|{machine_id()}|torch {torch.__version__}|{label}|{revision}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    return root / "profiles" / f"{Path(model_dir).name}-{label}-{key}.json"


def cpu_flags() -> str:
    """The instruction sets that decide which kernels are fast, for reports next to every figure."""
    flags = [name for name, ok in (("avx2", torch.cpu._is_avx2_supported()), ("avx512", torch.cpu._is_avx512_supported()),
                                    ("avx512_bf16", torch.cpu._is_avx512_bf16_supported()),
                                    ("amx", torch.cpu._is_amx_tile_supported())) if ok]
    return " ".join(flags) or "none"
