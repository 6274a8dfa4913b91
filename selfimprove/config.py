"""Typed config schemas (registered with Hydra's ConfigStore) and the checks run before any model loads.

Groups whose options share one shape (model, sampler, trainer, logger) have a dataclass schema, so
OmegaConf rejects a typo or a wrong type with the key's path. Groups whose options are different
classes (task, verifiers, selector, objective) carry a `_target_`; `validate_targets` checks their keys
and simple types against the target's signature, again before anything heavy happens.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, DictConfig, OmegaConf

# its own module: the checks below call into backends.py and sampling/vllm.py, which raise it too;
# `from selfimprove.config import ConfigError` keeps working
from selfimprove.errors import ConfigError
from selfimprove.parts import Plan, build_node, build_parts, build_rollout
from selfimprove.rollout import check_views
from selfimprove.schedule import SCHEDULED, ScheduleEntry, schedule, scheduled  # noqa: F401 (also here)

UNLABELLED = ("unlabelled/information", "unlabelled/view_agreement")  # label-free model selection


@dataclass
class RunConfig:
    dir: str = "runs/${recipe}"


@dataclass
class LoopConfig:
    rounds: int = 4
    prompts_per_round: int = 64
    # seeded: the run's seed draws where in the task's prompt stream round 1 starts (seeds differ in
    # prompts and sampling); fixed: round r takes prompts (r-1)*prompts_per_round ... whatever the seed
    prompt_order: str = "seeded"
    # every round takes round 1's prompts (many epochs on one small set: Hyperfitting) instead of the next
    same_prompts: bool = False


@dataclass
class ModelConfig:
    kind: str = "embedded"  # embedded | hf | tiny
    path: str | None = None  # hf: a local folder or a cached hub id (offline)
    dtype: str = "float32"  # float32 | bfloat16 (fp32 master weights, bf16 autocast) | float16 (no training)
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2; None: transformers' choice
    # tiny only: a randomly initialised model of the same architecture and tokenizer
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    init_seed: int = 0


@dataclass
class VLLMConfig:
    """sampler.backend=vllm only: the engine colocated in each training process."""

    gpu_memory_utilization: float = 0.3  # the share of the GPU vLLM may take (the trainer keeps the rest)
    sleep: bool = True  # free vLLM's weights and KV cache while the trainer runs
    sync_timeout_s: float = 300.0  # a weight push that takes longer fails the run with an error
    probe_tolerance: float = 0.05  # max |log-prob difference| (nats/token) of the probe after a push
    logprobs_topk: int = 20  # top-k log-probs per token; self-certainty approximated from them (-1: all)
    enforce_eager: bool = False


@dataclass
class BacktrackConfig:
    """sampler.backtrack: tokenwise rejection sampling with backtracking (`sampling/backtrack.py`)."""

    quota: int = 0  # backtracks per sequence (0: off); the paper's code job: 4
    block: int = 4  # tokens erased per backtrack (B)
    threshold: float = 0.5  # reject when P(error) >= threshold
    same_prefix_once: bool = True
    verifier: str = "task"  # task | probe
    layer: int = -1  # probe: the hidden layer it reads

    def check(self, where: str = "sampler.backtrack") -> None:
        if self.quota < 0:
            raise ValueError(f"{where}.quota={self.quota}: must be >= 0 (0 turns backtracking off)")
        if self.block < 1:
            raise ValueError(f"{where}.block={self.block}: must be >= 1 token")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"{where}.threshold={self.threshold}: must be in (0, 1]")
        if self.verifier not in ("task", "probe"):
            raise ValueError(f"{where}.verifier={self.verifier!r}: not task|probe")


@dataclass
class SamplerConfig:
    backend: str = "hf"  # hf (transformers generate, everywhere) | vllm (GPU, the 'vllm' extra)
    compile: str = (
        "auto"  # hf: static KV cache + torch.compile: auto (GPU, ≥ 64 new tokens) | true | false | static
    )
    length_bucket: int = 32  # hf static cache: prompt widths round up to a multiple (few compiled shapes)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    typical_p: float = 1.0  # locally typical sampling's mass τ (Meister et al.); 1: off
    max_new_tokens: int = 6
    batch_size: int = 64  # sequences per generate call
    max_prompt_tokens: int = 512
    # tokenwise rejection sampling with backtracking (Botta et al.): quota 0 is off
    backtrack: BacktrackConfig = field(default_factory=BacktrackConfig)


@dataclass
class TrainerConfig:
    lora: bool = True
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    optimizer: str = "adamw"  # adamw | adamw_8bit (needs bitsandbytes) | sgd
    lr: float = 3e-4
    weight_decay: float = 0.0
    momentum: float = 0.0  # sgd only
    gradient_checkpointing: bool = False
    # the update's forward: "auto" packs a micro-batch's rows as one prefix tree where that is cheaper
    # (each shared prompt token once), "false" runs every row whole, "true" always packs
    share_prefix: str = "auto"
    max_grad_norm: float = 1.0
    steps_per_round: int = 8  # optimizer steps in each update phase
    micro_batch_size: int = 16
    grad_accum: int = 1
    scheduler: str = "constant"  # any transformers.get_scheduler name
    warmup_steps: int = 0
    min_selected: int = 1  # fewer selected samples than this skips the update (logged)


@dataclass
class LauncherConfig:
    """How training is spread over the processes `torchrun`/`accelerate launch` started (configs/launcher/)."""

    backend: str = "ddp"  # ddp | deepspeed (the 'deepspeed' extra) | fsdp2
    zero_stage: int = 2  # deepspeed: 2 (optimizer + gradients sharded) | 3 (parameters too)
    reshard_after_forward: bool = True  # fsdp2: free the gathered layer after its forward


@dataclass
class EMAConfig:
    enabled: bool = False
    warmup: int = 10
    power: float = 0.5
    floor: float = 1e-4
    sample_from: str = "raw"  # raw | ema
    evaluate: list[str] = field(default_factory=lambda: ["raw"])


@dataclass
class EvalConfig:
    n_problems: int = 300
    k: int = 8  # samples per held-out problem for pass@k / maj@k (0: greedy only)
    k_problems: int = 100  # pass@k / maj@k on the first k_problems held-out problems
    k_every_round: bool = False  # else only before the first and after the last round
    temperature: float = 1.0
    batch_size: int = 64
    # the sampler's unless set: a chain of thought cut at a shorter eval length would score as wrong
    max_new_tokens: int = II("sampler.max_new_tokens")
    before: bool = True  # evaluate the starting model as round 0
    every: int = 1
    # Model selection: the evaluated round with the best `select_by` is the one reported (selected/*).
    # dev/accuracy: greedy accuracy on dev_problems labelled problems (a recipe using it uses labels);
    # unlabelled/information: the prompt-answer mutual information of unlabelled_k samples on each of
    # unlabelled_problems prompts (no labels); unlabelled/view_agreement (rollout=views): how often a
    # prompt's forms' majority answers agree. Both sets are training problems far past any run's rounds,
    # not held out: a small task trains on many of them (the default task: about half).
    dev_problems: int = 0
    unlabelled_problems: int = 0
    unlabelled_k: int = 4
    select_by: str | None = None  # None | dev/accuracy | one of UNLABELLED (view_agreement: rollout=views)


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb | tensorboard (metrics.jsonl is always written)
    project: str = "selfimprove"


@dataclass
class Config:
    recipe: str = "quickstart"
    seed: int = 0
    resume: str | None = None  # None | auto
    run: RunConfig = field(default_factory=RunConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    verifiers: dict[str, Any] = field(default_factory=dict)
    selector: Any = None
    objective: Any = None
    rollout: Any = None
    # stages and objective per range of rounds: [{name, until_round, verifiers/selector/objective: {...}}]
    schedule: list[Any] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in [
        ("model", ModelConfig),
        ("sampler", SamplerConfig),
        ("launcher", LauncherConfig),
        ("trainer", TrainerConfig),
        ("logger", LoggerConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)


def _type_ok(value: Any, annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty or annotation is Any or value is None:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation in (int, str, bool):
        return isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return True


def _check_target(path: str, node: dict) -> None:
    target = node["_target_"]
    module_name, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{path}._target_: cannot import '{target}' ({e})") from None
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to names only
        hints = {}
    params = inspect.signature(fn).parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key not in params:
            if takes_kwargs:
                continue
            close = [p for p in params if p != "self"]
            raise ConfigError(f"{path}.{key}: not a parameter of {target} (accepted: {close})")
        if not _type_ok(value, hints.get(key, params[key].annotation)):
            want = hints.get(key, params[key].annotation)
            raise ConfigError(f"{path}.{key}: {value!r} is not a valid {want} for {target}")


def validate_targets(cfg: DictConfig) -> Plan:
    """Check every `_target_` node's keys and simple types against its signature; returns the parts
    built to check their columns, for the loop to run with."""
    container = OmegaConf.to_container(cfg, resolve=True)

    def walk(path: str, node: Any) -> None:
        if isinstance(node, dict):
            if "_target_" in node:
                _check_target(path, node)
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(f"{path}.{k}" if path else str(k), v)

    walk("", container)
    for group in ("task", "selector", "objective"):
        if not isinstance(container.get(group), dict) or "_target_" not in container[group]:
            raise ConfigError(f"{group}: missing (choose one with {group}=NAME)")
    entries = schedule(cfg)
    for entry in entries:  # every stage of a schedule is checked like the base config
        merged = OmegaConf.to_container(entry.cfg, resolve=True)
        for group in SCHEDULED:
            if group in entry.overrides:
                walk(f"schedule.{entry.name}.{group}", merged[group])
    plan = build_plan(cfg, entries)
    from selfimprove.sampling.vllm_checks import check_backend, check_sampling_values

    if cfg.sampler.backend == "vllm":
        if cfg.model.kind == "tiny":
            raise ConfigError("sampler.backend=vllm loads a model folder; model.kind=tiny is built in code")
        check_sampling_values(cfg)  # temperatures and top-p vLLM samples at exactly as asked
    check_backend(cfg.sampler.backend)  # hf | vllm (where vllm imports and a CUDA GPU is visible)
    _check_model(cfg)
    from selfimprove import backends

    backends.check(cfg)
    if cfg.trainer.optimizer not in ("adamw", "adamw_8bit", "sgd"):
        raise ConfigError(f"trainer.optimizer: {cfg.trainer.optimizer!r} is not adamw|adamw_8bit|sgd")
    if cfg.trainer.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("trainer.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes")
    _check_sampler(cfg.sampler)
    if cfg.loop.prompt_order not in ("seeded", "fixed"):
        raise ConfigError(f"loop.prompt_order: {cfg.loop.prompt_order!r} is not seeded|fixed")
    if cfg.eval.every < 1:
        raise ConfigError(
            f"eval.every: {cfg.eval.every} (evaluate every N >= 1 rounds; eval.before=false skips round 0)"
        )
    needs = {"dev/accuracy": "dev_problems"} | dict.fromkeys(UNLABELLED, "unlabelled_problems")
    if cfg.eval.select_by is not None and cfg.eval.select_by not in needs:
        raise ConfigError(f"eval.select_by: {cfg.eval.select_by!r} is not null|{'|'.join(needs)}")
    if cfg.eval.select_by and cfg.eval[needs[cfg.eval.select_by]] <= 0:
        raise ConfigError(
            f"eval.select_by={cfg.eval.select_by} reads eval.{needs[cfg.eval.select_by]}, which is 0"
        )
    check_views(plan.rollout, cfg.sampler.n, cfg.eval.select_by)
    if cfg.ema.sample_from not in ("raw", "ema"):
        raise ConfigError(f"ema.sample_from: {cfg.ema.sample_from!r} is not raw|ema")
    for which in cfg.ema.evaluate:
        if which not in ("raw", "ema"):
            raise ConfigError(f"ema.evaluate: {which!r} is not raw|ema")
    if (cfg.ema.sample_from == "ema" or "ema" in cfg.ema.evaluate) and not cfg.ema.enabled:
        raise ConfigError("ema.sample_from/ema.evaluate use 'ema' but ema.enabled is false")
    return plan


def _check_sampler(sampler) -> None:
    """The sampling options and backtracking settings, each error naming its key."""
    from selfimprove.sampling.decode import WARPERS, check_warper_options

    try:
        check_warper_options({k: sampler[k] for k in WARPERS})
        BacktrackConfig(**sampler.backtrack).check()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if sampler.backend == "vllm" and sampler.typical_p != 1.0:
        raise ConfigError(
            f"sampler.typical_p={sampler.typical_p}: vLLM has no typical sampling; use sampler=hf"
        )
    if sampler.backend == "vllm" and sampler.backtrack.quota > 0:
        raise ConfigError(
            "sampler.backtrack.quota > 0: backtracking erases from our own KV cache; use sampler=hf"
        )


def _check_model(cfg: DictConfig) -> None:
    model = cfg.model
    if model.kind not in ("embedded", "hf", "tiny"):
        raise ConfigError(f"model.kind: {model.kind!r} is not embedded|hf|tiny")
    if model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype: {model.dtype!r} is not float32|bfloat16|float16")
    if model.kind == "hf":
        if not model.path:
            raise ConfigError("model.path: required with model=hf (a local model folder)")
        # "org/name" may be a hub id in the local cache; anything else is a path
        looks_local = model.path.startswith((".", "/", "~")) or model.path.count("/") > 1
        if looks_local and not Path(model.path).expanduser().exists():
            raise ConfigError(f"model.path: {model.path} does not exist")


def check_trainable(cfg: DictConfig) -> None:
    """What only training needs: fp16 would need a loss scaler, which this version does not use."""
    if cfg.model.dtype == "float16":
        raise ConfigError(
            "model.dtype=float16 cannot train here (fp16 gradients need a loss scaler): use bfloat16, which "
            "trains with fp32 master weights, or float32"
        )
    from selfimprove.logprobs import check_share_prefix  # late: it imports torch

    check_share_prefix(str(cfg.trainer.share_prefix).lower(), cfg.model.attn_implementation)


def build_plan(cfg: DictConfig, entries: list[ScheduleEntry] | None = None) -> Plan:
    """The run's parts, built once (cheap: no stage loads a model when built) and checked for the
    columns they read: the base config's, and each schedule entry's (which the rounds then use)."""
    base = OmegaConf.to_container(cfg, resolve=True)
    rollout = build_rollout(base.get("rollout"))
    entries = schedule(cfg) if entries is None else entries
    base_parts = build_parts(base, rollout)  # checked even when a schedule replaces it
    by_entry = {e.index: build_parts(OmegaConf.to_container(e.cfg, resolve=True), rollout) for e in entries}
    return Plan(entries, by_entry or {None: base_parts}, rollout)


def build_stages(nodes: dict[str, Any], task: Any) -> dict[str, Any]:
    """Stages by config path, built and checked against the task (curation's real data needs
    references) before any model loads; a ConfigError names the path."""
    stages = {}
    for path, node in nodes.items():
        stages[path] = build_node(path, node)
        try:
            stages[path].check(task)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    return stages
