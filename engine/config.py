"""Engine arguments: one validated dataclass shared by the scheduler and the runner."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

_DTYPES = ("auto", "float32", "float16", "bfloat16")
# "auto": the model's dtype; "fp8" (= "fp8_e4m3", vLLM's names): float8_e4m3fn, values past +-448 saturate
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
EXECUTOR_BACKENDS = ("uni", "mp", "external_launcher")


@dataclass
class EngineConfig:
    """Everything an engine needs besides the model weights.

    ``model=None`` selects the embedded tiny default model. ``max_model_len=None`` takes
    the model's ``max_position_embeddings``. ``num_kv_blocks`` forces the KV pool size;
    ``kv_cache_memory_bytes`` forces its byte size; otherwise the runner's
    ``profile_run`` sizes it (``gpu_memory_utilization`` of device memory on GPUs).
    ``kv_cache_dtype="fp8"`` stores K and V as float8_e4m3fn (half the bytes of bf16: twice the
    blocks, half the decode attention's reads; values past +-448 saturate, no scales), where the
    attention backend supports it (Triton, torch). ``tensor_parallel_size`` ranks each hold a
    shard of the model and of the KV cache;
    ``distributed_executor_backend`` says how they run: ``"uni"`` (this process, one rank),
    ``"mp"`` (one spawned process per rank; the default when tensor_parallel_size > 1) or
    ``"external_launcher"`` (every rank is a process started by torchrun that builds its own
    engine and runs the same schedule).
    """

    model: str | None = None
    device: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_dtype: str = "auto"
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    # Image tokens the vision encoder may take per step; None: max_num_batched_tokens.
    max_num_encoder_input_tokens: int | None = None
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    seed: int = 0
    attention_backend: str | None = None
    enforce_eager: bool = False
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights
    cuda_graph_sizes: list[int] = field(default_factory=list)  # full decode graphs; empty: the runner's default
    # Piecewise graphs: token-wise pieces compiled with torch.compile, attention eager between them,
    # captured at these token counts where the device has graphs (empty: the runner's default).
    use_piecewise_graph: bool = False
    tokenwise_graph_batch_sizes: list[int] = field(default_factory=list)
    tensor_parallel_size: int = 1
    # Schedule and launch step n+1 while step n runs; None: on where it was proven (CUDA), else off.
    async_scheduling: bool | None = None
    distributed_executor_backend: str | None = None  # None: "uni" for one rank, else "mp"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            _positive(name, getattr(self, name))
        for name in ("max_model_len", "num_kv_blocks", "kv_cache_memory_bytes", "max_num_encoder_input_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2 (block 0 is the null block), got {self.num_kv_blocks}")
        if not (isinstance(self.long_prefill_token_threshold, int) and self.long_prefill_token_threshold >= 0):
            raise ValueError("long_prefill_token_threshold must be an integer >= 0 (0 = off), "
                             f"got {self.long_prefill_token_threshold!r}")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("cuda_graph_sizes", "tokenwise_graph_batch_sizes"):
            for s in getattr(self, name):
                _positive(name, s)
        if not isinstance(self.use_piecewise_graph, bool):
            raise ValueError(f"use_piecewise_graph must be True or False, got {self.use_piecewise_graph!r}")
        if self.tokenwise_graph_batch_sizes and not self.use_piecewise_graph:
            raise ValueError("tokenwise_graph_batch_sizes are the piecewise graphs' token counts: "
                             "set use_piecewise_graph=True with them")
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be True, False or None (auto), got {self.async_scheduling!r}")
        backend = self.distributed_executor_backend
        if backend is not None and backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS} (or None), "
                             f"got {backend!r}")
        if backend == "uni" and self.tensor_parallel_size > 1:
            raise ValueError(f"distributed_executor_backend='uni' runs one rank, but tensor_parallel_size="
                             f"{self.tensor_parallel_size}: use 'mp' (or 'external_launcher' under torchrun)")

    @property
    def executor_backend(self) -> str:
        """``distributed_executor_backend`` with its default filled in."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "uni" if self.tensor_parallel_size == 1 else "mp"

    @classmethod
    def from_kwargs(cls, **kwargs: object) -> "EngineConfig":
        """Like the constructor, but an unknown argument names the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)  # type: ignore[arg-type]


def _positive(name: str, value: object) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
