"""The label-free rewards as trl reward functions, trained with trl's own GRPOTrainer on the tiny model;
and the loop's round tables as records trl takes."""

import json
import math

import pytest
from conftest import run_cli

from selfimprove.tasks import ArithmeticTask
from selfimprove.trl_rewards import empo_reward, label_free_reward, ttrl_reward

TASK = ArithmeticTask(level="add_2d_1d", seed=0, prefill=True)


def test_rewards_by_hand():
    """Two prompts of four completions, in trl's layout (a prompt repeated once per generation)."""
    prompts = ["a"] * 4 + ["b"] * 4
    completions = ["13", "13", "78", "x"] + ["13", "50", "50", "50"]
    assert empo_reward(TASK)(prompts, completions) == [0.5, 0.5, 0.25, 0.0, 0.25, 0.75, 0.75, 0.75]
    assert ttrl_reward(TASK)(prompts, completions) == [1, 1, 0, 0, 0, 1, 1, 1]
    # "13" from prompt a: 1 of prompt b's 4 completions gives it: log(5/2); "78": log(5/1); none: 0
    got = label_free_reward(TASK, surprisal_weight=0.1)(prompts, completions)
    assert got[0] == pytest.approx(0.5 + 0.1 * math.log(5 / 2))
    assert got[2] == pytest.approx(0.25 + 0.1 * math.log(5))
    assert got[3] == 0.0 and got[5] == pytest.approx(0.75 + 0.1 * math.log(5))
    # conversational completions (trl's format for chat datasets) read the same
    chat = [[{"role": "assistant", "content": c}] for c in completions]
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    assert label_free_reward(TASK)(chat_prompts, chat) == label_free_reward(TASK)(prompts, completions)


def test_two_grpo_trainer_steps_on_the_tiny_model(tmp_path):
    trl = pytest.importorskip("trl", reason="the [trl] extra: pip install 'selfimprove[trl]'")
    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf

    from selfimprove import models
    from selfimprove.config import ModelConfig

    model_cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    tokenizer = models.load_tokenizer(model_cfg)
    torch.manual_seed(0)
    model = models.load_model(model_cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problems = [TASK.train_problem(i) for i in range(8)]
    prompts = [
        tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) + p.prefill
        for p in problems
    ]
    config = trl.GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    # the random model writes no number: its answer is its first character (an extractor is any function)
    first_char = lambda text: text.strip()[:1] or None  # noqa: E731
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=[label_free_reward(first_char), empo_reward(first_char)],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"rewards/label_free/mean", "rewards/empo/mean"} <= logged  # trl logs each under its name
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the steps trained


def test_round_tables_as_trl_records(baseline_run, tmp_path):
    import pyarrow.parquet as pq
    from datasets import load_dataset
    from trl.data_utils import is_conversational

    out = tmp_path / "rounds.jsonl"
    run_cli(["rounds", str(baseline_run), f"out={out}"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["round"] for r in records} == {1, 2}
    assert len(records) == 2 * 8 * 4  # rounds x prompts x samples of the tiny run
    first = pq.read_table(sorted((baseline_run / "rounds/r0001/scored").glob("*.parquet"))[0]).to_pylist()[0]
    assert records[0]["completion"][0]["content"] == first["prefill"] + first["completion"]
    assert records[0]["prompt"] == first["messages"] and records[0]["answer"] == first["answer"]
    dataset = load_dataset("json", data_files=str(out), split="train")
    assert is_conversational(dataset[0]) and dataset[0]["prompt"][-1]["role"] == "user"
    assert "score/loglik_base" in dataset.column_names  # the run's scores beside
    bad = run_cli(["rounds", str(tmp_path), f"out={out}"], check=False)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr
