"""The vLLM backend's pure parts (vLLM itself cannot run here: no GPU, not installed)."""

import copy
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from conftest import cfg_of
from hydra import compose, initialize_config_dir

from selfimprove.cli import CONFIG_DIR
from selfimprove.config import ConfigError, register, validate_targets
from selfimprove.sampling import vllm as V
from selfimprove.sampling import vllm_checks as C
from selfimprove.sampling.decode import token_stats

register()


# These mirror vLLM 0.33.0's classes (vllm/logprobs.py Logprob; vllm/outputs.py CompletionOutput and
# RequestOutput), attribute for attribute as far as rows_from_outputs reads them, because vLLM
# cannot run here.
@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class Tok:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


def test_collapse_and_expand_keep_order():
    prompts = [[1], [1], [2], [1], [1], [1], [3]]
    groups = V.collapse_repeats(prompts)
    assert groups == [([1], 2), ([2], 1), ([1], 3), ([3], 1)]
    counts = [c for _, c in groups]
    per_request = [[(tuple(p), j) for j in range(c)] for p, c in groups]
    flat = V.expand(per_request, counts)
    assert [list(p) for p, _ in flat] == prompts
    with pytest.raises(ValueError):
        V.expand(per_request, [2, 1, 3, 2])
    seeds = V.request_seeds(5, counts)  # vLLM's child k takes seed + k: one distinct seed per row
    row_seeds = [s + k for s, c in zip(seeds, counts) for k in range(c)]
    assert len(set(row_seeds)) == len(prompts)


def dist(vocab=10, seed=0):
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_topk_stats_exact_at_full_vocab_and_close_with_topk(temperature):
    logits = dist()
    _, sc, ent = token_stats(logits)
    q = torch.log_softmax(logits / temperature, dim=-1)  # vLLM's processed log-probs
    full_sc, full_ent = V.topk_token_stats(q.tolist(), 10, temperature)
    assert full_sc == pytest.approx(float(sc), abs=1e-5)
    assert full_ent == pytest.approx(float(ent), abs=1e-5)
    top = q.topk(7).values.tolist()
    approx_sc, approx_ent = V.topk_token_stats(top, 10, temperature)
    assert math.isfinite(approx_sc) and approx_sc >= 0
    assert approx_ent == pytest.approx(float(ent), abs=0.3)
    # k = V with a hand-made distribution
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    _, sc4, ent4 = token_stats(p.log())
    assert V.topk_token_stats(p.log().tolist(), 4) == pytest.approx((float(sc4), float(ent4)), abs=1e-6)
    # uniform tail is exact when the tail is uniform
    p = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    _, sc5, ent5 = token_stats(p.log())
    assert V.topk_token_stats(p.log()[:2].tolist(), 5) == pytest.approx((float(sc5), float(ent5)), abs=1e-6)


def test_rows_from_outputs():
    def pos(chosen, lp, others):
        d = {chosen: Logprob(lp, rank=1)}
        d.update({t: Logprob(v, rank=i + 2) for i, (t, v) in enumerate(others)})
        return d

    lps = [pos(5, -0.1, [(6, -2.5)]), pos(2, -0.3, [(7, -1.5)]), pos(9, -0.2, [])]
    comp = CompletionOutput(0, "", [5, 2, 9], None, lps)  # tokens after the EOS are cut
    comp2 = CompletionOutput(1, "", [7], None, [pos(7, -0.05, [(5, -3.0)])], finish_reason="length")
    out = RequestOutput("0", None, [1, 1], None, [comp, comp2])
    (rows,) = V.rows_from_outputs([out], Tok.eos_token_id, Tok(), vocab=10)
    assert rows[0]["completion_ids"] == [5, 2] and rows[0]["completion"] == "5"
    assert rows[0]["logprobs"] == [-0.1, -0.3]
    assert len(rows[0]["self_certainty"]) == len(rows[0]["entropy"]) == 2
    sc, ent = V.topk_token_stats([-0.1, -2.5], 10)
    assert rows[0]["self_certainty"][0] == pytest.approx(sc) and rows[0]["entropy"][0] == pytest.approx(ent)
    assert rows[1]["completion_ids"] == [7] and rows[1]["logprobs"] == [-0.05]
    assert [r["truncated"] for r in rows] == [False, True]  # vLLM's finish_reason: "length" is a cut
    (plain,) = V.rows_from_outputs([out], Tok.eos_token_id, Tok(), record=False)
    assert set(plain[0]) == {"completion_ids", "completion", "truncated"}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_merged_state_dict_reproduces_the_lora_model():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    plain = copy.deepcopy(base)
    assert set(V.merged_state_dict(plain)) == set(plain.state_dict())
    lora = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.eval()
    merged = V.merged_state_dict(lora)
    assert not any("lora_" in k or "base_layer" in k or k.startswith("base_model") for k in merged)
    assert set(merged) == set(plain.state_dict())
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    before = plain(ids).logits
    plain.load_state_dict(merged)
    with torch.no_grad():
        want, got = lora(input_ids=ids).logits, plain(ids).logits
    assert not torch.allclose(before, want, atol=1e-3)  # the adapter changes the model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_probe_pass_and_fail():
    a = [[-1.0, -2.0], [-0.5]]
    assert V.check_probe(V.probe_max_diff(a, [[-1.01, -2.0], [-0.5]]), 0.05) == pytest.approx(0.01)
    with pytest.raises(V.WeightSyncError, match="probe_tolerance=0.05"):
        V.check_probe(V.probe_max_diff(a, [[-1.0, -2.3], [-0.5]]), 0.05)
    with pytest.raises(V.WeightSyncError):
        V.check_probe(float("nan"), 0.05)
    with pytest.raises(ValueError):
        V.probe_max_diff(a, [[-1.0], [-0.5]])


