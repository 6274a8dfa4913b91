"""The trl side of `vs_trl_grpo.py`, run in its own process (that script with --trl-worker): trl's
GRPOTrainer on the plan the script made, evaluated by a callback with the clock paused."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EVAL_BATCH = 64  # = our eval.batch_size default


def trl_worker(args: argparse.Namespace, result: Path) -> None:
    """The trl side, run in its own process: train with GRPOTrainer, write the curve to `result`."""
    plan = json.loads(args.trl_plan)
    import torch
    from datasets import Dataset
    from omegaconf import OmegaConf
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import utils as trl_utils

    from selfimprove import distributed as dist
    from selfimprove import models
    from selfimprove.config import ModelConfig, TrainerConfig
    from selfimprove.sampling.hf import HFSampler
    from selfimprove.tasks import ArithmeticTask

    if not args.trl_full_head:  # score only completion positions, as trl does where Triton runs (CUDA)
        trl_utils._use_triton = lambda device: True  # its kernel module keeps its own check: torch tiles
    model_cfg = OmegaConf.structured(ModelConfig(kind="tiny" if args.tiny else "embedded"))
    tokenizer = models.load_tokenizer(model_cfg)
    model = models.load_model(model_cfg)
    torch.manual_seed(dist.derive_seed(0, "init"))  # the LoRA init our Engine draws for seed=0
    model = models.add_lora(model, OmegaConf.structured(TrainerConfig(lora_r=16, lora_alpha=32)))
    sampler, task = HFSampler(tokenizer), ArithmeticTask(level="add_2d_1d", seed=0, prefill=True)

    budget_s = args.budget_min * 60
    max_steps = int(budget_s * 10) + 10  # >= 0.1 s a step: never reached on this machine
    problems = [task.train_problem(i) for i in range(plan["prompts"] * max_steps)]
    texts = [
        tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False) + p.prefill
        for p in problems
    ]
    # trl tokenizes text prompts with processing_class(text=prompts): the same ids as our sampler?
    for p, text in zip(problems[:512], texts[:512]):
        if tokenizer(text=[text])["input_ids"][0] != sampler.encode(p):
            raise SystemExit(f"trl would tokenize {p.id} differently from HFSampler.encode: {text!r}")
    dataset = Dataset.from_dict({"prompt": texts, "index": list(range(len(problems)))})
    held_out = task.eval_problems(args.eval_problems)
    held_ids = [sampler.encode(p) for p in held_out]

    def exact_match(prompts: list, completions: list, index: list, **_: object) -> list[float]:
        if args.partial_reward:
            return [task.reward(c, problems[i]) for c, i in zip(completions, index)]
        return [float(task.is_correct(c, problems[i])) for c, i in zip(completions, index)]

    curve: list[tuple[float, float, int]] = []

    class Clock(TrainerCallback):
        """Training seconds with evaluation excluded; evaluates every K steps; stops at the budget."""

        def __init__(self) -> None:
            self.train_s, self.t0 = 0.0, 0.0

        def evaluate(self, model: torch.nn.Module, step: int) -> None:
            was_training = model.training
            model.eval()
            correct = 0
            for s in range(0, len(held_out), EVAL_BATCH):
                outs = sampler.generate(
                    model, held_ids[s : s + EVAL_BATCH], greedy=True, max_new_tokens=6, record=False
                )
                correct += sum(task.is_correct(o["completion"], p) for o, p in zip(outs, held_out[s:]))
            curve.append((self.train_s, correct / len(held_out), step))
            print(f"[trl] step {step} train_s={self.train_s:.1f} accuracy={curve[-1][1]:.3f}", flush=True)
            model.train(was_training)

        def on_train_begin(
            self, args_: object, state: object, control: object, model=None, **_: object
        ) -> None:
            self.evaluate(model, 0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args_: object, state, control, model=None, **_: object) -> None:
            self.train_s += time.perf_counter() - self.t0
            done = self.train_s >= budget_s
            if done or state.global_step % plan["eval_steps"] == 0:
                self.evaluate(model, state.global_step)
            control.should_training_stop = done
            self.t0 = time.perf_counter()

        def on_train_end(self, args_: object, state, control, model=None, **_: object) -> None:
            if curve[-1][2] != state.global_step:  # ran out of max_steps before the budget
                self.evaluate(model, state.global_step)

    settings: dict = dict(
        output_dir=str(result.parent / "trl_out"), num_generations=8, max_completion_length=6
    )
    settings |= dict(gradient_accumulation_steps=1, seed=0, beta=0.0)
    settings |= dict(temperature=1.0, top_p=1.0, top_k=0) | plan["settings"]
    # per_device_train_batch_size counts completions, not prompts: one step = prompts x num_generations
    settings["per_device_train_batch_size"] = plan["prompts"] * settings["num_generations"]
    settings |= dict(lr_scheduler_type="constant", use_vllm=False, max_steps=max_steps, shuffle_dataset=False)
    settings |= dict(bf16=False, gradient_checkpointing=False, save_strategy="no", report_to=[])
    settings |= dict(push_to_hub=False, logging_steps=10, disable_tqdm=True)
    for item in args.trl_arg:
        key, value = item.split("=", 1)
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    config = GRPOConfig(**settings)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=exact_match,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    shown = ("loss_type", "scale_rewards", "beta", "epsilon", "num_iterations", "steps_per_generation")
    result.write_text(
        json.dumps({"curve": curve, "config": {k: getattr(config, k) for k in shown} | settings}, default=str)
    )
