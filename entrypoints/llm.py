"""The offline API: ``LLM(model).generate(prompts)``: the scheduler loop over an executor's workers."""
from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Any, Iterable, Sequence

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.executor import Executor, WorkerError, WorkerInfo
from engine.logprobs import LogprobsBuilder, record_prompt_logprobs
from engine.outputs import CompletionOutput, ModelRunnerOutput, RequestMetrics, RequestOutput, SchedulerOutput
from engine.parallel_sampling import merge_samples
from engine.prompts import normalize_prompts, token_ids
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from entrypoints.llm_frontend import LLMFrontend, OnText, check_params
from entrypoints.stats import GenerationStats
from entrypoints.model_files import load_tokenizer
from entrypoints.multimodal import ImageInputs
from models.config import ModelConfig


class LLM(LLMFrontend):
    """Starts the workers through an executor (``distributed_executor_backend``), sizes the KV
    cache, and runs the scheduler loop. ``model=None`` is the embedded tiny default model.

    With ``tensor_parallel_size > 1`` the default executor spawns one process per rank: a script
    that builds an ``LLM`` must then guard its top level with ``if __name__ == "__main__":``
    (Python's spawn start method re-imports it). ``shutdown()`` (or ``with LLM(...) as llm:``)
    stops the workers; garbage collection and interpreter exit do too.
    """

    def __init__(self, model: str | None = None, device: str | None = None, dtype: str = "auto",
                 **engine_args: object) -> None:
        self.config = EngineConfig.from_kwargs(model=model, device=device, dtype=dtype, **engine_args)
        if self.config.model is None:
            from models.default import default_model_dir  # built once, here, before any worker starts

            self.config.model = default_model_dir()
        self.model_config = ModelConfig.from_dir(self.config.model)
        self.model_config.check_tensor_parallel(self.config.tensor_parallel_size)
        from workers import get_executor_cls

        self.executor: Executor = get_executor_cls(self.config.executor_backend)(self.config)
        try:
            self.info: WorkerInfo = self.executor.initialize()
        except BaseException:
            self.executor.shutdown()
            raise
        self.config.max_model_len = self.info.max_model_len
        if self.config.async_scheduling is None:  # auto: where it was measured to pay (any executor overlaps)
            self.config.async_scheduling = self.info.platform == "cuda"
        self.num_kv_blocks = self.info.num_kv_blocks
        self.tokenizer = load_tokenizer(self.config.model)
        self.scheduler = Scheduler(self.config, self.num_kv_blocks)
        self._ids = itertools.count()
        self.stats = GenerationStats()
        self._aborts: deque[str] = deque()  # ids to abort at the next step boundary
        self._pending: tuple | None = None  # async scheduling: the launched step not yet applied
        self._last_applied = 0.0
        self._samples: dict[str, list[str]] = {}  # a prompt's request id -> its samples' (n > 1)
        self._stream_targets: dict[str, tuple[int, int]] = {}  # request id -> (prompt, sample) for on_text
        self._on_text: OnText | None = None
        self._chat_template = None
        self._logprobs = LogprobsBuilder(self.tokenizer)
        self._warned_truncation = False  # max_tokens cut by max_model_len: reported once per engine
        self._image_inputs = ImageInputs(self.model_config)  # images -> placeholders, pixels (lazy)
        self._generating = False

    @property
    def runner(self) -> Any:
        """The model runner, where it lives in this process (the "uni" and "external_launcher"
        executors); the "mp" executor's runners are in the worker processes."""
        runner = getattr(self.executor, "runner", None)
        if runner is None:
            raise AttributeError("no model runner in this process: the 'mp' executor's live in its worker "
                                 "processes, and a shut-down engine has none")
        return runner

    def shutdown(self) -> None:
        """Stop the workers (idempotent); the object cannot generate afterwards."""
        self.executor.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(self, prompts: Sequence[str | Sequence[int] | dict],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None, *, on_text: OnText | None = None) -> list[RequestOutput]:
        """Complete every prompt; results come back in input order, one ``RequestOutput`` per
        prompt holding its ``n`` samples. ``on_text(prompt index, sample index, text)`` is called
        with each piece of text as it is generated (text that may still turn into a stop string
        is held back until it cannot).

        Every prompt is checked before any is queued (errors name its index). If anything
        raises inside (Ctrl-C included), the call's requests are aborted in the scheduler and
        the runner, their KV blocks return to the pool, and the exception propagates: the
        next call works as on a fresh object (same outputs for greedy and seeded requests).
        """
        prompts = normalize_prompts(prompts)
        requests, per_request_prompts, parents = self._make_requests(
            prompts, SamplingParams.broadcast(sampling_params, len(prompts)))
        self._generating, self._on_text = True, on_text
        try:
            outs = iter(self._generate(requests, per_request_prompts, use_tqdm))
            return [merge_samples(parent, [next(outs) for _ in range(n)]) for parent, n in parents]
        except BaseException as e:
            self._recover([r.request_id for r in requests], e)
            raise
        finally:
            self._generating, self._on_text = False, None
            self._samples.clear()
            self._stream_targets.clear()

    def _generate(self, requests: list[Request], prompts: list[str | list[int]],
                  use_tqdm: bool | None) -> list[RequestOutput]:
        for r in requests:
            self.scheduler.add_request(r)
        detoks = {r.request_id: self._new_detokenizer(r) for r in requests} if self.tokenizer is not None else {}
        bar = None
        if use_tqdm or (use_tqdm is None and len(requests) > 1):
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        self.stats = stats = GenerationStats()
        t_start = time.perf_counter()
        metrics = {r.request_id: RequestMetrics(t_start) for r in requests}
        step = self._step_async if self.config.async_scheduling else self._step
        try:
            while self.scheduler.has_unfinished_requests() or self._pending is not None:
                finished = step(detoks, stats, metrics) + len(self._apply_aborts())
                if bar is not None and finished:
                    bar.update(finished)
            if self.scheduler.has_finished_requests():  # let the runner free their state now
                self._flush()
        finally:
            if bar is not None:
                bar.close()
        stats.seconds = time.perf_counter() - t_start
        return [self._output(r, detoks.get(r.request_id), p, metrics[r.request_id])
                for r, p in zip(requests, prompts)]

    def _schedule(self) -> tuple[SchedulerOutput, int]:
        """The next step and how many of its tokens are prompt tokens (for the stats)."""
        so = self.scheduler.schedule()
        if so.total_num_scheduled_tokens == 0 and not so.finished_req_ids and self._pending is None:
            raise RuntimeError("the scheduler made no progress with requests still unfinished")
        prefill = 0
        for rid, n in so.num_scheduled_tokens.items():
            req = self.scheduler.get_request(rid)
            todo = req.num_prompt_tokens - (req.num_computed_tokens - n)
            prefill += min(max(todo, 0), n)
        return so, prefill

    def _step(self, detoks: dict[str, IncrementalDetokenizer], stats: GenerationStats,
              metrics: dict[str, RequestMetrics]) -> int:
        """One step: schedule, run, apply its output."""
        so, prefill = self._schedule()
        t = time.perf_counter()
        return self._apply(so, prefill, t, self.executor.execute_model(so), detoks, stats, metrics)

    def _step_async(self, detoks: dict[str, IncrementalDetokenizer], stats: GenerationStats,
                    metrics: dict[str, RequestMetrics]) -> int:
        """Async scheduling: schedule and launch step n+1, then apply step n's output, so the host
        prepares the next step while the device runs this one."""
        launched = None
        if self.scheduler.has_unfinished_requests():
            so, prefill = self._schedule()
            launched = (so, prefill, time.perf_counter(), self.executor.execute_model_async(so))
        pending, self._pending = self._pending, launched
        if pending is None:
            return 0
        so, prefill, t, handle = pending
        return self._apply(so, prefill, max(t, self._last_applied), handle.result(), detoks, stats, metrics)

    def _apply(self, so: SchedulerOutput, prefill: int, t: float, out: ModelRunnerOutput,
               detoks: dict[str, IncrementalDetokenizer], stats: GenerationStats,
               metrics: dict[str, RequestMetrics]) -> int:
        """Apply one step's output: scheduler, metrics, logprobs, detokenizer and stop strings."""
        finished = self.scheduler.update_from_output(so, out)
        accepted = self.scheduler.last_accepted
        record_prompt_logprobs(self.scheduler, out)
        now = self._last_applied = time.perf_counter()
        dt = now - t
        stats.steps += 1
        if prefill:
            stats.prefill_tokens += prefill
            stats.prefill_seconds += dt
        else:
            stats.decode_tokens += so.total_num_scheduled_tokens
            stats.decode_seconds += dt
        stopped = []
        for i, rid in enumerate(out.req_ids):
            toks = out.sampled_token_ids[i]
            if not toks or rid not in accepted:
                continue  # a partial prefill, or a late token of a request that had ended
            stats.output_tokens += len(toks)
            m = metrics[rid]
            if m.first_token_time is None:
                m.first_token_time = now
            m.last_token_time = now
            m.num_output_tokens += len(toks)
            req = self.scheduler.get_request(rid)
            if out.logprobs is not None and out.logprobs[i] is not None:
                req.logprobs.append(out.logprobs[i])
            detok = detoks.get(rid)
            if detok is not None:
                detok.update(toks)
                if not req.status.finished and detok.stop_string is not None:
                    req.stop_reason = detok.stop_string
                    stopped.append(rid)
        if stopped:
            self.scheduler.finish_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return len(finished) + len(stopped)

    def abort(self, request_ids: str | Iterable[str]) -> list[str]:
        """Abort requests by id (``RequestOutput.request_id``): they finish with finish_reason
        "abort", the scheduler, the executor and the runner drop them, and their KV blocks return
        to the pool (full blocks stay in the prefix cache). Unknown or finished ids are ignored.
        Called while ``generate`` runs (from inside a step, or another thread), the ids are
        applied at the next step boundary; returns the ids aborted now."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._aborts.extend(s for rid in ids for s in self._samples.get(rid, (rid,)))  # a prompt's samples
        return [] if self._generating else self._apply_aborts(flush=True)

    def _apply_aborts(self, flush: bool = False) -> list[str]:
        ids = []
        while self._aborts:
            ids.append(self._aborts.popleft())
        aborted = self.scheduler.abort_requests(ids)
        if aborted and flush:
            self._flush()
        return aborted

    def _flush(self) -> None:
        """One step that schedules nothing: the runner drops the requests that ended."""
        so = self.scheduler.drain_finished()
        self.scheduler.update_from_output(so, self.executor.execute_model(so) or ModelRunnerOutput([], []))

    def _recover(self, request_ids: list[str], exc: BaseException) -> None:
        """After an exception inside ``generate``: abort its requests everywhere, keep what is valid."""
        self._pending = None
        self.scheduler.discard_step()  # the steps cut short: their outcome is unknown
        self.scheduler.abort_requests(request_ids)
        self.scheduler.repair()  # an interrupt inside the block manager strands no block
        self._aborts.clear()
        if isinstance(exc, WorkerError):
            return  # the executor is shut down: nothing to tell the workers
        try:
            self._flush()
        except BaseException:  # noqa: BLE001 - e.g. a second Ctrl-C; the original exception propagates
            self.scheduler.discard_step()  # the next step tells the runner instead

    def _make_request(self, prompt: str | list[int], params: SamplingParams, index: int = 0,
                      request_id: str | None = None) -> Request:
        """Tokenize and check one prompt (errors name its index) and its sampling params."""
        check_params(params, index)
        mm_data = None
        if isinstance(prompt, dict):
            mm_data, prompt = prompt.get("multi_modal_data"), prompt.get("prompt", prompt.get("prompt_token_ids"))
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index}: model {self.config.model!r} has no tokenizer.json: "
                                 f"pass token ids")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = token_ids(prompt, index)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {index}: token ids must be in [0, {vocab}) (the vocabulary); got {bad[:5]}")
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        ids, mm_inputs = self._image_inputs(ids, mm_data, index)
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"prompt {index} has {len(ids)} tokens; max_model_len={self.config.max_model_len} "
                             "leaves no room to generate")
        self._warn_if_truncated(params, len(ids), index)
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, self.model_config.eos_token_ids,
                      mm_inputs=mm_inputs)
        try:
            self.scheduler.check_request(req)  # e.g. one that can never fit the KV pool
        except ValueError as e:
            raise ValueError(f"prompt {index}: {e}") from None
        return req

    def _output(self, req: Request, detok: IncrementalDetokenizer | None, prompt: str | list[int],
                metrics: RequestMetrics) -> RequestOutput:
        text = ""
        if detok is not None:
            detok.finish()  # flush a held-back tail (e.g. max_tokens cut a character short)
            text = detok.output_text
        tokens = list(req.output_token_ids)
        lp = cumulative = None
        if req.sampling_params.logprobs is not None:
            lp, cumulative = self._logprobs.build_all(req.logprobs[:len(tokens)])
        comp = CompletionOutput(0, text, tokens, req.status.finish_reason, req.stop_reason, lp, cumulative)
        plp = None
        if req.prompt_logprobs is not None:
            plp = [None] + [None if e is None else self._logprobs.build(e) for e in req.prompt_logprobs[1:]]
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt")
        return RequestOutput(req.request_id, prompt if isinstance(prompt, str) else None,
                             req.prompt_token_ids, [comp], req.status.finished,
                             max(req.num_cached_tokens, 0), metrics, plp)

