"""Shared fixtures: a per-session cache directory and the trained digits reference."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "conf" / "quant"

if "VITQ_CACHE" not in os.environ:
    os.environ["VITQ_CACHE"] = str(ROOT / ".cache" / "vitq")


@pytest.fixture(scope="session")
def reference():
    from vitq.models.reference import load_reference

    return load_reference()


@pytest.fixture(scope="session")
def digits():
    from vitq.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def byo(tmp_path_factory):
    """The bring-your-own case (tests/byo_case.py): a small non-default timm ViT, its timm-style EMA checkpoint
    and grayscale PNG folders calib/ and eval/, built once per test session."""
    import byo_case

    return byo_case.build(tmp_path_factory.mktemp("byo"))
