"""Log-probs and self-certainty captured during generation equal a separate forward pass, and
decoding is what the sampler asks for, whatever generation defaults the model was saved with."""

import pytest
import torch
from conftest import EosAs
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, GenerationConfig

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.logprobs import scored_logprobs
from selfimprove.objectives import PolicyGradient
from selfimprove.sampling import HFSampler, neutral_generation_defaults, sequence_logprobs
from selfimprove.sampling.decode import token_stats, warpers
from selfimprove.tasks import ArithmeticTask
from selfimprove.train import collate, micro_batch_loss


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    return models.load_model(cfg), models.load_tokenizer(cfg)


# Generation defaults that would change every decoding they leaked into: sampling, top-k, a penalty.
OPINIONS = {"do_sample": True, "temperature": 0.3, "top_k": 5, "repetition_penalty": 1.8}
LORA = OmegaConf.create(
    {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
)


@pytest.fixture(scope="module")
def opinionated_dir(tmp_path_factory):
    """A tiny model saved with those defaults in its generation_config.json. Its logits are 10x a
    random init's, so it repeats tokens and a leaked repetition penalty moves its log-probs by far
    more than the tolerance (near-uniform logits would hide it)."""
    model = models.load_model(OmegaConf.structured(ModelConfig(kind="tiny")))
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    model.generation_config = GenerationConfig(**OPINIONS)
    folder = tmp_path_factory.mktemp("opinionated")
    model.save_pretrained(folder)
    return folder


def load_opinionated(folder, lora: bool = False):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.generation_config.repetition_penalty == OPINIONS["repetition_penalty"]  # they load back
    if lora:
        model = models.add_lora(model, LORA)  # a PeftModel: generate runs on the model inside
    return model


@pytest.fixture(scope="module")
def opinionated(opinionated_dir, tiny):
    return load_opinionated(opinionated_dir), tiny[1]


def mixed_length_prompts(sampler: HFSampler) -> list[list[int]]:
    task = ArithmeticTask()
    prompts = [sampler.encode(task.train_problem(i)) for i in range(3)]
    return [prompts[0], prompts[1][:-2], prompts[2]]  # different lengths: left padding matters


def completion_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The logits that predicted each completion token, from one plain forward pass (no generate),
    on the model's device."""
    ids = torch.tensor([prompt + completion], device=next(model.parameters()).device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return logits[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)].float().cpu()


def assert_recorded_stats_match(
    model, tok, temperature: float, max_new_tokens: int = 5, **truncation: float
) -> None:
    """Recorded log-probs equal a plain forward pass at the sampling temperature, before any truncation
    (`truncation`: top_p, typical_p only choose which tokens can be drawn; the recorded π_old is the
    tempered policy the update trains, so the importance ratio is 1 on-policy); self-certainty and
    entropy equal the model's own distribution; at temperature 1 `sequence_logprobs` agrees."""
    sampler = HFSampler(tok)
    prompts = mixed_length_prompts(sampler)
    rows = sampler.generate(
        model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=1, **truncation
    )
    for p, row in zip(prompts, rows):
        logits = completion_logits(model, p, row["completion_ids"])
        _, sc, ent = token_stats(logits)
        logp = torch.log_softmax(logits / temperature, dim=-1)
        want_lp = logp.gather(1, torch.tensor(row["completion_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(row["logprobs"]), want_lp, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(row["self_certainty"]), sc, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(row["entropy"]), ent, atol=2e-4, rtol=1e-4)
    if temperature == 1.0:
        again = sequence_logprobs(model, prompts, [r["completion_ids"] for r in rows], tok.pad_token_id)
        for got, row in zip(again, rows):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(row["logprobs"]), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("model_name", ["tiny", "opinionated"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_recorded_stats_match_a_forward_pass(request, model_name, temperature):
    assert_recorded_stats_match(*request.getfixturevalue(model_name), temperature)


@pytest.mark.parametrize(
    "truncation", [{"top_p": 0.8}, {"typical_p": 0.5}, {"top_p": 0.5, "temperature": 1.0}]
)
def test_recorded_logprobs_are_the_tempered_policy_before_truncation(opinionated, truncation):
    assert_recorded_stats_match(*opinionated, **{"temperature": 0.7, **truncation})


@pytest.mark.parametrize("compile", ["false", "static"])
@pytest.mark.parametrize("truncation", [{"top_p": 0.5}, {"typical_p": 0.5}])
def test_grpo_ratio_is_one_on_policy_when_sampling_truncates(tiny, compile, truncation):
    """Issue 29: the first step on fresh samples is on-policy, so π (the update's own forward at the
    objective's temperature, as train.py runs it) over the recorded π_old is 1 on every completion
    token, though top-p / typical sampling drew them from a truncated distribution (whose log-probs
    are higher by log kept-mass: ρ would be the kept mass, and below 1 − ε the clip would zero every
    negative-advantage token's gradient)."""
    model, tok = tiny
    sampler = HFSampler(tok, compile=compile, batch_size=8)
    prompts = [p for p in mixed_length_prompts(sampler) for _ in range(2)]
    rows = sampler.generate(model, prompts, max_new_tokens=5, temperature=0.7, seed=1, **truncation)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        row.update(prompt_ids=p, advantage=-1.0 if i % 2 else 1.0)
    cut = warpers(temperature=0.7, **truncation)(
        None, completion_logits(model, prompts[0], rows[0]["completion_ids"])
    )
    assert torch.isinf(cut).any(-1).all()  # the truncation removed tokens at every step
    objective = PolicyGradient(temperature=0.7)
    with torch.no_grad():
        scored = scored_logprobs(
            model,
            [(r["prompt_ids"], r["completion_ids"]) for r in rows],
            tok.pad_token_id,
            objective.temperature,
        )
        batch = collate(rows, ("logprobs",))
        ratio = torch.exp(scored.logps - batch["logprobs"])[batch["completion"]]
        assert len(ratio) == sum(len(r["completion_ids"]) for r in rows)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
        _, metrics = micro_batch_loss(
            model, rows, objective, objective.normalizer(rows), pad=tok.pad_token_id
        )
    assert metrics["pg/clip_frac"][0].item() == 0
    total, count = metrics["pg/ratio"]
    assert (total / count).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_greedy_is_the_argmax_whatever_the_saved_generation_config(opinionated_dir, tiny, lora):
    model, tok = load_opinionated(opinionated_dir, lora), tiny[1]
    sampler = HFSampler(tok)
    prompts = mixed_length_prompts(sampler)
    rows = sampler.generate(model, prompts, max_new_tokens=8, greedy=True, seed=1)
    again = sampler.generate(model, prompts, max_new_tokens=8, greedy=True, seed=2)
    assert [r["completion_ids"] for r in rows] == [r["completion_ids"] for r in again]
    for p, row in zip(prompts, rows):
        logits = completion_logits(model, p, row["completion_ids"])
        assert row["completion_ids"] == logits.argmax(-1).tolist()  # teacher-forced: argmax at each step
        want_lp = torch.log_softmax(logits, -1).max(-1).values
        torch.testing.assert_close(torch.tensor(row["logprobs"]), want_lp, atol=2e-4, rtol=1e-4)
    assert model.generation_config.repetition_penalty == OPINIONS["repetition_penalty"]  # restored


def test_generation_defaults_restored_after_an_error(opinionated):
    model, _ = opinionated
    saved = model.generation_config
    with pytest.raises(RuntimeError, match="boom"), neutral_generation_defaults(model):
        assert model.generation_config.repetition_penalty is None
        raise RuntimeError("boom")
    assert model.generation_config is saved


def test_same_seed_same_samples(tiny):
    model, tok = tiny
    sampler = HFSampler(tok)
    prompts = [sampler.encode(ArithmeticTask().train_problem(0))] * 4
    a = sampler.generate(model, prompts, max_new_tokens=4, seed=7)
    b = sampler.generate(model, prompts, max_new_tokens=4, seed=7)
    assert [r["completion_ids"] for r in a] == [r["completion_ids"] for r in b]


def test_prompt_too_long_names_the_problem(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="problem train-0: prompt is"):
        HFSampler(tok, max_prompt_tokens=4).encode(ArithmeticTask().train_problem(0))


def test_repeated_prompts_share_one_prefill_and_sample_the_same(tiny):
    model, tok = tiny
    sampler = HFSampler(tok)
    prompts = [p for p in mixed_length_prompts(sampler) for _ in range(4)]
    shared = sampler.generate(model, prompts, max_new_tokens=5, seed=2)
    sampler.share_prompts = False
    each = sampler.generate(model, prompts, max_new_tokens=5, seed=2)
    assert [r["completion_ids"] for r in shared] == [r["completion_ids"] for r in each]
    for a, b in zip(shared, each):
        torch.testing.assert_close(
            torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=2e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            torch.tensor(a["entropy"]), torch.tensor(b["entropy"]), atol=2e-4, rtol=1e-4
        )


def test_finished_rows_leave_the_batch_and_change_no_other_row(opinionated):
    """Greedy with an EOS no row reaches, then with EOS = a token some rows emit early: each row is the
    first run cut at its first EOS, statistics included, and once a row has finished the decode steps
    run fewer rows. The first token comes from the prefill: one decode forward per later token."""
    model, tok = opinionated
    prompts = [p for p in mixed_length_prompts(HFSampler(tok)) for _ in range(2)]
    unreachable = HFSampler(EosAs(tok, model.config.vocab_size))
    full = unreachable.generate(model, prompts, max_new_tokens=6, greedy=True)
    eos = full[0]["completion_ids"][1]  # row 0 and its copy finish by their second token, others may
    rows_per_forward = []
    hook = model.model.embed_tokens.register_forward_hook(
        lambda m, args, out: rows_per_forward.append(args[0].shape)
    )
    try:
        cut = HFSampler(EosAs(tok, eos)).generate(model, prompts, max_new_tokens=6, greedy=True)
    finally:
        hook.remove()
    for whole, row in zip(full, cut):
        ids = whole["completion_ids"]
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        assert row["completion_ids"] == ids[:n]
        for key in ("logprobs", "self_certainty", "entropy"):
            torch.testing.assert_close(
                torch.tensor(row[key]), torch.tensor(whole[key][:n]), atol=2e-4, rtol=1e-4
            )
    decode = [shape[0] for shape in rows_per_forward if shape[1] == 1]
    assert len(decode) == 5  # 6 tokens: the first from the prefill's logits
    finished_by_step = [sum(len(r["completion_ids"]) <= step + 1 for r in cut) for step in range(5)]
    assert decode == [len(prompts) - f for f in finished_by_step]
    assert 0 < decode[-1] < len(prompts)  # some rows left early, some went on
