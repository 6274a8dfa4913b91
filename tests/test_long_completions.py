"""Long completions (issue 23): a chain of thought of many tokens, cut or ended, through sampling (eager
and the static-cache path), scoring, the update and the round's metrics; and the math recipes,
composed for a GPU run and run here on the tiny model. The 256+ token runs on the embedded model are
scripts/bench/long_completions.py's, not the suite's."""

import json
from pathlib import Path

import pytest
import torch
from conftest import EosAs, cfg_of, run_loop
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.compose import check
from selfimprove.config import ModelConfig
from selfimprove.sampling import HFSampler, sequence_logprobs
from selfimprove.sampling.hf import logit_chunks, next_token_logprobs
from selfimprove.tasks import RandomCalculationTask

DATA = Path(__file__).parent / "data"
LONG = 64  # tokens: long enough for every path's length handling, short enough for the suite


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    model, tokenizer = models.load_model(cfg), models.load_tokenizer(cfg)
    with torch.no_grad():
        model.model.norm.weight.mul_(5.0)  # peaked logits: greedy ties cannot hide a difference
    return model, tokenizer


def _prompts(tok) -> list[list[int]]:
    task = RandomCalculationTask(level=1)
    return [HFSampler(tok).encode(task.train_problem(i)) for i in range(4)]


