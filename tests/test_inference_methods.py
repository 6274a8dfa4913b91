"""Inference-time methods in the sampler: the warpers (typical sampling, METHODS §11) and tokenwise
rejection sampling with backtracking (METHODS §8), on the tiny model and on a uniform-bracket LM."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import TypicalLogitsWarper

from selfimprove import models
from selfimprove.config import BacktrackConfig, ModelConfig
from selfimprove.sampling import HFSampler, sequence_logprobs
from selfimprove.sampling.backtrack import Backtracker, TaskVerifier, UniformBrackets, fit_probe
from selfimprove.sampling.decode import sample, warpers
from selfimprove.sampling.prefix import PromptCache
from selfimprove.tasks import ArithmeticTask, DyckTask
from tests.conftest import cfg_of


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.structured(ModelConfig(kind="tiny"))
    return models.load_model(cfg), models.load_tokenizer(cfg)


def test_typical_worked_example_through_the_sampler():
    """p = [.5, .3, .2]: H = 1.02965; τ = 0.25 keeps token 1, 0.5 keeps {0, 1}, 0.9 all three; the
    recorded log-probs are those of the renormalised kept set."""
    p = torch.tensor([0.5, 0.3, 0.2])
    assert float(-(p * p.log()).sum()) == pytest.approx(1.02965, abs=1e-5)
    for tau, kept in [(0.25, {1}), (0.5, {0, 1}), (0.9, {0, 1, 2})]:
        rows = 3000
        prefilled = PromptCache(None, torch.zeros(rows, 1), torch.ones(rows, 1), p.log().expand(rows, 3))
        torch.manual_seed(0)
        tokens, stats = sample(
            None, prefilled, max_new_tokens=1, eos=None, pad=0, warp=warpers(typical_p=tau)
        )
        assert set(tokens[:, 0].tolist()) == kept
        mass = sum(p[i] for i in kept)
        for i in kept:
            at = tokens[:, 0] == i
            assert stats["logprobs"][at, 0] == pytest.approx(float((p[i] / mass).log()), abs=1e-6)
            assert at.float().mean() == pytest.approx(float(p[i] / mass), abs=0.04)


@pytest.mark.parametrize("compile", ["false", "static"])
def test_typical_recorded_logprobs_equal_a_forward_under_the_filtered_distribution(tiny, compile):
    model, tok = tiny
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # peaked logits, so the typical set is a real cut
    try:
        sampler = HFSampler(tok, compile=compile, batch_size=8)
        prompts = [sampler.encode(p) for p in ArithmeticTask().eval_problems(4)]
        outs = sampler.generate(model, prompts * 2, max_new_tokens=5, temperature=0.8, typical_p=0.4, seed=3)
        warp = warpers(temperature=0.8, typical_p=0.4)
        for prompt, out in zip(prompts * 2, outs):
            ids = torch.tensor([prompt + out["completion_ids"]])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            expected = torch.log_softmax(warp(None, logits), -1)
            got = expected.gather(1, torch.tensor(out["completion_ids"])[:, None])[:, 0]
            assert torch.isfinite(got).all()  # every sampled token is inside its typical set
            assert out["logprobs"] == pytest.approx(got.tolist(), abs=2e-4)
            cut = TypicalLogitsWarper(0.4)(None, logits / 0.8)
            assert (torch.isinf(cut).sum(-1) > 0).any()  # the filter removed tokens somewhere
    finally:
        with torch.no_grad():
            model.model.norm.weight.div_(8.0)


def dyck_batch(tok, n_problems=8, copies=8):
    task = DyckTask(length=6)
    problems = task.eval_problems(n_problems)
    sampler = HFSampler(tok, compile="false", batch_size=64)
    prompts = [sampler.encode(p) for p in problems for _ in range(copies)]
    return task, [p for p in problems for _ in range(copies)], sampler, prompts


def backtracker(task, problems, tok, **settings):
    return Backtracker(BacktrackConfig(**settings), TaskVerifier(task, problems, tok))


def test_dyck_quota_zero_is_plain_sampling_and_unlimited_quota_is_always_valid(tiny):
    model, tok = tiny
    stub = UniformBrackets(model, tok)
    task, problems, sampler, prompts = dyck_batch(tok)
    plain = sampler.generate(stub, prompts, max_new_tokens=12, seed=1)
    zero = sampler.generate(
        stub, prompts, max_new_tokens=12, seed=1, backtrack=backtracker(task, problems, tok)
    )
    assert [o["completion_ids"] for o in zero] == [o["completion_ids"] for o in plain]
    assert all(o["query_cost"] == len(o["completion_ids"]) and o["backtracks"] == 0 for o in zero)
    plain_valid = sum(task.reward(o["completion"], p) for o, p in zip(plain, problems)) / len(plain)
    assert plain_valid < 0.2  # uniform brackets rarely close a sequence

    unlimited = backtracker(task, problems, tok, quota=10**6, block=1, same_prefix_once=False)
    outs = sampler.generate(stub, prompts, max_new_tokens=12, seed=1, backtrack=unlimited)
    assert all(task.reward(o["completion"], p) == 1.0 for o, p in zip(outs, problems))
    for o in outs:  # query cost = tokens generated + tokens erased, erased = backtracks × B
        assert o["query_cost"] == len(o["completion_ids"]) + 2 * o["backtracks"]
    assert len({o["completion"] for o in outs}) > len(set(map(id, problems)))  # still samples, per row


class Hashed:
    """A verifier that rejects about half the prefixes, deterministically (by the prefix's hash)."""

    reads_hidden, name = False, "hashed"

    def __call__(self, rows, prefixes, ended, remaining, hidden):
        return [float(hash(tuple(p)) % 2) for p in prefixes]


@pytest.mark.parametrize("block", [1, 3])
def test_backtracked_rows_record_what_a_forward_pass_gives(tiny, block):
    """Erasing masks the cache columns and feeds the last kept token again: each row's recorded
    log-probs must still be those of its final completion after its prompt, row by row."""
    model, tok = tiny
    sampler = HFSampler(tok, compile="false", batch_size=64)
    prompts = [sampler.encode(p) for p in ArithmeticTask().eval_problems(6) for _ in range(4)]
    bt = Backtracker(BacktrackConfig(quota=3, block=block), Hashed())
    outs = sampler.generate(model, prompts, max_new_tokens=6, seed=2, backtrack=bt)
    assert sum(o["backtracks"] for o in outs) > 10
    assert any(o["quota_spent"] for o in outs)
    expected = sequence_logprobs(model, prompts, [o["completion_ids"] for o in outs], tok.pad_token_id)
    for o, e in zip(outs, expected):
        assert o["logprobs"] == pytest.approx(e, abs=2e-4)


def test_a_verifier_that_rejects_everything_ends_with_the_quota(tiny):
    model, tok = tiny
    sampler = HFSampler(tok, compile="false")
    prompts = [sampler.encode(p) for p in ArithmeticTask().eval_problems(3)]

    class Never:
        reads_hidden, name = False, "never"

        def __call__(self, rows, prefixes, ended, remaining, hidden):
            return [1.0] * len(prefixes)

    bt = Backtracker(BacktrackConfig(quota=5, block=2), Never())
    outs = sampler.generate(model, prompts, max_new_tokens=4, seed=0, backtrack=bt)
    assert all(o["quota_spent"] and o["backtracks"] == 5 for o in outs)


@pytest.mark.parametrize(
    "answer, message",
    [(lambda n: [float("nan")] * n, "never NaN"), (lambda n: 1 / 0, "ZeroDivisionError")],
)
def test_a_broken_verifier_is_a_clear_error(tiny, answer, message):
    model, tok = tiny
    sampler = HFSampler(tok, compile="false")

    class Broken:
        reads_hidden, name = False, "broken"

        def __call__(self, rows, prefixes, ended, remaining, hidden):
            return answer(len(prefixes))

    bt = Backtracker(BacktrackConfig(quota=2), Broken())
    with pytest.raises(RuntimeError, match=f"verifier=broken.*{message}"):
        sampler.generate(
            model, [sampler.encode(ArithmeticTask().eval_problems(1)[0])], max_new_tokens=3, backtrack=bt
        )


def test_probe_separates_what_it_was_fitted_on():
    torch.manual_seed(0)
    x = torch.randn(400, 16)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0.5).float()
    probe = fit_probe(x, y, layer=-1)
    assert ((probe.predict(x) > 0.5).float() == y).float().mean() > 0.95
    again = fit_probe(x, y, layer=-1)
    assert torch.equal(probe.weight, again.weight)  # deterministic: a resumed round refits the same


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.typical_p=0", "sampler.typical_p"),
        ("sampler.typical_p=1.5", "sampler.typical_p"),
        ("sampler.temperature=0", "sampler.temperature"),
        ("sampler.backtrack.quota=-1", "sampler.backtrack.quota"),
        ("sampler.backtrack.block=0", "sampler.backtrack.block"),
        ("sampler.backtrack.verifier=oracle", "sampler.backtrack.verifier"),
    ],
)
def test_bad_sampling_settings_name_the_key(override, key):
    from selfimprove.config import ConfigError, validate_targets

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_targets(cfg_of(override))


