"""Stages report metrics through the context (`ctx.log`), and the loop puts them in the round's record:
a selector's as select/<name>, a scorer's as verify/<name> (its mean over the units, on any ranks)."""

import contextlib
from types import SimpleNamespace

from omegaconf import OmegaConf

from selfimprove import loop as loop_module
from selfimprove.checkpoint import write_table
from selfimprove.loop import Loop
from selfimprove.stages import Scorer, Stage


class CountsRows(Scorer):
    name = "counts"

    def score(self, rows, ctx):
        ctx.log("counts/rows", len(rows))
        return [0.0] * len(rows)


class KeepsAll(Stage):
    name = "keeps"

    def __call__(self, rows, ctx):
        ctx.log("kept", len(rows))
        return rows


def _loop_and_round(tmp_path):
    loop = SimpleNamespace(
        cfg=OmegaConf.create({"seed": 0, "sampler": {"batch_size": 4}}), engine=None, task=None
    )
    loop.context = lambda r, *parts: Loop.context(loop, r, *parts)
    r = SimpleNamespace(
        number=1,
        folder=tmp_path,
        phase=lambda name: contextlib.nullcontext(),
        compute={},
        record={},
        parts=SimpleNamespace(scorers=[CountsRows()], selector=KeepsAll()),
    )
    return loop, r


def test_stage_logs_reach_the_round_record(tmp_path, monkeypatch):
    monkeypatch.setattr(loop_module, "summarize_round", lambda rows, examples, scored: {})
    for unit, size in enumerate([2, 2, 1]):  # three sampled units
        rows = [{"prompt_id": f"p{unit}", "sample_idx": i} for i in range(size)]
        write_table(tmp_path / "samples" / f"unit-{unit:05d}.parquet", rows)
    loop, r = _loop_and_round(tmp_path)
    rows = Loop.verify(loop, r)
    assert len(rows) == 5 and r.record == {"verify/counts/rows": 5 / 3}  # the mean over units
    Loop.select(loop, r, rows)
    assert r.record["select/kept"] == 5
    loop, again = _loop_and_round(tmp_path)  # a resumed round: the units are scored already
    Loop.verify(loop, again)
    assert again.record == {"verify/counts/rows": 5 / 3}
