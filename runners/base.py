"""ModelRunnerBase: everything between a scheduler's decision and sampled tokens that
does not depend on the device. Device runners override four hooks, nothing else."""
from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from attention import AttentionMetadata, get_attn_backend
from attention.backend import FP8_KV
from distributed import TPGroup
from engine.config import EngineConfig
from engine.executor import DoneStep, StepHandle
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from models.config import ModelConfig
from platforms import Platform, resolve_platform
from runners.input_batch import InputBatch
from runners.graphs import GraphManager
from runners.inputs import InputBuilder, StepInputs
from runners.kv_cache import KVCacheSpec, blocks_for_bytes
from runners.multimodal import MultiModalState
from runners.plan import DevicePlan, pad_to, plan_from_config
from runners.prompt_logprobs import prompt_logprobs
from runners.request_table import RequestTable
from runners.sampler import Sampler
from runners.sampling_state import SamplingState
from runners.step_output import RunnerStep
from runners.step_buffers import StepBuffers


def _no_grad(fn: Callable) -> Callable:
    """``torch.inference_mode``, or ``torch.no_grad`` where the plan says so (torch_xla cannot
    take a view of an ordinary tensor, e.g. a weight, in inference mode)."""
    @functools.wraps(fn)
    def run(self: "ModelRunnerBase", *args, **kwargs):
        with torch.inference_mode() if self.plan.inference_mode else torch.no_grad():
            return fn(self, *args, **kwargs)
    return run


