"""What a run's rounds are made of, built once from the config: the scorers, selector and objective
(per schedule entry, or one set for every round) and the rollout.

Building is cheap (no stage loads a model when built), so the config check builds them to check their
columns before any model loads, and the loop runs with what the check built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selfimprove.errors import ConfigError
from selfimprove.rollout import OneTurn
from selfimprove.stages import Stage, check_columns


def build_node(path: str, node: dict) -> Any:
    """A config node's object; a ConfigError names the path (the object's own check of its arguments)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except Exception as e:
        cause = e.__cause__ or e
        raise ConfigError(f"{path}: {cause}") from None


@dataclass
class Parts:
    """What verifies, selects and trains in a round."""

    scorers: list[Stage]  # in `order_stages` order: a combined score after its parts
    selector: Stage
    objective: Any
    paths: dict[str, Stage]  # every stage by its config path, for messages

    def check(self, task: Any) -> None:
        """Each stage against the task (e.g. curation's real data needs references)."""
        for path, stage in self.paths.items():
            try:
                stage.check(task)
            except ValueError as e:
                raise ConfigError(f"{path}: {e}") from None


def build_parts(container: dict, rollout: OneTurn) -> Parts:
    """A config's (resolved, as a dict) scorers, selector and objective; a selector or objective that
    reads a column nothing writes is a ConfigError naming both."""
    paths = {
        f"verifiers.{k}": build_node(f"verifiers.{k}", v) for k, v in container.get("verifiers", {}).items()
    }
    scorers = list(paths.values())
    paths["selector"] = selector = build_node("selector", container["selector"])
    objective = build_node("objective", container["objective"])
    try:
        scorers = check_columns(scorers, selector, objective, rollout.writes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Parts(scorers, selector, objective, paths)


def build_rollout(node: dict | None) -> OneTurn:
    """The configured rollout (None, a run saved before rollouts were configurable: one turn)."""
    return build_node("rollout", node) if node else OneTurn()


@dataclass
class Plan:
    """A run's parts, built once: by schedule entry index (None: no schedule, the same every round)."""

    schedule: list  # schedule.ScheduleEntry
    parts: dict[int | None, Parts]
    rollout: OneTurn

    @property
    def needs_reference(self) -> bool:
        """Some stage asks for the frozen base's log-probs (the engine then keeps a reference)."""
        return any(s.needs_reference for p in self.parts.values() for s in p.paths.values())

    def check(self, task: Any) -> None:
        """Every part against the task, before the run folder is made."""
        for parts in self.parts.values():
            parts.check(task)
        try:
            self.rollout.check(task)
        except ValueError as e:
            raise ConfigError(f"rollout: {e}") from None
