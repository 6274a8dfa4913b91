"""DITTO (Xu et al. 2206.02369): the hand value, the stop-gradient, the pseudo-repetitive sequences, the
per-step MLE/DITTO coin, and that training on the penalty lowers the repeat probabilities."""

import math
import random
from types import SimpleNamespace

import pytest
import torch

from selfimprove.logprobs import per_row_logprobs
from selfimprove.objectives import SFT
from selfimprove.objectives.ditto import Ditto
from selfimprove.select.ditto import DittoSequences, pseudo_repetitive, sentence_ends
from selfimprove.stages import Context
from selfimprove.train import collate, columns_of, micro_batch_loss

DOT = 0  # the fake vocabulary: 0 is ".", 1 is "!", every other id a word


class FakeTokenizer:
    """decode() of ids as words; __call__ splits on spaces (".", "!" are their own words)."""

    def __init__(self):
        self.decoded = 0

    def decode(self, ids):
        self.decoded += 1
        return " ".join({DOT: ".", 1: "!"}.get(i, f" w{i}") for i in ids)

    def __call__(self, text, add_special_tokens=False):
        word = {".": DOT, "!": 1}
        return {"input_ids": [word.get(w) if w in word else int(w[1:]) for w in text.split()]}


class FixedRng:
    def __init__(self, value):
        self.value = value

    def randint(self, a, b):
        assert a <= self.value <= b
        return self.value


def ditto_loss(objective, logits_by_row: list[torch.Tensor], rows: list[dict]):
    """The objective on log-probs taken by hand from each row's own logits [len, V] (logits[s]
    predicts token s + 1, scope "sequence"), in the batch the update builds."""
    width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) - 1 for r in rows)
    logps = torch.zeros(len(rows), width)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (logits, r) in enumerate(zip(logits_by_row, rows)):
        ids = torch.tensor(r["prompt_ids"] + r["completion_ids"])
        n = len(ids) - 1
        row_logps = torch.log_softmax(logits[:n], -1).gather(1, ids[1:, None])[:, 0]
        logps = logps.index_put((torch.full((n,), i), torch.arange(n)), row_logps)
        tokens[i, :n], scored[i, :n] = ids[1:], True
    batch = collate(rows, columns_of(objective), objective.scope)
    batch.update(tokens=tokens, scored=scored)
    return objective(logps, batch, objective.normalizer(rows))


def test_hand_value_ln2_and_padding_independence():
    # input [1, 0, 0], rep_len 1: the last '0' (p = 0.9, from logits[1]) against the one before it
    # (p_prev = 0.8, from logits[0]): −log(1 − |0.9 − 0.5·0.8|) = ln 2
    row = {"prompt_ids": [1, 0], "completion_ids": [0], "rep_len": 1}
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.9, 0.1], [0.5, 0.5]]))
    loss, metrics = ditto_loss(Ditto(lam=0.5), [logits], [row])
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # normaliser: 1 penalised token
    assert metrics["ditto/p_repeat"][0].item() == pytest.approx(0.9)
    assert metrics["ditto/p_prev"][0].item() == pytest.approx(0.8)
    # in a batch with a longer row the short row adds the same ln 2 (normaliser 3 tokens)
    other = {"prompt_ids": [1, 1, 0, 1], "completion_ids": [0, 1], "rep_len": 2}
    other_logits = torch.randn(6, 2)
    alone = ditto_loss(Ditto(), [other_logits], [other])[0] * 2
    both = ditto_loss(Ditto(), [logits, other_logits], [row, other])[0] * 3
    assert both.item() == pytest.approx(alone.item() + math.log(2), abs=1e-5)


def test_gradient_reaches_p_t_only():
    # "1 | 0 1 | 0 1 | 0 1": prompt = prefix + first copy, rep_len 2; logits[s] predicts token s + 1
    row = {"prompt_ids": [1, 0, 1], "completion_ids": [0, 1, 0, 1], "rep_len": 2}
    torch.manual_seed(0)
    leaves = [torch.randn(2, requires_grad=True) for _ in range(7)]
    (ditto_loss(Ditto(lam=0.5), [torch.stack(leaves)], [row])[0] * 4).backward()
    # positions 0, 1 only give p_prev (copy 1's tokens): the stop-gradient leaves them untouched
    assert leaves[0].grad.abs().max() == 0 and leaves[1].grad.abs().max() == 0
    assert all(leaf.grad.abs().max() > 0 for leaf in leaves[2:6])
    # the same as a hand loss whose p_prev is a constant
    values = torch.stack([leaf.detach() for leaf in leaves]).requires_grad_(True)
    p = torch.softmax(values, -1)
    ids = [1, 0, 1, 0, 1, 0, 1]
    hand = sum(
        -torch.log(1 - (p[t - 1, ids[t]] - 0.5 * p[t - 3, ids[t]].detach()).abs()) for t in range(3, 7)
    )
    hand.backward()
    assert torch.allclose(torch.stack([leaf.grad for leaf in leaves]), values.grad, atol=1e-6)


