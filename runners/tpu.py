"""TPURunner: torch_xla, the model compiled with ``torch.compile(backend="openxla")``, and
every step padded to a (token bucket, request bucket) shape that ``capture_model`` compiles
once, so serving greedy requests never compiles. Runs on XLA's CPU client with
``PJRT_DEVICE=CPU``; torch_xla is imported only by the hooks."""
from __future__ import annotations

import time

import torch

from runners.base import ModelRunnerBase
from runners.inputs import pad_to, power_of_two_buckets
from runners.sampling_metadata import SamplingMetadata

MIN_TOKEN_BUCKET = 16
MIN_REQ_BUCKET = 8  # fewer request buckets, fewer graphs; padded rows cost little
CPU_KV_CACHE_CAP = 4 * 2**30  # the CPU client shares host RAM, as on the CPU runner


def step_shapes(token_buckets: list[int], req_buckets: list[int]) -> list[tuple[int, int, bool]]:
    """One (num_tokens, num_reqs, pure_decode) per padded step shape that can occur.

    A step of n tokens over k <= n requests pads to (bucket(n), bucket(k)); pure decodes
    (n == k) attend with ``max_query_len`` 1, mixed steps with the padded token count, so
    they are distinct graphs. Each tuple is a step that pads to its shape.
    """
    shapes, t_lo = [], 0
    for t in token_buckets:
        r_lo = 0
        for r in req_buckets:
            if min(r, t - 1) > r_lo:  # mixed: the most requests below t tokens, within (r_lo, r]
                shapes.append((t, min(r, t - 1), False))
            if min(t, r) > max(t_lo, r_lo):  # pure decode: n == k inside both ranges
                shapes.append((min(t, r), min(t, r), True))
            r_lo = r
        t_lo = t
    return shapes


def greedy_metadata(num_rows: int, vocab_size: int, num_candidates: int) -> SamplingMetadata:
    """What ``SamplingState.prepare`` builds for ``num_rows`` greedy rows without penalties,
    logprobs or min_tokens: the sampler then runs argmax only."""
    return SamplingMetadata(num_rows, vocab_size, num_rows, None, num_candidates, None, None, None, None)


class TPURunner(ModelRunnerBase):
    def _cache_device_properties(self) -> None:
        import torch_xla.runtime as xr

        self.device_kind = xr.device_type()  # "TPU", or "CPU" for the host client
        self.num_devices = xr.global_runtime_device_count()
        self.persistent_buffers = False  # fresh uploads: updating a device buffer in place is traced
        self.use_inference_mode = False  # torch_xla cannot view a weight inside inference_mode
        self.token_buckets = power_of_two_buckets(self.max_num_tokens, min(MIN_TOKEN_BUCKET, self.max_num_tokens))
        self.req_buckets = power_of_two_buckets(self.max_num_reqs, min(MIN_REQ_BUCKET, self.max_num_reqs))
        self.step_shapes = step_shapes(self.token_buckets, self.req_buckets)
        self.compile_seconds = 0.0

    def load_model(self) -> None:
        self.model = self._build_model()
        if not self.config.enforce_eager:  # eager: XLA's lazy tensors trace every step instead
            import torch._dynamo.config as dynamo_config

            # One dynamo graph per step shape, + the profile step; the default limit is 8.
            key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), 2 * len(self.step_shapes) + 8))
            self.model.compile(backend="openxla", fullgraph=True, dynamic=False)

    def profile_run(self) -> int:
        # The serving path (KV cache present, so on a TPU the Pallas kernel) over a throwaway
        # two-block cache: dummy steps read and write only the null block.
        self.kv_caches = self.kv_cache_spec.allocate(2, self.device)
        self._dummy_run(self.max_num_tokens, sample=True)
        self.platform.synchronize()
        self.kv_caches = []
        free, total = self.platform.mem_get_info()
        if self.device_kind != "TPU":  # the CPU client: host RAM, bounded like the CPU runner's
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
        start, done = time.perf_counter(), set()
        vocab, cands = self.model_config.vocab_size, self.sampling_state.num_candidates
        for tokens, reqs, _ in self.step_shapes:
            hidden = self._dummy_run(tokens, reqs)
            top = self.req_buckets.index(pad_to(reqs, self.req_buckets))
            for rows in self.req_buckets[:top + 1]:
                if (hidden.shape[0], rows) in done:
                    continue
                done.add((hidden.shape[0], rows))
                with torch.no_grad():
                    idx = torch.zeros(rows, dtype=torch.int64).to(self.device)
                    logits = self.model.compute_logits(hidden[idx]).float()
                    self.sampler(logits, greedy_metadata(rows, vocab, cands)).sampled_token_ids.cpu()
        self.platform.synchronize()
        self.compile_seconds = time.perf_counter() - start
