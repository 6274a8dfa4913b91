"""Where results go: metrics.jsonl always (one JSON object per line), plus wandb or tensorboard,
and tqdm progress bars. Only rank 0 writes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from selfimprove import distributed as dist


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; None reads as "not measurable"
    return value


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg, config_dict: dict) -> None:
        self.main = dist.is_main()
        self.path = run_dir / "metrics.jsonl"
        self.backend = None
        if not self.main or cfg.kind == "none":
            return
        if cfg.kind == "wandb":
            import wandb

            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.backend = wandb.init(
                project=cfg.project, dir=str(run_dir), config=config_dict, mode=mode, resume="allow"
            )
        elif cfg.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.backend = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
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
