"""A recipe's `schedule`: per range of rounds, its verifiers, selector or objective merged over the
run's config (SCoRe's Stage I then II). Checked when the config is composed; the loop asks which entry
covers a round."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from selfimprove.errors import ConfigError

SCHEDULED = ("verifiers", "selector", "objective")


@dataclass
class ScheduleEntry:
    index: int
    name: str
    until_round: int | None  # None: to the last round
    overrides: dict
    cfg: DictConfig  # the run's config with this entry's overrides merged in


def schedule(cfg: DictConfig) -> list[ScheduleEntry]:
    """The recipe's `schedule`, each entry's stages and objective merged over the run's (SCoRe's Stage
    I then II); a ConfigError names a bad key. Empty: the same parts every round."""
    entries: list[ScheduleEntry] = []
    previous = 0
    items = list(cfg.get("schedule") or [])
    for i, item in enumerate(items):
        item = OmegaConf.to_container(item, resolve=False)
        where = f"schedule[{i}]"
        if not isinstance(item, dict) or "name" not in item:
            raise ConfigError(f"{where}: an entry is a mapping with a name, until_round and parts to change")
        unknown = sorted(set(item) - {"name", "until_round", *SCHEDULED})
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}: not schedulable (an entry sets name, until_round, {SCHEDULED})"
            )
        until = item.get("until_round")
        last = i == len(items) - 1
        if (until is None) != last or (until is not None and until <= previous):
            raise ConfigError(
                f"{where}.until_round: {until!r}; each entry but the last ends at a round after the previous "
                "entry's, and the last has until_round: null (to the end)"
            )
        previous = until or previous
        overrides = {k: item[k] for k in SCHEDULED if k in item}
        try:  # the run's config is in struct mode: an entry can only set keys its parts have
            merged = OmegaConf.merge(cfg, overrides)
        except Exception as e:
            key = getattr(e, "full_key", "") or ""
            why = str(e).splitlines()[0]
            parent = OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else None
            if "not in struct" in why and OmegaConf.is_dict(parent):  # a typo: list the keys there are
                keys = ", ".join(str(k) for k in parent if not str(k).startswith("_"))
                why = f"no such key in {key.rpartition('.')[0]} (keys: {keys})"
            raise ConfigError(f"{where}.{key}: {why}") from None
        entries.append(ScheduleEntry(i, str(item["name"]), until, overrides, merged))
    return entries


def scheduled(entries: list[ScheduleEntry], round_: int) -> ScheduleEntry | None:
    """The entry covering `round_` (None without a schedule)."""
    return next((e for e in entries if e.until_round is None or round_ <= e.until_round), None)
