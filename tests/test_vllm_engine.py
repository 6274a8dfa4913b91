"""The engine's side of the vLLM backend, with a transformers stand-in for vLLM (which cannot run
here): sleep before the update, push and probe after, and every request sampling the weights it
names — the EMA pushed to vLLM before it samples (issue 18's bug A: it sampled the trained weights)."""

import torch

from selfimprove.sampling import vllm as V


class StandIn:
    """A stand-in for VLLMSampler (vLLM cannot run here): a plain transformers copy that starts with
    the model folder's weights, loads what `push` sends (merged_state_dict), is probed like vLLM is,
    and records the weights it sampled from at each generate call (`fingerprint`)."""

    def __init__(self, tokenizer, model_path, cfg, *args, **kwargs):
        from selfimprove import models
        from selfimprove.sampling.hf import HFSampler

        self.hf = HFSampler(tokenizer, 512)
        self.events, self.sampled_from = [], []
        self.copy = models.load_model(STAND_IN_MODEL["cfg"]).eval()  # what vLLM loads from the folder
        self.holds = "policy"

    def generate(self, model, prompts, **gen):
        self.events.append("generate")
        self.sampled_from.append(fingerprint(self.copy))
        return self.hf.generate(self.copy, prompts, **gen)

    def sleep(self):
        self.events.append("sleep")

    def push(self, model, holds="policy"):
        from selfimprove.sampling.hf import sequence_logprobs

        self.events.append("push")
        self.copy.load_state_dict(V.merged_state_dict(model))
        self.holds = holds
        probe = V.probe_sequences(64)
        ours, theirs = (
            sequence_logprobs(m.eval(), [p[:1] for p in probe], [p[1:] for p in probe], 0)
            for m in (self.copy, model)
        )
        return V.check_probe(V.probe_max_diff(ours, theirs), 1e-4)


STAND_IN_MODEL: dict = {}


def fingerprint(model) -> float:
    """A number that differs between the trained and the averaged weights (merged, as vLLM holds them)."""
    with torch.no_grad():
        return round(sum(float(v.double().abs().sum()) for v in V.merged_state_dict(model).values()), 4)


def engine_on_stand_in(monkeypatch, *overrides):
    from conftest import cfg_of, reset_accelerate

    from selfimprove.engine import Engine

    cfg = cfg_of("sampler=vllm", *overrides)
    STAND_IN_MODEL["cfg"] = cfg.model
    monkeypatch.setattr(V, "VLLMSampler", StandIn)
    reset_accelerate()
    return cfg, Engine(cfg)


def test_engine_sleeps_before_the_update_pushes_after_and_samples_the_policy_there(monkeypatch):
    from test_engine import one_step

    cfg, engine = engine_on_stand_in(monkeypatch, "trainer.lr=0.05")
    _, probe = one_step(engine, cfg)
    assert engine.vllm.events == ["sleep", "push"]
    assert probe["sampler/probe_max_abs_diff"] < 1e-4

    prompts = [engine.tokenizer("What is 2 + 3?")["input_ids"]] * 2
    sampled = engine.generate(prompts, weights="policy", max_new_tokens=6, greedy=True)
    assert engine.vllm.events[-1] == "generate"
    direct = engine.sampler.generate(engine.policy, prompts, max_new_tokens=6, greedy=True)
    assert [r["completion_ids"] for r in sampled] == [r["completion_ids"] for r in direct]
    engine.generate(prompts, weights="base", max_new_tokens=2)  # the base stays with transformers
    assert engine.vllm.events.count("generate") == 1


def averaged_apart(engine) -> tuple[float, float]:
    """Moves the EMA away from the trained weights; returns (trained, averaged) fingerprints."""
    with torch.no_grad():
        for name, t in engine.ema.shadow.items():
            if "lora_B" in name:
                t.fill_(0.05)
    engine.ema.version += 1  # as an update does
    trained = fingerprint(engine.policy)
    with engine.ema.swapped_in(engine.policy):
        averaged = fingerprint(engine.policy)
    assert trained != averaged
    return trained, averaged


def test_ema_evaluation_samples_the_ema_weights_on_vllm(monkeypatch, tmp_path):
    """Bug A of issue 18: with vLLM, eval_ema/* sampled the trained weights (the EMA was swapped into
    the transformers policy, which vLLM never sees). Now "ema" is pushed to vLLM before it samples."""
    from hydra.utils import instantiate

    from selfimprove.evaluate import evaluate

    cfg, engine = engine_on_stand_in(
        monkeypatch, "ema.enabled=true", "ema.evaluate=[raw,ema]", "eval.n_problems=2", "eval.k=0"
    )
    trained, averaged = averaged_apart(engine)
    evaluate(cfg, tmp_path, task=instantiate(cfg.task), engine=engine)
    assert engine.vllm.sampled_from == [trained, averaged]
    assert fingerprint(engine.policy) == trained  # the trained weights are back in the policy
    prompts = [engine.tokenizer("What is 2 + 3?")["input_ids"]]
    engine.generate(prompts, weights="policy", max_new_tokens=2)  # and go back to vLLM when asked for
    assert engine.vllm.sampled_from[-1] == trained and engine.vllm.events.count("push") == 2


def test_ema_sample_from_samples_the_ema_weights_on_vllm(monkeypatch, tmp_path):
    """ema.sample_from=ema with vLLM: the round's samples come from the average."""
    import contextlib
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from selfimprove.loop import Loop
    from selfimprove.rollout import OneTurn

    cfg, engine = engine_on_stand_in(
        monkeypatch, "ema.enabled=true", "ema.sample_from=ema", "loop.prompts_per_round=2", "sampler.n=2"
    )
    _, averaged = averaged_apart(engine)
    loop = SimpleNamespace(
        cfg=cfg, engine=engine, task=instantiate(cfg.task), plan=SimpleNamespace(rollout=OneTurn())
    )
    loop.context = lambda r, *parts: Loop.context(loop, r, *parts)
    r = SimpleNamespace(
        number=1, folder=tmp_path, phase=lambda name: contextlib.nullcontext(), compute={}, record={}
    )
    assert len(Loop.sample(loop, r)) == 4
    assert engine.vllm.sampled_from == [averaged]
