"""Shared test fixtures: real files only (JPEGs written with Pillow, real params.yaml)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_SUBSET = ROOT.parent / "shared" / "data" / "oxford-iiit-pet-subset"

# Keep the 2-core machines responsive when several test processes train at once.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture
def pet_subset() -> Path:
    """The real 1,029-image subset in ../shared, or a clean skip when it is absent."""
    if not (SHARED_SUBSET / "images").is_dir():
        pytest.skip(f"{SHARED_SUBSET} not present")
    return SHARED_SUBSET
