"""Inference-time methods in the sampler: the warpers (typical sampling, Meister et al. 2202.00666) and tokenwise
rejection sampling with backtracking (Botta et al. 2502.12123), on the tiny model and on a uniform-bracket LM."""

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
    """p = [.5, .3, .2]: H = 1.02965; τ = 0.25 keeps token 1, 0.5 keeps {0, 1}, 0.9 all three; tokens
    are drawn from the renormalised kept set, the recorded log-probs are the policy's before the cut
    (log p: what the update's π is, so the importance ratio is 1 on-policy)."""
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
            assert stats["logprobs"][at, 0] == pytest.approx(float(p[i].log()), abs=1e-6)
            assert at.float().mean() == pytest.approx(float(p[i] / mass), abs=0.04)


@pytest.mark.parametrize("compile", ["false", "static"])
def test_typical_samples_inside_the_filter_and_records_the_tempered_policy(tiny, compile):
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
            drawn = torch.tensor(out["completion_ids"])[:, None]
            assert torch.isfinite(warp(None, logits).gather(1, drawn)).all()  # inside its typical set
            got = torch.log_softmax(logits / 0.8, -1).gather(1, drawn)[:, 0]  # before the filter
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

    # the first round (no samples yet) and a round of one class fit none, and say why
    assert fit_round_probe(Holder(), tmp_path / "missing", layer=2) == (
        None,
        "no earlier round's samples to fit it on",
    )
    write_table(tmp_path / "one" / "unit-00000.parquet", [{**r, "correct": False} for r in rows])
    assert fit_round_probe(Holder(), tmp_path / "one", layer=2) == (
        None,
        f"the last round's {len(rows)} samples all have correct=False, one class only",
    )
    probe, why = fit_round_probe(Holder(), tmp_path, layer=2)
    assert probe is not None and probe.layer == 2 and why == ""
    bt = Backtracker(BacktrackConfig(quota=2, block=1, threshold=0.5, verifier="probe", layer=2), probe)
    again = sampler.generate(model, prompts, max_new_tokens=4, seed=0, backtrack=bt)
    assert all("query_cost" in o for o in again)


def test_the_round_probe_reads_the_hidden_states_of_the_weights_that_sample(tmp_path):
    """With ema.sample_from=ema the probe must read the EMA's hidden states, as the sampler will: after
    the policy moved away from the average, fit_round_probe(weights="ema") is the EMA's, not the policy's."""
    from selfimprove.checkpoint import write_table
    from selfimprove.engine import Engine
    from selfimprove.sampling.backtrack import fit_round_probe, prefix_hidden_states
    from tests.conftest import reset_accelerate

    reset_accelerate()
    engine = Engine(cfg_of("ema.enabled=true"), train=False)
    with torch.no_grad():  # an update the average has not followed (LoRA's B starts at zero)
        torch.manual_seed(0)
        for p in engine.policy.parameters():
            if p.requires_grad:
                p.add_(0.5 * torch.randn_like(p))
    prompts = [engine.sampler.encode(p) for p in ArithmeticTask().eval_problems(4)]
    completions = [[5 + i, 7, 11 + i] for i in range(len(prompts))]
    rows = [
        {"prompt_ids": p, "completion_ids": c, "correct": i % 2 == 0}
        for i, (p, c) in enumerate(zip(prompts, completions))
    ]
    write_table(tmp_path / "unit-00000.parquet", rows)
    mean = {}
    for weights in ("policy", "ema"):
        with engine.model_with(weights) as model:
            states = prefix_hidden_states(model, prompts, completions, engine.pad, layer=-1)
        mean[weights] = torch.cat(states).mean(0)
    assert not torch.allclose(mean["policy"], mean["ema"], atol=1e-3)  # the two really differ here
    probe, _ = fit_round_probe(engine, tmp_path, layer=-1, weights="ema")
    assert torch.allclose(probe.mean, mean["ema"], atol=1e-5)  # standardised by the EMA's states


def test_a_loop_round_without_a_probe_says_so_and_fits_on_the_sampling_weights(tmp_path, monkeypatch, capsys):
    """verifier=probe in round 1 (no checked samples yet): the round says in one line and in its
    metrics that it samples without backtracking; the fit is asked for the weights that sample (ema)."""
    import json

    from selfimprove import loop
    from tests.conftest import run_loop

    asked, fit = [], loop.fit_round_probe

    def spy(*args, **kwargs):
        asked.append(kwargs.get("weights", "policy"))
        return fit(*args, **kwargs)

    monkeypatch.setattr(loop, "fit_round_probe", spy)
    run_dir = tmp_path / "run"
    run_loop(
        cfg_of(
            "loop.rounds=1",
            "loop.prompts_per_round=4",
            "sampler.n=2",
            "sampler.backtrack.quota=2",
            "sampler.backtrack.verifier=probe",
            "ema.enabled=true",
            "ema.sample_from=ema",
            "eval.before=false",
            "eval.n_problems=4",
            "eval.k=0",
            "trainer.steps_per_round=1",
            "trainer.micro_batch_size=4",
            f"run.dir={run_dir}",
        )
    )
    said = [line for line in capsys.readouterr().out.splitlines() if "without backtracking" in line]
    assert said == [
        "[selfimprove] round 1: sampling without backtracking: sampler.backtrack.verifier=probe has no "
        "probe (no earlier round's samples to fit it on)"
    ]
    record = json.loads((run_dir / "rounds" / "r0001" / "metrics.json").read_text())
    assert record["sample/backtrack_probe"] is False
    assert asked == ["ema"]  # fitted (when it can be) on the EMA's hidden states: the EMA samples


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
