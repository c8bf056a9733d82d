"""TPURunner: torch_xla, the model compiled with ``torch.compile(backend="openxla")``, and
every step padded to a (token bucket, request bucket) shape that ``capture_model`` compiles
once, so serving greedy requests never compiles. Runs on XLA's CPU client with
``PJRT_DEVICE=CPU``; torch_xla is imported only by the hooks."""
from __future__ import annotations

import torch

from runners.base import ModelRunnerBase
from runners.plan import DevicePlan, pad_to, power_of_two_buckets, step_shapes
from runners.sampling_metadata import SamplingMetadata

MIN_TOKEN_BUCKET = 16
MIN_REQ_BUCKET = 8  # fewer request buckets, fewer graphs; padded rows cost little
CPU_KV_CACHE_CAP = 4 * 2**30  # the CPU client shares host RAM, as on the CPU runner


def greedy_metadata(num_rows: int, vocab_size: int, num_candidates: int) -> SamplingMetadata:
    """What ``SamplingState.prepare`` builds for ``num_rows`` greedy rows without penalties,
    logprobs or min_tokens: the sampler then runs argmax only."""
    return SamplingMetadata(num_rows, vocab_size, num_rows, None, num_candidates, None, None, None, None)


class TPURunner(ModelRunnerBase):
    def _cache_device_properties(self) -> DevicePlan:
        notes = ("use_piecewise_graph is not needed on XLA: every step runs as one compiled graph",) \
            if self.config.use_piecewise_graph else ()
        return self.default_plan(
            token_buckets=tuple(power_of_two_buckets(self.max_num_tokens, min(MIN_TOKEN_BUCKET, self.max_num_tokens))),
            req_buckets=tuple(power_of_two_buckets(self.max_num_reqs, min(MIN_REQ_BUCKET, self.max_num_reqs))),
            persistent_buffers=False,  # fresh uploads: updating a device buffer in place is traced
            inference_mode=False,  # torch_xla cannot view a weight inside inference_mode
            use_piecewise_graph=False, notes=notes)

    def load_model(self) -> None:
        self.model = self._build_model()
        if not self.config.enforce_eager:  # eager: XLA's lazy tensors trace every step instead
            import torch._dynamo.config as dynamo_config

            # One dynamo graph per step shape, + the profile step; the default limit is 8.
            key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            num_shapes = len(step_shapes(self.plan.token_buckets, self.plan.req_buckets))
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), 2 * num_shapes + 8))
            self.model.compile(backend="openxla", fullgraph=True, dynamic=False)

    def profile_run(self) -> int:
        # The serving path (KV cache present, so on a TPU the Pallas kernel) over a throwaway
        # two-block cache: dummy steps read and write only the null block.
        import torch_xla.runtime as xr

        empty, self.kv_caches = self.kv_caches, self.kv_cache_spec.allocate(2, self.device)
        try:
            self._dummy_run(self.max_num_tokens, sample=True)
            self.platform.synchronize()
        finally:
            self.kv_caches = empty
        free, total = self.platform.mem_get_info()
        if xr.device_type() != "TPU":  # the CPU client: host RAM, bounded like the CPU runner's
            useful = self.max_num_reqs * self.max_blocks_per_req + 1  # more could never be used
            budget = min(CPU_KV_CACHE_CAP, free // 2)
            return self._num_kv_blocks_for(budget, "min(4 GiB, half of free RAM)", max_useful=useful)
        peak = self.platform.max_memory_allocated()  # weights + the dummy step (not resettable)
        budget = int(total * self.config.gpu_memory_utilization) - peak
        return self._num_kv_blocks_for(
            budget, f"gpu_memory_utilization={self.config.gpu_memory_utilization} of "
                    f"{total / 2**30:.1f} GiB minus the {peak / 2**30:.1f} GiB peak")

    def capture_model(self) -> None:
        # Every padded forward, then the greedy sampler for every padded count of sampled rows
        # that forward can feed (the base pads sampled rows to a request bucket as well).
        done: set[tuple[int, int]] = set()
        vocab, cands = self.model_config.vocab_size, self.sampling_state.num_candidates
        buckets = self.plan.req_buckets
        for tokens, reqs, _ in step_shapes(self.plan.token_buckets, buckets):
            hidden = self._dummy_run(tokens, reqs)
            top = buckets.index(pad_to(reqs, buckets))
            for rows in buckets[:top + 1]:
                if (hidden.shape[0], rows) in done:
                    continue
                done.add((hidden.shape[0], rows))
                with torch.no_grad():
                    idx = torch.zeros(rows, dtype=torch.int64).to(self.device)
                    logits = self.model.compute_logits(hidden[idx]).float()
                    self.sampler(logits, greedy_metadata(rows, vocab, cands)).sampled_token_ids.cpu()
        self.platform.synchronize()
