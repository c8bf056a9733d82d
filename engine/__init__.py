"""Torch-free engine: requests, sampling params, KV block manager, scheduler, the executor interface.

``LLM`` (and ``GenerationStats``) live in ``entrypoints``, above the engine; they are re-exported
here lazily so that ``from engine import LLM, SamplingParams`` keeps working. That lazy
``__getattr__`` is the engine's one reference upward.
"""
from __future__ import annotations

import importlib
from typing import Any

from engine.config import EngineConfig
from engine.executor import Executor, WorkerError, WorkerInfo
from engine.outputs import (CachedRequestData, CompletionOutput, Logprob, ModelRunnerOutput, NewRequestData,
                            RequestOutput, SampleLogprobs, SchedulerOutput, TokenLogprobs)
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams

_UPWARD = {"LLM": "entrypoints.llm", "GenerationStats": "entrypoints.llm"}

__all__ = ["LLM", "GenerationStats", "EngineConfig", "SamplingParams", "Request", "RequestStatus",
           "SchedulerOutput", "NewRequestData", "CachedRequestData", "ModelRunnerOutput",
           "RequestOutput", "CompletionOutput", "Logprob", "TokenLogprobs", "SampleLogprobs", "Executor",
           "WorkerInfo", "WorkerError"]


def __getattr__(name: str) -> Any:
    if name in _UPWARD:
        return getattr(importlib.import_module(_UPWARD[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