class ModelRunnerBase(ABC):
    """Turns ``SchedulerOutput`` into sampled tokens on one device.

    Lifecycle: ``__init__`` (configs, host buffers; ``_cache_device_properties`` returns the
    ``DevicePlan``) -> ``load_model`` -> ``profile_run`` (returns the KV block count) ->
    ``initialize_kv_cache`` -> ``capture_model``; ``initialize()`` runs all four. Then
    ``execute_model`` once per step.
    """

    # The only attributes a hook may set (the conformance suite checks it): everything else a
    # device wants from the base is declared in the plan.
    HOOK_RESULTS: ClassVar[dict[str, frozenset[str]]] = {
        "load_model": frozenset({"model", "weights_bytes"}),  # bytes the weights took (memory profiling)
        "profile_run": frozenset({"memory_profile"}),  # the KV sizing arithmetic, reported to users
    }

    def __init__(self, config: EngineConfig, platform: Platform | None = None, tp: TPGroup | None = None) -> None:
        """``tp``: this rank's tensor-parallel group (a worker builds it); the model and the KV
        cache then hold this rank's shard. The runner itself never communicates."""
        self.config = config
        self.platform = platform or resolve_platform(config.device)
        self.tp = tp or TPGroup.single()
        index = config.device.split(":")[1] if config.device and ":" in config.device else None
        self.device = self.platform.device(int(index) if index is not None else None)
        if config.model is None:
            from models.default import default_model_dir  # builds the tiny model on first use

            config.model = default_model_dir()
        self.model_config = ModelConfig.from_dir(config.model)
        mc = self.model_config
        self.dtype = self.platform.resolve_dtype(config.dtype, mc.dtype)
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings="
                             f"{mc.max_position_embeddings} (config.json): lower max_model_len to at most that")
        if mc.sliding_window is not None and self.max_model_len > mc.sliding_window:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's sliding_window="
                             f"{mc.sliding_window}, which is not supported: lower max_model_len")
        self.block_size = config.block_size
        self.max_num_reqs = config.max_num_seqs
        self.max_num_tokens = config.max_num_batched_tokens
        self.max_blocks_per_req = -(-self.max_model_len // self.block_size)
        kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else FP8_KV  # the config admits fp8 names only
        self.attn_backend = get_attn_backend(
            config.attention_backend, self.device.type, self.dtype, mc.head_dim, self.block_size,
            self.platform.attention_backends, kv_dtype)
        self.kv_cache_spec = KVCacheSpec(mc.num_hidden_layers, self.block_size,
                                         mc.kv_heads_per_rank(self.tp.size), mc.head_dim, kv_dtype)
        self.input_batch = InputBatch(self.max_num_reqs, self.max_model_len, self.max_blocks_per_req)
        self.sampling_state = SamplingState(self.max_num_reqs, mc.vocab_size, self.device,
                                            config.seed, mc.eos_token_ids)
        self.requests = RequestTable(self.input_batch, self.sampling_state)
        self._last_step: RunnerStep | None = None  # the last launched step (its ids may be unread)
        self.steps_launched_ahead = 0  # steps launched before the previous step's ids were read
        self.sampler = Sampler()
        self.model: torch.nn.Module | None = None  # set by load_model
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        self.plan = self._cache_device_properties()
        if not isinstance(self.plan, DevicePlan):
            raise TypeError(f"{type(self).__name__}._cache_device_properties() must return a DevicePlan "
                            f"(e.g. self.default_plan()), got {self.plan!r}")
        plan = self.plan
        max_tokens = max(pad_to(self.max_num_tokens, plan.token_buckets), self.max_num_reqs)
        self.buffers = StepBuffers(max_tokens, pad_to(self.max_num_reqs, plan.req_buckets),
                                   self.max_blocks_per_req, self.device,
                                   pin_memory=self.platform.pin_memory, persistent=plan.persistent_buffers)
        pin = self.platform.pin_memory and self.device.type not in ("cpu", "xla")
        self._host_ids = [torch.empty(self.max_num_reqs, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._host_flip = 0
        self.mm: MultiModalState | None = None  # M-RoPE positions and the encoder cache (VL models only)
        if mc.is_multimodal:
            self.mm = MultiModalState(mc.vision_config.get("spatial_merge_size", 2), self.max_num_reqs,
                                      self.device, pin)
        self.inputs = InputBuilder(self.buffers, self.input_batch, self.attn_backend, plan, self.block_size,
                                   self.max_model_len, self.max_blocks_per_req,
                                   self.mm.row_delta if self.mm is not None else None)
        self.graphs = GraphManager(plan, self.platform, self.buffers, mc.hidden_size, self.dtype)

    # The four device hooks ----------------------------------------------------------
    @abstractmethod
    def _cache_device_properties(self) -> DevicePlan:
        """Read device facts once (bind the device, ...) and return this device's ``DevicePlan``:
        ``self.default_plan(**changes)``. Called by ``__init__``; sets no attribute."""

    @abstractmethod
    def load_model(self) -> None:
        """Set ``self.model`` on ``self.device`` (``_build_model`` does the loading)."""

    @abstractmethod
    def profile_run(self) -> int:
        """Run a worst-case dummy step, measure memory, return the number of KV blocks
        (``_num_kv_blocks_for`` applies the engine overrides and the fit check)."""

    @abstractmethod
    def capture_model(self) -> None:
        """Prepare the fast paths the plan declares (``self.graphs.capture(...)`` for graphs, XLA
        precompilation); a no-op where the device runs eagerly. Sets no attribute."""

    # The plan -------------------------------------------------------------------------
    def default_plan(self, **changes: Any) -> DevicePlan:
        """The plan from the platform's capability flags and the engine config, with ``changes``.

        Full decode graphs where the platform and the attention backend support graphs (at
        ``cuda_graph_sizes``, else 1, 2, 4, 8, 16, ... up to the batch limit); piecewise
        graphs where ``use_piecewise_graph`` (captured at ``tokenwise_graph_batch_sizes``
        where graphs run, else the compiled pieces alone); ``enforce_eager`` turns all off."""
        return dataclasses.replace(plan_from_config(self.config, self.platform, self.attn_backend, self.max_num_reqs,
                                                    self.max_num_tokens, self.model_config.is_multimodal), **changes)

    # Lifecycle ----------------------------------------------------------------------
    def initialize(self) -> int:
        """load_model -> profile_run -> initialize_kv_cache -> capture_model."""
        self.platform.seed_everything(self.config.seed)
        self.load_model()
        num_blocks = self.profile_run()
        self.initialize_kv_cache(num_blocks)
        if not self.config.enforce_eager:
            self.capture_model()
        return num_blocks

    def _build_model(self) -> torch.nn.Module:
        from models.loader import load_model

        return load_model(self.config.model, self.dtype, self.device, self.attn_backend, self.tp,
                          load_format=self.config.load_format)

    def get_kv_cache_spec(self) -> KVCacheSpec:
        return self.kv_cache_spec

    def initialize_kv_cache(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 2:  # profile_run's result, usually
            raise ValueError(f"need an int >= 2 KV blocks (block 0 is the null block; {type(self).__name__}"
                             f".profile_run() returns the count), got {num_blocks!r}")
        self.kv_caches = self.kv_cache_spec.allocate(num_blocks, self.device)
        self.num_kv_blocks = num_blocks

    def _num_kv_blocks_for(self, available_bytes: int, budget_desc: str,
                           max_useful: int | None = None) -> int:
        """Engine overrides first (num_kv_blocks, kv_cache_memory_bytes), else ``available_bytes``."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            available_bytes, budget_desc = self.config.kv_cache_memory_bytes, "kv_cache_memory_bytes"
        return blocks_for_bytes(self.kv_cache_spec, available_bytes, max_model_len=self.max_model_len,
                                max_useful=max_useful, budget_desc=budget_desc)

    # One step -------------------------------------------------------------------------
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and return its sampled tokens (``execute_model_async(...).result()``)."""
        return self.execute_model_async(scheduler_output).result()

    @_no_grad
    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Launch one step without waiting for it: forward and sampling are queued on the device;
        the handle's ``result()`` brings the ids to the host. Resolve handles in launch order; a
        step launched before the previous one is resolved takes that one's ids on the device."""
        self._update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return DoneStep(ModelRunnerOutput([], []))
        step = self._prepare_inputs(scheduler_output)
        if self._last_step is not None and not self._last_step.resolved:
            self.steps_launched_ahead += 1
            self._last_step.scatter_pending(step, self.buffers)
        hidden = self._forward(step)
        prompt_lp = prompt_logprobs(self, step.req_ids, hidden)  # only where asked (reads back at once)
        n = int(step.sample_mask.sum())  # sample_rows beyond n are padding (static shapes)
        if n == 0:
            return DoneStep(ModelRunnerOutput(step.req_ids, [[] for _ in step.req_ids], None, prompt_lp))
        logits = self.model.compute_logits(hidden[step.logits_indices]).float()
        out = self.sampler(logits, self.sampling_state.prepare(step.sample_rows))
        rows, ids = step.sample_rows[:n], out.sampled_token_ids[:n]
        self.sampling_state.update(rows, ids)
        positions = self.input_batch.append_placeholders(rows)
        where = np.flatnonzero(step.sample_mask)
        host, event = self._copy_to_host(out.sampled_token_ids, n)
        self._last_step = RunnerStep(step.req_ids, where, rows, positions, ids, host, event,
                                     out.logprobs.to_lists if out.logprobs is not None else None,
                                     self.requests, prompt_lp)
        return self._last_step

    def _copy_to_host(self, ids: torch.Tensor, n: int) -> tuple[torch.Tensor | None, object | None]:
        """Start copying ``ids[:n]`` to pinned host memory (two buffers: two steps may be unread);
        None on the CPU (nothing to copy). XLA reads the whole (padded) tensor back at once and
        slices it on the host: slicing on the device would compile a graph per batch size."""
        if self.device.type == "cpu":
            return None, None
        if self.device.type == "xla" or not self.platform.pin_memory:
            return ids.cpu()[:n], None
        self._host_flip ^= 1
        buf = self._host_ids[self._host_flip][:n]
        buf.copy_(ids[:n], non_blocking=True)
        event = torch.Event(device=self.device)
        event.record()
        return buf, event

    def _forward(self, step: StepInputs) -> torch.Tensor:
        kv = self.kv_caches or [None] * self.kv_cache_spec.num_layers
        return self.graphs.forward(self.model, step, kv)

    def _capture_graphs(self) -> None:
        """What ``capture_model`` calls where the device has graphs (the plan says which)."""
        self.graphs.capture(self.model, self.kv_caches, self.inputs.dummy, self._dummy_run)

    def _update_states(self, so: SchedulerOutput) -> None:
        """Apply finished / preempted / new / cached requests to the persistent batch."""
        self.requests.apply(so)
        if self.mm is not None:
            self._calc_mrope_positions(so)

    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        """This step's inputs, in batch order: cached requests, then new ones."""
        req_ids = so.scheduled_cached_reqs.req_ids + [r.req_id for r in so.scheduled_new_reqs]
        nst = so.num_scheduled_tokens
        num_sched = np.fromiter((nst[r] for r in req_ids), dtype=np.int32, count=len(req_ids))
        rows = self.requests.rows(req_ids)
        step = self.inputs.build(req_ids, rows, num_sched)
        if self.mm is not None:  # positions [3, T]; image embeddings for the placeholders scheduled
            computed = self.input_batch.num_computed[rows]
            # Text tokens only (steady decoding): M-RoPE is plain RoPE at index + delta, which the
            # step buffer already holds (the builder's position offset), so decode graphs replay.
            if not (step.md.is_pure_decode and not self.mm.active):
                step.positions = self.mm.positions(req_ids, rows, computed, num_sched, step.input_ids.shape[0])
            self._execute_encoder(req_ids, computed, num_sched)
            step.mm_embeds = self._gather_encoder_outputs(req_ids, computed, num_sched)
        return step

    # Multimodal (runners/multimodal.py) --------------------------------------------------
    def _calc_mrope_positions(self, so: SchedulerOutput) -> None:
        """Each new request's M-RoPE positions and decode delta, once; drops what ended."""
        self.mm.update(so, self.requests)

    def _execute_encoder(self, req_ids: list[str], computed: np.ndarray, num_sched: np.ndarray) -> None:
        """Run the vision encoder, batched, on the images this step's scheduled tokens meet."""
        self.mm.execute_encoder(self.model, req_ids, computed, num_sched)

    def _gather_encoder_outputs(self, req_ids: list[str], computed: np.ndarray,
                                num_sched: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached embeddings of exactly this step's placeholder tokens, with their indices."""
        return self.mm.gather(req_ids, computed, num_sched)

    # Dummy runs (profiling, warm-up, graph capture) ------------------------------------
    @_no_grad
    def _dummy_run(self, num_tokens: int, num_reqs: int | None = None, sample: bool = False) -> torch.Tensor:
        """Run a dummy step; ``sample`` also runs the sampler over ``num_reqs`` rows (profiling)."""
        num_tokens = min(num_tokens, self.max_num_reqs * self.max_model_len)  # the most a step can hold
        num_reqs = min(num_reqs or min(num_tokens, self.max_num_reqs), num_tokens)
        num_reqs = max(num_reqs, -(-num_tokens // self.max_model_len))
        hidden = self._forward(self.inputs.dummy(num_tokens, num_reqs))
        if sample:
            logits = self.model.compute_logits(hidden[:num_reqs]).float()
            self.sampler(logits, self.sampling_state.prepare_dummy(num_reqs))
        return hidden
