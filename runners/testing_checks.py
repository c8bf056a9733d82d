"""Checks the conformance suite (runners.testing) applies, and the reference it compares with.
Each failure names the hook or the request that broke the contract, with the numbers (plain
asserts would be bare here: pytest rewrites asserts in test modules only)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch

from attention.metadata import AttentionMetadata
from attention.torch_ref import TorchAttentionBackend
from platforms import Platform
from runners.base import ModelRunnerBase

MIB = 2**20


def _prefill_md(n: int) -> AttentionMetadata:
    qsl, lens = np.array([0, n], np.int32), np.array([n], np.int32)
    return AttentionMetadata(torch.from_numpy(qsl), torch.from_numpy(lens), torch.zeros(1, 1, dtype=torch.int32),
                             torch.full((n,), -1, dtype=torch.int64), n, n, n, 1, qsl, lens)


@functools.lru_cache(maxsize=None)
def _reference_model(model_dir: str) -> torch.nn.Module:
    from models.loader import load_model

    return load_model(model_dir, torch.float32, torch.device("cpu"), TorchAttentionBackend)


@torch.inference_mode()
def reference_greedy(model_dir: str, prompt: tuple[int, ...], n: int) -> list[int]:
    """n greedy tokens by full recomputation on the CPU in float32 (no paging, no batching)."""
    model = _reference_model(model_dir)
    ids = list(prompt)
    for _ in range(n):
        t = torch.tensor(ids)
        hidden = model(t, torch.arange(len(ids)), [None] * model.config.num_hidden_layers, _prefill_md(len(ids)))
        ids.append(int(model.compute_logits(hidden[-1:]).float().argmax(-1)))
    return ids[len(prompt):]


_MISSING = object()


def _changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    """Attributes added, removed or rebound (an equal scalar written again does not count)."""
    out = set()
    for k in before.keys() | after.keys():
        a, b = before.get(k, _MISSING), after.get(k, _MISSING)
        if a is b or (type(a) is type(b) and isinstance(a, (int, float, str)) and a == b):
            continue
        out.add(k)
    return out


def run_hook(runner: ModelRunnerBase, hook: str, check: Callable[[Any], None] | None = None) -> Any:
    """Call one of the four hooks and ``check`` its result; it may set only its documented
    results (``ModelRunnerBase.HOOK_RESULTS``) and must not replace a method on the instance."""
    name, before = type(runner).__name__, dict(vars(runner))
    result = getattr(runner, hook)()
    if check is not None:
        check(result)
    shadowed = sorted(k for k in vars(runner) if callable(getattr(type(runner), k, None)))
    if shadowed:
        raise AssertionError(f"{name}.{hook}(): the instance attributes {shadowed} replace methods of the "
                             f"class; override a hook instead")
    extra = _changed(before, vars(runner)) - runner.HOOK_RESULTS.get(hook, frozenset())
    if extra:
        allowed = sorted(runner.HOOK_RESULTS.get(hook, ()))
        raise AssertionError(f"{name}.{hook}() set {sorted(extra)}: a hook sets no attribute beyond its "
                             f"documented results ({allowed or 'none'}); what a device wants from the base "
                             f"goes into the DevicePlan that _cache_device_properties() returns")
    return result


def load_and_profile(runner: ModelRunnerBase) -> int:
    """``load_model`` then ``profile_run``, each checked against its contract; the block count."""
    name = type(runner).__name__
    runner.platform.seed_everything(runner.config.seed)

    def has_model(_: None) -> None:
        if not isinstance(runner.model, torch.nn.Module):
            raise AssertionError(f"{name}.load_model() must set self.model to the model on self.device "
                                 f"(self._build_model() loads it); self.model is {runner.model!r}")

    def is_count(n: Any) -> None:
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 2):
            raise AssertionError(f"{name}.profile_run() must return the number of KV blocks, an int >= 2 "
                                 f"(self._num_kv_blocks_for(...) applies the engine overrides); it returned {n!r}")

    run_hook(runner, "load_model", has_model)
    return run_hook(runner, "profile_run", is_count)


def finish_initialize(runner: ModelRunnerBase, num_blocks: int) -> None:
    """The rest of ``initialize()``: the KV cache, then ``capture_model`` (unless eager)."""
    runner.initialize_kv_cache(num_blocks)
    if not runner.config.enforce_eager:
        run_hook(runner, "capture_model")


def check_kv_blocks(runner: ModelRunnerBase, returned: int, expected: int, why: str) -> None:
    """``profile_run`` returned ``expected`` blocks and the cache holds them."""
    name = type(runner).__name__
    if returned != expected:
        raise AssertionError(f"{name}.profile_run() returned {returned} KV blocks; {why} gives {expected}")
    held = {int(kv.shape[1]) for kv in runner.kv_caches}
    if runner.num_kv_blocks != returned or held != {returned}:
        raise AssertionError(f"{name}: profile_run() returned {returned} blocks, but the runner holds "
                             f"num_kv_blocks={runner.num_kv_blocks} and caches of {sorted(held)} blocks")


def assert_tokens(what: str, actual: list[int], expected: list[int]) -> None:
    """Greedy tokens equal the reference's; else both are shown, with the first difference."""
    if actual != expected:
        i = next((i for i, (a, e) in enumerate(zip(actual, expected)) if a != e), min(len(actual), len(expected)))
        raise AssertionError(f"{what}: greedy tokens differ from the reference (the same model recomputing "
                             f"the whole sequence on the CPU) at token {i}\n  expected {expected}\n"
                             f"  actual   {actual}")


