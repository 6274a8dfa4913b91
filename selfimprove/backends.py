"""Training backends, all through accelerate: ddp (the default), deepspeed (ZeRO-2/3), fsdp2.

`launcher.backend` picks one (configs/launcher/); `accelerate launch --config_file
scripts/accelerate/<name>.yaml` or plain `torchrun` start the processes. What differs between them is
gathered here, so the engine, the update and the checkpoints read the same on every backend:

- where a parameter's values live: whole on every rank (ddp, ZeRO-2), or partitioned (ZeRO-3: each
  rank holds a flat slice `ds_tensor`; FSDP2: a DTensor whose local part is a dim-0 shard). `local`
  gives this rank's part (what the EMA averages: it stays sharded, on the CPU), `gather` the whole
  tensors (collective: checkpoints, the sampling copy), `scatter` puts whole tensors back.
- how micro-batches accumulate: DDP/FSDP skip the gradient reduction with no_sync until the last
  micro-batch; DeepSpeed is told where the accumulation boundary is, steps itself there (clipping
  with `gradient_clipping`) and reports the gradient norm (accelerate's clip_grad_norm_ returns None).

accelerate enables neither FSDP nor DeepSpeed on a CPU (it picks MULTI_CPU); torch's FSDP2 and
DeepSpeed both run over gloo, so on a CPU we set the distributed type after construction — how the
tests run every backend with two CPU ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from selfimprove import distributed as dist
from selfimprove.errors import ConfigError
from selfimprove.extras import require

BACKENDS = ("ddp", "deepspeed", "fsdp2")
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}


def check(cfg) -> None:
    """Config-time checks of `launcher`, before anything is loaded."""
    launcher = cfg.launcher
    if launcher.backend not in BACKENDS:
        raise ConfigError(f"launcher.backend: {launcher.backend!r} is not {'|'.join(BACKENDS)}")
    if launcher.backend == "deepspeed":
        require("deepspeed", "deepspeed", "launcher.backend=deepspeed")
        if launcher.zero_stage not in (2, 3):
            raise ConfigError(f"launcher.zero_stage: {launcher.zero_stage} is not 2|3")
    # `accelerate launch --config_file` says which backend it set up in the environment: it must agree
    for env, backend in (("ACCELERATE_USE_DEEPSPEED", "deepspeed"), ("ACCELERATE_USE_FSDP", "fsdp2")):
        if os.environ.get(env, "false").lower() == "true" and launcher.backend != backend:
            raise ConfigError(
                f"launched by accelerate with {backend} ({env}=true) but launcher.backend={launcher.backend}: "
                f"add launcher={'zero3' if backend == 'deepspeed' else 'fsdp2'} (or zero2)"
            )


def deepspeed_config(cfg) -> dict:
    """The DeepSpeed config the run's numbers imply. The update tells DeepSpeed where each step's
    accumulation ends, so its own gradient_accumulation_steps stays 1 (no loss scaling by it)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.trainer.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.trainer.max_grad_norm,
        "zero_optimization": {"stage": cfg.launcher.zero_stage},
        "bf16": {"enabled": cfg.model.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.model.dtype == "float16"},
        "zero_allow_untested_optimizer": True,  # our torch AdamW; DeepSpeed wraps it
    }


def make_accelerator(cfg) -> Accelerator:
    backend, cpu = cfg.launcher.backend, not torch.cuda.is_available()
    if backend != "ddp" and "RANK" not in os.environ:
        _single_process_group()
    mixed = MIXED_PRECISION[cfg.model.dtype]
    plugin: dict = {}
    if backend == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        plugin["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg))
    elif backend == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",  # one shard group per decoder layer
            reshard_after_forward=cfg.launcher.reshard_after_forward,
            state_dict_type="FULL_STATE_DICT",
        )
    if not cpu or backend == "ddp":
        return Accelerator(cpu=cpu, mixed_precision=mixed, **plugin)
    accelerator = Accelerator(cpu=True, mixed_precision=mixed)
    state = accelerator.state
    kind = DistributedType.FSDP if backend == "fsdp2" else DistributedType.DEEPSPEED
    # every later AcceleratorState() copies the process state's type over its own: set both
    state.distributed_type = PartialState().distributed_type = kind
    if backend == "fsdp2":
        state.fsdp_plugin = plugin["fsdp_plugin"]
    else:
        ds = plugin["deepspeed_plugin"]
        ds.set_mixed_precision(mixed)
        ds.select(_from_accelerator_state=True)
        state.deepspeed_plugins = ds
        accelerator.deepspeed_engine_wrapped = None
    return accelerator


