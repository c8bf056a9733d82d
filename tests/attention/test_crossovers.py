"""The per-step routing rule, the crossover table and fitting thresholds from timings."""
import json

import pytest
import torch

from attention.crossovers import (ROLE_RULE, Crossover, StepShape, choose_route, crossover_for,
                                  family_key, fit_crossover, load_table)

XO = Crossover(prefill_min_query_len=512, split_min_decode_tokens=4)


@pytest.mark.parametrize("shape,route", [
    (StepShape(64, 0, 0), "decode"),  # pure decode
    (StepShape(0, 0, 0), "decode"),
    (StepShape(64, 1000, 4), "decode"),  # 250-token rows on average: below 512
    (StepShape(64, 2048, 4), "split"),
    (StepShape(3, 2048, 4), "prefill"),  # too few decodes to be worth a second kernel
    (StepShape(0, 8192, 2), "prefill"),
    (StepShape(0, 511, 1), "decode"),
])
def test_choose_route(shape: StepShape, route: str) -> None:
    assert choose_route(shape, XO) == route


def test_role_rule_sends_every_row_to_its_role() -> None:
    assert choose_route(StepShape(1, 2, 1), ROLE_RULE) == "split"
    assert choose_route(StepShape(0, 2, 1), ROLE_RULE) == "prefill"
    assert choose_route(StepShape(5, 0, 0), ROLE_RULE) == "decode"


def test_table_lookup(tmp_path) -> None:
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"_doc": "comment", "sm90": {
        "decode": "triton", "prefill": "flash", "prefill_min_query_len": 300,
        "split_min_decode_tokens": 8, "source": "test"}}))
    assert crossover_for("sm90", "triton", "flash", str(path)) == Crossover(300, 8, "test")
    assert crossover_for("sm90", "triton", "torch", str(path)) is ROLE_RULE  # other kernels
    assert crossover_for("sm100", "triton", "flash", str(path)) is ROLE_RULE  # no entry
    assert crossover_for(None, "triton", "flash", str(path)) is ROLE_RULE
    assert family_key(torch.device("cpu")) is None


def test_shipped_table_says_where_its_numbers_come_from() -> None:
    table = load_table()
    entry = table["sm90"]
    assert (entry["decode"], entry["prefill"]) == ("triton", "flash")
    assert "gpu_attention_crossover.py" in entry["source"] and "gpu_attention_e2e.py" in entry["source"]
    for e in table.values():
        assert e["prefill_min_query_len"] >= 2 and e["split_min_decode_tokens"] >= 1


def _timed(dec: int, pre: int, reqs: int, **t) -> tuple[StepShape, dict]:
    return StepShape(dec, pre, reqs), t


def test_fit_recovers_the_crossovers_of_synthetic_timings() -> None:
    cases = [  # prefill kernel wins from 1024-token rows; splitting pays from 16 decodes
        _timed(0, 4096, 64, decode=1.0, prefill=1.5),  # 64-token rows
        _timed(0, 4096, 16, decode=1.0, prefill=1.2),  # 256
        _timed(0, 4096, 4, decode=1.0, prefill=0.7),  # 1024
        _timed(0, 8192, 2, decode=2.0, prefill=1.0),  # 4096
        _timed(4, 4096, 1, decode=2.0, prefill=1.0, split=1.1),
        _timed(16, 4096, 1, decode=2.2, prefill=1.3, split=1.1),
        _timed(64, 4096, 1, decode=2.5, prefill=1.8, split=1.2),
        _timed(64, 1024, 16, decode=1.0, prefill=1.6, split=1.5),  # 64-token rows: decode kernel
    ]
    xo = fit_crossover(cases, "synthetic")
    assert (xo.prefill_min_query_len, xo.split_min_decode_tokens) == (1024, 16)
    assert all(choose_route(s, xo) == min(t, key=t.get) for s, t in cases)


def test_fit_can_say_never() -> None:
    cases = [_timed(0, 4096, 1, decode=1.0, prefill=1.1), _timed(8, 4096, 1, decode=1.0, prefill=1.2, split=1.3)]
    xo = fit_crossover(cases, "decode kernel everywhere")
    assert choose_route(StepShape(0, 1 << 20, 1), xo) == "decode"
