"""The engine: one object owns the policy, its reference, the EMA, the optimizer, the scheduler and the
sampler, and it alone moves weights (into checkpoints, out of them, to an exported folder).

`selfimprove train`, `eval`, `sample` and `export` all build one, so loading a checkpoint is written
once. Precision: the model loads in `model.dtype`; trainable parameters are upcast to fp32 (master
weights and optimizer state), and with bfloat16 accelerate's autocast runs the math in bf16.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import get_scheduler

from selfimprove import backends, checkpoint, models
from selfimprove import distributed as dist
from selfimprove.ema import EMA, swapped
from selfimprove.errors import ConfigError
from selfimprove.sampling import HFSampler
from selfimprove.sampling.hf import logit_chunks, next_token_logprobs, sequence_logprobs

WEIGHTS = ("policy", "base", "ema")  # what a generate / logprobs call names: the one vocabulary

# peft and accelerate still ask transformers 5 for the old name; users cannot act on the warning.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def build_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    """`trainer.optimizer`: adamw | adamw_8bit (bitsandbytes) | sgd."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "trainer.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"trainer.optimizer: {cfg.optimizer!r} is not adamw|adamw_8bit|sgd")


class Engine:
    """Models and their state for one process. `train=False` builds no optimizer (eval, sample, export);
    `reference=True` keeps a frozen base for scoring (free with LoRA: the adapter switched off)."""

    def __init__(self, cfg: DictConfig, *, train: bool = True, reference: bool = False) -> None:
        self.cfg = cfg
        self.accelerator = backends.make_accelerator(cfg)
        self.device = self.accelerator.device
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.sampler = HFSampler(
            self.tokenizer,
            cfg.sampler.max_prompt_tokens,
            compile=cfg.sampler.compile,
            length_bucket=cfg.sampler.length_bucket,
            batch_size=cfg.sampler.batch_size,
        )
        # sampler.backend=vllm: the policy and the EMA sample on a colocated vLLM engine (the trained
        # weights pushed after each update, the average when asked for); the base stays with transformers
        self.vllm = None
        if cfg.sampler.backend == "vllm":
            from selfimprove.sampling.vllm import VLLMSampler

            model_path = models.model_path(cfg.model)
            self.vllm = VLLMSampler(self.tokenizer, model_path, cfg, autocast=self.accelerator.autocast)
        self.pad = self.tokenizer.pad_token_id
        self._classifiers: dict[str, tuple] = {}

        model = models.load_model(cfg.model)
        # A full fine-tune has no free base: keep a frozen copy, on the policy's device.
        self.frozen = None
        if reference and not cfg.trainer.lora:
            self.frozen = copy.deepcopy(model).requires_grad_(False).to(self.device)
        torch.manual_seed(dist.derive_seed(cfg.seed, "init"))  # LoRA's A is drawn: same seed, same run
        model = models.add_lora(model, cfg.trainer) if cfg.trainer.lora else model.requires_grad_(True)
        models.upcast_trainable(model)
        if cfg.trainer.gradient_checkpointing:
            kwargs = {"use_reentrant": False}  # works with frozen inputs (LoRA) without input grads
            if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 (the old name warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

        # ZeRO-3 and FSDP2 split the trained parameters over ranks; sampling, scoring and evaluation
        # run on a whole copy each rank keeps, refreshed from the trainer after every update (the same
        # push a separate inference engine gets), so generation needs no collective per decode step.
        self.partitioned = train and backends.partitioned(cfg)
        whole = copy.deepcopy(model).requires_grad_(False) if self.partitioned else None
        self.optimizer = self.scheduler = None
        if train:
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = build_optimizer(params, cfg.trainer)
            total_steps = cfg.loop.rounds * cfg.trainer.steps_per_round
            self.scheduler = get_scheduler(
                cfg.trainer.scheduler, self.optimizer, cfg.trainer.warmup_steps, total_steps
            )
            self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        else:
            self.model = model.to(self.device)
        self.trained = backends.module(self.accelerator, self.model)  # the trainer's (maybe sharded) module
        self.policy = whole.to(self.device) if whole is not None else self.trained  # what sampling sees
        self.policy.eval()
        # averaged where the trainer's parameters live: each rank its part when they are partitioned
        self.ema = (
            EMA(self.trained, cfg.ema.warmup, cfg.ema.power, cfg.ema.floor) if cfg.ema.enabled else None
        )
        self._whole_ema: tuple[int, dict[str, torch.Tensor]] | None = None  # (EMA version, tensors)

    def ema_update(self, global_step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.trained, global_step)

    def before_update(self) -> None:
        """Before each update phase: vLLM frees its GPU memory for the trainer."""
        if self.vllm is not None:
            self.vllm.sleep()

    def after_update(self) -> dict[str, float]:
        """Collective, after each update phase: the sampling copy takes the trained weights, and vLLM
        takes them from it; returns vLLM's log-prob probe of the push ({} without vLLM)."""
        if self.partitioned:
            self._push(self.policy)
        if self.vllm is not None:
            return {"sampler/probe_max_abs_diff": self.vllm.push(self.policy)}
        return {}

    def _push(self, target: torch.nn.Module) -> None:
        models.load_trainable(target, backends.gather(self.trained))

    # ----- which weights: every generate / logprobs call names them -----
    @contextlib.contextmanager
    def model_with(self, weights: str) -> Iterator[torch.nn.Module]:
        """The module holding `weights` (WEIGHTS): "policy", the trained weights as they are now;
        "base", the frozen base; "ema", the average, loaded into the policy's module for the duration
        (the trained weights come back after; an error when the run keeps no EMA)."""
        if weights == "policy":
            yield self.policy
        elif weights == "base":
            with self.reference() as base:
                yield base
        elif weights == "ema":
            if self.ema is None:
                raise ValueError("weights='ema' needs the EMA: set ema.enabled=true")
            if not self.partitioned:
                with self.ema.swapped_in(self.policy):
                    yield self.policy
                return
            self.share_ema()  # collective when stale: see share_ema
            with swapped(self.policy, self._whole_ema[1]):
                yield self.policy
        else:
            raise ValueError(f"weights must be one of {'|'.join(WEIGHTS)}, got {weights!r}")

    def share_ema(self) -> None:
        """Collective under ZeRO-3/FSDP2 (a no-op otherwise): there each rank averages only its part of
        the weights, so the whole average is gathered (to the CPU) once per EMA version, for "ema"
        requests to load locally. Call it on every rank before a phase whose units ask for "ema":
        units are split over ranks, so a gather inside one would not pair up."""
        if not self.partitioned or self.ema is None:
            return
        if self._whole_ema is None or self._whole_ema[0] != self.ema.version:
            self._whole_ema = (self.ema.version, backends.gather_locals(self.trained, self.ema.shadow))

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen base: the LoRA policy with its adapter off, or the frozen copy."""
        if self.frozen is not None:
            yield self.frozen
        else:
            with models.base_model(self.policy) as base:
                yield base

    # ----- what stages ask of the model -----
    def generate(self, prompts: list[list[int]], *, weights: str, **gen) -> list[dict]:
        """Completions from `weights`. With vLLM the policy and the EMA sample there (the one it does
        not hold is pushed first, checked by the probe); the base samples with transformers."""
        if self.vllm is not None and weights in ("policy", "ema"):
            self._vllm_holding(weights)
            return self.vllm.generate(None, prompts, **gen)
        with self.model_with(weights) as model, self.accelerator.autocast():
            return self.sampler.generate(model, prompts, **gen)

    def _vllm_holding(self, weights: str) -> None:
        """vLLM holds one copy of the weights: push `weights` unless it holds them already. The
        trained weights are pushed after every update (after_update); an EMA push is named by the
        EMA's version, so an average that moved since is pushed again."""
        label = "policy" if weights == "policy" else f"ema@{self.ema.version if self.ema else None}"
        if self.vllm.holds != label:
            with self.model_with(weights) as model:
                self.vllm.push(model, holds=label)

    def logprobs(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        weights: str,
        batch_size: int = 64,
    ) -> list[list[float]]:
        """Per-token log-probs of given completions under the policy, the base or the EMA weights."""
        out: list[list[float]] = []
        with self.model_with(weights) as model, self.accelerator.autocast():
            for part in logit_chunks([len(c) for c in completions], batch_size):
                out += sequence_logprobs(model, prompts[part], completions[part], self.pad)
        return out

    def next_token_logprobs(
        self,
        prefix: list[int],
        suffixes: list[list[int]],
        candidates: list[int],
        weights: str,
        batch_size: int = 64,
    ) -> list[list[float]]:
        """log p(candidate | prefix + suffix) per suffix, the shared prefix computed once (P(True))."""
        with self.model_with(weights) as model, self.accelerator.autocast():
            return next_token_logprobs(model, prefix, suffixes, candidates, self.pad, batch_size)

    def classifier(self, path: str) -> tuple[torch.nn.Module, object]:
        """A sequence-classification model (a reward model) and its tokenizer, loaded once, on this
        engine's device. Loaded from a local folder only: the run never reaches the hub."""
        if path not in self._classifiers:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            folder = Path(path).expanduser()
            if not folder.exists():
                raise ValueError(f"reward model {path}: no such folder")
            model = AutoModelForSequenceClassification.from_pretrained(folder, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self._classifiers[path] = (model.requires_grad_(False).eval().to(self.device), tokenizer)
        return self._classifiers[path]

    # ----- checkpoints -----
    def save(self, run_dir: Path, journal: dict) -> Path:
        """Collective. Whole tensors (gathered when sharded), so any backend and number of ranks can
        resume from it; DeepSpeed's optimizer is the exception: its own per-rank shards."""
        name = f"r{journal['round']:04d}-s{journal['global_step']:06d}"
        ema_state = None
        if self.ema is not None:
            ema_state = (
                backends.gather_locals(self.trained, self.ema.shadow)
                if self.partitioned
                else self.ema.state_dict()
            )
        return checkpoint.save(
            run_dir,
            name,
            weights=backends.gather(self.trained),
            optimizer=OptimizerState(self),
            scheduler=self.scheduler,
            ema_state=ema_state,
            journal={**journal, "world": dist.world(), "backend": self.cfg.launcher.backend},
        )

    def restore(self, run_dir: Path, weights: str | None = None) -> tuple[Path, dict] | None:
        """Loads the newest readable checkpoint of a run (weights, EMA, and with an optimizer its
        state); returns (its folder, its journal), or None when the run has none.

        `weights` names what a command will use (sample, export: policy | base | ema). Given, a run
        without a checkpoint, or `ema` from one that kept none, is a CheckpointError: the engine would
        otherwise hold the base model, or an average that never moved from it."""
        optimizer = OptimizerState(self) if self.optimizer is not None else None
        found = checkpoint.load_latest(run_dir, optimizer=optimizer, scheduler=self.scheduler)
        if found is None:
            if weights is not None:
                raise checkpoint.CheckpointError(f"{run_dir} has no checkpoint")
            return None
        path, state = found
        if weights == "ema" and (self.ema is None or state["ema"] is None):
            raise checkpoint.CheckpointError("weights=ema but the run kept no EMA")
        backends.scatter(self.trained, state["weights"])
        if optimizer is not None and (path / checkpoint.SHARDS).is_dir():
            optimizer.read_shards(path / checkpoint.SHARDS, state["journal"])
        if self.ema is not None and state["ema"] is not None:
            ema = state["ema"]
            if self.partitioned:
                params = backends.trainable(self.trained)
                ema = {n: backends.part_of(params[n], t) for n, t in ema.items()}
            self.ema.load_state_dict(ema)
        self.after_update()
        if dist.is_main():
            print(f"[selfimprove] loaded {path}")
        return path, {k: v for k, v in state["journal"].items() if k not in ("world", "backend")}


class OptimizerState:
    """The optimizer's state as a checkpoint holds it, whatever the backend: a whole, name-keyed state
    dict (torch.distributed.checkpoint's, gathered from FSDP2 shards, loadable on any number of
    ranks), or under DeepSpeed its own per-rank files (`write_shards`), resumable on as many ranks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside accelerate's

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=self.engine.partitioned)

    def state_dict(self) -> dict | None:
        if backends.is_deepspeed(self.engine.accelerator):
            return None
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.engine.trained, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.engine.trained, self.optimizer, state, options=self._options())

    def write_shards(self, folder: Path) -> None:
        self.engine.model.save_checkpoint(
            str(folder), tag="state", save_latest=False, exclude_frozen_parameters=True
        )

    def read_shards(self, folder: Path, journal: dict) -> None:
        saved = journal.get("world")
        if saved is not None and saved != dist.world():
            raise ConfigError(
                f"{folder.parent.name}: DeepSpeed's optimizer was saved on {saved} ranks and cannot be "
                f"loaded on {dist.world()}; resume on {saved}, or convert it with DeepSpeed's "
                "ds_to_universal and resume with its universal checkpoint"
            )
        self.engine.model.load_checkpoint(
            str(folder),
            tag="state",
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
