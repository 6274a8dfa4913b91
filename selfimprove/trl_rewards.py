"""The label-free rewards where trl users are: reward functions for trl's `GRPOTrainer(reward_funcs=...)`
(extra `[trl]`), and the loop's round tables as trl's prompt/completion records.

    from trl import GRPOTrainer
    from selfimprove.tasks import ArithmeticTask
    from selfimprove.trl_rewards import label_free_reward
    trainer = GRPOTrainer(model=..., reward_funcs=[label_free_reward(ArithmeticTask())], ...)

A reward function sees one generation batch: each prompt with its `num_generations` completions (the
group). The rewards are the loop's own scorers on those rows, so trl and `selfimprove train` reward
alike: `empo` (the share of the group giving the completion's answer), `ttrl` (1 for the group's
majority answer) and `label_free` (EMPO's share + λ × the answer's surprisal among the batch's other
prompts' answers: the `label_free` recipe's reward; trl subtracts each group's mean, so this is the
recipe with `selector.surprisal_baseline=group`: the batch baseline is an advantage term, not a reward). They need the batch to hold whole groups (trl's sampler
keeps a prompt's generations together) and, for `label_free`, several prompts (per_device batch ≥ 2 ×
num_generations). The rewards that read the model's own token distribution (self-certainty, RENT's
entropy) are not here: trl hands a reward function text and ids, not the policy's logits.

Round tables: `selfimprove rounds RUN_DIR out=FILE.jsonl` writes every sampled row of every round as
{"prompt": [messages], "completion": [{"role": "assistant", "content": prefill + completion}], ...}
with the round, answer and scores beside; `datasets.load_dataset("json", data_files=FILE)` gives a
dataset trl's SFTTrainer (completion-only loss) and GRPOTrainer (its prompts) take.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selfimprove.config import ConfigError
from selfimprove.select.advantage import cross_prompt_surprisal
from selfimprove.select.filters import by_prompt
from selfimprove.verify.majority import MajorityAgreement
from selfimprove.verify.rewards import MajorityVoteReward

RewardFunction = Callable[..., list[float]]


def _text(item: Any) -> str:
    """A trl prompt or completion: a string, or conversational messages (their contents joined)."""
    if isinstance(item, str):
        return item
    return "".join(m.get("content", "") for m in item)


def _rows(prompts: list, completions: list, extract: Callable[[str], str | None]) -> list[dict]:
    return [
        {
            "prompt_id": json.dumps(p, sort_keys=True) if not isinstance(p, str) else p,
            "answer": extract(_text(c)),
        }
        for p, c in zip(prompts, completions)
    ]


def _extractor(task: Any) -> Callable[[str], str | None]:
    """A task (anything with extract_answer, e.g. `selfimprove.tasks.ArithmeticTask()`) or a function."""
    extract = getattr(task, "extract_answer", task)
    if not callable(extract):
        raise TypeError(f"expected a task with extract_answer or a function str -> answer, got {type(task)}")
    return extract


def _named(fn: RewardFunction, name: str) -> RewardFunction:
    fn.__name__ = name  # trl logs each reward under its function's name
    return fn


def empo_reward(task: Any) -> RewardFunction:
    """EMPO: the share of the completion's group giving its answer (0 without an answer)."""
    extract = _extractor(task)

    def reward(prompts: list, completions: list, **_: Any) -> list[float]:
        return MajorityAgreement().score(_rows(prompts, completions, extract))

    return _named(reward, "empo")


def ttrl_reward(task: Any) -> RewardFunction:
    """TTRL: 1 when the completion's answer is its group's majority answer, else 0."""
    extract = _extractor(task)

    def reward(prompts: list, completions: list, **_: Any) -> list[float]:
        return MajorityVoteReward().score(_rows(prompts, completions, extract))

    return _named(reward, "ttrl")


def label_free_reward(task: Any, surprisal_weight: float = 0.3) -> RewardFunction:
    """`label_free`'s reward: EMPO's share + λ·log((M + 1)/(c + 1)), c of the batch's M completions
    of other prompts giving the same answer (agreement within a prompt, diversity across prompts)."""
    extract = _extractor(task)

    def reward(prompts: list, completions: list, **_: Any) -> list[float]:
        rows = _rows(prompts, completions, extract)
        surprisal = cross_prompt_surprisal(rows, by_prompt(rows))
        return [s + surprisal_weight * b for s, b in zip(MajorityAgreement().score(rows), surprisal)]

    return _named(reward, "label_free")


def round_records(run_dir: Path) -> list[dict]:
    """Every sampled row of every round (the scored table where the round got that far), as trl's
    conversational prompt/completion records with round, answer, correct and scores beside."""
    import pyarrow.parquet as pq

    records = []
    for folder in sorted((run_dir / "rounds").glob("r*")):
        table = folder / "scored" if any((folder / "scored").glob("*.parquet")) else folder / "samples"
        for shard in sorted(table.glob("*.parquet")):
            for row in pq.read_table(shard).to_pylist():
                records.append(
                    {
                        "prompt": row["messages"],
                        "completion": [{"role": "assistant", "content": row["prefill"] + row["completion"]}],
                        "round": int(folder.name[1:]),
                        "prompt_id": row["prompt_id"],
                        "answer": row.get("answer"),
                        "correct": row.get("correct"),
                        **{k: v for k, v in row.items() if k.startswith("score/") or k == "advantage"},
                    }
                )
    return records


def main(args: list[str]) -> None:
    """`selfimprove rounds RUN_DIR out=FILE.jsonl`."""
    out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), None)
    runs = [a for a in args if not a.startswith("out=")]
    if out is None or len(runs) != 1:
        raise ConfigError("rounds: usage: selfimprove rounds RUN_DIR out=FILE.jsonl")
    run_dir = Path(runs[0])
    if not (run_dir / "config.yaml").exists():
        raise ConfigError(f"rounds: {run_dir} is not a run folder (no config.yaml)")
    records = round_records(run_dir)
    if not records:
        raise ConfigError(f"rounds: {run_dir} has no sampled round yet")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, target)
    print(f"[selfimprove] {len(records)} rows of {run_dir} -> {target}", file=sys.stderr)
