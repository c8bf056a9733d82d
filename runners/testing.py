"""The runner conformance suite, for in-tree devices and out-of-tree backends alike.

Use it from any test module (pytest collects the inherited tests)::

    from runners.testing import RunnerConformance

    class TestMyRunner(RunnerConformance):
        runner_cls = MyRunner
        device = "mydevice"

It drives ``execute_model`` with hand-built ``SchedulerOutput``s - prefill, decode, a
mixed batch, chunked prefill, a prefix-cache hit, preemption and resume - and checks
the greedy tokens against a plain reference (the same model recomputing the whole
sequence each step on the CPU, no KV cache), plus the four-hook contract (each hook's
result checked, failures name the hook; ``_cache_device_properties`` returns the DevicePlan and
no hook sets an attribute beyond its documented results or replaces a method), ``_dummy_run``, KV-cache initialisation, the
engine overrides (``num_kv_blocks``, ``kv_cache_memory_bytes``) and KV sizing without
them on a device of ``kv_sizing_budget`` bytes (the platform seen through ``MemoryBudget``).
"""
from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from engine.config import EngineConfig
from platforms import Platform, resolve_platform
from runners.base import ModelRunnerBase
from runners.plan import DevicePlan
from runners.testing_multimodal import check_multimodal
from runners.testing_steps import StepBuilder
from runners.testing_checks import (MIB, MemoryBudget, assert_tokens, check_kv_blocks, check_sized_within,
                                    finish_initialize, load_and_profile, reference_greedy, run_hook)

HOOKS = frozenset({"_cache_device_properties", "load_model", "profile_run", "capture_model"})


def overridden_names(cls: type) -> set[str]:
    """Methods/properties a class defines itself (dunders aside)."""
    return {n for n, v in vars(cls).items() if not (n.startswith("__") and n.endswith("__"))
            and (callable(v) or isinstance(v, (staticmethod, classmethod, property)))}


