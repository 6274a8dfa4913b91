"""`selfimprove report`: one run or many into one HTML page, rendered by a real headless browser; and
the bad inputs (no runs, a killed run, a torn metrics line, mixed recipes and round counts)."""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY, letter_task, run_cli

from selfimprove.metrics import answer_information

BROWSER = next(
    (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
)


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory) -> Path:
    """A tiny run whose reported round is chosen without labels (the information score), on answers
    that change from round to round (a letter task), so the score differs between rounds."""
    folder = tmp_path_factory.mktemp("report")
    run_dir = folder / "run"
    select = ["eval.unlabelled_problems=6", "eval.unlabelled_k=4", "eval.select_by=unlabelled/information"]
    sized = ["eval.n_problems=6", "eval.k_problems=6", "trainer.lr=0.05"]
    run_cli(["train", *TINY, *letter_task(folder), *sized, *select, f"run.dir={run_dir}"])
    return run_dir


def rendered(page: Path) -> str:
    """The page's DOM after a headless browser loaded it (its images decoded or not)."""
    proc = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def rounds_of(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {x["round"]: x for x in lines if "round_seconds" in x}


def test_answer_information_by_hand():
    # pooled {1: 2, 2: 1, 3: 1}: H = ln 2 / 2 + ln 4 / 2; within: 0 and ln 2
    info = answer_information({"p1": ["1", "1"], "p2": ["2", "3"]})
    assert info["answer_entropy"] == pytest.approx(1.5 * math.log(2))
    assert info["information"] == pytest.approx(math.log(2))
    assert info["agreement"] == pytest.approx(0.75)
    # every prompt answered alike (a collapse) carries no information, however confident
    assert answer_information({"p1": ["7"] * 4, "p2": ["7"] * 4})["information"] == 0.0


def test_selection_without_labels(selected_run):
    """The reported round is the evaluated one with the highest information, recomputed here from
    each round's unlabelled samples on disk (scores that differ between rounds, so a broken score or a
    tie-break to round 0 fails); its metrics under selected/."""
    import pyarrow.parquet as pq

    rounds = rounds_of(selected_run)
    for number, record in rounds.items():
        (folder,) = (selected_run / "rounds" / f"r{number:04d}" / "eval").glob("*/raw-unlabelled")
        groups: dict[str, list] = {}
        for row in pq.read_table(folder).to_pylist():
            groups.setdefault(row["prompt_id"], []).append(row["answer"])
        assert len(groups) == 6 and all(len(g) == 4 for g in groups.values())
        assert record["unlabelled/information"] == pytest.approx(answer_information(groups)["information"])
    assert len({r["unlabelled/information"] for r in rounds.values()}) > 1
    selected = json.loads((selected_run / "selected.json").read_text())
    best = max(rounds.values(), key=lambda r: (r["unlabelled/information"], -r["round"]))
    assert selected["selected/round"] == best["round"] and selected["selected/by"] == "unlabelled/information"
    assert selected["selected/eval/accuracy"] == best["eval/accuracy"]


@pytest.mark.skipif(
    BROWSER is None, reason="no headless browser (apt-get install chromium; setup.sh --tests)"
)
def test_one_run_page_in_a_browser(selected_run, tmp_path):
    page = tmp_path / "one.html"
    run_cli(["report", str(selected_run), f"out={page}"])
    numbers = json.loads(page.with_suffix(".json").read_text())
    (run,) = numbers["runs"]
    rounds = rounds_of(selected_run)
    assert run["summary"]["start"] == rounds[0]["eval/accuracy"]
    assert run["summary"]["final"] == rounds[2]["eval/accuracy"]
    assert (
        run["summary"]["reported_round"]
        == json.loads((selected_run / "selected.json").read_text())["selected/round"]
    )
    dom = rendered(page)
    images = len(re.findall(r"<img ", dom))
    assert images >= 6  # accuracy, samples, model selection, diversity, seconds, memory at least
    assert f'data-plots-rendered="{images}"' in dom  # every plot decoded by the browser
    for table in ("runs", "aggregate", "samples"):
        assert f'id="{table}"' in dom
    assert 'alt="held-out accuracy"' in dom


@pytest.mark.skipif(
    BROWSER is None, reason="no headless browser (apt-get install chromium; setup.sh --tests)"
)
def test_sweep_page_with_bad_runs(selected_run, tmp_path):
    """A sweep of three: one whole, one killed mid-round with a torn last line, one of another recipe and
    round count. The page reports what is there and says what is odd; the numbers are the runs' own."""
    sweep = tmp_path / "sweep"
    for name in ("seed=0", "seed=1", "seed=2"):
        shutil.copytree(selected_run, sweep / name, ignore=shutil.ignore_patterns("checkpoints"))
    killed = sweep / "seed=1" / "metrics.jsonl"
    lines = killed.read_text().splitlines()
    last_round = max(i for i, x in enumerate(lines) if "round_seconds" in x)
    killed.write_text("\n".join(lines[:last_round]) + "\n" + lines[last_round][: len(lines[last_round]) // 2])
    (sweep / "seed=1" / "selected.json").unlink()
    other = sweep / "seed=2" / "config.yaml"
    other.write_text(
        other.read_text().replace("recipe: sharpen_sft", "recipe: other").replace("rounds: 2", "rounds: 3")
    )
    page = tmp_path / "sweep.html"
    proc = run_cli(["report", str(sweep), f"out={page}"])
    assert "Traceback" not in proc.stderr
    numbers = json.loads(page.with_suffix(".json").read_text())
    assert [r["name"] for r in numbers["runs"]] == ["seed=0", "seed=1", "seed=2"]
    notes = " ".join(numbers["warnings"])
    assert "metrics.jsonl:" in notes and "torn" in notes  # the torn line, named by file and line
    assert "1 of 2 rounds" in notes and "different recipes" in notes and "different round counts" in notes
    rounds = rounds_of(selected_run)
    killed_summary = numbers["runs"][1]["summary"]
    assert killed_summary["final_round"] == 1 and killed_summary["final"] == rounds[1]["eval/accuracy"]
    band = numbers["aggregate"]["per_round"]["eval/accuracy"]
    assert band["2"]["runs"] == 2 and band["1"]["runs"] == 3
    gains = [r["summary"]["gain"] for r in numbers["runs"]]
    assert numbers["aggregate"]["gain"]["worst"] == min(gains)
    assert numbers["aggregate"]["gain"]["median"] == sorted(gains)[1]
    # selecting afterwards: the killed run (no selected.json) reports its most informative round
    run_cli(["report", str(sweep), f"out={page}", "select_by=unlabelled/information"])
    after = json.loads(page.with_suffix(".json").read_text())["runs"][1]["summary"]
    best = max((rounds[0], rounds[1]), key=lambda r: (r["unlabelled/information"], -r["round"]))
    assert after["reported_round"] == best["round"] and after["reported_by"] == "unlabelled/information"
    dom = rendered(page)
    assert 'id="aggregate"' in dom and dom.count("<img ") >= 2
    assert f'data-plots-rendered="{dom.count("<img ")}"' in dom


def test_report_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    for args, message in [
        ([str(tmp_path / "empty"), f"out={tmp_path}/r.html"], "no run under"),
        ([str(tmp_path / "absent"), f"out={tmp_path}/r.html"], "does not exist"),
        ([str(tmp_path / "empty")], "usage: selfimprove report"),
    ]:
        proc = run_cli(["report", *args], check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "r.html").exists()
