"""Iterate averaging (EMA) of the trained weights, after Block et al. 2310.11428.

theta_bar <- (1 - beta_t) theta_bar + beta_t theta_t, with the schedule of the authors'
``abblock/bema`` code. The average is for inference/evaluation only and is never fed back
to the optimizer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from selfimprove.backends import local

# The names users give weights (ema.sample_from, ema.evaluate, `sample weights=`, `export --weights`) and
# the engine's one vocabulary (Engine.WEIGHTS): "raw" is the trained weights, the engine's "policy".
USER_WEIGHTS = {"raw": "policy", "ema": "ema"}


def engine_weights(name: str) -> str:
    """The engine's name for the weights a user named raw|ema."""
    if name not in USER_WEIGHTS:
        raise ValueError(f"weights: {name!r} is not {'|'.join(USER_WEIGHTS)}")
    return USER_WEIGHTS[name]


def ema_beta(t: int, warmup: int = 10, power: float = 0.5, floor: float = 1e-4) -> float:
    """beta_t = max((1 + max(0, t - warmup))^(-power), floor), for optimizer step t counted from 1.

    beta = 1 (a plain copy) for t <= warmup: an implicit warm-up; the defaults give .7071 at t=11.
    ``power=1, warmup=1`` gives beta_t = 1/t: the running mean of the iterates theta_1..theta_t.
    (``warmup=0`` gives 1/(1+t), a running mean that also counts the weights the EMA started from.)
    """
    if t < 1:
        raise ValueError(f"EMA step t counts optimizer steps from 1 (t=1 after the first step); got t={t}")
    return max((1.0 + max(0, t - warmup)) ** (-power), floor)


class EMA:
    """fp32 CPU averages of the model's trainable parameters, keyed by parameter name.

    Under ZeRO-3 or FSDP2 each rank averages only its own part of every parameter (`backends.local`),
    so the EMA stays sharded: no rank ever holds a whole gathered copy of it.

    Only ``requires_grad`` parameters are tracked (with LoRA: just the adapter), since frozen
    ones never change. ``update`` takes t, the global optimizer step counted from 1 (HF's
    ``global_step`` after the step), not the number of updates, so updating every k steps still
    follows the schedule. Steps t <= warmup copy the weights.

    LoRA: the A and B factors are averaged separately, so the averaged adapter applies
    avg(B) @ avg(A), which is not the average update avg(B @ A). That is cheap and keeps the
    average loadable as an ordinary adapter; the two agree when A or B stays constant.
    """

    def __init__(self, model: nn.Module, warmup: int = 10, power: float = 0.5, floor: float = 1e-4) -> None:
        self.warmup = warmup
        self.power = power
        self.floor = floor
        self.shadow: dict[str, Tensor] = {
            name: local(p).detach().to("cpu", torch.float32, copy=True)
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        if not self.shadow:
            raise ValueError("model has no trainable parameters to average")
        self.version = 0  # counts changes of the averages: a copy made of them names the one it holds

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [n for n in self.shadow if n not in params]
        if missing:
            raise KeyError(f"model lacks EMA-tracked parameters, e.g. {missing[:3]}")
        return params

    @torch.no_grad()
    def update(self, model: nn.Module, t: int) -> float:
        """Fold the current weights in with beta = ema_beta(t), after optimizer step t (counted
        from 1: pass 1 after the first step). Returns beta, for logging; ValueError if t < 1."""
        beta = ema_beta(t, self.warmup, self.power, self.floor)
        params = self._params(model)
        for name, avg in self.shadow.items():
            cur = local(params[name]).detach().to("cpu", torch.float32)
            if beta >= 1.0:
                avg.copy_(cur)  # exact copy; also clears any non-finite history
            else:
                avg.mul_(1.0 - beta).add_(cur, alpha=beta)
        self.version += 1
        return beta

    def swapped_in(self, model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """Temporarily load the averages into ``model`` (each rank its part); see `swapped`."""
        self._params(model)  # a missing name is a KeyError before anything moves
        return swapped(model, self.shadow)

    def state_dict(self) -> dict[str, Tensor]:
        """Flat name -> fp32 tensor map (safetensors-compatible); schedule args are config."""
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        if set(sd) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(sd))[:3]
            extra = sorted(set(sd) - set(self.shadow))[:3]
            raise KeyError(f"EMA keys differ: missing {missing}, extra {extra}")
        for name, t in sd.items():
            if t.shape != self.shadow[name].shape:
                raise ValueError(f"shape mismatch for {name}: {tuple(t.shape)}")
            self.shadow[name].copy_(t.to("cpu", torch.float32))
        self.version += 1


@contextmanager
def swapped(model: nn.Module, tensors: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily load `tensors` (by parameter name, shaped like each parameter's `local` part) into
    ``model``; its own weights come back on exit.

    The own weights are backed up on CPU (memory-safe for full fine-tunes) and restored bit-for-bit
    even if the body raises. Do not step the optimizer inside.
    """
    params = dict(model.named_parameters())
    backup: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, value in tensors.items():
            p = local(params[name])
            backup[name] = p.detach().to("cpu", copy=True)
            p.copy_(value.to(device=p.device, dtype=p.dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, own in backup.items():
                local(params[name]).copy_(own.to(local(params[name]).device))
