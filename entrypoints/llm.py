"""The offline API: ``LLM(model).generate(prompts)``: the scheduler loop over an executor's workers."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, Sequence

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.executor import Executor, WorkerInfo
from engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.tokenizer import load_tokenizer
from models.config import ModelConfig


@dataclass
class GenerationStats:
    """Figures of the last ``generate`` call. A step with any prefill token counts as prefill."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    output_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


class LLM:
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
        self.num_kv_blocks = self.info.num_kv_blocks
        self.tokenizer = load_tokenizer(self.config.model)
        self.scheduler = Scheduler(self.config, self.num_kv_blocks)
        self._ids = itertools.count()
        self.stats = GenerationStats()

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

    def generate(self, prompts: Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Complete every prompt; results come back in input order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = SamplingParams.broadcast(sampling_params, len(prompts))
        requests = [self._make_request(p, sp) for p, sp in zip(prompts, params)]  # all checked first
        for r in requests:
            self.scheduler.add_request(r)
        detoks = {r.request_id: IncrementalDetokenizer(self.tokenizer, r.prompt_token_ids, r.sampling_params)
                  for r in requests} if self.tokenizer is not None else {}
        bar = None
        if use_tqdm or (use_tqdm is None and len(requests) > 1):
            from tqdm import tqdm

            bar = tqdm(total=len(requests), desc="generate", unit="req")
        self.stats = stats = GenerationStats()
        t_start = time.perf_counter()
        metrics = {r.request_id: RequestMetrics(t_start) for r in requests}
        try:
            while self.scheduler.has_unfinished_requests():
                finished = self._step(detoks, stats, metrics)
                if bar is not None and finished:
                    bar.update(finished)
            if self.scheduler.has_finished_requests():  # let the runner free their state now
                self.executor.execute_model(self.scheduler.schedule())
        finally:
            if bar is not None:
                bar.close()
        stats.seconds = time.perf_counter() - t_start
        return [self._output(r, detoks.get(r.request_id), p, metrics[r.request_id])
                for r, p in zip(requests, prompts)]

    def _step(self, detoks: dict[str, IncrementalDetokenizer], stats: GenerationStats,
              metrics: dict[str, RequestMetrics]) -> int:
        so = self.scheduler.schedule()
        if so.total_num_scheduled_tokens == 0 and not so.finished_req_ids:
            raise RuntimeError("the scheduler made no progress with requests still unfinished")
        prefill = 0
        for rid, n in so.num_scheduled_tokens.items():
            req = self.scheduler.get_request(rid)
            todo = req.num_prompt_tokens - (req.num_computed_tokens - n)
            prefill += min(max(todo, 0), n)
        t = time.perf_counter()
        out = self.executor.execute_model(so)
        finished = self.scheduler.update_from_output(so, out)
        now = time.perf_counter()
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
            if not toks:
                continue
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

    def _make_request(self, prompt: str | list[int], params: SamplingParams) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"model {self.config.model!r} has no tokenizer.json: pass token ids")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = list(prompt)
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if not ids:
            raise ValueError("a prompt is empty")
        if len(ids) >= self.config.max_model_len:
            raise ValueError(f"a prompt has {len(ids)} tokens; max_model_len={self.config.max_model_len} "
                             "leaves no room to generate")
        return Request(f"req-{next(self._ids)}", ids, params, self.model_config.eos_token_ids)

    def _output(self, req: Request, detok: IncrementalDetokenizer | None, prompt: str | list[int],
                metrics: RequestMetrics) -> RequestOutput:
        text = ""
        if detok is not None:
            detok.finish()  # flush a held-back tail (e.g. max_tokens cut a character short)
            text = detok.output_text
        tokens = list(req.output_token_ids)
        lp = list(req.logprobs) if req.sampling_params.logprobs is not None else None
        comp = CompletionOutput(0, text, tokens, req.status.finish_reason, req.stop_reason, lp)
        return RequestOutput(req.request_id, prompt if isinstance(prompt, str) else None,
                             req.prompt_token_ids, [comp], req.status.finished,
                             max(req.num_cached_tokens, 0), metrics)
