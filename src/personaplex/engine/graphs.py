"""CUDA graphs of the engine tick: one per (bucket, pinned-prompt variant, top-k bounds), captured when the
engine is built and replayed every 80 ms.

Eager PyTorch spends 5-10 us of host time launching each kernel; a tick at the 7B shape issues a few
thousand, which alone would fill the 80 ms frame. A captured graph replays the whole tick (Mimi encode, LM
step, sampling, Mimi decode) with one launch. That is possible because `BatchEngine._tick` is device work
only: every tensor it reads or writes is preallocated and updated in place (the same storage every tick),
nothing is read back to the host, and no shape depends on data; the host's decisions (which bucket, whether
any row has passed the window, the top-k bounds) pick the graph.

Capture happens on an engine without conversations: warm-up and capture run the tick on empty rows, which
are cleared afterwards. Graphs share one memory pool (their intermediates are never live at the same time).
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("personaplex.engine")

Key = tuple[int, bool, tuple[int, int]]  # (bucket, slid, (text kmax, audio kmax))


class TickGraphs:
    def __init__(self, engine, keys: list[Key], warmup: int = 2) -> None:
        if engine.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; pass cuda_graphs=False")
        if engine.active:
            raise RuntimeError("CUDA graphs are captured on an engine without conversations")
        self.graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        started = time.perf_counter()
        side = torch.cuda.Stream()
        pool = None
        with torch.no_grad():
            for key in keys:
                views = engine._views[key[0]]
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # kernels' lazy initialisation happens here, not in the capture
                    for _ in range(warmup):
                        engine._tick(views, key[1], key[2])
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    engine._tick(views, key[1], key[2])
                pool = graph.pool()
                self.graphs[key] = graph
        torch.cuda.synchronize()
        engine.clear()  # the warm-up ticks stepped the empty rows
        log.info("captured %d CUDA graphs of the tick in %.1f s", len(self.graphs), time.perf_counter() - started)

    def replay(self, key: Key) -> bool:
        """Replay the graph of `key`; False when there is none (the caller runs the tick eagerly)."""
        graph = self.graphs.get(key)
        if graph is None:
            return False
        graph.replay()
        return True


__all__ = ["TickGraphs"]
