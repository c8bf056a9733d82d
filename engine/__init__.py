"""Torch-free engine: requests, sampling params, KV block manager, scheduler, offline API."""
from engine.config import EngineConfig
from engine.llm import LLM, GenerationStats
from engine.outputs import (CachedRequestData, CompletionOutput, ModelRunnerOutput, NewRequestData,
                            RequestOutput, SampleLogprobs, SchedulerOutput)
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "GenerationStats", "EngineConfig", "SamplingParams", "Request", "RequestStatus",
           "SchedulerOutput", "NewRequestData", "CachedRequestData", "ModelRunnerOutput",
           "RequestOutput", "CompletionOutput", "SampleLogprobs"]
