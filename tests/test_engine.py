"""The engine owns the models: reference on the policy's device, fp32 master weights under bf16,
the optimizer the config names, gradient checkpointing, attention implementation."""

import pytest
import torch
from conftest import cfg_of

from selfimprove import models, train
from selfimprove.config import ConfigError, check_trainable, register, validate_targets
from selfimprove.engine import Engine

register()
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def examples(engine, n=4):
    prompt = engine.tokenizer("What is 2 + 3?")["input_ids"]
    return [
        {"prompt_ids": prompt, "completion_ids": engine.tokenizer(f" {i + 5}")["input_ids"]} for i in range(n)
    ]


def one_step(engine, cfg) -> tuple[dict, dict]:
    """One SFT optimizer step on four rows, then the sampler takes the weights: (metrics, its probe)."""
    from selfimprove.objectives import SFT

    steps = train.steps(engine, SFT(), examples(engine), cfg=cfg.trainer, seed_of_step=lambda *parts: 0)
    _, metrics = next(steps)
    steps.close()
    return metrics, engine.after_update()


def test_full_finetune_reference_is_frozen_on_the_policy_device():
    cfg = cfg_of("trainer=full")
    engine = Engine(cfg, train=True, reference=True)
    ref = next(engine.frozen.parameters())
    assert ref.device == next(engine.policy.parameters()).device == engine.device
    assert not any(p.requires_grad for p in engine.frozen.parameters())
    with engine.reference() as base:
        assert base is engine.frozen


def test_lora_reference_is_the_adapter_switched_off():
    engine = Engine(cfg_of(), train=False, reference=True)
    assert engine.frozen is None
    prompt, completion = [[1, 2, 3]], [[4, 5]]
    with torch.no_grad():  # a non-zero adapter makes policy and base differ
        for n, p in engine.policy.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    base = engine.logprobs(prompt, completion, "base")
    policy = engine.logprobs(prompt, completion, "policy")
    assert base != policy


@pytest.mark.parametrize("trainer", ["full", "lora"])
def test_bf16_trains_fp32_master_weights(trainer):
    # At lr 1e-5 an AdamW step moves each weight by ~1e-5, below bf16's resolution for weights ~0.02:
    # stepped in bf16 the update rounds away; with fp32 master weights it is kept.
    cfg = cfg_of(
        f"trainer={trainer}", "model.dtype=bfloat16", "trainer.lr=1e-5", "trainer.micro_batch_size=4"
    )
    engine = Engine(cfg, train=True)
    trainable = {n: p for n, p in engine.policy.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in engine.policy.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # the LoRA base stays in bf16
    before = {n: p.detach().clone() for n, p in trainable.items()}
    metrics, _ = one_step(engine, cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    moved = [n for n, p in trainable.items() if not torch.equal(p, before[n])]
    assert len(moved) >= len(trainable) // 2
    state = next(iter(engine.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32


def test_fp16_training_is_refused_with_a_message():
    with pytest.raises(ConfigError, match="model.dtype=float16 cannot train"):
        check_trainable(cfg_of("model.dtype=float16"))


def test_optimizer_choice():
    assert isinstance(Engine(cfg_of("trainer.optimizer=sgd")).optimizer.optimizer, torch.optim.SGD)
    with pytest.raises(ConfigError, match="trainer.optimizer: 'lion' is not"):
        validate_targets(cfg_of("trainer.optimizer=lion"))


def test_adamw_8bit_without_bitsandbytes_names_the_package():
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        validate_targets(cfg_of("trainer.optimizer=adamw_8bit"))


def test_gradient_checkpointing_and_attention_implementation():
    cfg = cfg_of("trainer.gradient_checkpointing=true", "model.attn_implementation=eager")
    engine = Engine(cfg)
    base = engine.policy.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert engine.policy.config._attn_implementation == "eager"
    assert torch.isfinite(torch.tensor(one_step(engine, cfg)[0]["train/loss"]))


def test_missing_model_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        validate_targets(cfg_of("model=hf", f"model.path={tmp_path}/nowhere"))


def test_end_of_turn_is_eos_and_pad_whatever_the_converter_chose():
    # transformers 5.17 converts the GGUF with eos <|im_start|> and no pad token.
    tokenizer = models.load_tokenizer(cfg_of().model)
    tokenizer.eos_token = "<|im_start|>"
    tokenizer.pad_token = None
    models.set_end_of_turn(tokenizer)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2


def test_bf16_recipe_runs_end_to_end(tmp_path):
    import json

    from conftest import TINY, run_cli

    run_dir = tmp_path / "r"
    run_cli(["train", *TINY, "loop.rounds=1", "eval.k=0", "model.dtype=bfloat16", f"run.dir={run_dir}"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert [x["round"] for x in lines if "eval/accuracy" in x] == [0, 1]


def test_same_seed_same_adapter_whatever_the_global_rng(tmp_path):
    # A model loaded from a folder draws LoRA's A from the global RNG: unseeded, two runs of the same
    # recipe and seed trained different adapters (the default job diverged after its first update).
    base = Engine(cfg_of(), train=False)
    base.policy.get_base_model().save_pretrained(tmp_path / "m")
    base.tokenizer.save_pretrained(tmp_path / "m")

    def adapter(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(torch.randint(0, 2**31, (1,)).item())  # whatever happened before
        engine = Engine(cfg_of("model=hf", f"model.path={tmp_path / 'm'}", f"seed={seed}"), train=False)
        return {n: p.detach().clone() for n, p in engine.policy.named_parameters() if "lora_A" in n}

    a, b, c = adapter(0), adapter(0), adapter(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)
