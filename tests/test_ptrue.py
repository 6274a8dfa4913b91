"""P(True): the analytic ratio from a stub LM, the prefix/suffix split against a plain forward pass on the
tiny model (policy, LoRA policy, frozen base), the first differing option token, few-shot draws that
never show the judged prompt, and brainstormed ideas that contain the judged answer."""

import math
import re
from pathlib import Path

import pytest
import torch
from conftest import cfg_of
from hydra.utils import instantiate

from selfimprove import models
from selfimprove.cli import CONFIG_DIR
from selfimprove.engine import Engine
from selfimprove.stages import Context
from selfimprove.verify.ptrue import PTrue, p_true

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")  # each test's engines start afresh


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(cfg_of().model)


class StubEngine:
    """Fixed log-probs for the two candidates; records every call (prefix, suffixes, candidates)."""

    def __init__(self, tokenizer, lps=(math.log(0.3), math.log(0.1))):
        self.tokenizer, self.lps, self.calls = tokenizer, list(lps), []

    def next_token_logprobs(self, prefix, suffixes, candidates, weights="policy", batch_size=64):
        self.calls.append((list(prefix), [list(s) for s in suffixes], list(candidates), weights))
        return [list(self.lps) for _ in suffixes]


class Recording:
    """A real engine whose next_token_logprobs calls are recorded."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.calls = engine, engine.tokenizer, []

    def next_token_logprobs(self, prefix, suffixes, candidates, weights="policy", batch_size=64):
        self.calls.append((list(prefix), [list(s) for s in suffixes], list(candidates), weights))
        return self.engine.next_token_logprobs(prefix, suffixes, candidates, weights, batch_size)


def row(pid, idx, a, b, answer=None, correct=None):
    total = a + b if answer is None else answer
    return {
        "prompt_id": pid,
        "sample_idx": idx,
        "messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
        "prefill": f"{a} + {b} = ",
        "completion": str(total),
        "answer": str(total),
        "correct": total == a + b if correct is None else correct,
    }


def texts(tok, calls):
    """(prefix text, full text) per judged row, from recorded calls."""
    return [
        (tok.decode(prefix), tok.decode(prefix + suffix))
        for prefix, suffixes, _, _ in calls
        for suffix in suffixes
    ]


# ----- 1. the analytic ratio -----
@pytest.mark.parametrize("shift", [0.0, -1000.0, -1e6])
def test_stub_lm_gives_the_analytic_ratio(tokenizer, shift):
    stub = StubEngine(tokenizer, [math.log(0.3) + shift, math.log(0.1) + shift])
    rows = [row("p0", 0, 47, 5), row("p0", 1, 47, 5, answer=51), row("p1", 0, 3, 4)]
    scored = PTrue()(rows, Context(stub, None, seed=0))
    assert [r["score/ptrue"] for r in scored] == pytest.approx([0.75] * 3, abs=1e-9)  # naive exp(): 0 / 0
    assert len(stub.calls) == 2  # one call per prompt: the samples share the prefix
    stub.lps = stub.lps[::-1]  # True the less likely: 0.1 / 0.4
    scored = PTrue(name="again")(rows, Context(stub, None, seed=0))
    assert [r["score/again"] for r in scored] == pytest.approx([0.25] * 3, abs=1e-9)
    assert p_true(-math.inf, 0.0) == 0.0 and p_true(0.0, -math.inf) == 1.0
    assert math.isnan(p_true(-math.inf, -math.inf))


def test_options_without_a_differing_token_are_refused(tokenizer):
    with pytest.raises(ValueError, match="two different strings"):
        PTrue(options=[" (A)", " (A)"])
    with pytest.raises(ValueError, match="differing token"):
        PTrue(options=[" (A)", " (A) "])([row("p0", 0, 1, 2)], Context(StubEngine(tokenizer), None, seed=0))
    with pytest.raises(ValueError, match="answer"):
        PTrue(template="Question: {question}")


# ----- 2. against a plain forward pass -----
def full_forward(model, ids, candidates):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    lp = torch.log_softmax(logits, dim=-1)[candidates]
    return p_true(float(lp[0]), float(lp[1]))


@pytest.mark.parametrize(
    ("overrides", "weights"), [(["trainer=full"], "policy"), ([], "policy"), ([], "base")]
)
def test_matches_a_full_forward_pass(overrides, weights):
    engine = Engine(cfg_of(*overrides), train=False, reference=weights == "base")
    if engine.cfg.trainer.lora:  # a non-zero adapter: policy and base differ
        with torch.no_grad():
            for n, p in engine.policy.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.05)
    rec = Recording(engine)
    rows = [row("p0", i, 47, 5, answer=52 + i) for i in range(3)] + [
        row("p1", i, 8, 9, 17 + 3 * i) for i in range(3)
    ]
    scores = [
        r[f"score/ptrue_{weights}"]
        for r in PTrue(name=f"ptrue_{weights}", weights=weights)(rows, Context(rec, None, 0))
    ]
    assert len(rec.calls) == 2 and all(w == weights for *_, w in rec.calls)
    judged = [(p, s, c) for p, suffixes, c, _ in rec.calls for s in suffixes]
    with engine.model_with(weights) as model:
        expected = [full_forward(model, p + s, c) for p, s, c in judged]
    assert scores == pytest.approx(expected, abs=1e-5)  # the rows come grouped by prompt, in order
    assert len(set(round(s, 6) for s in scores)) > 1  # the answers make a difference
    if weights == "base":  # the frozen base is not the adapted policy
        policy = PTrue()(rows, Context(engine, None, 0))
        assert [r["score/ptrue"] for r in policy] != pytest.approx(scores, abs=1e-6)


# ----- 3. the first differing token -----
def test_first_differing_option_token(tokenizer):
    stub = StubEngine(tokenizer)
    PTrue()([row("p0", 0, 1, 2)], Context(stub, None, seed=0))
    prefix, (suffix,), (a, b), _ = stub.calls[0]
    ta, tb = tokenizer.decode([a]), tokenizer.decode([b])
    assert ta != tb and "A" in ta and "B" in tb and "B" not in ta
    assert tokenizer.decode(prefix + suffix).endswith("The proposed answer is: (")  # " (" is shared
    assert len(tokenizer(" (A)", add_special_tokens=False)["input_ids"]) > 1  # why the first difference
    # the pieces are the whole chat text tokenised at once: the split at the answer is clean
    question = (
        "Question: What is 1 + 2?\nProposed Answer: 1 + 2 = 3\nIs the proposed answer:\n (A) True\n (B) False"
    )
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    whole = tokenizer(chat + "The proposed answer is: (A)", add_special_tokens=False)["input_ids"]
    assert prefix + suffix + [a] == whole[: len(prefix) + len(suffix) + 1]


# ----- 4. few-shot -----
def shots_in(prefix_text):
    """(answer, True?) for each worked example (plain text: blocks separated by a blank line)."""
    blocks = prefix_text.split("\n\n")[:-1]
    return [
        (re.search(r"Proposed Answer: (.*)\n", b)[1], b.endswith("The proposed answer is: (A)"))
        for b in blocks
    ]


def test_few_shot_never_shows_the_judged_prompt_and_is_balanced_and_seeded(tokenizer):
    rows = [row(f"p{p}", i, p, 10, answer=p + 10 + (i % 2)) for p in range(5) for i in range(4)]
    scorer = PTrue(name="fs", shots=4, shot_labels="ground_truth", chat=False)
    assert "correct" in scorer.reads
    runs = []
    for _ in range(2):
        stub = StubEngine(tokenizer)
        scorer(rows, Context(stub, None, seed=3))
        runs.append(texts(tokenizer, stub.calls))
        assert len(stub.calls) == 5  # one prefix per prompt: its samples share its shots
    assert runs[0] == runs[1]
    shuffled = StubEngine(tokenizer)  # the draw does not depend on the rows' order
    scorer(rows[::-1], Context(shuffled, None, seed=3))
    assert sorted(texts(tokenizer, shuffled.calls)) == sorted(runs[0])
    for prefix, full in runs[0]:
        own = re.findall(r"Question: (.*)\n", full)[-1]
        assert re.findall(r"Question: (.*)\n", full).count(own) == 1  # no shot of the judged prompt
        labels = [ok for _, ok in shots_in(prefix)]
        assert len(labels) == 4 and sum(labels) == 2
    chat = StubEngine(tokenizer)  # chat mode: shots are earlier user/assistant turns
    PTrue(shots=2)(rows, Context(chat, None, seed=3))
    prefix = tokenizer.decode(chat.calls[0][0])
    assert prefix.count("<|im_start|>user") == 3 and prefix.count("<|im_start|>assistant") == 2
    other = StubEngine(tokenizer)
    scorer(rows, Context(other, None, seed=4))
    assert texts(tokenizer, other.calls) != runs[0]  # the draw follows the unit's seed


def test_majority_and_ground_truth_labels_differ(tokenizer):
    # every prompt's majority answer is wrong: majority labels call it True, the checker False
    rows = [row(f"p{p}", i, p, 1, answer=p + 5 if i < 3 else p + 1) for p in range(4) for i in range(4)]
    seen = {}
    for labels in ("majority", "ground_truth"):
        stub = StubEngine(tokenizer)
        scorer = PTrue(shots=4, shot_labels=labels, chat=False)
        scorer(rows, Context(stub, None, seed=0))
        seen[labels] = [s for prefix, _ in texts(tokenizer, stub.calls) for s in shots_in(prefix)]
    assert "answer" in PTrue(shots=1).reads and "correct" not in PTrue(shots=1).reads
    majority_answers = {f"{p} + 1 = {p + 5}" for p in range(4)}
    assert all(ok == (a in majority_answers) for a, ok in seen["majority"])
    assert all(ok == (a not in majority_answers) for a, ok in seen["ground_truth"])
    assert {ok for _, ok in seen["majority"]} == {True, False}


# ----- 5. brainstorm -----
def test_brainstorm_lists_the_judged_answer(tokenizer):
    rows = [row("p0", i, 40, 2, answer=100 + i) for i in range(8)]
    stub = StubEngine(tokenizer)
    PTrue(name="bs", brainstorm=3)(rows, Context(stub, None, seed=0))
    assert len(stub.calls) == 2  # the first 3 samples share one prefix, the others another
    judged_all = []
    for _, full in texts(tokenizer, stub.calls):
        found = re.search(r"brainstormed ideas: (.*?)\nPossible Answer: ([^\n]*)\n", full, re.S)
        listed, judged = found[1].split("\n"), found[2]
        assert judged in listed and len(listed) == 3
        assert listed[:2] == ["40 + 2 = 100", "40 + 2 = 101"]  # the first ones, then the judged one
        assert full.endswith("The possible answer is: (")
        judged_all.append(judged)
    assert sorted(judged_all) == [f"40 + 2 = {100 + i}" for i in range(8)]  # sample_idx 3..7 included


# ----- 6. a custom template -----
def test_custom_plain_template_is_what_the_model_reads(tokenizer):
    stub = StubEngine(tokenizer)
    scorer = PTrue(
        name="mine",
        template="Q: {question} -> {answer}. Right?",
        prefill="Verdict:",
        options=[" yes", " no"],
        chat=False,
    )
    scorer([row("p0", 0, 2, 2)], Context(stub, None, seed=0))
    prefix, (suffix,), (a, b), _ = stub.calls[0]
    assert tokenizer.decode(prefix + suffix + [a]) == "Q: What is 2 + 2? -> 2 + 2 = 4. Right?\nVerdict: yes"
    assert tokenizer.decode([b]) == " no"
    assert tokenizer.decode(prefix) == "Q: What is 2 + 2? ->"  # the answer's space starts the suffix


@pytest.mark.parametrize("name", ["ptrue", "ptrue_fewshot", "ptrue_fewshot_labeled", "ptrue_brainstorm"])
def test_configs_build(name):
    cfg = cfg_of(f"+verifier@verifiers.{name}={name}")
    scorer = instantiate(cfg.verifiers[name])
    assert scorer.name == name and isinstance(scorer, PTrue)
    assert ("correct" in scorer.reads) == (name == "ptrue_fewshot_labeled")
    assert (
        "uses the ground-truth labels"
        in Path(CONFIG_DIR, "verifier", "ptrue_fewshot_labeled.yaml").read_text().lower()
    )