def test_pseudo_repetitive_sequence():
    ids = [5, 6, DOT, 7, 8, DOT, 9, 10, 11, DOT, 12, DOT]
    ends = sentence_ends(ids, FakeTokenizer())
    assert ends == [2, 5, 9, 11]
    # i = 1: prefix "7 8" (its '.' removed), unit ". 9 10 11" — the '.' before the sentence + its words
    prompt, completion, rep_len = pseudo_repetitive(ids, ends, FixedRng(1), max_tokens=13)
    assert prompt == [7, 8, DOT, 9, 10, 11] and rep_len == 4
    assert completion == [DOT, 9, 10, 11, DOT, 9, 10]  # copies 2 and 3, the last cut at 13 tokens
    assert len(prompt) + len(completion) == 13
    full = prompt + completion
    assert all(full[t] == full[t - rep_len] for t in range(len(prompt), len(full)))
    # exactly two copies fit at 10 tokens, fewer at 9
    assert pseudo_repetitive(ids, ends, FixedRng(1), max_tokens=10)[1] == [DOT, 9, 10, 11]
    assert pseudo_repetitive(ids, ends, FixedRng(1), max_tokens=9) is None
    assert pseudo_repetitive(ids, ends, FixedRng(2), max_tokens=9) == (
        [9, 10, 11, DOT, 12],
        [DOT, 12, DOT, 12],
        2,
    )
    # fewer than 3 sentence ends, or an empty prefix (". ." ): nothing
    assert pseudo_repetitive(ids[:6], ends[:2], random.Random(0), 64) is None
    assert pseudo_repetitive([5, DOT, DOT, 7, DOT], [1, 2, 4], FixedRng(1), 64) is None


def test_sentence_ends_decodes_each_id_once():
    tok = FakeTokenizer()
    ids = [5, 6, DOT, 7, 1, 5, 6, DOT] * 50
    ends = sentence_ends(ids, tok)
    assert ends[:3] == [2, 4, 7] and len(ends) == 150
    assert tok.decoded == 5  # distinct ids: 5, 6, 0, 7, 1


def rows_of(texts: list[str], completion: str = " w3 . w4 w5 . w6 .") -> list[dict]:
    """Two samples of each text's prompt; a text task splits it so that prefill + target == text."""
    return [
        {"prompt_id": f"p{i}", "sample_idx": j, "prefill": t[:6], "target": t[6:], "completion": completion}
        for i, t in enumerate(texts)
        for j in range(2)
    ]


def test_selector_builds_pairs():
    words = " w5 w6 . w7 w8 . w9 w10 w11 . w12 ."
    texts = [words, " w5 w6 . w7 .", words + " w13 w14 ."]  # the middle one has 2 sentence ends
    ctx = Context(engine=SimpleNamespace(tokenizer=FakeTokenizer()), task=None, seed=3)
    sel = DittoSequences(source="task", max_tokens=16)
    out = sel(rows_of(texts), ctx)  # one sequence per prompt, not per sample
    assert ctx.logged == {"ditto_sequences": 2, "ditto_skipped": 1}
    assert [r["source"] for r in out] == ["real", "ditto", "real", "ditto"]
    assert [r["pair"] for r in out] == [0, 0, 1, 1] and [r["prompt_id"] for r in out] == [
        "p0",
        "p0",
        "p2",
        "p2",
    ]
    real, ditto = out[0], out[1]
    assert real["prompt_ids"] + real["completion_ids"] == [5, 6, DOT, 7, 8, DOT, 9, 10, 11, DOT, 12, DOT]
    assert len(ditto["prompt_ids"]) + len(ditto["completion_ids"]) == 16 and "rep_len" not in real
    assert not real["correct"] and set(ditto) >= {"rep_len", "source", "pair", "prompt_id", "correct"}
    assert sel(rows_of(texts), ctx) == out  # seeded per text: the same again
    # source=samples: each sample's prefill + completion (" w5 w6 w3 . w4 w5 . w6 ." has 3 ends)
    samples = DittoSequences(source="samples", max_tokens=16)
    assert samples.reads == ("prefill", "completion")
    out = samples(rows_of(texts[:1]), ctx)
    assert [r["source"] for r in out] == ["policy", "ditto"] * 2 and [r["pair"] for r in out] == [0, 0, 1, 1]
    assert out[0]["completion_ids"] == [6, 3, DOT, 4, 5, DOT, 6, DOT]


def test_selector_on_real_text():
    from omegaconf import OmegaConf

    from selfimprove import models
    from selfimprove.config import ModelConfig

    tok = models.load_tokenizer(OmegaConf.structured(ModelConfig(kind="tiny")))
    text = (
        "Alice was beginning to get very tired of sitting by her sister on the bank. She had peeped into"
        " the book her sister was reading! It had no pictures or conversations in it. And what is the use"
        " of a book, thought Alice, without pictures or conversations? So she was considering in her own mind."
    )
    row = {"prompt_id": "a", "prefill": text[:40], "target": text[40:]}
    ctx = Context(engine=SimpleNamespace(tokenizer=tok), task=None, seed=0)
    out = DittoSequences(max_tokens=128)([row], ctx)
    assert len(out) == 2
    ditto = out[1]
    full = ditto["prompt_ids"] + ditto["completion_ids"]
    unit = tok.decode(ditto["prompt_ids"][-ditto["rep_len"] :])
    assert unit.startswith((".", "!", "?")) and len(full) == 128
    assert tok.decode(ditto["completion_ids"]).startswith(unit)


