"""P(True) self-evaluation (Kadavath et al. 2207.05221, §3.2 and §4): the model judges its own answer.

The model reads the question and a proposed answer, is asked whether it is (A) True or (B) False, and
the score is pA / (pA + pB) at the first token where the two options differ (" (A)" is several BPE
tokens). All samples of a prompt share the text before their answer (few-shot examples, the question,
the brainstormed ideas), so that prefix is computed once and its cache reused over the samples.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from selfimprove.metrics import majority_answer
from selfimprove.stages import Context, Scorer

TEMPLATE = "Question: {question}\nProposed Answer: {answer}\nIs the proposed answer:\n (A) True\n (B) False"
PREFILL = "The proposed answer is:"
BRAINSTORM_TEMPLATE = (
    "Question: {question}\nHere are some brainstormed ideas: {ideas}\nPossible Answer: {answer}\n"
    "Is the possible answer:\n (A) True\n (B) False"
)
BRAINSTORM_PREFILL = "The possible answer is:"
MARK = "<<SELFIMPROVE_PTRUE_ANSWER>>"  # where the judged answer goes; the text is split there
PLACEHOLDER = re.compile(r"\{(question|answer|ideas)\}")


def question_of(row: dict) -> str:
    """The last user turn of the problem's chat messages."""
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    if not users:
        raise ValueError(f"prompt {row['prompt_id']!r}: its messages have no user turn")
    return users[-1]


def answer_of(row: dict) -> str:
    """The proposed answer: what the assistant wrote, the prefill included (e.g. "47 + 5 = 52")."""
    return ((row.get("prefill") or "") + row["completion"]).strip()


def p_true(lp_a: float, lp_b: float) -> float:
    """pA / (pA + pB) from log-probs: the sigmoid of their difference, exact even when both are tiny."""
    d = lp_a - lp_b
    if d != d:  # both -inf: the model gives neither option any mass
        return math.nan
    if d >= 0:
        return 1.0 / (1.0 + math.exp(-d))
    e = math.exp(d)
    return e / (1.0 + e)


