"""Scorers built on other models or scores: a reward model (any sequence classifier, padded right or
left), and a combination of scores (z-scores or ranks; ties, -inf, constants; ordered after its parts)."""

import math

import pytest
import torch
from conftest import cfg_of, reset_accelerate

from selfimprove import models
from selfimprove.engine import Engine
from selfimprove.select import BestOfN
from selfimprove.stages import Context, check_columns, order_stages
from selfimprove.verify import SelfCertainty, SequenceLogLik
from selfimprove.verify.combined import Combined, ranks, zscores
from selfimprove.verify.reward_model import RewardModel

INF = math.inf


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A tiny random Llama reward model (one logit) with the tiny model's tokenizer, and no pad id
    in its config (the scorer sets it)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = models.load_tokenizer(cfg_of().model)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_labels=1,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rm")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def engine():
    reset_accelerate()
    return Engine(cfg_of(), train=False)


def _rows() -> list[dict]:
    questions = ["What is 2 + 3?", "What is 17 + 4? Answer with a number only, please."]
    answers = ["5", "21, because seven and four make eleven", ""]
    return [
        {
            "prompt_id": f"p{i}",
            "sample_idx": j,
            "messages": [{"role": "user", "content": q}],
            "prefill": "= " if i else "",
            "completion": a,
        }
        for i, q in enumerate(questions)
        for j, a in enumerate(answers)
    ]


