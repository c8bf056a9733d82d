"""ModelRunnerBase: everything between a scheduler's decision and sampled tokens that
does not depend on the device. Device runners override four hooks, nothing else."""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from attention import AttentionMetadata, get_attn_backend
from distributed import TPGroup
from engine.config import EngineConfig
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from models.config import ModelConfig
from platforms import Platform, resolve_platform
from runners.input_batch import InputBatch, RequestState
from runners.kv_cache import KVCacheSpec, blocks_for_bytes
from runners.prompt_logprobs import prompt_logprobs
from runners.sampler import Sampler
from runners.sampling_state import SamplingState
from runners.step_buffers import StepBuffers


@dataclass
class StepInputs:
    """One step's model inputs (device tensors) and what the host needs after sampling."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    md: AttentionMetadata
    logits_indices: torch.Tensor
    req_ids: list[str]
    sample_rows: np.ndarray  # persistent rows that get a token this step, in batch order (+ padding)
    sample_mask: np.ndarray  # per request in batch order: does it sample?


def _no_grad(fn: Callable) -> Callable:
    """``torch.inference_mode``, or ``torch.no_grad`` where a hook cleared ``use_inference_mode``
    (torch_xla cannot take a view of an ordinary tensor, e.g. a weight, in inference mode)."""
    @functools.wraps(fn)
    def run(self: "ModelRunnerBase", *args, **kwargs):
        with torch.inference_mode() if self.use_inference_mode else torch.no_grad():
            return fn(self, *args, **kwargs)
    return run


def _buckets(limit: int, start: int = 1) -> list[int]:
    """Powers of two from ``start`` up to and including ``limit``."""
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class ModelRunnerBase(ABC):
    """Turns ``SchedulerOutput`` into sampled tokens on one device.

    Lifecycle: ``__init__`` (configs, host buffers) -> ``load_model`` -> ``profile_run``
    (returns the KV block count) -> ``initialize_kv_cache`` -> ``capture_model``;
    ``initialize()`` runs all four. Then ``execute_model`` once per step.
    """

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
        self.attn_backend = get_attn_backend(
            config.attention_backend, self.device.type, self.dtype, mc.head_dim, self.block_size,
            self.platform.attention_backends)
        self.kv_cache_spec = KVCacheSpec(mc.num_hidden_layers, self.block_size,
                                         mc.kv_heads_per_rank(self.tp.size), mc.head_dim, self.dtype)
        self.requests: dict[str, RequestState] = {}
        self.input_batch = InputBatch(self.max_num_reqs, self.max_model_len, self.max_blocks_per_req)
        self.sampling_state = SamplingState(self.max_num_reqs, mc.vocab_size, self.device,
                                            config.seed, mc.eos_token_ids)
        self.sampler = Sampler()
        self.model: torch.nn.Module | None = None
        self.kv_caches: list[torch.Tensor] = []
        self.num_kv_blocks = 0
        # Set by hooks. Padding buckets: ``token_buckets``/``req_buckets`` pad every step
        # (static-shape devices); ``decode_buckets`` pad pure-decode steps only (graphs).
        self.token_buckets: list[int] | None = None
        self.req_buckets: list[int] | None = None
        self.decode_buckets: list[int] | None = None
        # XLA clears both: fresh uploads instead of fixed device buffers; no_grad, not inference_mode.
        self.persistent_buffers = True
        self.use_inference_mode = True
        self.captured: dict[tuple[int, int], Callable[[StepInputs], torch.Tensor]] = {}
        self._cache_device_properties()
        max_tokens = max(self._pad(self.max_num_tokens, self.token_buckets), self.max_num_reqs)
        self.buffers = StepBuffers(max_tokens, self._pad(self.max_num_reqs, self.req_buckets),
                                   self.max_blocks_per_req, self.device,
                                   pin_memory=self.platform.pin_memory, persistent=self.persistent_buffers)

    # The four device hooks ----------------------------------------------------------
    @abstractmethod
    def _cache_device_properties(self) -> None:
        """Read device facts once (SM count, graph sizes...); may set ``token_buckets`` and
        ``req_buckets`` so the base pads shapes for graphs or XLA. Called by ``__init__``."""

    @abstractmethod
    def load_model(self) -> None:
        """Set ``self.model`` on ``self.device`` (``_build_model`` does the loading)."""

    @abstractmethod
    def profile_run(self) -> int:
        """Run a worst-case dummy step, measure memory, return the number of KV blocks
        (``_num_kv_blocks_for`` applies the engine overrides and the fit check)."""

    @abstractmethod
    def capture_model(self) -> None:
        """Prepare fast paths (CUDA/XPU graphs, XLA precompilation) into ``self.captured``;
        a no-op where the device runs eagerly."""

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
    @_no_grad
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduler_output)
        if scheduler_output.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput([], [])
        step = self._prepare_inputs(scheduler_output)
        hidden = self._forward(step)
        prompt_lp = prompt_logprobs(self, step.req_ids, hidden)
        sampled: list[list[int]] = [[] for _ in step.req_ids]
        logprobs = None
        if len(step.sample_rows):
            logits = self.model.compute_logits(hidden[step.logits_indices]).float()
            out = self.sampler(logits, self.sampling_state.prepare(step.sample_rows))
            n = int(step.sample_mask.sum())  # sample_rows beyond n are padding (static shapes)
            ids = out.sampled_token_ids.cpu().numpy()[:n]  # the step's one host sync
            self.input_batch.append_sampled(step.sample_rows[:n], ids)
            self.sampling_state.update(step.sample_rows[:n], out.sampled_token_ids[:n])
            where = np.flatnonzero(step.sample_mask)
            for i, tok in zip(where.tolist(), ids.tolist()):
                sampled[i] = [tok]
            if out.logprobs is not None:
                lp = out.logprobs.to_lists()
                logprobs = [None] * len(step.req_ids)
                for i, entry in zip(where.tolist(), lp):
                    logprobs[i] = entry
        return ModelRunnerOutput(step.req_ids, sampled, logprobs, prompt_lp)

    def _forward(self, step: StepInputs) -> torch.Tensor:
        key = (step.input_ids.shape[0], step.md.query_start_loc.shape[0] - 1)
        fn = self.captured.get(key) if step.md.is_pure_decode else None
        if fn is not None:
            return fn(step)
        kv = self.kv_caches or [None] * self.kv_cache_spec.num_layers
        return self.model(step.input_ids, step.positions, kv, step.md)

    def _update_states(self, so: SchedulerOutput) -> None:
        """Apply finished / preempted / new / cached requests to the persistent batch."""
        ib = self.input_batch
        for rid in so.finished_req_ids:
            self._drop(rid)
        for rid in so.preempted_req_ids:
            st = self.requests.get(rid)
            if st is not None and st.row is not None:
                self._park(st)
        for new in so.scheduled_new_reqs:
            self._drop(new.req_id)  # a known id sent as new replaces the old request
            st = RequestState(new.req_id, len(new.prompt_token_ids), new.sampling_params, None,
                              parked_tokens=np.asarray(new.prompt_token_ids, dtype=np.int32))
            self.requests[new.req_id] = st
            self._unpark(st, new.block_ids, new.num_computed_tokens)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            st = self.requests[rid]
            if cached.resumed_from_preemption[i] or st.row is None:
                self._unpark(st, cached.new_block_ids[i], cached.num_computed_tokens[i])
            else:
                ib.append_blocks(st.row, cached.new_block_ids[i])
                ib.num_computed[st.row] = cached.num_computed_tokens[i]

    def _drop(self, rid: str) -> None:
        """Forget a request and free its row, if it has them."""
        st = self.requests.pop(rid, None)
        if st is not None and st.row is not None:
            self.input_batch.remove(st.row)
            self.sampling_state.remove_request(st.row)

    def _park(self, st: RequestState) -> None:
        """Drop a request's row but keep its tokens (preemption)."""
        st.parked_tokens = self.input_batch.tokens(st.row)
        self.input_batch.remove(st.row)
        self.sampling_state.remove_request(st.row)
        st.row = None

    def _unpark(self, st: RequestState, block_ids: list[int], num_computed: int) -> None:
        tokens = st.parked_tokens
        if st.row is not None:
            tokens = self.input_batch.tokens(st.row)
            self.input_batch.remove(st.row)
            self.sampling_state.remove_request(st.row)
        st.row = self.input_batch.add(tokens, block_ids, num_computed)
        st.seed = self.sampling_state.add_request(  # a resumed request keeps its first seed
            st.row, st.sampling_params, tokens[:st.num_prompt_tokens], tokens[st.num_prompt_tokens:],
            seed=st.seed)
        st.parked_tokens = None

    # Inputs ---------------------------------------------------------------------------
    @staticmethod
    def _pad(n: int, buckets: list[int] | None) -> int:
        if not buckets:
            return n
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} exceeds the largest padding bucket {buckets[-1]}")

    def _pad_shape(self, n: int, n_reqs: int) -> tuple[int, int, bool]:
        """(padded tokens, padded requests, static?) for a step of n tokens over n_reqs."""
        if self.token_buckets:
            return self._pad(n, self.token_buckets), self._pad(n_reqs, self.req_buckets), True
        if n == n_reqs and self.decode_buckets and n <= self.decode_buckets[-1]:
            p = self._pad(n, self.decode_buckets)
            return p, p, True
        return n, n_reqs, False

    def _prepare_inputs(self, so: SchedulerOutput) -> StepInputs:
        req_ids = so.scheduled_cached_reqs.req_ids + [r.req_id for r in so.scheduled_new_reqs]
        reqs = self.requests
        rows = np.fromiter((reqs[r].row for r in req_ids), dtype=np.int64, count=len(req_ids))
        nst = so.num_scheduled_tokens
        num_sched = np.fromiter((nst[r] for r in req_ids), dtype=np.int32, count=len(req_ids))
        return self._fill_inputs(req_ids, rows, num_sched)

    def _fill_inputs(self, req_ids: list[str], rows: np.ndarray, num_sched: np.ndarray,
                     dummy: bool = False) -> StepInputs:
        """Vectorised: positions, token ids, slots, block table, query starts, seq lens."""
        b, ib, bs = self.buffers.np, self.input_batch, self.block_size
        n_reqs, n = len(num_sched), int(num_sched.sum())
        n_pad, r_pad, static = self._pad_shape(n, n_reqs)
        cu = np.cumsum(num_sched)
        computed = np.zeros(n_reqs, np.int32) if dummy else ib.num_computed[rows]
        seq_lens = computed + num_sched
        if n == n_reqs:  # pure decode
            req_idx, pos = np.arange(n_reqs), computed.astype(np.int64)
        else:
            req_idx = np.repeat(np.arange(n_reqs), num_sched)
            pos = np.arange(n) - np.repeat(cu - num_sched, num_sched) + computed[req_idx]
        b["positions"][:n] = pos
        b["positions"][n:n_pad] = 0
        b["input_ids"][n:n_pad] = 0
        b["slot_mapping"][n:n_pad] = -1
        qsl = b["query_start_loc"]
        qsl[0] = 0
        qsl[1:n_reqs + 1] = cu
        qsl[n_reqs + 1:r_pad + 1] = n
        b["seq_lens"][:n_reqs] = seq_lens
        b["seq_lens"][n_reqs:r_pad] = 0
        max_seq, max_q = int(seq_lens.max()), int(num_sched.max())
        nb = -(-max_seq // bs)
        if static:  # shapes and launch decisions must not depend on this step's lengths
            nb, max_seq, max_q = self.max_blocks_per_req, self.max_model_len, 1 if n == n_reqs else n_pad
        bt = b["block_table"][:r_pad * nb].reshape(r_pad, nb)
        if dummy:
            b["input_ids"][:n] = 0
            b["slot_mapping"][:n] = -1
            bt[:] = 0
            sample_mask = np.zeros(n_reqs, dtype=bool)
        else:
            tok_rows = rows[req_idx]
            b["input_ids"][:n] = ib.token_ids[tok_rows, pos]
            b["slot_mapping"][:n] = ib.block_table[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs
            bt[:n_reqs] = ib.block_table[rows, :nb]
            bt[n_reqs:] = 0
            sample_mask = seq_lens >= ib.num_tokens[rows]
        sample_idx, sample_rows = cu[sample_mask] - 1, rows[sample_mask]
        if self.req_buckets and len(sample_idx):  # static sampler shapes: repeat the last sampled row
            extra = self._pad(len(sample_idx), self.req_buckets) - len(sample_idx)
            sample_idx = np.pad(sample_idx, (0, extra), "edge")
            sample_rows = np.pad(sample_rows, (0, extra), "edge")
        b["logits_indices"][:len(sample_idx)] = sample_idx
        to = self.buffers.to_device
        md = AttentionMetadata(
            query_start_loc=to("query_start_loc", r_pad + 1), seq_lens=to("seq_lens", r_pad),
            block_table=to("block_table", r_pad * nb, (r_pad, nb)), slot_mapping=to("slot_mapping", n_pad),
            max_query_len=max_q, max_seq_len=max_seq, num_actual_tokens=n, num_reqs=n_reqs,
            query_start_loc_cpu=qsl[:r_pad + 1], seq_lens_cpu=b["seq_lens"][:r_pad])
        return StepInputs(to("input_ids", n_pad), to("positions", n_pad), self.attn_backend.prepare(md),
                          to("logits_indices", len(sample_idx)), req_ids, sample_rows, sample_mask)

    # Dummy runs (profiling, warm-up, graph capture) ------------------------------------
    def _dummy_step(self, num_tokens: int, num_reqs: int) -> StepInputs:
        """Inputs of ``num_tokens`` tokens over ``num_reqs`` fake requests: positions from 0,
        slots -1 (the KV cache is untouched), block tables on the null block."""
        num_sched = np.full(num_reqs, num_tokens // num_reqs, dtype=np.int32)
        num_sched[: num_tokens % num_reqs] += 1
        return self._fill_inputs([f"_dummy{i}" for i in range(num_reqs)], np.zeros(num_reqs, np.int64),
                                 num_sched, dummy=True)

    @_no_grad
    def _dummy_run(self, num_tokens: int, num_reqs: int | None = None, sample: bool = False) -> torch.Tensor:
        """Run a dummy step; ``sample`` also runs the sampler over ``num_reqs`` rows (profiling)."""
        num_tokens = min(num_tokens, self.max_num_reqs * self.max_model_len)  # the most a step can hold
        num_reqs = min(num_reqs or min(num_tokens, self.max_num_reqs), num_tokens)
        num_reqs = max(num_reqs, -(-num_tokens // self.max_model_len))
        hidden = self._forward(self._dummy_step(num_tokens, num_reqs))
        if sample:
            logits = self.model.compute_logits(hidden[:num_reqs]).float()
            self.sampler(logits, self.sampling_state.prepare_dummy(num_reqs))
        return hidden