class MemoryBudget:
    """A platform seen as a small device: ``budget`` bytes (at most what is really free), of
    which nothing is in use when the view is made. Memory figures count only what was
    allocated since; every other attribute is the wrapped platform's. ``lowest_free`` is the
    least free memory ``mem_get_info`` reported: a KV cache must fit in it."""

    def __init__(self, platform: Platform, budget: int) -> None:
        self._platform = platform
        self.budget = budget
        self._reserved0 = platform.memory_reserved()
        self._allocated0 = platform.memory_allocated()
        self.lowest_free: int | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._platform, name)

    def memory_allocated(self) -> int:
        return max(self._platform.memory_allocated() - self._allocated0, 0)

    def memory_reserved(self) -> int:
        return max(self._platform.memory_reserved() - self._reserved0, 0)

    def max_memory_allocated(self) -> int:
        return max(self._platform.max_memory_allocated() - self._allocated0, 0)

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._platform.mem_get_info()
        free = max(min(free, self.budget - self.memory_reserved()), 0)
        self.lowest_free = free if self.lowest_free is None else min(self.lowest_free, free)
        return free, min(total, self.budget)

    def __repr__(self) -> str:
        return f"MemoryBudget({self._platform!r}, {self.budget / MIB:.0f} MiB)"


def check_sized_within(runner: ModelRunnerBase, view: MemoryBudget, n: int, host_memory: bool) -> None:
    """A KV cache sized without overrides holds one max_model_len request and fits in the
    memory the platform reported free while sizing; in host RAM (``host_memory``) in half of
    it, the rest being the activations', the OS's and other processes' (as the CPU runner does)."""
    name, spec = type(runner).__name__, runner.kv_cache_spec
    if view.lowest_free is None:
        raise AssertionError(f"{name}.profile_run() sized the KV cache ({n} blocks) without asking the platform "
                             f"how much memory is free (platform.mem_get_info())")
    need = -(-runner.max_model_len // spec.block_size) + 1
    if n < need:
        raise AssertionError(f"{name}.profile_run() returned {n} KV blocks, fewer than one request of "
                             f"max_model_len={runner.max_model_len} needs ({need} with the null block)")
    nbytes, share = n * spec.bytes_per_block, 0.5 if host_memory else 1.0
    if nbytes > view.lowest_free * share:
        where = "half of the host RAM" if host_memory else "the memory"
        raise AssertionError(f"{name}.profile_run() sized the KV cache at {n} blocks = {nbytes / MIB:.1f} MiB, more "
                             f"than {where} the platform reported free while sizing ({view.lowest_free / MIB:.1f} "
                             f"MiB of a {view.budget / MIB:.0f} MiB device)")
