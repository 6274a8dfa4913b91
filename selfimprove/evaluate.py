"""Held-out evaluation: greedy accuracy, and pass@k / maj@k from k samples, for raw and EMA weights.

Used by the loop after each round and by `selfimprove eval` on a run folder or a bare model. Shards
are cached under a folder named by a hash of everything that produced them (task, eval settings,
seed), so a resumed run with changed eval settings computes fresh results instead of reusing stale ones.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove import distributed as dist
from selfimprove import phases
from selfimprove.ema import engine_weights
from selfimprove.metrics import answer_information, eval_summary, final_turn, view_agreement
from selfimprove.parts import build_rollout
from selfimprove.repetition import perplexity, text_metrics
from selfimprove.rollout import OneTurn
from selfimprove.stages import Context

# model-selection problems: the task's training stream far past where a run's rounds read (< 10**9 + rounds)
DEV_START, UNLABELLED_START = 2 * 10**9, 3 * 10**9


def eval_key(cfg: DictConfig) -> str:
    """A short hash of what evaluation results depend on, besides the weights."""
    parts = {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "seed": cfg.seed,
        "max_prompt_tokens": cfg.sampler.max_prompt_tokens,
        "rollout": OmegaConf.to_container(cfg.rollout, resolve=True) if cfg.get("rollout") else None,
    }
    # when and which round to report, not what is measured (batch_size sets the units' seeds)
    for key in ("every", "k_every_round", "before", "select_by"):
        parts["eval"].pop(key, None)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def evaluate(
    cfg: DictConfig,
    folder: Path,
    *,
    task,
    engine,
    rollout: OneTurn | None = None,
    with_k: bool = True,
    should_stop: Callable[[], bool] = lambda: False,
    fault: str = "",
) -> dict | None:
    """Metrics named eval/* (raw weights) and eval_ema/* (EMA weights); None if stopped by a signal.
    `rollout`: the run's (built once by the loop); by default the config's. Evaluation runs its
    `for_evaluation()` form: n samples per problem whatever budget training gives them."""
    out: dict = {}
    problems = task.eval_problems(cfg.eval.n_problems)
    folder = folder / eval_key(cfg)
    run_rollout = rollout or build_rollout(
        OmegaConf.to_container(cfg.rollout, resolve=True) if cfg.get("rollout") else None
    )

    def draw(
        name: str,
        problems: list,
        n: int,
        gen: dict,
        seed_of_unit: Callable[[int], int],
        desc: str,
        rollout: OneTurn | None = None,
    ):
        """n rollouts per problem into folder/name, unit by unit (the loop's own sampling code), with
        the rollout evaluation runs unless told."""
        return phases.sample_units(
            folder / name,
            problems,
            rollout or run_rollout.for_evaluation(),
            n,
            gen,
            context_of_unit=lambda u: Context(engine, task, seed_of_unit(u), cfg.eval.batch_size),
            should_stop=should_stop,
            desc=desc,
            fault=fault,
        )

    for which in cfg.ema.evaluate:  # raw | ema: the folder and metric names; the engine's name passed
        weights = engine_weights(which)
        if weights == "ema":
            engine.share_ema()  # collective: before the units, which ranks split
        gen = dict(max_new_tokens=cfg.eval.max_new_tokens, record=False, weights=weights)
        greedy = draw(
            f"{which}-greedy", problems, 1, {**gen, "greedy": True}, lambda u: 0, f"eval {which} greedy"
        )
        if greedy is None:
            return None
        prefix = "eval/" if which == "raw" else "eval_ema/"
        if getattr(task, "open_ended", False):  # no answer to check: repetition and perplexity
            summary = text_summary(cfg, task, engine, greedy, weights)
            out.update({prefix + k: v for k, v in summary.items()})
            continue
        sampled: list[dict] = []
        if cfg.eval.k > 0 and with_k:
            sampled = draw(
                f"{which}-k{cfg.eval.k}",
                problems[: cfg.eval.k_problems],
                cfg.eval.k,
                {**gen, "temperature": cfg.eval.temperature},
                lambda u: dist.derive_seed(cfg.seed, "eval", u),
                f"eval {which} k={cfg.eval.k}",
            )
            if sampled is None:
                return None
        out.update({prefix + k: v for k, v in eval_summary(greedy, sampled, cfg.eval.k).items()})
    if cfg.eval.dev_problems > 0:
        dev = [task.train_problem(DEV_START + i) for i in range(cfg.eval.dev_problems)]
        gen = dict(max_new_tokens=cfg.eval.max_new_tokens, record=False, weights="policy", greedy=True)
        greedy = draw("raw-dev", dev, 1, gen, lambda u: 0, "eval dev")
        if greedy is None:
            return None
        out["dev/accuracy"] = eval_summary(greedy, [], 0)["accuracy"]
    if cfg.eval.unlabelled_problems > 0:
        prompts = [task.train_problem(UNLABELLED_START + i) for i in range(cfg.eval.unlabelled_problems)]
        gen = dict(
            max_new_tokens=cfg.eval.max_new_tokens,
            record=False,
            weights="policy",
            temperature=cfg.eval.temperature,
        )
        seed_of_unit = lambda u: dist.derive_seed(cfg.seed, "unlabelled", u)  # noqa: E731
        # a views run asks every form unlabelled_k times (the views rollout splits n across the forms)
        forms = run_rollout.forms
        sampled = draw(
            "raw-unlabelled",
            prompts,
            cfg.eval.unlabelled_k * forms,
            gen,
            seed_of_unit,
            "eval unlabelled",
            run_rollout if forms > 1 else None,
        )
        if sampled is None:
            return None
        out.update(unlabelled_summary(final_turn(sampled)))
    return out


def unlabelled_summary(rows: list[dict]) -> dict[str, float | None]:
    """unlabelled/*: the prompt-answer information of the original forms' answers, and where rows carry
    `view`, the agreement of a prompt's forms (answers only: the rows' `correct` is never read)."""
    groups: dict[str, list] = {}
    forms: dict[str, dict[int, list]] = {}
    for row in rows:
        view = row.get("view", 0)
        if view == 0:
            groups.setdefault(row["prompt_id"], []).append(row["answer"])
        forms.setdefault(row["prompt_id"], {}).setdefault(view, []).append(row["answer"])
    out = {f"unlabelled/{k}": v for k, v in answer_information(groups).items()}
    if any("view" in row for row in rows):
        out["unlabelled/view_agreement"] = view_agreement(forms)
    return out


def text_summary(cfg: DictConfig, task, engine, greedy: list[dict], weights: str) -> dict[str, float]:
    """An open-ended task's held-out metrics: repetition and diversity of the greedy continuations
    (rep-n, rep-w, rep-r, rep-sen, distinct-n), and the perplexity of the true continuations given
    their prompts under `weights` (those that wrote the continuations)."""
    out = text_metrics([r["completion_ids"] for r in greedy], [r["completion"] for r in greedy])
    documents = task.eval_documents(cfg.eval.n_problems)
    encode = engine.tokenizer
    prompts = [encode(p, add_special_tokens=False)["input_ids"] for p, _ in documents]
    continuations = [encode(c, add_special_tokens=False)["input_ids"] for _, c in documents]
    out["perplexity"] = perplexity(
        engine.logprobs(prompts, continuations, weights=weights, batch_size=cfg.eval.batch_size)
    )
    return out


def evaluate_run(cfg: DictConfig, run_dir: Path | None) -> dict:
    """`selfimprove eval`: a run folder's latest checkpoint (raw and EMA), or the configured model."""
    from hydra.utils import instantiate

    from selfimprove.engine import Engine

    engine = Engine(cfg, train=False)
    found = engine.restore(run_dir) if run_dir is not None else None
    if found is None or engine.ema is None:  # a bare model has no average to evaluate
        cfg.ema.evaluate = ["raw"]
    task = instantiate(cfg.task)
    with tempfile.TemporaryDirectory() as tmp:  # fresh shards: weights may differ from the run's
        metrics = evaluate(cfg, Path(tmp), task=task, engine=engine)  # the config's rollout
    metrics["checkpoint"] = str(found[0]) if found else None
    return metrics
