"""Where results go: metrics.jsonl always (one JSON object per line), plus wandb or tensorboard,
and tqdm progress bars. Only rank 0 writes."""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selfimprove import distributed as dist
from selfimprove.config import ConfigError


def log(message: str) -> None:
    """A `[selfimprove]` line on stderr: stdout carries only a command's data (eval's JSON)."""
    print(f"[selfimprove] {message}", file=sys.stderr, flush=True)


def stdout_to_stderr() -> contextlib.AbstractContextManager:
    """For a command whose stdout is data: while it works, anything printed to stdout goes to stderr,
    libraries' notices included (DeepSpeed's logger, made on import, keeps the stream it found)."""
    return contextlib.redirect_stdout(sys.stderr)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; None reads as "not measurable"
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def trim_metrics(path: Path, round_: int, global_step: int) -> None:
    """On resume at (round_, global_step), forgets the lines the resumed run will write again: keeps
    those of earlier rounds and train steps <= global_step. A line a kill tore mid-write is dropped
    with a notice. Rewritten atomically; rank 0 only (the others return at once)."""
    if not dist.is_main() or not path.exists():
        return
    keep, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            done_step = "train/loss" in rec and rec["step"] <= global_step
            if rec["round"] < round_ or done_step:
                keep.append(line)
        except (ValueError, TypeError, KeyError):  # torn (or not ours): not a record to keep
            if line.strip():
                torn += 1
    if torn:
        print(f"[selfimprove] {path}: dropped {torn} unreadable line(s), torn by an interrupted write")
    _write_atomic(path, "".join(k + "\n" for k in keep))


def _needs(extra: str, error: ImportError) -> ConfigError:
    return ConfigError(f"logger={extra} needs its package ({error}): pip install 'selfimprove[{extra}]'")


def _wandb(run_dir: Path, project: str, config_dict: dict) -> Any:
    """A wandb run whose id lives in the run folder, so a resumed run continues the same wandb run."""
    try:
        import wandb
    except ImportError as e:
        raise _needs("wandb", e) from None
    id_file = run_dir / "wandb_run_id"
    if not id_file.exists():  # written before init: a kill during init still resumes this id
        _write_atomic(id_file, secrets.token_hex(4) + "\n")  # 8 characters, like wandb's own ids
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return wandb.init(
        project=project,
        dir=str(run_dir),
        config=config_dict,
        mode=mode,
        id=id_file.read_text().strip(),
        resume="allow",
    )


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise _needs("tensorboard", e) from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, config_dict: dict) -> None:
        self.main = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.backend = None
        if not self.main or cfg.kind == "none":
            return
        if cfg.kind == "wandb":
            self.backend = _wandb(run_dir, cfg.project, config_dict)
        elif cfg.kind == "tensorboard":
            self.backend = _tensorboard(run_dir)
        else:
            raise ValueError(f"logger.kind: {cfg.kind!r} is not none|wandb|tensorboard")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.main:
            return
        record = {k: _clean(v) for k, v in metrics.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None}
        if self.backend is None:
            return
        if hasattr(self.backend, "add_scalar"):
            for k, v in numeric.items():
                self.backend.add_scalar(k, v, step)
        else:
            self.backend.log(numeric, step=step)

    def close(self) -> None:
        if self.backend is not None:
            getattr(self.backend, "finish", getattr(self.backend, "close", lambda: None))()


def progress(total: int, desc: str, initial: int = 0) -> tqdm:
    return tqdm(
        total=total, desc=desc, initial=initial, disable=not dist.is_main(), dynamic_ncols=True, leave=False
    )