def test_arithmetic_answer_format_as_a_prefix_check():
    task = ArithmeticTask()
    problem = task.train_problem(0)
    ok = [("", False), (" 4", False), (" 4", True), ("-", False), ("12 is it", True), ("1.5/", False)]
    bad = [("", True), ("-", True), (" a", False), ("The answer", False)]
    assert not any(task.prefix_error(problem, t, e, 3) for t, e in ok)
    assert all(task.prefix_error(problem, t, e, 3) for t, e in bad)


def test_dyck_task_and_its_exact_verifier():
    task = DyckTask(length=8)
    problem = task.train_problem(0)
    assert task.reward(problem.reference, problem) == 1.0
    assert task.reward(problem.reference + " )", problem) == 0.0
    assert task.reward("so: " + problem.reference, problem) == 0.0
    depth = len(problem.answer)
    assert task.prefix_error(problem, "", False, depth - 1)  # not enough tokens left to close
    assert not task.prefix_error(problem, "", False, depth)
    assert task.prefix_error(problem, "", True, 10)  # ended unbalanced
    assert not task.prefix_error(problem, problem.reference, True, 0)
    held_out = {p.prefill for p in task.eval_problems(50)}
    assert held_out.isdisjoint({task.train_problem(i).prefill for i in range(200)})


