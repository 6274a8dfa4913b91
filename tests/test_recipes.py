"""Every shipped recipe runs one round end to end (sample, verify, select, update, checkpoint, evaluate)
on the tiny model, in-process and at the smallest size that still takes an optimizer step.

The random tiny model never writes a number, so every answer would be None, every group would agree
on nothing and every oracle row would be wrong: each selector would drop everything and the update
would never run. The arithmetic task's checker is therefore replaced by a coarse one (the answer is
the completion's length mod 2, "0" counts as correct): groups then agree in part and some answers are
right, which is all the selectors need to hand rows to the update.
"""

import json
from pathlib import Path

import pytest
from conftest import cfg_of, run_loop

from selfimprove.compose import check
from selfimprove.tasks import ArithmeticTask, RandomCalculationTask

RECIPES = sorted(p.stem for p in (Path(__file__).parents[1] / "recipes").glob("*.yaml"))
SMALL = [
    "loop.rounds=1",
    "loop.prompts_per_round=2",
    "sampler.n=4",  # the fewest for a 3-of-4 majority (consistency_sft) and mixed groups
    "sampler.batch_size=16",
    "sampler.max_new_tokens=4",
    "trainer.steps_per_round=1",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=1",
    "eval.before=false",
    "eval.every=1",
    "eval.n_problems=2",
    "eval.k=0",
    "eval.batch_size=4",
    "eval.max_new_tokens=4",
]
# What a recipe needs beyond SMALL to run here, and why.
EXTRA = {
    "label_free_dev50": ["eval.dev_problems=2"],  # its 50 dev problems, cut like eval.n_problems
    "label_free": ["eval.unlabelled_problems=2"],  # its 64 unlabelled prompts, cut the same way
    "label_free_views": ["eval.unlabelled_problems=2"],
    "math_label_free": ["eval.unlabelled_problems=2"],
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_round(recipe, tmp_path, monkeypatch):
    for task in (ArithmeticTask, RandomCalculationTask):  # the math recipes' task grades its own way
        monkeypatch.setattr(task, "extract_answer", lambda self, completion: str(len(completion) % 2))
        monkeypatch.setattr(task, "reward", lambda self, completion, problem: float(len(completion) % 2 == 0))

    run_dir = tmp_path / "run"
    cfg = cfg_of(*SMALL, *EXTRA.get(recipe, []), f"run.dir={run_dir}", recipe=recipe)
    check(cfg)  # what `selfimprove train` checks before it runs
    last = run_loop(cfg)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/loss" in x]
    assert last["round"] == 1 and not last.get("update/skipped"), last
    assert len(steps) == 1, lines
    assert (run_dir / "checkpoints" / "latest").exists()