def _direct(folder, text: str | list[int], special: bool = False) -> float:
    """The RM's logit on one unpadded text (or ids), straight through transformers."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    if isinstance(text, str):
        text = AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=special)["input_ids"]
    with torch.no_grad():
        return model(input_ids=torch.tensor([text])).logits[0, 0].item()


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_model_batched_equals_one_at_a_time(engine, rm_dir, side):
    engine.classifier(str(rm_dir))[1].padding_side = side  # the RM tokenizer's own side is not used
    rm, rows = RewardModel(str(rm_dir)), _rows()
    batched = rm(rows, Context(engine, None, seed=0, batch_size=4))
    single = [rm([r], Context(engine, None, seed=0, batch_size=1))[0] for r in rows]
    got = [r["score/reward_model"] for r in batched]
    assert got == pytest.approx([r["score/reward_model"] for r in single], abs=1e-5)
    assert len(set(got)) == len(got)  # the answers matter
    assert rm.reads == ("messages", "prefill", "completion")


def test_reward_model_score_is_a_forward_pass_of_the_rendered_text(engine, rm_dir):
    row = _rows()[4]
    tokenizer = engine.classifier(str(rm_dir))[1]
    turns = [*row["messages"], {"role": "assistant", "content": "= " + row["completion"]}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    ctx = Context(engine, None, seed=0)
    assert RewardModel(str(rm_dir)).score([row], ctx)[0] == pytest.approx(
        _direct(rm_dir, text, False), abs=1e-5
    )
    plain = f"{row['messages'][-1]['content']}\n= {row['completion']}"
    got = RewardModel(str(rm_dir), chat=False).score([row], ctx)[0]
    assert got == pytest.approx(_direct(rm_dir, plain, True), abs=1e-5)


def test_reward_model_keeps_the_last_tokens(engine, rm_dir):
    row, tokenizer = _rows()[4], engine.classifier(str(rm_dir))[1]
    rm = RewardModel(str(rm_dir), chat=False, max_length=6)
    ids = rm.render(row, tokenizer)
    assert len(ids) > 6 and rm.truncate(ids, tokenizer) == ids[-6:]  # no BOS in this tokenizer
    want = _direct(rm_dir, ids[-6:])
    assert rm.score([row], Context(engine, None, seed=0))[0] == pytest.approx(want, abs=1e-5)


def test_reward_model_missing_folder_fails_when_built(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}/nowhere: no such folder"):
        RewardModel(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no config.json"):
        RewardModel(str(tmp_path))


def _scored(**columns) -> list[dict]:
    """Rows of one prompt with `score/<name>` columns given as lists."""
    n = len(next(iter(columns.values())))
    return [
        {"prompt_id": "p", "sample_idx": i, **{f"score/{k}": float(v[i]) for k, v in columns.items()}}
        for i in range(n)
    ]


def test_zscores_and_ranks_by_hand():
    assert zscores([1.0, 2.0, 3.0]) == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert zscores([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]  # constant: 0, never nan
    assert zscores([-INF, 0.0, 1.0]) == pytest.approx([-2.0, -1.0, 1.0])  # -inf: 1 std below the lowest
    assert zscores([math.nan, 5.0, 5.0]) == [-1.0, 0.0, 0.0]
    assert zscores([-INF, -INF]) == [0.0, 0.0] and zscores([7.0]) == [0.0]
    assert ranks([1.0, 2.0, 2.0, 3.0]) == pytest.approx([0.0, 0.5, 0.5, 1.0])  # ties: average rank
    assert ranks([3.0, -INF, math.nan, 0.0]) == pytest.approx([1.0, 1 / 6, 1 / 6, 2 / 3])
    assert ranks([4.0, 4.0, 4.0]) == [0.5, 0.5, 0.5] and ranks([1.0]) == [0.5]


def test_combined_zscore_is_a_weighted_sum():
    rows = _scored(a=[1, 2, 3], b=[10, 10, 10], c=[3, 1, 2])
    out = Combined({"a": 1.0, "b": 5.0, "c": -2.0})(rows, None)
    s = math.sqrt(1.5)
    assert [r["score/combined"] for r in out] == pytest.approx([-s - 2 * s, 0 + 2 * s, s])
    assert Combined({"a": 1.0, "b": 0.0}).reads == ("score/a",)  # weight 0: not read


def test_combined_rank_is_a_weighted_mean_and_handles_minus_inf():
    rows = _scored(ll=[-INF, -1.0, -2.0, -1.0], sc=[0.2, 0.1, 0.4, 0.3])
    out = Combined({"ll": 3.0, "sc": 1.0}, method="rank", name="mix")(rows, None)
    ll, sc = [0.0, 5 / 6, 1 / 3, 5 / 6], [1 / 3, 0.0, 1.0, 2 / 3]
    want = [(3 * a + b) / 4 for a, b in zip(ll, sc)]
    assert [r["score/mix"] for r in out] == pytest.approx(want)
    z = Combined({"ll": 1.0, "sc": 0.0})(rows, None)
    assert min(range(4), key=lambda i: z[i]["score/combined"]) == 0  # -inf ranks lowest, finitely
    assert all(math.isfinite(r["score/combined"]) for r in z)


def test_combined_within_prompt_or_all():
    rows = _scored(a=[1, 2, 10, 20])
    for r, p in zip(rows, ["p", "p", "q", "q"]):
        r["prompt_id"] = p
    by_prompt = Combined({"a": 1.0}, within="prompt").score(rows)
    assert by_prompt == pytest.approx([-1.0, 1.0, -1.0, 1.0])
    overall = Combined({"a": 1.0}, within="all").score(rows)
    # all four together: mean 8.25, population std sqrt(232.75 / 4) = 7.628 (not each prompt's ±1)
    std = math.sqrt((7.25**2 + 6.25**2 + 1.75**2 + 11.75**2) / 4)
    assert overall == pytest.approx([(x - 8.25) / std for x in (1.0, 2.0, 10.0, 20.0)])
    assert Combined({"a": 1.0}, method="rank", within="prompt").score(rows) == [0.0, 1.0, 0.0, 1.0]


def test_combined_runs_after_its_parts_and_config_checks_them():
    combined = Combined({"self_certainty": 1.0, "loglik_base_mean": 1.0})
    parts = [SelfCertainty(), SequenceLogLik(normalize=True)]
    assert order_stages([combined, *parts])[-1] is combined
    check_columns([combined, *parts], BestOfN(score="combined"))
    with pytest.raises(ValueError, match="loglik_base_mean"):
        check_columns([combined, SelfCertainty()], BestOfN(score="combined"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scores": {}}, "at least one"),
        ({"scores": {"a": 0.0}}, "not all zero"),
        ({"scores": {"a": 1.0}, "method": "mean"}, "method"),
        ({"scores": {"a": 1.0}, "within": "batch"}, "within"),
        ({"scores": {"a": 1.0}, "name": "a"}, "itself"),
    ],
)
def test_combined_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Combined(**kwargs)