@pytest.mark.parametrize("compile", ["false", "static"])
def test_truncated_is_no_eos_within_max_new_tokens(tiny, compile):
    """Eager and static-cache decoding of 64 tokens: a row that emits the EOS stops there and is not
    truncated, a row that never does has all 64 tokens and is; both paths agree token for token."""
    model, tok = tiny
    prompts = _prompts(tok)
    never = HFSampler(EosAs(tok, model.config.vocab_size), compile="false")
    full = never.generate(model, prompts, max_new_tokens=LONG, greedy=True)
    assert all(r["truncated"] and len(r["completion_ids"]) == LONG for r in full)
    eos = full[0]["completion_ids"][LONG // 2]  # row 0 ends by its 33rd token; others may not
    sampler = HFSampler(EosAs(tok, eos), compile=compile, batch_size=8)
    rows = sampler.generate(model, prompts, max_new_tokens=LONG, greedy=True)
    for whole, row in zip(full, rows):
        ids = whole["completion_ids"]
        n = ids.index(eos) + 1 if eos in ids else LONG
        assert row["completion_ids"] == ids[:n] and len(row["logprobs"]) == n
        assert row["truncated"] == (eos not in ids)
    assert not rows[0]["truncated"] and len(rows[0]["completion_ids"]) <= LONG // 2 + 1


def test_long_rows_are_scored_in_bounded_parts(tiny):
    """Scoring forwards are cut by logit positions, not only rows, and give the same log-probs; P(True)'s
    next-token log-probs after suffixes of many lengths equal a plain forward's last position."""
    model, tok = tiny
    assert logit_chunks([6] * 130, 64) == [slice(0, 64), slice(64, 128), slice(128, 130)]  # short: rows
    assert logit_chunks([512] * 40, 64) == [slice(0, 16), slice(16, 32), slice(32, 40)]  # 8192 positions
    assert logit_chunks([3, 600, 600, 10, 9000, 5], 64, budget=1200) == [
        slice(0, 2),
        slice(2, 4),
        slice(4, 5),
        slice(5, 6),
    ]
    prompts = [p for p in _prompts(tok) for _ in range(2)]
    gen = torch.Generator().manual_seed(0)
    completions = [
        torch.randint(3, 1000, (n,), generator=gen).tolist() for n in (LONG, 5, 40, 1, LONG, 17, 2, 9)
    ]
    whole = sequence_logprobs(model, prompts, completions, tok.pad_token_id)
    parts = [
        x
        for part in logit_chunks([len(c) for c in completions], 64, budget=100)
        for x in sequence_logprobs(model, prompts[part], completions[part], tok.pad_token_id)
    ]
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=1e-4)
    prefix, candidates = prompts[0], [5, 7]
    got = next_token_logprobs(model, prefix, completions, candidates, tok.pad_token_id)
    with torch.no_grad():
        for suffix, row in zip(completions, got):
            logits = model(input_ids=torch.tensor([prefix + suffix])).logits[0, -1]
            want = torch.log_softmax(logits.float(), -1)[candidates]
            torch.testing.assert_close(torch.tensor(row), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("recipe", ["math_grpo", "math_label_free"])
def test_math_recipes_compose_for_a_gpu_run(recipe):
    """docs/recipes.md's command line composes: a 1-2B model folder, ZeRO-2, vLLM or the HF fast path; the
    evaluation decodes as long as sampling; only math_grpo reads the labels."""
    head = ["model=hf", "model.path=/models/Qwen2.5-1.5B-Instruct", "launcher=zero2"]
    for sampler in ("sampler=vllm", "sampler=hf"):
        cfg = cfg_of(*head, sampler, recipe=recipe, model=None)
        assert cfg.sampler.max_new_tokens >= 256 and cfg.eval.max_new_tokens == cfg.sampler.max_new_tokens
        assert cfg.launcher.backend == "deepspeed" and cfg.model.path.endswith("Instruct")
        assert cfg.task._target_.endswith("RandomCalculationTask")
        assert cfg.trainer.steps_per_round == 1 and cfg.trainer.micro_batch_size <= 8
    labelled = {"correct", "task_reward"} & set(cfg.verifiers)
    assert labelled == ({"correct", "task_reward"} if recipe == "math_grpo" else set())
    assert cfg.selector.reward == {"math_grpo": "task_reward", "math_label_free": "majority"}[recipe]
    mine = cfg_of(*head, "task=jsonl", "task.path=train.jsonl", "task.grader=math", recipe=recipe, model=None)
    assert mine.task.grader == "math"  # the recipe sets nothing a data task would not take


SMALL = [
    "model=tiny",
    "loop.rounds=1",
    "loop.prompts_per_round=2",
    "sampler.n=4",
    "sampler.batch_size=8",
    f"sampler.max_new_tokens={LONG}",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=2",
    "eval.before=false",
    "eval.n_problems=1",  # the GSM8K-style file holds out one problem
    "eval.batch_size=4",
    "eval.unlabelled_problems=0",
    "eval.select_by=null",
]
GSM8K = ["task=jsonl", f"task.path={DATA / 'gsm8k_style.jsonl'}", "task.grader=math"]
MATH = GSM8K[:1] + [f"task.path={DATA / 'math_style.jsonl'}", "task.grader=math"]
MATH += ["task.prompt_field=problem", "task.answer_field=solution"]
# the random tiny model writes no answer: every group ties, so its real rewards teach nothing; its
# self-certainty varies, so an update on the long rows runs
UPDATE = ["+verifier@verifiers.self_certainty=self_certainty", "selector.reward=self_certainty"]


@pytest.mark.parametrize(
    "recipe, task, skipped",
    [
        ("math_grpo", GSM8K + UPDATE, 1),
        ("math_label_free", MATH, 2),
        ("math_grpo", ["task=random_calculation"], 0),
    ],
    ids=["grpo-gsm8k-update", "label_free-math", "grpo-random_calculation"],
)
def test_math_recipes_run_with_long_rows(tmp_path, recipe, task, skipped):
    """One round of 64-token completions on GSM8K- and MATH-style rows (graded by math-verify) and on
    RandomCalculation: truncation and token budgets reach the round and eval metrics, the rows the
    grader could not read are counted, and (with a varying reward) the update trains on the long rows."""
    cfg = cfg_of(*SMALL, *task, f"run.dir={tmp_path / 'run'}", recipe=recipe, model=None)
    check(cfg)
    last = run_loop(cfg)
    for prefix in ("sample/", "eval/"):
        assert 0.0 <= last[prefix + "truncated"] <= 1.0
        assert last[prefix + "completion_tokens_max"] <= LONG
        assert 1 <= last[prefix + "completion_tokens_mean"] <= LONG
    assert last.get("data/skipped_rows", 0) == skipped
    assert last["sample/tokens"] == pytest.approx(last["sample/completion_tokens_mean"] * last["sample/n"])
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "train/loss" in x]
    if "selector.reward=self_certainty" in task:
        assert len(steps) == 1 and steps[0]["train/tokens"] > 4 * LONG  # long rows in the step