def test_run_with_deadline():
    assert V.run_with_deadline(lambda: 7, 5.0, "fast") == 7
    with pytest.raises(V.WeightSyncTimeout, match=r"sampler\.vllm\.sync_timeout_s=0\.2"):
        V.run_with_deadline(lambda: time.sleep(3), 0.2, "vLLM weight push")

    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        V.run_with_deadline(boom, 5.0, "failing")


def test_config_check_is_one_line():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        tiny = compose("config", overrides=["sampler=vllm", "model=tiny"])
        cfg = compose("config", overrides=["sampler=vllm"])
    with pytest.raises(ConfigError, match="model.kind=tiny is built in code"):
        validate_targets(tiny)
    assert cfg.sampler.backend == "vllm" and cfg.sampler.vllm.logprobs_topk == 20
    with pytest.raises(ConfigError) as e:
        validate_targets(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg in (
        "sampler.backend=vllm needs vllm: pip install 'selfimprove[vllm]'",
        "sampler.backend=vllm needs a CUDA GPU",
    )
    with pytest.raises(ConfigError, match=r"'sglang' is not hf\|vllm"):
        C.check_backend("sglang")
    C.check_backend("hf")


# ----- VLLMSampler itself, on a fake `vllm` module that records what it is asked -----
class FakeCUDA(threading.local):
    """CUDA's current device is per thread; a new thread starts on device 0."""

    device = 0


class FakeLLM:
    """vLLM 0.33's LLM as far as VLLMSampler calls it. Each call records the CUDA device current in
    the calling thread; its copy of the model takes what reload_weights sends and answers the probe."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.params = kwargs, [], []
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # as vLLM's Worker.init_device does
        self.copy = tiny_llama()
        self.model_config = SimpleNamespace(get_vocab_size=lambda: 100)
        self.prefix_cache_reset = True

    def record(self, what):
        self.calls.append((what, torch.cuda.current_device()))

    def wake_up(self, tags=None):
        self.record("wake_up")
        return True

    def sleep(self, level=1):
        self.record("sleep")

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.record(method)
        self.copy.load_state_dict(dict(kwargs["weights_iterator"]))
        return [None]

    def reset_prefix_cache(self):
        self.record("reset_prefix_cache")
        return self.prefix_cache_reset

    def generate(self, prompts, params, use_tqdm=True):
        from selfimprove.sampling.hf import sequence_logprobs

        self.record("generate")
        self.params.append(params)
        outs = []
        for p in prompts:
            ids = p["prompt_token_ids"]
            lps = sequence_logprobs(self.copy, [ids[:1]], [ids[1:]], 0)[0]
            outs.append(
                RequestOutput("0", None, ids, [None] + [{t: Logprob(x)} for t, x in zip(ids[1:], lps)])
            )
        return outs


class FakeSamplingParams(dict):
    def __init__(self, **kwargs):
        super().__init__(kwargs)


class ProbeTok(Tok):
    pad_token_id = 0

    def __len__(self):
        return 100


@pytest.fixture
def fake_vllm(monkeypatch):
    """VLLMSampler on FakeLLM, with a per-thread fake CUDA device and an environment of its own."""
    from selfimprove import extras

    cuda = FakeCUDA()
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: setattr(cuda, "device", int(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: cuda.device)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the sampler sets RANK, MASTER_PORT, ...
    fake = SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    monkeypatch.setattr(extras, "require", lambda *args: fake)
    return cfg_of(
        "sampler=vllm",
        "model.dtype=bfloat16",
        "sampler.max_prompt_tokens=100",
        "sampler.max_new_tokens=8",
        "eval.max_new_tokens=40",
        recipe=None,
        model=None,
    )


def test_vllm_gets_the_dtype_the_length_and_a_free_port(fake_vllm):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)
    sampler = V.VLLMSampler(ProbeTok(), "/models/m", fake_vllm)
    kwargs = sampler.llm.kwargs
    assert kwargs["dtype"] == "bfloat16"  # vLLM's "auto" would run a float32 model in bf16
    assert kwargs["max_model_len"] == 100 + 40  # the longest prompt + the most new tokens asked for
    assert os.environ["RANK"] == "0" and os.environ["MASTER_PORT"] != "29500"
    with pytest.raises(ValueError, match="max_model_len=140"):
        sampler.generate(None, [[1] * 100], max_new_tokens=41)


def test_push_runs_on_the_callers_device_reloads_and_checks_the_cache(fake_vllm):
    os.environ.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2")  # rank 1's engine lives on GPU 1
    sampler = V.VLLMSampler(ProbeTok(), "/models/m", fake_vllm)
    sampler.sleep()
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.1)  # the trainer's weights moved
    assert sampler.push(model, holds="ema@3") == pytest.approx(0.0, abs=1e-5)
    assert sampler.holds == "ema@3" and not sampler.asleep
    calls = sampler.llm.calls
    assert [what for what, _ in calls] == [
        "sleep",
        "wake_up",
        "reload_weights",  # load_weights plus vLLM's post-load processing
        "wake_up",
        "reset_prefix_cache",
        "generate",
    ]
    assert {device for _, device in calls} == {1}  # the push's thread too, not GPU 0
    assert sampler.llm.params[-1]["detokenize"] is False
    sampler.llm.prefix_cache_reset = False
    with pytest.raises(V.WeightSyncError, match="prefix cache"):
        sampler.push(model)
    assert sampler.holds is None  # a failed push leaves weights nobody asked for


def vllm_cfg(tmp_path, *overrides):
    return cfg_of(
        "sampler=vllm",
        "model=hf",
        f"model.path={tmp_path}",
        "+verifiers.teacher._target_=selfimprove.verify.EMATeacher",
        "ema.enabled=true",
        *overrides,
        recipe=None,
        model=None,
    )


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.temperature=0.005", "sampler.temperature"),  # vLLM would sample at 0.01
        ("sampler.temperature=2.5", "sampler.temperature"),  # vLLM refuses > 2
        ("sampler.top_p=0", "sampler.top_p"),
        ("sampler.top_p=0.9", "sampler.top_p"),  # vLLM's log-probs would be the nucleus's, not π_old
        ("eval.temperature=3", "eval.temperature"),
        ("+verifiers.teacher.temperature=0.001", "verifiers.teacher.temperature"),  # the EMA samples too
    ],
)
def test_vllm_refuses_temperatures_it_would_change(tmp_path, override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=\S+: sampler.backend=vllm"):
        validate_targets(vllm_cfg(tmp_path, override))


def test_vllm_takes_the_temperatures_it_samples_at_as_asked(tmp_path):
    C.check_sampling_values(vllm_cfg(tmp_path, "sampler.temperature=0.01", "eval.temperature=2.0"))
    validate_targets(vllm_cfg(tmp_path, "sampler.backend=hf", "sampler.temperature=0.005"))  # hf: any


def test_the_backends_and_the_vllm_sampler_do_not_import_the_config():
    """The config check calls into both: they take ConfigError from its own module (no import circle),
    and the config module still offers the same class."""
    import subprocess
    import sys

    from selfimprove import errors

    code = "import sys, selfimprove.backends, selfimprove.sampling.vllm; print('selfimprove.config' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert ConfigError is errors.ConfigError