class RunnerConformance:
    """Inherit it in a test class and set ``runner_cls`` (and ``device`` if it is not the
    current platform's, or a ``platform`` object). Float32 by default so greedy tokens must
    match the reference exactly; ``engine_args`` adds or overrides engine arguments."""

    runner_cls: ClassVar[type[ModelRunnerBase]]
    device: ClassVar[str | None] = None
    platform: ClassVar[Platform | None] = None  # default: resolved from ``device``
    dtype: ClassVar[str] = "float32"
    engine_args: ClassVar[dict[str, Any]] = {}
    kv_sizing_budget: ClassVar[int] = 256 * MIB  # the small device the sizing test presents
    # Does the KV cache live in host RAM (then it may take half of what is free)? None: the
    # runner's device is the CPU. A stand-in for a device with its own memory sets False.
    kv_in_host_memory: ClassVar[bool | None] = None
    multimodal: ClassVar[bool] = False  # run the image case (runners/testing_multimodal.py)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls) -> str:
        from models.default import default_model_dir

        return default_model_dir()

    @classmethod
    def new_runner(cls, model_dir: str, platform: Any = None, **overrides: Any) -> ModelRunnerBase:
        """A runner of the suite's engine arguments (``engine_args``, then ``overrides``), not started."""
        args = dict(model=model_dir, device=cls.device, dtype=cls.dtype, block_size=16, num_kv_blocks=64,
                    max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256)
        args.update(cls.engine_args)
        args.update(overrides)
        return cls.runner_cls(EngineConfig(**args), platform or cls.platform)

    @pytest.fixture(scope="class")
    @classmethod
    def runner(cls, model_dir: str) -> ModelRunnerBase:
        runner = cls.new_runner(model_dir)
        n = load_and_profile(runner)
        finish_initialize(runner, n)
        forced = runner.config.num_kv_blocks
        if forced is not None:  # the engine override wins over any measurement
            check_kv_blocks(runner, n, forced, f"the engine's num_kv_blocks={forced}")
        return runner

    @pytest.fixture
    def steps(self, runner: ModelRunnerBase):
        builder = StepBuilder(runner)
        yield builder
        for rid in list(builder.blocks):  # leave the runner empty for the next test
            builder.finish(rid)
        runner.execute_model(builder.step())
        assert runner.input_batch.num_active == 0 and not runner.requests, \
            f"finished requests must leave the runner: still holds {sorted(runner.requests)}"

    @staticmethod
    def prompt(seed: int, n: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (n,), generator=g).tolist()

    @staticmethod
    def tokens(out, rid: str) -> list[int]:
        return out.sampled_token_ids[out.req_ids.index(rid)]

    def decode(self, runner, steps, live: dict[str, list[int]], n: int) -> None:
        """n decode steps for every request in ``live`` (id -> generated tokens, appended to)."""
        for _ in range(n):
            cached = [(r, runner.input_batch.num_tokens[runner.requests[r].row] - 1, 1) for r in live]
            out = runner.execute_model(steps.step(cached=cached))
            for rid, toks in live.items():
                toks.extend(self.tokens(out, rid))

    # The contract ---------------------------------------------------------------------
    def test_overrides_only_the_four_hooks(self) -> None:
        for cls in self.runner_cls.__mro__:
            if cls is ModelRunnerBase:
                break
            extra = overridden_names(cls) - HOOKS
            assert not extra, f"{cls.__name__} defines {sorted(extra)} beyond the four hooks"

    def test_device_properties_declare_a_plan(self, model_dir: str) -> None:
        runner = self.new_runner(model_dir)
        plan = run_hook(runner, "_cache_device_properties")
        assert isinstance(plan, DevicePlan) and plan == runner.plan, \
            f"{type(runner).__name__}._cache_device_properties() returned {plan!r}, not the runner's plan {runner.plan!r}"

    def test_kv_cache_initialised_to_spec(self, runner: ModelRunnerBase) -> None:
        spec = runner.get_kv_cache_spec()
        assert len(runner.kv_caches) == spec.num_layers, f"{len(runner.kv_caches)} KV caches for {spec}"
        shape = (2, runner.num_kv_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        for kv in runner.kv_caches:
            assert tuple(kv.shape) == shape and kv.dtype == spec.dtype and kv.device.type == runner.device.type, \
                f"a KV cache is {tuple(kv.shape)} {kv.dtype} on {kv.device}; the spec gives {shape} {spec.dtype}"
        assert spec.bytes_per_block == 2 * spec.num_layers * spec.block_size * spec.num_kv_heads * \
            spec.head_dim * kv.element_size(), f"bytes_per_block={spec.bytes_per_block} disagrees with {spec}"

    def test_dummy_run_leaves_the_cache_untouched(self, runner: ModelRunnerBase) -> None:
        before = [kv[:, 1:].cpu() for kv in runner.kv_caches]  # all but the null block (host copies:
        hidden = runner._dummy_run(37, 5)  # a lazy device clone may alias a buffer the step donates)
        assert hidden.shape[0] >= 37 and hidden.shape[1] == runner.model_config.hidden_size, \
            f"a dummy step of 37 tokens gave hidden states of shape {tuple(hidden.shape)}"
        changed = [i for i, (b, kv) in enumerate(zip(before, runner.kv_caches)) if not torch.equal(b, kv[:, 1:].cpu())]
        assert not changed, f"a dummy step wrote the KV cache of layers {changed} outside the null block"

    # KV sizing ------------------------------------------------------------------------
    def test_kv_cache_memory_bytes_is_honoured(self, model_dir: str) -> None:
        bpb = self.new_runner(model_dir).kv_cache_spec.bytes_per_block  # (a runner not started)
        sized = self.new_runner(model_dir, num_kv_blocks=None, kv_cache_memory_bytes=29 * bpb + bpb // 2)
        n = load_and_profile(sized)
        useful = sized.max_num_reqs * sized.max_blocks_per_req + 1  # a runner may stop there
        if not min(29, useful) <= n <= 29:
            raise AssertionError(f"{type(sized).__name__}.profile_run() returned {n} KV blocks for "
                                 f"kv_cache_memory_bytes={29 * bpb + bpb // 2} (29.5 blocks of {bpb} bytes): "
                                 f"expected 29 (the engine override wins over any measurement)")

    def test_kv_sizing_within_a_small_memory_budget(self, model_dir: str) -> None:
        view = MemoryBudget(self.platform or resolve_platform(self.device), self.kv_sizing_budget)
        sized = self.new_runner(model_dir, view, num_kv_blocks=None)
        try:
            n = load_and_profile(sized)
        except AssertionError:
            raise
        except Exception as e:
            raise AssertionError(f"{type(sized).__name__} cannot size its KV cache on {view}: "
                                 f"{type(e).__name__}: {e}") from e
        host = self.kv_in_host_memory if self.kv_in_host_memory is not None else sized.device.type == "cpu"
        check_sized_within(sized, view, n, host)
        finish_initialize(sized, n)
        check_kv_blocks(sized, n, n, "its own sizing")
        steps, p = StepBuilder(sized), self.prompt(9, 23)  # and the sized cache serves a request
        live = {"a": self.tokens(sized.execute_model(steps.step(new=[("a", p, 0, len(p))])), "a")}
        self.decode(sized, steps, live, 3)
        assert_tokens("a request on the sized KV cache", live["a"], reference_greedy(model_dir, tuple(p), 4))

    # Execution --------------------------------------------------------------------------
    def test_multimodal_images_in_chunks_and_after_preemption(self) -> None:
        """Runners that declare ``multimodal = True``: a Qwen2-VL request whose chunks start and
        end inside its images, beside a text request; then preempted and recomputed."""
        if not self.multimodal:
            pytest.skip(f"{self.runner_cls.__name__}'s suite does not declare multimodal = True")
        check_multimodal(self)

    def test_prefill_then_decode(self, runner, steps, model_dir) -> None:
        p = self.prompt(1, 21)
        out = runner.execute_model(steps.step(new=[("a", p, 0, len(p))]))
        toks = {"a": self.tokens(out, "a")}
        self.decode(runner, steps, toks, 7)
        assert_tokens("prefill then decode", toks["a"], reference_greedy(model_dir, tuple(p), 8))

    def test_mixed_batch_and_chunked_prefill(self, runner, steps, model_dir) -> None:
        pa, pb = self.prompt(2, 9), self.prompt(3, 40)
        out = runner.execute_model(steps.step(new=[("a", pa, 0, len(pa))]))
        live = {"a": self.tokens(out, "a")}
        done = 0
        for chunk in (13, 13, 14):  # b's prompt in three chunks, each beside a's decode
            new = [("b", pb, 0, chunk)] if done == 0 else []
            cached = [("a", len(pa) + len(live["a"]) - 1, 1)] + ([("b", done, chunk)] if done else [])
            out = runner.execute_model(steps.step(new=new, cached=cached))
            live["a"] += self.tokens(out, "a")
            done += chunk
            assert (self.tokens(out, "b") == []) == (done < len(pb)), \
                f"after {done} of {len(pb)} prompt tokens b sampled {self.tokens(out, 'b')}: only a complete " \
                f"prefill samples"
        live["b"] = self.tokens(out, "b")
        self.decode(runner, steps, live, 4)
        assert_tokens("a, decoding beside b's prefill chunks", live["a"],
                      reference_greedy(model_dir, tuple(pa), len(live["a"])))
        assert_tokens("b, prefilled in three chunks", live["b"], reference_greedy(model_dir, tuple(pb), 5))

    def test_prefix_cache_hit(self, runner, steps, model_dir) -> None:
        shared, bs = self.prompt(4, 32), runner.block_size
        pa, pb = shared + self.prompt(5, 6), shared + self.prompt(6, 9)
        out = runner.execute_model(steps.step(new=[("a", pa, 0, len(pa))]))
        hit = steps.blocks["a"][: len(shared) // bs]  # full blocks of the shared prefix
        out = runner.execute_model(steps.step(new=[("b", pb, len(shared), len(pb) - len(shared))],
                                              cached=[("a", len(pa), 1)], shared={"b": hit}))
        live = {"b": self.tokens(out, "b")}
        self.decode(runner, steps, live, 3)
        assert_tokens("b, after a prefix-cache hit", live["b"], reference_greedy(model_dir, tuple(pb), 4))

    def test_preemption_and_resume(self, runner, steps, model_dir) -> None:
        p = self.prompt(7, 19)
        out = runner.execute_model(steps.step(new=[("a", p, 0, len(p))]))
        live = {"a": self.tokens(out, "a")}
        self.decode(runner, steps, live, 3)
        steps.preempt("a")
        runner.execute_model(steps.step())
        assert runner.requests["a"].row is None, "a preempted request gives its row back (and keeps its tokens)"
        n = len(p) + len(live["a"])  # recompute every token (the last sampled one has no KV yet)
        out = runner.execute_model(steps.step(cached=[("a", 0, n)], resumed={"a"}))
        live["a"] += self.tokens(out, "a")
        self.decode(runner, steps, live, 3)
        assert_tokens("a, preempted and resumed", live["a"], reference_greedy(model_dir, tuple(p), 8))

    def test_steps_launched_one_ahead(self, runner, steps, model_dir) -> None:
        """Async scheduling's pattern: each step is launched before the previous one's output is
        read; the runner takes the unread tokens from the device."""
        pa, pb = self.prompt(9, 11), self.prompt(10, 23)
        handle = runner.execute_model_async(steps.step(new=[("a", pa, 0, len(pa)), ("b", pb, 0, len(pb))]))
        computed, live = {"a": len(pa), "b": len(pb)}, {"a": [], "b": []}
        for _ in range(6):
            launched = runner.execute_model_async(steps.step(cached=[(r, computed[r], 1) for r in live]))
            out = handle.result()
            for rid in live:
                live[rid] += self.tokens(out, rid)
                computed[rid] += 1
            handle = launched
        out = handle.result()
        for rid in live:
            live[rid] += self.tokens(out, rid)
        assert_tokens("a, launched one step ahead", live["a"], reference_greedy(model_dir, tuple(pa), 7))
        assert_tokens("b, launched one step ahead", live["b"], reference_greedy(model_dir, tuple(pb), 7))
        assert list(runner.input_batch.tokens(runner.requests["a"].row)[len(pa):]) == live["a"], \
            "the host copy of the tokens was completed once the outputs were read"

    def test_finished_requests_free_their_rows(self, runner, steps) -> None:
        p = self.prompt(8, 5)
        runner.execute_model(steps.step(new=[(r, p, 0, len(p)) for r in ("x", "y", "z")]))
        assert runner.input_batch.num_active == 3, f"3 requests hold {runner.input_batch.num_active} rows"
        steps.finish("x")
        steps.finish("z")
        out = runner.execute_model(steps.step(cached=[("y", len(p), 1)]))
        assert out.req_ids == ["y"] and runner.input_batch.num_active == 1 and set(runner.requests) == {"y"}, \
            f"after x and z finished: rows {runner.input_batch.num_active}, requests {sorted(runner.requests)}, " \
            f"step output {out.req_ids}"