def test_step_examples_coin():
    pairs = [{"source": "real", "pair": k} for k in range(5)] + [
        {"source": "ditto", "pair": k, "rep_len": 2} for k in range(5)
    ]
    obj = Ditto(mle_probability=0.5)
    views = [(obj.step_examples(pairs, seed), obj.mode) for seed in range(200)]
    assert all(obj.step_examples(pairs, s)[0] is views[s][0][0] for s in range(20))  # per seed
    mle = sum(mode == "mle" for _, mode in views)
    assert 70 < mle < 130
    real, ditto = views[[m for _, m in views].index("mle")][0], views[[m for _, m in views].index("ditto")][0]
    assert len(real) == len(ditto) and [r["pair"] for r in real] == [r["pair"] for r in ditto]
    assert {r["source"] for r in real} == {"real"} and {r["source"] for r in ditto} == {"ditto"}
    assert all(obj.step_examples(pairs[:5], s) == pairs[:5] for s in range(20))  # no DITTO rows: MLE
    assert Ditto(mle_probability=0.0).step_examples(pairs, 0) == pairs[5:]


def per_copy_probs(model, rows: list[dict], prefix_len: int, rep_len: int) -> list[float]:
    """Mean probability of the repeated tokens in each copy (copy 1 is in the prompt)."""
    pairs = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    with torch.no_grad():
        p = per_row_logprobs(model, pairs, 0, 1.0, scope="sequence").logps.exp()  # p[:, t - 1] of token t
    n = p.shape[1] + 1
    copies = (n - prefix_len) // rep_len
    return [
        p[:, prefix_len - 1 + c * rep_len : prefix_len - 1 + (c + 1) * rep_len].mean().item()
        for c in range(copies)
    ]


@pytest.fixture(scope="module")
def copying_model():
    """A tiny random Llama (32 ids) trained by MLE to continue 8 pseudo-repetitive rows, as a model
    that loops does; each text's rows: MLE (the real text) and DITTO (prefix of 5, unit of 6 tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    rng, rows = random.Random(0), []
    for k in range(8):  # "w w w. w w w w w. w w w w w." — same-length sentences, so copies align
        ids = [rng.randint(2, 31) for _ in range(3)] + [DOT]
        ids += [rng.randint(2, 31) for _ in range(5)] + [DOT] + [rng.randint(2, 31) for _ in range(5)] + [DOT]
        ends = sentence_ends(ids, FakeTokenizer())
        prompt, completion, rep_len = pseudo_repetitive(ids, ends, FixedRng(1), 45)
        rows.append({"source": "real", "pair": k, "prompt_ids": ids[:1], "completion_ids": ids[1:]})
        rows.append(
            {
                "source": "ditto",
                "pair": k,
                "prompt_ids": prompt,
                "completion_ids": completion,
                "rep_len": rep_len,
            }
        )
    ditto_rows = [r for r in rows if r["source"] == "ditto"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss, _ = micro_batch_loss(
            model, ditto_rows, SFT(), SFT().normalizer(ditto_rows), pad=0, share="false"
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, rows


def train(model, rows: list[dict], objective: Ditto, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        chosen = objective.step_examples(rows, step)
        loss, _ = micro_batch_loss(model, chosen, objective, objective.normalizer(chosen), pad=0)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_the_penalty_alone_lowers_repeat_probabilities(copying_model):
    import copy

    model, rows = copy.deepcopy(copying_model[0]), copying_model[1]
    before = per_copy_probs(model, rows[1::2], 5, 6)
    train(model, rows, Ditto(lam=0.5, mle_probability=0.0), steps=20, lr=1e-2)
    after = per_copy_probs(model, rows[1::2], 5, 6)
    print(f"DITTO only: per-copy p {[round(x, 4) for x in before]} -> {[round(x, 5) for x in after]}")
    assert min(before[1:]) > 0.9 and max(after[1:]) < 0.5 * min(before[1:])


def test_with_mle_steps_repeats_decay_like_lambda_n(copying_model):
    """With the MLE half holding up the first copy, each copy's probability settles near λ times the
    one before, the λ^n decay the paper's loss aims at. Loose: a 2-layer model on 8 texts, 150 steps."""
    model, rows = copying_model
    train(model, rows, Ditto(lam=0.5, mle_probability=0.5), steps=150, lr=3e-3)
    after = per_copy_probs(model, rows[1::2], 5, 6)
    ratios = [b / a for a, b in zip(after, after[1:])]
    print(f"DITTO + MLE: per-copy p {[round(x, 3) for x in after]}, ratios {[round(r, 2) for r in ratios]}")
    assert after[0] > 0.15 and all(0.25 < r < 0.75 for r in ratios[:3])
