"""`selfimprove sample`: a table of scored samples, as Parquet or JSON lines, from a model config or a
run folder's checkpoint."""

import json
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import reset_accelerate
from test_export import fake_run

from selfimprove.compose import load_config
from selfimprove.ema import engine_weights
from selfimprove.engine import Engine
from selfimprove.sample import main

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # each test's engines start afresh

TINY_MODEL = ["recipe=sharpen_sft", "model=tiny", "sampler.n=2", "prompts=3"]
SCORES = ["score/loglik_base", "score/loglik_base_mean", "score/self_certainty", "score/majority"]
COLUMNS = [
    "prompt_id",
    "sample_idx",
    "prompt",
    "messages",
    "prefill",
    "completion",
    "completion_ids",
    "prompt_ids",
    "logprobs",
    "self_certainty",
    "entropy",
    "answer",
    "target",
    "reward",
    "correct",
    *SCORES,
]


def test_model_samples_as_jsonl_and_parquet(tmp_path):
    main([*TINY_MODEL, f"out={tmp_path / 's.jsonl'}"])
    main([*TINY_MODEL, f"out={tmp_path / 's.parquet'}"])
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    frame = pd.read_json(tmp_path / "s.jsonl", lines=True)
    assert len(lines) == len(table) == len(frame) == 3 * 2
    for rows in (lines, table):
        assert all(c in rows[0] for c in COLUMNS), sorted(rows[0])
        assert {r["prompt_id"] for r in rows} == {"eval-0", "eval-1", "eval-2"}
        for r in rows:
            assert (
                len(r["logprobs"])
                == len(r["self_certainty"])
                == len(r["entropy"])
                == len(r["completion_ids"])
            )
            assert r["prompt"].endswith(r["prefill"]) and r["messages"][0]["role"] == "user"
            assert all(r[s] is None or math.isfinite(r[s]) or r[s] == -math.inf for s in SCORES)
    # same seeds, same samples, whatever the format
    assert [r["completion_ids"] for r in lines] == [r["completion_ids"] for r in table]


def test_training_split(tmp_path):
    out = tmp_path / "train.parquet"
    main(["model=tiny", "recipe=oracle_sft", "sampler.n=3", "prompts=2", "split=train", f"out={out}"])
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 6 and {r["prompt_id"] for r in rows} == {"train-0", "train-1"}
    assert "score/correct" in rows[0]  # oracle_sft's verifier: the task's checker


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_run_folder_samples_its_checkpoint(tmp_path, weights):
    run_dir = fake_run(tmp_path / "run")
    out = tmp_path / "s.parquet"
    main([str(run_dir), f"weights={weights}", "sampler.n=2", "prompts=2", f"out={out}"])
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 4 and all(s in rows[0] for s in SCORES)  # the run's recipe: sharpen_sft
    # The recorded log-probs are those of the restored weights (a forward pass agrees with them).
    reset_accelerate()
    engine = Engine(load_config(run_dir, []), train=False)
    engine.restore(run_dir)
    again = engine.logprobs(
        [r["prompt_ids"] for r in rows], [r["completion_ids"] for r in rows], engine_weights(weights)
    )
    for r, lp in zip(rows, again):
        assert lp == pytest.approx(r["logprobs"], abs=1e-4)


def test_mistakes_are_one_line(tmp_path, capsys):
    def error(*args):
        with pytest.raises(SystemExit) as exit_:
            main(list(args))
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("sample: ")
        return exit_.value.code, err

    assert error("model=tiny", f"out={tmp_path / 's.csv'}") == (
        2,
        f"sample: out: {tmp_path / 's.csv'} must end in .parquet or .jsonl",
    )
    assert error("model=tiny")[1].startswith("sample: out: missing value")
    assert "prompts" in error("model=tiny", "prompts=many", f"out={tmp_path / 's.jsonl'}")[1]
    run_dir = fake_run(tmp_path / "run", "ema.enabled=false", "ema.evaluate=[raw]")
    assert error(str(run_dir), "weights=ema", f"out={tmp_path / 's.jsonl'}") == (
        1,
        "sample: weights=ema but the run kept no EMA",
    )
    assert not list(tmp_path.glob("s.*"))


def test_probe_backtracking_is_refused_in_one_line(tmp_path, capsys):
    """`sample` fits no probe (that takes a training round's samples): backtracking with
    verifier=probe would sample plainly, so it is refused before the model loads."""
    out = tmp_path / "s.jsonl"
    with pytest.raises(SystemExit) as exit_:
        main([*TINY_MODEL, "sampler.backtrack.quota=2", "sampler.backtrack.verifier=probe", f"out={out}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in err
    assert err.startswith(
        "sample: sampler.backtrack.verifier=probe needs a probe fitted on a training round's samples"
    )
    assert "use sampler.backtrack.verifier=task" in err and not out.exists()
