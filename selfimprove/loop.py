"""The self-improvement loop: rounds of sample → verify → select → update → EMA → checkpoint → evaluate.

Resuming: sampling, scoring and evaluation write their outputs under rounds/rNNNN/ and skip what is
already there; weights change only in the update phase, whose progress is in the checkpoint's journal.
So a run killed anywhere continues from the phase it was in.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from selfimprove import checkpoint, faults, phases, train
from selfimprove import distributed as dist
from selfimprove.config import ConfigError, build_plan, check_trainable
from selfimprove.ema import engine_weights
from selfimprove.engine import Engine
from selfimprove.evaluate import evaluate
from selfimprove.logging import MetricsLogger, progress, trim_metrics
from selfimprove.metrics import select_round, summarize_round
from selfimprove.parts import Parts, Plan
from selfimprove.resume import resume_diff
from selfimprove.sampling.backtrack import fit_round_probe
from selfimprove.schedule import scheduled
from selfimprove.stages import Context, Scorer

_stop = {"requested": False}


def _request_stop(signum, frame) -> None:  # SIGTERM/SIGUSR1 (SLURM preemption); a second one is the same
    _stop["requested"] = True


def should_stop() -> bool:
    """Collective: every rank calls it at the same points, and all agree."""
    return dist.all_sum([float(_stop["requested"])])[0] > 0


def prepare_run_dir(cfg: DictConfig) -> Path:
    """Creates the run folder and saves the config; refuses an incompatible resume with a diff."""
    run_dir = Path(cfg.run.dir)
    saved = run_dir / "config.yaml"
    if saved.exists():
        if cfg.resume != "auto":
            raise ConfigError(f"{run_dir} already holds a run: pass resume=auto, or a new run.dir")
        old = OmegaConf.load(saved)
        if old.get("recipe") != cfg.get("recipe"):  # one line, not a diff of every key the recipes set
            raise ConfigError(
                f"{run_dir} holds a run of recipe {old.get('recipe')!r}, not {cfg.get('recipe')!r}: "
                "use another run.dir (RUN_DIR on SLURM)"
            )
        diff = resume_diff(old, cfg)
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


def first_prompt(cfg: DictConfig) -> int:
    """Where round 1 starts in the task's prompt stream. A table task reshuffles per pass over its
    rows (the pass is index // rows), so a seeded start draws both the order and the starting point."""
    return 0 if cfg.loop.prompt_order == "fixed" else dist.derive_seed(cfg.seed, "prompts") % 10**9


@dataclass
class Round:
    """What one round's phases share: where they write, and what they measured, and its parts."""

    number: int
    folder: Path
    parts: Parts
    record: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)  # wall time per phase
    compute: dict = field(default_factory=dict)  # time inside generate / scoring forward / update

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class Loop:
    def __init__(self, cfg: DictConfig, plan: Plan | None = None) -> None:
        """`plan`: the parts the config check built (`compose.check`); built here when not given."""
        self.cfg = cfg
        check_trainable(cfg)
        try:  # the data before the run folder: a bad file must not leave a run to resume
            self.task = instantiate(cfg.task)
        except InstantiationException as e:  # bad data: the task's own message names the file and line
            raise ConfigError(f"task: {e.__cause__ or e}") from None
        try:
            self.task.eval_problems(cfg.eval.n_problems)
        except ValueError as e:
            raise ConfigError(f"eval.n_problems={cfg.eval.n_problems}: {e}") from None
        # checked against the task before the run folder too: the parts of every stage of the schedule
        self.plan = plan or build_plan(cfg)
        self.plan.check(self.task)
        self.run_dir = prepare_run_dir(cfg)
        self.engine = Engine(cfg, train=True, reference=self.plan.needs_reference)
        self.journal = {"round": 0, "phase": "evaluate", "update_step": 0, "global_step": 0}
        if cfg.resume == "auto" and (found := self.engine.restore(self.run_dir)) is not None:
            self.journal = found[1]
            if dist.is_main():
                print(f"[selfimprove] resuming at round {self.journal['round']}, {self.journal['phase']}")
        self.logger = MetricsLogger(self.run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True))
        trim_metrics(self.run_dir / "metrics.jsonl", self.journal["round"], self.journal["global_step"])

    def save(self, round_: int, phase: str, update_step: int) -> None:
        self.journal.update(round=round_, phase=phase, update_step=update_step)
        self.engine.save(self.run_dir, self.journal)

    # ----- the phases -----
    def sample(self, r: Round) -> list[dict] | None:
        """This round's prompts (round 1's again with loop.same_prompts), n completions each, from the
        raw or EMA weights (ema.sample_from)."""
        cfg = self.cfg
        offset = 0 if cfg.loop.same_prompts else (r.number - 1) * cfg.loop.prompts_per_round
        start = first_prompt(cfg) + offset
        problems = [self.task.train_problem(start + i) for i in range(cfg.loop.prompts_per_round)]
        weights = engine_weights(cfg.ema.sample_from)
        with r.phase("sample"):
            if weights == "ema":
                self.engine.share_ema()  # collective: before the units, which ranks split
            if cfg.sampler.backtrack.quota > 0 and cfg.sampler.backtrack.verifier == "probe":
                # the learned verifier, fitted on the last round's checked samples (recomputed on resume)
                # and on the hidden states of the weights that sample with it
                last = self.run_dir / "rounds" / f"r{r.number - 1:04d}" / "samples"
                probe, why = fit_round_probe(self.engine, last, cfg.sampler.backtrack.layer, weights=weights)
                self.engine.probe = probe  # None: the rollout samples plainly, as said here
                r.record["sample/backtrack_probe"] = probe is not None
                if probe is None and dist.is_main():
                    print(
                        f"[selfimprove] round {r.number}: sampling without backtracking: "
                        f"sampler.backtrack.verifier=probe has no probe ({why})"
                    )
            rows = phases.sample_units(
                r.folder / "samples",
                problems,
                self.plan.rollout,
                cfg.sampler.n,
                {**phases.generation_options(cfg.sampler), "weights": weights},
                context_of_unit=lambda u: self.context(r, "sample", u),
                should_stop=should_stop,
                desc=f"round {r.number} sample",
                fault=f"sample:r{r.number}",
            )
        if rows is not None:
            r.record["sample/tokens"] = sum(len(row["completion_ids"]) for row in rows)
        return rows

    def context(self, r: Round, *parts: object) -> Context:
        """What a stage (or the rollout) may ask for, seeded by (seed, round, *parts); its time
        generating and scoring counts in the round's compute seconds."""
        seed = dist.derive_seed(self.cfg.seed, r.number, *parts)
        return Context(self.engine, self.task, seed, self.cfg.sampler.batch_size, r.compute)

    def verify(self, r: Round) -> list[dict] | None:
        """Every scorer attaches a score to every sample; what they log is recorded as verify/<name>."""
        with r.phase("verify"):
            if any(s.uses_ema for s in r.parts.scorers):
                self.engine.share_ema()  # collective: before the units, which ranks split
            scored = phases.verify_units(
                r.folder / "samples",
                r.folder / "scored",
                scorers=r.parts.scorers,
                context_of_unit=lambda u: self.context(r, "verify", u),
                should_stop=should_stop,
                fault=f"verify:r{r.number}",
            )
        if scored is None:
            return None
        rows, logged = scored
        r.record.update({f"verify/{k}": v for k, v in logged.items()})
        return rows

    def select(self, r: Round, rows: list[dict]) -> list[dict]:
        """Scored samples -> training examples (the same result on every rank)."""
        with r.phase("select"):
            ctx = self.context(r, "select")
            examples = r.parts.selector(rows, ctx)
            scored = [s.name for s in r.parts.scorers if isinstance(s, Scorer)]
            r.record.update(summarize_round(rows, examples, scored))
            r.record.update({f"select/{k}": v for k, v in ctx.logged.items()})
        faults.point(f"phase:r{r.number}:select")
        return examples

    def update(self, r: Round, examples: list[dict]) -> bool:
        """K optimizer steps, each followed by the EMA, its log line and the collective stop decision;
        False if stopped by a signal (after saving where it stopped: every rank agrees)."""
        cfg, journal = self.cfg, self.journal
        if len(examples) < max(cfg.trainer.min_selected, 1):
            print(f"[selfimprove] round {r.number}: {len(examples)} samples selected, skipping the update")
            r.record["update/skipped"] = True
            return True
        start = journal["update_step"] if journal["round"] == r.number else 0
        bar = progress(cfg.trainer.steps_per_round, f"round {r.number} update", start)
        with r.phase("update"):
            for step, metrics in train.steps(
                self.engine,
                r.parts.objective,
                examples,
                cfg=cfg.trainer,
                seed_of_step=lambda *parts: dist.derive_seed(cfg.seed, r.number, "train", *parts),
                start=start,
                fault=f"update:r{r.number}",
            ):
                journal["global_step"] += 1
                self.engine.ema_update(journal["global_step"])  # t counts from 1
                self.logger.log(
                    {"round": r.number, "step": journal["global_step"], **metrics}, journal["global_step"]
                )
                bar.update(1)
                faults.point(f"update:r{r.number}:s{step}")
                if should_stop():
                    self.save(r.number, "update", step)
                    bar.close()
                    return False
            r.record.update(self.engine.after_update())  # the sampler takes the weights (vLLM: its probe)
        r.compute["train"] = r.seconds["update"]  # the whole update is compute (collate to EMA)
        bar.close()
        return True

    def evaluate(self, r: Round) -> bool:
        """Held-out metrics (cached on disk, so a resumed run does not redo them); False if stopped."""
        cfg = self.cfg
        due = r.number == 0 or r.number % cfg.eval.every == 0 or r.number == cfg.loop.rounds
        if not due:
            return True
        with r.phase("evaluate"):
            metrics = evaluate(
                cfg,
                r.folder / "eval",
                task=self.task,
                engine=self.engine,
                rollout=self.plan.rollout,
                with_k=cfg.eval.k_every_round or r.number in (0, cfg.loop.rounds),
                should_stop=should_stop,
                fault=f"eval:r{r.number}",
            )
        if metrics is None:
            return False
        r.record.update(metrics)
        return True

    def round(self, number: int) -> Round:
        entry = scheduled(self.plan.schedule, number)
        r = Round(number, self.run_dir / "rounds" / f"r{number:04d}", self.plan.parts[entry and entry.index])
        r.record["round"] = number
        skipped = getattr(self.task, "skipped", None)  # data rows the grader cannot read, dropped at load
        if skipped:
            r.record["data/skipped_rows"] = len(skipped)
        if entry is not None and number > 0:
            r.record["schedule/stage"] = entry.index + 1  # e.g. SCoRe's Stage I (1) and II (2)
        return r

    # ----- the loop -----
    def train_round(self, r: Round) -> bool:
        """sample → verify → select → update, then a checkpoint; False if stopped by a signal."""
        rows = self.sample(r)
        if rows is None:
            return False
        rows = self.verify(r)
        if rows is None:
            return False
        examples = self.select(r, rows)
        if not self.update(r, examples):
            return False
        r.record["phase_seconds"] = dict(r.seconds)
        r.record["compute_seconds"] = dict(r.compute)
        if dist.is_main():  # a run resumed at its evaluation still reports this round's training
            checkpoint.write_json(r.folder / "train_metrics.json", r.record)
        self.save(r.number, "evaluate", 0)
        return True

    def run(self) -> dict:
        cfg, journal = self.cfg, self.journal
        last: dict = {}
        for number in range(journal["round"], cfg.loop.rounds + 1):
            r = self.round(number)
            trained = journal["round"] == number and journal["phase"] == "evaluate"
            if number > 0 and not trained:
                if not self.train_round(r):
                    return _preempted(self.run_dir)
            elif number > 0 and (r.folder / "train_metrics.json").exists():
                r.record = json.loads((r.folder / "train_metrics.json").read_text())
                r.seconds, r.compute = r.record.pop("phase_seconds"), r.record.pop("compute_seconds", {})
            if number > 0 or cfg.eval.before:
                if not self.evaluate(r):
                    return _preempted(self.run_dir)
                self.log_round(r)
                last = r.record
            journal.update(round=number + 1, phase="sample", update_step=0)
        if cfg.eval.select_by:
            last = {**last, **self.log_selection()}
        self.logger.close()
        return last

    def log_selection(self) -> dict:
        """Model selection: the evaluated round with the best eval.select_by, logged and printed."""
        records = [json.loads(p.read_text()) for p in sorted(self.run_dir.glob("rounds/r*/metrics.json"))]
        selected = select_round(records, self.cfg.eval.select_by)
        if selected and dist.is_main():
            self.logger.log(selected, self.journal["global_step"])
            checkpoint.write_json(self.run_dir / "selected.json", selected)
            print(
                f"[selfimprove] selected round {selected['selected/round']} by {self.cfg.eval.select_by}: "
                f"eval/accuracy={selected.get('selected/eval/accuracy')}"
            )
        return selected

    def log_round(self, r: Round) -> None:
        generate = r.compute.get("generate")
        r.record.update(
            {
                "step": self.journal["global_step"],
                "phase_seconds": r.seconds,
                "round_seconds": sum(r.seconds.values()),
                "tokens_per_second": r.record.get("sample/tokens", 0) / generate if generate else None,
                "compute_seconds": r.compute,
                "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "device": str(self.engine.device),
            }
        )
        self.logger.log(r.record, self.journal["global_step"])
        if dist.is_main():
            r.folder.mkdir(parents=True, exist_ok=True)
            checkpoint.write_json(r.folder / "metrics.json", r.record)
            shown = {k: v for k, v in r.record.items() if k.startswith(("eval", "select/acc"))}
            print(
                f"[selfimprove] round {r.number}: "
                + ", ".join(f"{k}={v:.3f}" for k, v in shown.items() if isinstance(v, float))
            )


def run(cfg: DictConfig, plan: Plan | None = None) -> dict:
    """Runs (or resumes) a recipe with the parts the config check built; returns the last round's
    metrics."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _request_stop)
    return Loop(cfg, plan).run()


def _preempted(run_dir: Path) -> dict:
    if dist.is_main():
        print(
            f"[selfimprove] stopped by signal; continue with: selfimprove train resume=auto run.dir={run_dir}"
        )
    return {"preempted": True}
