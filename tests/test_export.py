"""`selfimprove export`: the exported folder loads in plain transformers (or peft) and decodes greedily
to the same tokens as our sampler on the same weights; raw and EMA; merged and adapter; the errors.

The runs are made without training: a tiny engine's trainable weights are moved by seeded noise (the
EMA keeps one copy, the raw weights move on) and saved with `Engine.save`, the loop's own checkpoint
path. Large moves make raw, EMA and base decode differently, so a mix-up would show.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from selfimprove.compose import compose_config, load_config
from selfimprove.config import register
from selfimprove.ema import engine_weights
from selfimprove.engine import Engine
from selfimprove.export import main

register()
MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # each test's engines start afresh


def fake_run(run_dir: Path, *overrides: str, checkpoint: bool = True) -> Path:
    """A run folder (saved config + one checkpoint) whose raw and EMA weights differ from each other
    and from the base."""
    cfg = compose_config([*TINY, f"run.dir={run_dir}", *overrides])
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    if not checkpoint:
        return run_dir
    engine = Engine(cfg, train=True)
    gen = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def move(scale: float) -> None:
        for p in engine.policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)

    move(0.3)
    if engine.ema is not None:
        engine.ema.update(engine.policy, 1)  # within the warm-up: the EMA copies these weights
    move(0.3)
    engine.save(run_dir, {"round": 1, "phase": "evaluate", "update_step": 0, "global_step": 1})
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return fake_run(tmp_path_factory.mktemp("lora") / "run")


def problems_of(run_dir: Path):
    cfg = OmegaConf.load(run_dir / "config.yaml")
    return instantiate(cfg.task).eval_problems(8)


def our_greedy(run_dir: Path, weights: str) -> list[list[int]]:
    """What `selfimprove eval` decodes greedily: the engine after restore, our sampler."""
    engine = Engine(load_config(run_dir, []), train=False)
    engine.restore(run_dir)
    prompts = [engine.sampler.encode(p) for p in problems_of(run_dir)]
    rows = engine.generate(
        prompts, weights=engine_weights(weights), max_new_tokens=MAX_NEW, greedy=True, record=False
    )
    return [r["completion_ids"] for r in rows]


def plain_greedy(model, folder: Path, problems, generation_config=None) -> list[list[int]]:
    """What a user of the exported folder gets: its tokenizer, its chat template, plain generate."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.padding_side == "left"
    texts = [
        tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) + p.prefill
        for p in problems
    ]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        if generation_config is None:  # the model's own, as saved
            out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
        else:  # an adapter's, loaded separately
            generation_config.update(max_new_tokens=MAX_NEW, do_sample=False)
            out = model.generate(**batch, generation_config=generation_config)
    eos = tokenizer.eos_token_id
    new = [row.tolist() for row in out[:, batch["input_ids"].shape[1] :]]
    return [ids[: ids.index(eos) + 1] if eos in ids else ids for ids in new]


def export(*args) -> None:
    main([str(a) for a in args])


@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_merged_export_decodes_like_our_sampler(lora_run, tmp_path, weights):
    out = tmp_path / "merged"
    export(lora_run, out, "--merge", "--weights", weights)
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    saved = GenerationConfig.from_pretrained(out)
    assert not saved.do_sample and saved.repetition_penalty in (None, 1.0)
    want = our_greedy(lora_run, weights)
    assert plain_greedy(model, out, problems_of(lora_run)) == want
    other = our_greedy(lora_run, "ema" if weights == "raw" else "raw")
    assert other != want  # the test can tell raw from EMA


def test_adapter_export_loads_over_the_base_with_peft(lora_run, tmp_path):
    from peft import PeftModel

    from selfimprove import models

    out = tmp_path / "adapter"
    export(lora_run, out, "--weights", "ema")
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()
    # The tiny base is built in code; the README says how: from the exported model config.
    base = models.load_model(OmegaConf.load(out / "selfimprove_model.yaml"))
    model = PeftModel.from_pretrained(base, out)
    gen = GenerationConfig.from_pretrained(out)
    assert plain_greedy(model, out, problems_of(lora_run), generation_config=gen) == our_greedy(
        lora_run, "ema"
    )


def test_full_finetune_exports_a_model(tmp_path):
    run_dir = fake_run(tmp_path / "run", "trainer=full", "ema.enabled=false", "ema.evaluate=[raw]")
    out = tmp_path / "full"
    export(run_dir, out)  # no --merge needed: there is nothing to merge
    model = AutoModelForCausalLM.from_pretrained(out)
    assert plain_greedy(model, out, problems_of(run_dir)) == our_greedy(run_dir, "raw")


def error_of(capsys, *args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        export(*args)
    return exit_.value.code, capsys.readouterr().err.strip()


def test_run_without_a_checkpoint(tmp_path):
    run_dir = fake_run(tmp_path / "run", checkpoint=False)
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from selfimprove.export import main; main(sys.argv[1:])"]
        + [str(run_dir), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"export: {run_dir} has no checkpoint"
    assert not (tmp_path / "out").exists()


def test_ema_of_a_run_without_ema(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", "ema.enabled=false", "ema.evaluate=[raw]")
    code, err = error_of(capsys, run_dir, tmp_path / "out", "--weights", "ema")
    assert code == 1 and err == "export: --weights ema but the run kept no EMA"


def test_existing_out_dir_is_refused_unless_forced(lora_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = error_of(capsys, lora_run, out, "--merge")
    assert code == 1 and err == f"export: {out} exists and is not empty (pass --force to replace it)"
    assert (out / "keep.txt").exists()
    export(lora_run, out, "--merge", "--force")
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    code, err = error_of(capsys, lora_run, lora_run.parent, "--force")
    assert code == 1 and "holds the run" in err


def test_config_mistake_is_one_line(lora_run, tmp_path, capsys):
    code, err = error_of(capsys, lora_run, tmp_path / "out", "model.nope=1")
    assert code == 2 and err.startswith("export: model.nope") and "\n" not in err
