"""``StepBuilder``: hand-built ``SchedulerOutput``s for the conformance suite (runners.testing): it
hands out KV blocks and writes new, cached, finished and preempted requests as a scheduler would."""
from __future__ import annotations

from engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from engine.sampling_params import SamplingParams
from runners.base import ModelRunnerBase

GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)


class StepBuilder:
    """Hands out blocks and writes SchedulerOutputs the way a scheduler would."""

    def __init__(self, runner: ModelRunnerBase) -> None:
        self.bs = runner.block_size
        self.free = list(range(runner.num_kv_blocks - 1, 0, -1))  # block 0 is the null block
        self.blocks: dict[str, list[int]] = {}
        self.known: set[str] = set()
        self.finished: set[str] = set()
        self.preempted: set[str] = set()

    def _grow(self, rid: str, upto: int) -> list[int]:
        have = self.blocks.setdefault(rid, [])
        new = [self.free.pop() for _ in range(-(-upto // self.bs) - len(have))]
        have.extend(new)
        return new

    def step(self, new: list[tuple[str, list[int], int, int]] = (), cached: list[tuple[str, int, int]] = (),
             shared: dict[str, list[int]] | None = None, resumed: set[str] = frozenset(),
             images: dict[str, tuple] | None = None) -> SchedulerOutput:
        """new: (id, prompt, num_computed, num_tokens); cached: (id, num_computed, num_tokens).
        ``shared[id]`` gives a new request's prefix blocks (a cache hit) before its own;
        ``images[id]`` a new request's ``MultiModalInput``s."""
        news, cd, sched = [], CachedRequestData(), {}
        for rid, prompt, computed, n in new:
            self.blocks[rid] = list((shared or {}).get(rid, []))
            self._grow(rid, computed + n)
            news.append(NewRequestData(rid, list(prompt), GREEDY, list(self.blocks[rid]), computed,
                                       (images or {}).get(rid, ())))
            self.known.add(rid)
            sched[rid] = n
        for rid, computed, n in cached:
            if rid in resumed:
                self.blocks[rid] = []
                self._grow(rid, computed + n)
                blocks = list(self.blocks[rid])
            else:
                blocks = self._grow(rid, computed + n)
            cd.req_ids.append(rid)
            cd.resumed_from_preemption.append(rid in resumed)
            cd.new_block_ids.append(blocks)
            cd.num_computed_tokens.append(computed)
            sched[rid] = n
        out = SchedulerOutput(news, cd, sched, sum(sched.values()), self.finished, self.preempted)
        self.finished, self.preempted = set(), set()
        return out

    def finish(self, rid: str) -> None:
        self.free.extend(self.blocks.pop(rid))
        self.finished.add(rid)

    def preempt(self, rid: str) -> None:
        self.free.extend(self.blocks.pop(rid))
        self.preempted.add(rid)
