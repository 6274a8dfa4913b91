"""The self-improvement loop: rounds of sample → verify → select → update → EMA → evaluate → checkpoint.

Resuming: sampling, scoring, selection and evaluation write their outputs under rounds/rNNNN/ and
skip what is already there; weights change only in the update phase, whose progress is in the
checkpoint's journal. So a run killed anywhere continues from the phase it was in.
"""

from __future__ import annotations

import contextlib
import copy
import json
import resource
import signal
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import get_scheduler

from selfimprove import checkpoint, faults, models, phases
from selfimprove import distributed as dist
from selfimprove.config import ConfigError, resume_diff
from selfimprove.ema import EMA, weights
from selfimprove.evaluate import evaluate
from selfimprove.logging import MetricsLogger, progress
from selfimprove.metrics import summarize_round
from selfimprove.sampling import HFSampler
from selfimprove.train import update

_stop = {"requested": False}


def _request_stop(signum, frame) -> None:  # SIGTERM/SIGUSR1 (SLURM preemption)
    _stop["requested"] = True


def should_stop() -> bool:
    return dist.all_sum([float(_stop["requested"])])[0] > 0


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Creates the run folder and saves the config; refuses an incompatible resume with a diff."""
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        if cfg.resume != "auto":
            raise ConfigError(f"{run_dir} already holds a run: pass resume=auto, or a new run.dir")
        diff = resume_diff(OmegaConf.load(saved), cfg)
        if diff:
            raise ConfigError("resume=auto refused, the config changed incompatibly:\n" + "\n".join(diff))
    dist.barrier()
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        OmegaConf.save(cfg, tmp, resolve=True)
        tmp.replace(saved)
    dist.barrier()
    return run_dir


def _trim_metrics(path: Path, journal: dict) -> None:
    """On resume, forget lines that the resumed run will write again."""
    if not dist.is_main() or not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        done_step = "train/loss" in rec and rec["step"] <= journal["global_step"]
        if rec["round"] < journal["round"] or done_step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def run(cfg: DictConfig) -> dict:
    """Runs (or resumes) a recipe; returns the last round's metrics."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _request_stop)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    run_dir = prepare_run_dir(cfg)
    task = instantiate(cfg.task)
    scorers = [instantiate(v) for v in cfg.verifiers.values()]
    selector = instantiate(cfg.selector)
    objective = instantiate(cfg.objective)
    tokenizer = models.load_tokenizer(cfg.model)
    sampler = HFSampler(tokenizer, cfg.sampler.max_prompt_tokens)
    pad = tokenizer.pad_token_id

    policy = models.load_model(cfg.model)
    needs_base = any(getattr(s, "needs_base_logprobs", False) for s in scorers)
    frozen = copy.deepcopy(policy).requires_grad_(False) if needs_base and not cfg.trainer.lora else None
    policy = models.add_lora(policy, cfg.trainer) if cfg.trainer.lora else policy.requires_grad_(True)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.trainer.lr, weight_decay=cfg.trainer.weight_decay)
    total_steps = cfg.loop.rounds * cfg.trainer.steps_per_round
    scheduler = get_scheduler(cfg.trainer.scheduler, optimizer, cfg.trainer.warmup_steps, total_steps)
    model, optimizer = accelerator.prepare(policy, optimizer)
    raw = accelerator.unwrap_model(model)
    ema = EMA(raw, cfg.ema.warmup, cfg.ema.power, cfg.ema.floor) if cfg.ema.enabled else None

    journal = {"round": 0, "phase": "evaluate", "update_step": 0, "global_step": 0}
    if cfg.resume == "auto" and (ckpt := checkpoint.latest(run_dir)) is not None:
        state = checkpoint.load(ckpt, optimizer=optimizer, scheduler=scheduler)
        models.load_trainable(raw, state["weights"])
        if ema is not None and state["ema"] is not None:
            ema.load_state_dict(state["ema"])
        journal = state["journal"]
        if dist.is_main():
            print(f"[selfimprove] resuming {run_dir} at round {journal['round']}, {journal['phase']}")
    logger = MetricsLogger(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True))
    _trim_metrics(run_dir / "metrics.jsonl", journal)

    def save(round_: int, phase: str, update_step: int) -> None:
        journal.update(round=round_, phase=phase, update_step=update_step)
        checkpoint.save(
            run_dir,
            f"r{round_:04d}-s{journal['global_step']:06d}",
            weights=models.trainable_state(raw),
            optimizer=optimizer,
            scheduler=scheduler,
            ema_state=ema.state_dict() if ema is not None else None,
            journal=dict(journal),
        )

    last: dict = {}
    for round_ in range(journal["round"], cfg.loop.rounds + 1):
        timer: dict[str, float] = {}
        seconds: dict[str, float] = {}
        record: dict = {"round": round_}
        folder = run_dir / "rounds" / f"r{round_:04d}"
        if round_ > 0 and not (journal["round"] == round_ and journal["phase"] == "evaluate"):
            # sample: this round's prompts, n completions each, from the raw or EMA weights
            t0 = time.perf_counter()
            start = (round_ - 1) * cfg.loop.prompts_per_round
            problems = [task.train_problem(start + i) for i in range(cfg.loop.prompts_per_round)]
            with weights(raw, ema, cfg.ema.sample_from):
                rows, stopped = phases.sample_units(
                    folder / "samples",
                    problems,
                    model=raw,
                    sampler=sampler,
                    task=task,
                    n=cfg.sampler.n,
                    batch_size=cfg.sampler.batch_size,
                    gen=dict(
                        max_new_tokens=cfg.sampler.max_new_tokens,
                        temperature=cfg.sampler.temperature,
                        top_p=cfg.sampler.top_p,
                    ),
                    seed_of_unit=lambda u: dist.derive_seed(cfg.seed, round_, "sample", u),
                    timer=timer,
                    should_stop=should_stop,
                    desc=f"round {round_} sample",
                    fault=f"sample:r{round_}",
                )
            if stopped:
                return _preempted(run_dir)
            seconds["sample"] = time.perf_counter() - t0
            record["sample/tokens"] = sum(len(r["completion_ids"]) for r in rows)

            # verify: every scorer attaches a score to every sample
            t0 = time.perf_counter()
            base_fn = None
            if needs_base:
                base_fn = phases.base_logprob_fn(
                    frozen if frozen is not None else raw, pad, cfg.sampler.batch_size
                )
            units = phases.n_units(len(problems), cfg.sampler.n, cfg.sampler.batch_size)
            with models.base_model(raw) if frozen is None else contextlib.nullcontext():
                rows = phases.verify_units(
                    folder / "samples",
                    folder / "scored",
                    units,
                    scorers=scorers,
                    base_logprobs=base_fn,
                    timer=timer,
                )
            seconds["verify"] = time.perf_counter() - t0

            # select: scored samples -> training examples (same result on every rank)
            t0 = time.perf_counter()
            chosen = selector(rows)
            examples = [rows[i] for i in chosen]
            record.update(summarize_round(rows, chosen, [s.name for s in scorers]))
            seconds["select"] = time.perf_counter() - t0
            faults.point(f"phase:r{round_}:select")

            # update (+ EMA after every optimizer step)
            t0 = time.perf_counter()
            if len(examples) < max(cfg.trainer.min_selected, 1):
                print(f"[selfimprove] round {round_}: {len(examples)} samples selected, skipping the update")
                record["update/skipped"] = True
            else:
                bar = progress(cfg.trainer.steps_per_round, f"round {round_} update", journal["update_step"])

                def after_step(step: int, metrics: dict) -> bool:
                    if ema is not None:
                        ema.update(raw, journal["global_step"])
                    journal["global_step"] += 1
                    logger.log(
                        {"round": round_, "step": journal["global_step"], **metrics}, journal["global_step"]
                    )
                    bar.update(1)
                    faults.point(f"update:r{round_}:s{step}")
                    if should_stop():
                        save(round_, "update", step)
                        return True
                    return False

                t_fb = time.perf_counter()
                update(
                    accelerator,
                    model,
                    optimizer,
                    scheduler,
                    objective,
                    examples,
                    cfg=cfg.trainer,
                    pad=pad,
                    seed_of_step=lambda s: dist.derive_seed(cfg.seed, round_, "train", s),
                    start_step=journal["update_step"] if journal["round"] == round_ else 0,
                    after_step=after_step,
                )
                timer["train"] = time.perf_counter() - t_fb
                bar.close()
                if _stop["requested"]:
                    return _preempted(run_dir)
            seconds["update"] = time.perf_counter() - t0
            record["phase_seconds"] = seconds
            if dist.is_main():  # a run resumed at its evaluation still reports this round's training
                checkpoint.write_json(folder / "train_metrics.json", record)
            save(round_, "evaluate", 0)
        elif round_ > 0 and (folder / "train_metrics.json").exists():
            record = json.loads((folder / "train_metrics.json").read_text())
            seconds = record["phase_seconds"]

        # evaluate (held-out; cached on disk, so a resumed run does not redo it)
        t0 = time.perf_counter()
        if round_ == 0 and not cfg.eval.before:
            continue
        if round_ == 0 or round_ % cfg.eval.every == 0 or round_ == cfg.loop.rounds:
            record.update(
                evaluate(
                    cfg,
                    folder / "eval",
                    task=task,
                    model=raw,
                    sampler=sampler,
                    ema=ema,
                    with_k=cfg.eval.k_every_round or round_ in (0, cfg.loop.rounds),
                )
            )
        seconds["evaluate"] = time.perf_counter() - t0
        record.update(
            {
                "step": journal["global_step"],
                "phase_seconds": seconds,
                "round_seconds": sum(seconds.values()),
                "tokens_per_second": record.get("sample/tokens", 0) / timer["generate"]
                if timer.get("generate")
                else None,
                "compute_seconds": timer,
                "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            }
        )
        logger.log(record, journal["global_step"])
        if dist.is_main():
            folder.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(folder / "metrics.json", record)
            shown = {k: v for k, v in record.items() if k.startswith(("eval", "select/acc", "sample/acc"))}
            print(
                f"[selfimprove] round {round_}: "
                + ", ".join(f"{k}={v:.3f}" for k, v in shown.items() if isinstance(v, float))
            )
        journal.update(round=round_ + 1, phase="sample", update_step=0)
        last = record
    logger.close()
    return last


def _preempted(run_dir: Path) -> dict:
    if dist.is_main():
        print(
            f"[selfimprove] stopped by signal; continue with: selfimprove train resume=auto run.dir={run_dir}"
        )
    return {"preempted": True}
