"""The multistream LM: temporal transformer, depformer, KV cache and the incremental step."""

from .generate import NOT_FORCED, FrameOutput, greedy, step_frame
from .model import LMModel, LMOutput, LMState
from .transformer import KVCache

__all__ = ["LMModel", "LMOutput", "LMState", "KVCache", "FrameOutput", "step_frame", "greedy", "NOT_FORCED"]