def test_the_loop_probe_is_fitted_on_a_rounds_checked_samples(tmp_path, tiny):
    """fit_round_probe reads a round's sample shards, labels every prefix by its row's `correct`, and
    the probe it returns backtracks in the sampler (reading the hidden layer it was fitted on)."""
    from selfimprove.checkpoint import write_table
    from selfimprove.sampling.backtrack import fit_round_probe

    model, tok = tiny
    sampler = HFSampler(tok, compile="false")
    prompts = [sampler.encode(p) for p in ArithmeticTask().eval_problems(8) for _ in range(2)]
    outs = sampler.generate(model, prompts, max_new_tokens=4, seed=0)
    rows = [
        {"prompt_ids": p, "completion_ids": o["completion_ids"], "correct": i % 3 == 0}
        for i, (p, o) in enumerate(zip(prompts, outs))
    ]
    write_table(tmp_path / "unit-00000.parquet", rows)

    class Holder:
        pad = tok.pad_token_id

        def model_with(self, weights):
            import contextlib

            return contextlib.nullcontext(model)

    assert fit_round_probe(Holder(), tmp_path / "missing", layer=2) is None  # the first round: none
    probe = fit_round_probe(Holder(), tmp_path, layer=2)
    assert probe is not None and probe.layer == 2
    bt = Backtracker(BacktrackConfig(quota=2, block=1, threshold=0.5, verifier="probe", layer=2), probe)
    again = sampler.generate(model, prompts, max_new_tokens=4, seed=0, backtrack=bt)
    assert all("query_cost" in o for o in again)


def test_sample_command_backtracks_on_the_dyck_task(tmp_path):
    import json

    from tests.conftest import run_cli

    out = tmp_path / "dyck.jsonl"
    run_cli(
        [
            "sample",
            "model=tiny",
            "task=dyck",
            "sampler.n=2",
            "sampler.max_new_tokens=8",
            "sampler.backtrack.quota=3",
            "sampler.backtrack.block=2",
            "prompts=4",
            f"out={out}",
        ]
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 8
    assert all(r["backtracks"] == 3 and r["quota_spent"] for r in rows)  # random text: always rejected
    for r in rows:  # each backtrack erased 1 or 2 tokens (B = 2), each erased token was generated too
        assert 2 * r["backtracks"] <= r["query_cost"] - len(r["completion_ids"]) <= 4 * r["backtracks"]


@pytest.mark.parametrize(
    "setting, key", [({"typical_p": 0.5}, "sampler.typical_p"), ({"backtrack": {"quota": 2}}, "backtrack")]
)
def test_vllm_refuses_what_it_cannot_sample(setting, key):
    from selfimprove.config import ConfigError, SamplerConfig, _check_sampler

    sampler = OmegaConf.merge(OmegaConf.structured(SamplerConfig(backend="vllm")), setting)
    with pytest.raises(ConfigError, match=key):
        _check_sampler(sampler)
    _check_sampler(OmegaConf.merge(OmegaConf.structured(SamplerConfig(backend="hf")), setting))
