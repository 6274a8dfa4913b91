"""Held-out evaluation: greedy accuracy, and pass@k / maj@k from k samples, for raw and EMA weights.

Used by the loop after each round and by `selfimprove eval` on a run folder or a bare model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from omegaconf import DictConfig

from selfimprove import distributed as dist
from selfimprove import phases
from selfimprove.ema import weights
from selfimprove.metrics import eval_summary


def evaluate(cfg: DictConfig, folder: Path, *, task, model, sampler, ema=None, with_k: bool = True) -> dict:
    """Metrics named eval/* (raw weights) and eval_ema/* (EMA weights); shards cached in `folder`."""
    out: dict = {}
    problems = task.eval_problems(cfg.eval.n_problems)
    gen = dict(max_new_tokens=cfg.eval.max_new_tokens, record=False)
    common = dict(
        model=model,
        sampler=sampler,
        task=task,
        batch_size=cfg.eval.batch_size,
        timer={},
        should_stop=lambda: False,
    )
    for which in cfg.ema.evaluate:
        with weights(model, ema, which):
            greedy, _ = phases.sample_units(
                folder / f"{which}-greedy",
                problems,
                n=1,
                gen={**gen, "greedy": True},
                seed_of_unit=lambda u: 0,
                desc=f"eval {which} greedy",
                **common,
            )
            sampled = []
            if cfg.eval.k > 0 and with_k:
                sampled, _ = phases.sample_units(
                    folder / f"{which}-k{cfg.eval.k}",
                    problems[: cfg.eval.k_problems],
                    n=cfg.eval.k,
                    gen={**gen, "temperature": cfg.eval.temperature},
                    seed_of_unit=lambda u: dist.derive_seed(cfg.seed, "eval", u),
                    desc=f"eval {which} k={cfg.eval.k}",
                    **common,
                )
        prefix = "eval/" if which == "raw" else "eval_ema/"
        out.update({prefix + k: v for k, v in eval_summary(greedy, sampled, cfg.eval.k).items()})
    return out


def evaluate_run(cfg: DictConfig, run_dir: Path | None) -> dict:
    """`selfimprove eval`: a run folder's latest checkpoint (raw and EMA), or the configured model."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    from selfimprove import checkpoint, models
    from selfimprove.ema import EMA
    from selfimprove.sampling import HFSampler

    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model)
    ema = None
    ckpt = checkpoint.latest(run_dir) if run_dir is not None else None
    if ckpt is not None:
        if cfg.trainer.lora:
            model = models.add_lora(model, cfg.trainer)
        models.load_trainable(model, load_file(ckpt / "model.safetensors"))
        if (ckpt / "ema.safetensors").exists():
            ema = EMA(model, cfg.ema.warmup, cfg.ema.power, cfg.ema.floor)
            ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
    if ema is None:
        cfg.ema.evaluate = ["raw"]
    task = instantiate(cfg.task)
    sampler = HFSampler(tokenizer, cfg.sampler.max_prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:  # fresh shards: weights may differ from the run's
        metrics = evaluate(cfg, Path(tmp), task=task, model=model, sampler=sampler, ema=ema)
    metrics["checkpoint"] = str(ckpt) if ckpt else None
    return metrics