def _single_process_group() -> None:
    """DeepSpeed and FSDP2 need a process group even alone: `python -m selfimprove` then runs as a
    world of one, as torchrun would start it (DeepSpeed would otherwise look for MPI)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    os.environ.update({**defaults, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def partitioned(cfg) -> bool:
    """Whether parameters are split over ranks (sampling then runs on a whole copy: `Engine.policy`)."""
    return cfg.launcher.backend == "fsdp2" or (
        cfg.launcher.backend == "deepspeed" and cfg.launcher.zero_stage == 3
    )


def module(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The trained module inside accelerate's (and DeepSpeed's) wrappers; FSDP2 shards in place."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard, ZeRO-3's flat partition, or itself."""
    if hasattr(p, "to_local"):
        return p.to_local()
    if hasattr(p, "ds_tensor"):
        return p.ds_tensor
    return p


def gather(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole trainable parameters, on the CPU, on every rank."""
    params = trainable(model)
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in params.items()}
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().to("cpu", copy=True)
        for n, p in params.items()
    }


def gather_locals(model: torch.nn.Module, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective: whole tensors from per-rank parts shaped like `local(p)` (the sharded EMA)."""
    params = trainable(model)
    out = {}
    for name, part in parts.items():
        p = params[name]
        if hasattr(p, "to_local"):
            from torch.distributed.tensor import DTensor

            whole = DTensor.from_local(
                part.to(p.device, p.dtype), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
            out[name] = whole.full_tensor().to("cpu", torch.float32)
        elif hasattr(p, "ds_tensor"):
            out[name] = _gather_zero3(p, part)
        else:
            out[name] = part.to("cpu", torch.float32, copy=True)
    return out


def _gather_zero3(p: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    # ZeRO-3 pads the flattened parameter to world × partition size: all-gather, cut, reshape
    chunks = [torch.empty_like(part) for _ in range(dist.world())]
    device = dist.state().device
    gathered = [c.to(device) for c in chunks]
    torch.distributed.all_gather(gathered, part.to(device))
    return torch.cat([g.cpu() for g in gathered])[: p.ds_numel].view(p.ds_shape).float()


def part_of(p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole tensor, shaped like `local(p)` (no communication)."""
    if hasattr(p, "to_local"):
        shard = local(p)
        if shard.numel() == 0:
            return whole.new_empty(shard.shape)
        # FSDP2 shards dim 0 into world chunks (torch.chunk), the last ones possibly short or empty
        return torch.chunk(whole, p.device_mesh.size(), dim=0)[dist.rank()].reshape(shard.shape)
    if hasattr(p, "ds_tensor"):
        size = p.ds_tensor.numel()
        flat = torch.zeros(size * dist.world(), dtype=whole.dtype)
        flat[: whole.numel()] = whole.reshape(-1)
        return flat[dist.rank() * size : (dist.rank() + 1) * size]
    return whole


@torch.no_grad()
def scatter(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies whole tensors into the trainable parameters, each rank its part; a missing name errors."""
    params = trainable(model) | dict(model.named_parameters())
    for name, whole in state.items():
        if name not in params:
            raise KeyError(f"checkpoint holds {name!r}, which this model does not have")
        target = local(params[name])
        target.copy_(part_of(params[name], whole).to(target.device, target.dtype))


@contextlib.contextmanager
def accumulating(accelerator: Accelerator, model: torch.nn.Module, last: bool) -> Iterator[None]:
    """One micro-batch's backward: gradients reduce over ranks only after the last one of a step."""
    if is_deepspeed(accelerator):
        model.set_gradient_accumulation_boundary(last)
        yield
    elif last:
        yield
    else:
        with accelerator.no_sync(model):
            yield


def backward(accelerator: Accelerator, model: torch.nn.Module, loss: torch.Tensor) -> None:
    if is_deepspeed(accelerator):
        model.backward(loss)  # not accelerate's: it would call DeepSpeed's step after every micro-batch
    else:
        accelerator.backward(loss)


def clip_and_norm(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> float:
    """Clips and returns the global grad norm (not under DeepSpeed, which clips inside its step)."""
    norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return float(norm)


def deepspeed_step(model: torch.nn.Module) -> tuple[float | None, bool]:
    """DeepSpeed's optimizer step at the boundary (clip, step, zero grads): (its global grad norm, or
    None when it computed none; whether it skipped the step). DeepSpeed skips a step whose gradient
    is not finite (fp16 always; bf16 and fp32 through its grad-norm check in 0.19.8, the version
    scripts/setup.sh installs) and records it in the optimizer's `overflow`."""
    model.step()
    norm = model.get_global_grad_norm()
    skipped = bool(getattr(model.optimizer, "overflow", False))
    return (float(norm) if norm is not None else None), skipped
