"""Cross-view rewards (Co-rewarding 2508.00410, Self-Harmony 2511.01191): a problem asked several ways must get one answer.

Rows come from the views rollout (`rollout.Views`): a problem's forms share its `prompt_id` and carry
`view` (0: the original). Agreement within a prompt (TTRL, EMPO) plus diversity across prompts rewards
a consistent wrong rule (38 + 6 = 104, roughly a + bb) as much as the right one; a rule that depends on
how the problem is written answers its forms differently, and these rewards ask the forms to agree.
All label-free. A problem asked in one form only (a data row without rephrasings) has no other form to
agree with: 0 (Self-Harmony's label is then that form's majority). Each scorer logs the share of the
views' rows (view >= 1) without an answer: a view the task cannot parse is counted, not fatal.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from selfimprove.metrics import majority_answer, votes
from selfimprove.select.filters import by_prompt
from selfimprove.stages import Context, Scorer


def forms_of(rows: list[dict]) -> list[dict[int, list[int]]]:
    """Per problem (first-seen order), its rows' indices by view (first-seen order)."""
    out = []
    for idx in by_prompt(rows).values():
        forms: dict[int, list[int]] = {}
        for i in idx:
            forms.setdefault(int(rows[i]["view"]), []).append(i)
        out.append(forms)
    return out


def harmony_label(answers_by_form: Sequence[Sequence[Hashable | None]]) -> Hashable | None:
    """Self-Harmony's pseudo-label: the answer with the highest harmonic mean of its frequencies under
    the forms, F / sum_f 1/p_f(y) (0 when a form never gives it); ties to the first seen; None when no
    answer is given by every form."""
    shares = [{a: c / len(answers) for a, c in votes(answers).items()} for answers in answers_by_form]
    best, best_hm = None, 0.0
    for answers in answers_by_form:
        for y in answers:
            if y is None or any(y not in s for s in shares):
                continue
            hm = len(shares) / sum(1.0 / s[y] for s in shares)
            if hm > best_hm:
                best, best_hm = y, hm
    return best


class _CrossView(Scorer):
    reads = ("prompt_id", "view", "answer")

    def score(self, rows: list[dict], ctx: Context | None = None) -> list[float]:
        out = [0.0] * len(rows)
        for forms in forms_of(rows):
            answers = {v: [rows[i]["answer"] for i in idx] for v, idx in forms.items()}
            for view, idx in forms.items():
                for i, reward in zip(idx, self.rewards(view, answers)):
                    out[i] = reward
        views = [r for r in rows if r["view"] != 0]
        if ctx is not None and views:
            ctx.log("unanswered_views", sum(r["answer"] is None for r in views) / len(views))
        return out

    def rewards(self, view: int, answers: dict[int, list]) -> list[float]:
        """The rewards of form `view`'s samples, from every form's answers (view -> answers)."""
        raise NotImplementedError


class CrossLabel(_CrossView):
    """Co-rewarding-I (2508.00410): a sample scores 1.0 when its answer is the majority answer of the
    *other* forms' samples pooled (with one view: the other view's majority), so each form's vote labels
    the other's samples (cross-labelling) and no form grades itself."""

    name = "cross_label"

    def rewards(self, view: int, answers: dict[int, list]) -> list[float]:
        label = majority_answer([a for v, group in answers.items() if v != view for a in group])
        return [float(a is not None and a == label) for a in answers[view]]


class Harmony(_CrossView):
    """Self-Harmony (2511.01191): every sample of the problem, in whichever form, scores 1.0 when its
    answer is the pseudo-label y* = argmax_y HM(p_0(y), ..., p_V(y)), the harmonic mean of the answer's
    frequencies under the forms (`harmony_label`): an answer must be frequent under every form."""

    name = "harmony"

    def rewards(self, view: int, answers: dict[int, list]) -> list[float]:
        label = harmony_label(list(answers.values()))
        return [float(a is not None and a == label) for a in answers[view]]


class ViewMajority(_CrossView):
    """Agreement with the other views' majorities: the share of the problem's other forms whose own
    majority answer is the sample's answer (each form one vote). With one view it is Co-rewarding-I's
    reward; with more, a form that splits its vote counts once, however many samples it has."""

    name = "view_majority"

    def rewards(self, view: int, answers: dict[int, list]) -> list[float]:
        others = [majority_answer(group) for v, group in answers.items() if v != view]
        if not others:
            return [0.0] * len(answers[view])
        return [0.0 if a is None else sum(m == a for m in others) / len(others) for a in answers[view]]


__all__ = ["CrossLabel", "Harmony", "ViewMajority", "forms_of", "harmony_label"]
