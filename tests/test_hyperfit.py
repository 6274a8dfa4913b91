"""Hyperfitting (Carlsson et al. 2412.04318): the passages selector, and that the recipe trains on the
same passages every round with a falling loss (tiny model, in-process)."""

import json
import signal
from types import SimpleNamespace

import pytest
from conftest import cfg_of, reset_accelerate
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.checkpoint import read_table
from selfimprove.compose import check
from selfimprove.config import ModelConfig
from selfimprove.select import DittoSequences, TaskDocuments
from selfimprove.stages import Context
from selfimprove.tasks import ArithmeticTask, TextTask

TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank. She had peeped into"
    " the book her sister was reading! It had no pictures or conversations in it."
)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(OmegaConf.structured(ModelConfig(kind="tiny")))


def test_documents_one_row_per_passage(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    # two samples of one prompt, one of another: one row per distinct prompt (source=task)
    rows = [
        {"prompt_id": "a", "prefill": TEXT[:30], "target": TEXT[30:], "completion": "x"},
        {"prompt_id": "a", "prefill": TEXT[:30], "target": TEXT[30:], "completion": "y"},
        {"prompt_id": "b", "prefill": TEXT[:10], "target": TEXT[10:], "completion": "z"},
    ]
    ctx = Context(engine=SimpleNamespace(tokenizer=tokenizer), task=None, seed=0)
    out = TaskDocuments(max_tokens=16)(rows, ctx)
    assert [r["prompt_id"] for r in out] == ["a", "b"] and {r["source"] for r in out} == {"real"}
    assert out[0]["prompt_ids"] == ids[:1] and out[0]["completion_ids"] == ids[1:16]  # cut at 16 in all
    assert ctx.logged == {"documents": 2, "document_tokens": 30}
    # the whole passage when it is shorter than max_tokens
    assert TaskDocuments(max_tokens=4096)(rows[:1], ctx)[0]["completion_ids"] == ids[1:]
    # DITTO's MLE row is this selector's row
    ditto = DittoSequences(max_tokens=64)(rows[:1], ctx)
    assert {k: ditto[0][k] for k in ("prompt_ids", "completion_ids")} == {
        k: TaskDocuments(max_tokens=64)(rows[:1], ctx)[0][k] for k in ("prompt_ids", "completion_ids")
    }
    samples = TaskDocuments(source="samples", max_tokens=64)
    assert samples.reads == ("prefill", "completion")
    assert samples(rows[2:], ctx)[0]["source"] == "policy"


def test_documents_refusals():
    with pytest.raises(ValueError, match="task\\|samples"):
        TaskDocuments(source="other")
    with pytest.raises(ValueError, match="max_tokens >= 4"):
        TaskDocuments(max_tokens=2)
    with pytest.raises(ValueError, match="needs a text task"):
        TaskDocuments().check(ArithmeticTask())
    TaskDocuments().check(TextTask())  # an open-ended task serves its documents


def test_recipe_trains_on_the_same_passages_each_round(tmp_path):
    from selfimprove.loop import run

    run_dir = tmp_path / "run"
    cfg = cfg_of(
        "loop.rounds=2",
        "loop.prompts_per_round=4",
        "trainer.steps_per_round=6",
        "trainer.micro_batch_size=4",  # every step: all 4 passages
        "trainer.lr=3e-3",  # the random 2-layer model needs more than the recipe's 3e-4
        "selector.max_tokens=32",
        "eval.before=false",
        "eval.n_problems=2",
        "eval.batch_size=2",
        "eval.max_new_tokens=4",
        f"run.dir={run_dir}",
        recipe="hyperfit",
    )
    assert cfg.loop.same_prompts and not cfg.trainer.lora and cfg.trainer.weight_decay == 0
    check(cfg)
    reset_accelerate()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        run(cfg)
    finally:  # the loop installs its preemption handlers: give pytest its own back
        for s, h in handlers.items():
            signal.signal(s, h)
    prompts = [
        sorted(
            r["prefill"]
            for r in read_table(run_dir / "rounds" / f"r{n:04d}" / "samples" / "unit-00000.parquet")
        )
        for n in (1, 2)
    ]
    assert len(set(prompts[0])) == 4 and prompts[0] == prompts[1]  # round 2 trains on round 1's passages
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 12 and all(x["train/examples"] == 4 for x in lines if "train/loss" in x)
    # the same 4 passages every step: the loss falls step after step, across the rounds too
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.75 * losses[0], losses
    record = json.loads((run_dir / "rounds" / "r0002" / "metrics.json").read_text())
    assert record["select/documents"] == 4 and "eval/rep_4" in record and "eval/perplexity" in record
