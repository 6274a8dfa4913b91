"""Whether a run may resume under a changed config: the changes that would make it a different
experiment, as lines naming each key (`resume=auto` refuses with them)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys that may change on resume (rounds, logger, eval sizes, run.dir...); any other change makes the
# resumed run a different experiment.
# The launcher too: a run may resume on another backend or number of ranks (checkpoints hold whole tensors).
RESUME_SAFE = ("loop.rounds", "logger", "eval", "run", "resume", "ema.evaluate", "launcher")

CONSTANT_SCHEDULERS = ("constant", "constant_with_warmup")


def resume_diff(old: DictConfig, new: DictConfig) -> list[str]:
    """Lines describing changes between two resolved configs that make resuming unsafe."""
    a = _flatten(OmegaConf.to_container(old, resolve=True))
    b = _flatten(OmegaConf.to_container(new, resolve=True))
    lines = []
    if a.get("loop.rounds") != b.get("loop.rounds") and a.get("trainer.scheduler") not in CONSTANT_SCHEDULERS:
        # The schedule's horizon is rounds × steps: changing it would change learning rates already planned.
        lines.append(
            f"  loop.rounds: {a.get('loop.rounds')!r} -> {b.get('loop.rounds')!r} (trainer.scheduler="
            f"{a.get('trainer.scheduler')} spans loop.rounds × trainer.steps_per_round steps; changing the "
            "number of rounds would change its learning rates: start a new run, or use a constant scheduler)"
        )
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key) or any(key == s or key.startswith(s + ".") for s in RESUME_SAFE):
            continue
        lines.append(f"  {key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return lines


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
