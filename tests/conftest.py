"""Shared fixtures: a tiny checkpoint in the released layout (tiny LM, full-size Mimi, random weights), built
once per test session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from personaplex.demo import build_demo_checkpoint

    return build_demo_checkpoint(tmp_path_factory.mktemp("demo-checkpoint"))


@pytest.fixture(scope="session")
def checkpoint(demo_dir):
    from personaplex.checkpoint import load_checkpoint

    return load_checkpoint(demo_dir, device="cpu")


def speech_like(seconds: float, seed: int = 0, rate: int = 24_000) -> np.ndarray:
    """A deterministic voiced signal (harmonics with pitch and amplitude movement plus a little noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(h * phase) / h for h in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