def first_difference(a: list[int], b: list[int]) -> int:
    """The first position where two token sequences differ; a ValueError when there is none."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    raise ValueError(
        f"the P(True) options tokenise without a differing token ({a} vs {b}): choose options that do"
    )


def spread(pool: list[tuple[dict, bool]], rng: random.Random) -> list[tuple[dict, bool]]:
    """The pool shuffled, then each prompt's first row before any prompt's second (varied questions)."""
    pool = list(pool)
    rng.shuffle(pool)
    seen: Counter = Counter()
    ranked = []
    for item in pool:
        ranked.append((seen[item[0]["prompt_id"]], item))
        seen[item[0]["prompt_id"]] += 1
    return [item for _, item in sorted(ranked, key=lambda x: x[0])]  # stable: the shuffle stays


class PTrue(Scorer):
    """Scorer: P(True) that the row's answer is right, by the model itself (policy or frozen base).

    ``template`` holds ``{question}``, ``{answer}`` and, for ``brainstorm > 0``, ``{ideas}``; then the
    ``prefill`` starts the reply and the two ``options`` (True first) are compared. ``chat=True`` puts
    the text in a user turn through the chat template; ``chat=False`` reads ``template + "\\n" +
    prefill`` as plain text. ``shots=k`` shows k worked examples first, drawn per prompt from the
    OTHER prompts' rows in the same call (never the judged prompt's own), balanced True/False where
    the pool allows. ``shot_labels="majority"`` is label-free (a shot is True iff its answer is its
    prompt's majority answer); ``"ground_truth"`` reads ``correct``: it USES THE LABELS (oracle
    few-shot, for comparison only). ``brainstorm=k`` lists k of the prompt's samples (the judged one
    among them) before the answer, with Kadavath's wording. ``weights="base"`` judges with the
    frozen base model. Text is tokenised without added special tokens: the chat template (or, with
    ``chat=False``, the template itself) says what the model sees.
    """

    probability = True  # the score is P(right): the verifier report gives its calibration

    def __init__(
        self,
        name: str = "ptrue",
        template: str | None = None,
        prefill: str | None = None,
        options: Sequence[str] = (" (A)", " (B)"),
        chat: bool = True,
        shots: int = 0,
        shot_labels: str = "majority",
        brainstorm: int = 0,
        weights: str = "policy",
    ) -> None:
        if weights not in ("policy", "base"):
            raise ValueError(f"weights must be 'policy' or 'base', got {weights!r}")
        if shot_labels not in ("majority", "ground_truth"):
            raise ValueError(f"shot_labels must be 'majority' or 'ground_truth', got {shot_labels!r}")
        if shots < 0 or brainstorm < 0:
            raise ValueError(f"shots and brainstorm must be >= 0, got {shots} and {brainstorm}")
        self.options = tuple(options)
        if len(self.options) != 2 or self.options[0] == self.options[1]:
            raise ValueError(f"options must be two different strings (True first), got {self.options}")
        self.template = template if template is not None else BRAINSTORM_TEMPLATE if brainstorm else TEMPLATE
        self.prefill = prefill if prefill is not None else BRAINSTORM_PREFILL if brainstorm else PREFILL
        if self.template.count("{answer}") != 1:
            raise ValueError("the P(True) template must hold {answer} exactly once")
        if brainstorm and "{ideas}" not in self.template:
            raise ValueError("brainstorm > 0 needs {ideas} in the template")
        self.name = name
        self.chat, self.shots, self.shot_labels = chat, shots, shot_labels
        self.brainstorm, self.weights = brainstorm, weights
        self.needs_reference = weights == "base"
        reads = ["prompt_id", "sample_idx", "messages", "prefill", "completion"]
        if shots:
            reads.append("correct" if shot_labels == "ground_truth" else "answer")
        self.reads = tuple(reads)

    # ----- what the model reads -----
    def _ideas(self, row: dict, siblings: list[dict], judged: bool) -> str:
        """The first `brainstorm` samples of the prompt; the row itself replaces the last when it is not
        among them (as MARK when judged, so rows beyond the first k still share a prefix)."""
        first = siblings[: self.brainstorm]
        if any(s is row for s in first):
            return "\n".join(answer_of(s) for s in first)
        own = MARK if judged else answer_of(row)
        return "\n".join([answer_of(s) for s in first[: self.brainstorm - 1]] + [own])

    def _fill(self, row: dict, answer: str, ideas: str) -> str:
        values = {"question": question_of(row), "answer": answer, "ideas": ideas}
        return PLACEHOLDER.sub(lambda m: values[m[1]], self.template)  # one pass: no text is re-read

    def render(
        self, row: dict, shots: list[tuple[dict, bool]], siblings: Callable[[dict], list[dict]], tok: Any
    ) -> str:
        """The judged prompt's text with MARK in place of the judged answer, ending with the prefill."""
        examples = [
            (self._fill(s, answer_of(s), self._ideas(s, siblings(s), False)), self.options[0 if ok else 1])
            for s, ok in shots
        ]
        judged = self._fill(row, MARK, self._ideas(row, siblings(row), True))
        if not self.chat:
            parts = [f"{q}\n{self.prefill}{o}" for q, o in examples] + [f"{judged}\n{self.prefill}"]
            return "\n\n".join(parts)
        if not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: set chat: false for P(True)")
        messages: list[dict] = []
        for q, o in examples:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": self.prefill + o}]
        messages.append({"role": "user", "content": judged})
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + self.prefill

    def pieces(self, text: str, answer: str, encode: Callable[[str], list[int]]) -> tuple:
        """(prefix ids, suffix ids, (tok_A, tok_B)): the text is split before the first MARK; the prefix
        keeps everything before it but trailing spaces (" 52" stays one token with its answer)."""
        if MARK not in text:
            raise ValueError("the chat template dropped the P(True) answer placeholder")
        before, rest = text.split(MARK, 1)
        head = before.rstrip(" ")
        rest = before[len(head) :] + answer + rest.replace(MARK, answer)
        a, b = (encode(rest + option) for option in self.options)
        d = first_difference(a, b)
        prefix, suffix = encode(head), a[:d]
        if not prefix:  # a plain template opening with the answer: the engine needs a prefix
            if not suffix:
                raise ValueError("nothing precedes the P(True) options")
            prefix, suffix = suffix[:1], suffix[1:]
        return prefix, suffix, (a[d], b[d])

    # ----- few-shot examples -----
    def _labelled(self, rows: list[dict]) -> list[tuple[dict, bool]]:
        if self.shot_labels == "ground_truth":
            return [(r, bool(r["correct"])) for r in rows]
        answers: dict[Hashable, list] = defaultdict(list)
        for r in rows:
            answers[r["prompt_id"]].append(r["answer"])
        winner = {p: majority_answer(a) for p, a in answers.items()}
        return [(r, r["answer"] is not None and r["answer"] == winner[r["prompt_id"]]) for r in rows]

    def draw_shots(self, pool: list[tuple[dict, bool]], rng: random.Random) -> list[tuple[dict, bool]]:
        """`shots` examples, half True and half False where the pool allows, the rest from the other."""
        true = spread([x for x in pool if x[1]], rng)
        false = spread([x for x in pool if not x[1]], rng)
        n_true = min(len(true), max(self.shots // 2, self.shots - len(false)))
        chosen = true[:n_true] + false[: self.shots - n_true]
        rng.shuffle(chosen)
        return chosen

    # ----- scoring -----
    def score(self, rows: list[dict], ctx: Context) -> list[float]:
        tok = ctx.tokenizer
        ordered = sorted(rows, key=lambda r: (str(r["prompt_id"]), r["sample_idx"]))  # input order-free
        siblings: dict[Hashable, list[dict]] = defaultdict(list)
        for r in ordered:
            siblings[r["prompt_id"]].append(r)
        labelled = self._labelled(ordered) if self.shots else []
        shots_of: dict[Hashable, list[tuple[dict, bool]]] = {}
        cache: dict[str, list[int]] = {}

        def encode(text: str) -> list[int]:
            if text not in cache:
                cache[text] = tok(text, add_special_tokens=False)["input_ids"]
            return cache[text]

        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, row in enumerate(rows):
            pid = row["prompt_id"]
            if pid not in shots_of:
                pool = [x for x in labelled if x[0]["prompt_id"] != pid]
                shots_of[pid] = self.draw_shots(pool, ctx.rng("ptrue", pid)) if pool else []
            text = self.render(row, shots_of[pid], lambda r: siblings[r["prompt_id"]], tok)
            prefix, suffix, candidates = self.pieces(text, answer_of(row), encode)
            groups[(tuple(prefix), candidates)].append((i, suffix))

        out = [math.nan] * len(rows)
        for (prefix, candidates), items in groups.items():
            lps = ctx.next_token_logprobs(
                list(prefix), [s for _, s in items], candidates, weights=self.weights
            )
            for (i, _), (lp_a, lp_b) in zip(items, lps):
                out[i] = p_true(lp_a, lp_b)
        return out
