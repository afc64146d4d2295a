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
    from personaplex.audio import voiced_signal

    return voiced_signal(seconds, seed, rate)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny per-frame ops run faster and steadier on one thread than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
