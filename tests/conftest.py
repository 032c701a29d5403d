"""Shared fixtures: the real default model, fetched once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """Converted SmolLM2-135M-Instruct model directory (downloaded and cached on first use)."""
    from export.fetch import fetch_model

    return fetch_model(DEFAULT_MODEL)
