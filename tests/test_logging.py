"""metrics.jsonl trimming on resume (torn lines, atomic rewrite) and wandb/tensorboard set-up."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

from selfimprove import logging as slog
from selfimprove.config import ConfigError

LINES = [
    {"round": 0, "step": 0, "eval/accuracy": 0.1},
    *({"round": 1, "step": s, "train/loss": 1.0} for s in (1, 2, 3)),
    {"round": 1, "step": 3, "eval/accuracy": 0.2},
    *({"round": 2, "step": s, "train/loss": 1.0} for s in (4, 5)),
]


def write_metrics(path, torn: str = '{"round": 2, "step": 6, "train/lo') -> None:
    path.write_text("".join(json.dumps(x) + "\n" for x in LINES) + torn)


def test_trim_metrics_keeps_the_resumed_rule_and_skips_a_torn_line(tmp_path, capsys):
    """Resuming in round 2 after global step 4: earlier rounds and steps <= 4 stay, the rest (the
    resumed run writes them again) and the line torn by the kill go."""
    path = tmp_path / "metrics.jsonl"
    write_metrics(path)
    slog.trim_metrics(path, 2, 4)
    kept = [json.loads(x) for x in path.read_text().splitlines()]
    assert kept == LINES[:-1]
    out = [x for x in capsys.readouterr().out.splitlines() if x]
    assert len(out) == 1 and "metrics.jsonl" in out[0] and "1" in out[0], out


def test_trim_metrics_rewrites_atomically(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, torn="")
    before = path.read_text()

    def killed(*args):
        raise KeyboardInterrupt  # the process dies before the rename

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        slog.trim_metrics(path, 1, 0)
    assert path.read_text() == before  # never half-rewritten


def test_trim_metrics_without_a_file(tmp_path):
    slog.trim_metrics(tmp_path / "metrics.jsonl", 3, 9)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # keep the user's ~/.config out of it
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = SimpleNamespace(kind="wandb", project="selfimprove-test")
    ids = []
    for step in (1, 2):  # a run, then its resume
        logger = slog.MetricsLogger(run_dir, cfg, {"seed": 0})
        logger.log({"round": 1, "step": step, "train/loss": 1.0 / step}, step)
        ids.append(logger.backend.id)
        logger.close()
    assert ids[0] == ids[1]
    assert (run_dir / "wandb_run_id").read_text().strip() == ids[0]
    runs = [p.name for p in (run_dir / "wandb").iterdir() if p.name.startswith("offline-run-")]
    # offline-run-<time>-<id>, with "-1" appended by wandb when both started within the same second
    assert len(runs) == 2 and all(r.split("-")[3] == ids[0] for r in runs), runs


@pytest.mark.parametrize(("kind", "module"), [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_logger_package_names_the_extra(tmp_path, monkeypatch, kind, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ConfigError) as err:
        slog.MetricsLogger(tmp_path, SimpleNamespace(kind=kind, project="p"), {})
    message = str(err.value)
    assert f"pip install 'selfimprove[{kind}]'" in message and "\n" not in message
