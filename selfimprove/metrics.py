"""Evaluation metrics: accuracy, pass@k, maj@k, AUROC/ECE of self-verifiers, repetition.

Pure functions of plain Python values; an empty input gives nan (or None where stated)
rather than a misleading 0.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence


def accuracy(flags: Sequence[bool | float]) -> float:
    """Mean of correctness flags; nan when empty."""
    return sum(float(f) for f in flags) / len(flags) if len(flags) else math.nan


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), n samples, c correct.

    Uses the product form 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def votes(answers: Sequence[Hashable | None]) -> Counter:
    """How many samples gave each answer; None (nothing extracted) does not vote."""
    return Counter(a for a in answers if a is not None)


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent answer, ties to the first seen; None if no sample gave one. The one
    majority vote behind maj@k, the majority selector and the agreement scorer."""
    counts = votes(answers)
    return max(counts, key=lambda a: counts[a]) if counts else None  # Counter keeps first-seen order


def _majority(pairs: Sequence[tuple[Hashable | None, bool]]) -> tuple[Hashable | None, bool]:
    """(majority answer, its correctness)."""
    winner = majority_answer([a for a, _ in pairs])
    if winner is None:
        return None, False
    return winner, next(bool(c) for a, c in pairs if a == winner)


def maj_at_k(groups: dict[str, Sequence[tuple[Hashable | None, bool]]]) -> float:
    """Fraction of prompts whose majority answer (ties -> first seen) is correct."""
    return accuracy([_majority(pairs)[1] for pairs in groups.values()])


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """P(score of a random positive > a random negative), ties counting 1/2.

    Rank-based Mann-Whitney U with average ranks for ties. Rows with a nan score are
    dropped. None when only one class is present (AUROC is undefined there).
    """
    pairs = [(float(s), bool(y)) for s, y in zip(scores, labels) if not math.isnan(float(s))]
    n_pos = sum(y for _, y in pairs)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    pairs.sort(key=lambda t: t[0])
    rank_sum_pos = 0.0
    i = 0
    while i < len(pairs):
        j = i
        while j + 1 < len(pairs) and pairs[j + 1][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1  # 1-based average rank of the tie block i..j
        rank_sum_pos += avg_rank * sum(y for _, y in pairs[i : j + 1])
        i = j + 1
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def ece(probs: Sequence[float], labels: Sequence[bool], bins: int = 10) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1]; nan when empty."""
    if not probs:
        return math.nan
    conf: dict[int, list[float]] = defaultdict(list)
    hits: dict[int, list[float]] = defaultdict(list)
    for p, y in zip(probs, labels):
        b = min(max(int(p * bins), 0), bins - 1)  # p == 1.0 falls in the last bin
        conf[b].append(float(p))
        hits[b].append(float(y))
    total = len(probs)
    return sum(
        len(conf[b]) / total * abs(sum(hits[b]) / len(hits[b]) - sum(conf[b]) / len(conf[b])) for b in conf
    )


def mean_reward(rows: list[dict]) -> float | None:
    """The task's reward averaged (partial credit where the task grants it, so it moves on tasks
    where accuracy stays at 0); None when no row carries one (hand-built rows)."""
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    return sum(rewards) / len(rewards) if rewards else None


def token_budget(rows: list[dict]) -> dict[str, float | None]:
    """How long the completions ran: mean and max completion tokens, and the fraction `truncated`
    (cut by max_new_tokens without an EOS; None for rows sampled before the column existed)."""
    lengths = [len(r["completion_ids"]) for r in rows if "completion_ids" in r]
    cut = [r["truncated"] for r in rows if r.get("truncated") is not None]
    return {
        "truncated": accuracy(cut) if cut else None,
        "completion_tokens_mean": sum(lengths) / len(lengths) if lengths else None,
        "completion_tokens_max": max(lengths, default=None),
    }


def summarize_round(rows: list[dict], examples: list[dict], scorer_names: list[str]) -> dict:
    """One round's sample / selection / verifier-quality metrics.

    ``sample/pass_at_k`` uses k = every sample of the prompt (any correct), ``sample/maj_at_k``
    votes over all of them. Diversity: ``sample/distinct_answers`` per prompt and the mean token
    ``sample/entropy``; ``sample/kl_to_base`` is the k1 estimate mean(sum(logprobs - ref_logprobs))
    when a scorer computed the base's log-probs (unbiased for samples drawn at temperature 1).
    ``score/<name>`` is each score's mean (the curation reward's rise), ``auroc/<name>`` pools every
    row carrying it and asks how well it separates correct from wrong samples (None: one class).
    ``sample/truncated`` and ``sample/completion_tokens_mean|max``: `token_budget`.
    """
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_prompt[row["prompt_id"]].append(row)
    n_correct = {p: sum(bool(r["correct"]) for r in g) for p, g in by_prompt.items()}
    policy = [e for e in examples if e.get("source", "policy") == "policy"]
    tokens = [x for r in rows for x in r.get("entropy", [])]
    out: dict = {
        "sample/n": len(rows),
        "sample/n_prompts": len(by_prompt),
        "sample/accuracy": accuracy([r["correct"] for r in rows]),
        "sample/reward": mean_reward(rows),
        "sample/pass_at_k": accuracy([pass_at_k(len(g), n_correct[p], len(g)) for p, g in by_prompt.items()]),
        "sample/maj_at_k": maj_at_k(
            {p: [(r["answer"], r["correct"]) for r in g] for p, g in by_prompt.items()}
        ),
        "sample/distinct_answers": sum(len(votes([r["answer"] for r in g])) for g in by_prompt.values())
        / max(len(by_prompt), 1),
        "sample/entropy": sum(tokens) / len(tokens) if tokens else None,
        "select/n": len(examples),
        "select/n_real": len(examples) - len(policy),
        "select/accuracy": accuracy([e["correct"] for e in policy]) if policy else None,
    }
    out.update({f"sample/{k}": v for k, v in self_correction(rows).items()})  # two-attempt episodes
    out.update({f"sample/{k}": v for k, v in token_budget(rows).items()})
    if rows and all("ref_logprobs" in r for r in rows):
        out["sample/kl_to_base"] = sum(sum(r["logprobs"]) - sum(r["ref_logprobs"]) for r in rows) / len(rows)
    for name in scorer_names:
        scored = [r for r in rows if f"score/{name}" in r]
        finite = [r[f"score/{name}"] for r in scored if math.isfinite(r[f"score/{name}"])]
        out[f"score/{name}"] = sum(finite) / len(finite) if finite else None
        out[f"auroc/{name}"] = auroc([r[f"score/{name}"] for r in scored], [r["correct"] for r in scored])
    return out


def eval_summary(greedy: list[dict], sampled: list[dict], k: int) -> dict[str, float]:
    """Held-out metrics: greedy accuracy and mean task reward (partial credit where the task grants
    it), and pass@k / maj@k from k samples per problem, of the final attempts; the self-correction
    metrics of two-attempt episodes; the greedy completions' lengths and truncation (`token_budget`)."""
    out = {
        "accuracy": accuracy([r["correct"] for r in final_turn(greedy)]),
        "reward": mean_reward(final_turn(greedy)),
        **self_correction(greedy),
        **token_budget(greedy),
    }
    sampled = final_turn(sampled)
    if sampled:
        groups: dict[str, list] = {}
        for r in sampled:
            groups.setdefault(r["prompt_id"], []).append((r["answer"], r["correct"]))
        out["pass_at_k"] = sum(pass_at_k(len(g), sum(c for _, c in g), k) for g in groups.values()) / len(
            groups
        )
        out["maj_at_k"] = maj_at_k(groups)
        out["k"] = k
        out["sample_accuracy"] = accuracy([r["correct"] for r in sampled])
    return out


def answer_information(groups: dict[str, Sequence[Hashable | None]]) -> dict[str, float]:
    """Label-free: the mutual information between prompt and answer, from k sampled answers per prompt,
    in nats: H(all answers pooled) − mean over prompts of H(the prompt's answers). High when a prompt's
    samples agree and different prompts get different answers; low for a policy that answers every
    prompt alike (a collapse) or none consistently. "No answer" counts as one answer."""

    def entropy(counts: Counter) -> float:
        total = sum(counts.values())
        return 0.0 - sum(c / total * math.log(c / total) for c in counts.values())  # 0.0, not -0.0

    pooled = entropy(Counter(a for answers in groups.values() for a in answers))
    within = [entropy(Counter(answers)) for answers in groups.values()]
    agreement = [max(Counter(answers).values()) / len(answers) for answers in groups.values()]
    return {
        "information": pooled - sum(within) / len(within),
        "answer_entropy": pooled,
        "agreement": sum(agreement) / len(agreement),
    }


def view_agreement(forms: dict[str, dict[int, Sequence[Hashable | None]]]) -> float | None:
    """Label-free: over prompts asked in several forms (prompt -> view -> answers; view 0 the original),
    the mean share of a prompt's other forms whose majority answer is the original form's (none when
    the original has no answer). A wrong rule that depends on how the problem is written scores low
    however consistent it is within a form. None when no prompt has two forms."""
    shares = []
    for by_view in forms.values():
        if 0 not in by_view or len(by_view) < 2:
            continue
        original = majority_answer(by_view[0])
        others = [v for v in by_view if v != 0]
        shares.append(
            sum(original is not None and majority_answer(by_view[v]) == original for v in others)
            / len(others)
        )
    return sum(shares) / len(shares) if shares else None


def select_round(records: list[dict], key: str) -> dict:
    """The evaluated round with the best `key` (ties: the earliest), with its metrics under selected/:
    what a run that selects its model by `key` reports."""
    scored = [r for r in records if r.get(key) is not None]
    if not scored:
        return {}
    best = max(scored, key=lambda r: (r[key], -r["round"]))
    return {
        "selected/round": best["round"],
        "selected/by": key,
        **{
            f"selected/{k}": v
            for k, v in best.items()
            if k.startswith(("eval/", "eval_ema/", "dev/", "unlabelled/"))
        },
    }


# --- verifier report: how well a score picks among one prompt's samples ------------------------------


def _mann_whitney(pos: Sequence[float], neg: Sequence[float]) -> float:
    """U: pairs (positive, negative) where the positive scores higher, ties counting 1/2."""
    from bisect import bisect_left, bisect_right

    ranked = sorted(neg)
    return sum(bisect_left(ranked, p) + 0.5 * (bisect_right(ranked, p) - bisect_left(ranked, p)) for p in pos)


def auroc_within(
    scores: Sequence[float], labels: Sequence[bool], groups: Sequence[Hashable]
) -> tuple[float | None, int]:
    """AUROC over (correct, wrong) pairs of the same group (prompt) only, and how many groups had both.

    What matters for picking one of N answers: a score that only tells easy prompts from hard ones has
    a high pooled AUROC but ranks a prompt's own samples no better than chance. It is the sum over
    groups of Mann-Whitney U over the sum of n_pos * n_neg (ties 1/2), i.e. every within-group pair
    weighs the same. Rows with a nan score are dropped; None when no group has both classes.
    """
    by_group: dict[Hashable, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    for s, y, g in zip(scores, labels, groups):
        s = float(s)
        if not math.isnan(s):
            by_group[g][0 if y else 1].append(s)
    u = pairs = 0.0
    both = 0
    for pos, neg in by_group.values():
        if pos and neg:
            both += 1
            u += _mann_whitney(pos, neg)
            pairs += len(pos) * len(neg)
    return (u / pairs if pairs else None), both


def rank_order(scores: Sequence[float]) -> list[int]:
    """Indices from best to worst score, ties to the lower index; nan ranks last (never picked)."""
    key = [-math.inf if math.isnan(float(s)) else float(s) for s in scores]
    return sorted(range(len(key)), key=lambda i: (-key[i], i))


def best_of_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """Expected correctness of the top-scored sample of a uniformly random k-subset of one prompt's N
    samples (given in sample_idx order), exactly: the sample ranked j-th overall (0-based, ties to the
    lower index) is the best of the subset iff it is in it and no better-ranked one is, which has
    probability C(N-1-j, k-1) / C(N, k). k = 1 gives the mean accuracy, k = N the argmax's correctness.
    """
    n = len(scores)
    if len(correct) != n or not 1 <= k <= n:
        raise ValueError(f"need len(correct) == len(scores) = N and 1 <= k <= N, got N={n} k={k}")
    total = math.comb(n, k)
    return sum(
        math.comb(n - 1 - j, k - 1) / total for j, i in enumerate(rank_order(scores)) if bool(correct[i])
    )


def majority_of_k(
    pairs: Sequence[tuple[Hashable | None, bool]], k: int, draws: int = 64, seed: int = 0
) -> float:
    """maj@k for one prompt: mean correctness of the majority answer of k of its samples (in
    sample_idx order; ties to the first seen, as `majority_answer`). Exact over every k-subset when
    there are at most `draws` of them, else the mean over `draws` subsets drawn with random.Random(seed)
    (the same subsets on every run)."""
    import itertools
    import random

    n = len(pairs)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= N, got N={n} k={k}")
    if math.comb(n, k) <= draws:
        subsets = list(itertools.combinations(range(n), k))
    else:
        rng = random.Random(seed)
        subsets = [tuple(sorted(rng.sample(range(n), k))) for _ in range(draws)]
    return sum(_majority([pairs[i] for i in s])[1] for s in subsets) / len(subsets)


def reliability_bins(probs: Sequence[float], labels: Sequence[bool], bins: int = 10) -> list[dict]:
    """The reliability diagram behind `ece`, with its bins: for each equal-width bin of [0, 1] its
    edges, how many probabilities fell in it, their mean and the fraction correct (None when empty).
    ece = sum over bins of count / total * |accuracy - confidence|."""
    members: list[list[tuple[float, bool]]] = [[] for _ in range(bins)]
    for p, y in zip(probs, labels):
        members[min(max(int(float(p) * bins), 0), bins - 1)].append((float(p), bool(y)))
    return [
        {
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "count": len(m),
            "confidence": sum(p for p, _ in m) / len(m) if m else None,
            "accuracy": sum(y for _, y in m) / len(m) if m else None,
        }
        for b, m in enumerate(members)
    ]


# --- two-attempt episodes (SCoRe) ----------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance in characters."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def final_turn(rows: list[dict]) -> list[dict]:
    """The rows of each episode's last attempt (all rows of a one-turn table)."""
    last = max((r.get("turn") or 1 for r in rows), default=1)
    return [r for r in rows if (r.get("turn") or 1) == last]


def self_correction(rows: list[dict]) -> dict[str, float]:
    """SCoRe's metrics over two-attempt episodes: accuracy at each attempt, Δ(t1, t2) = acc2 − acc1,
    Δ(i→c) and Δ(c→i) (share of episodes going incorrect → correct, correct → incorrect), and the mean
    character edit distance between the attempts. Empty for one-turn rows."""
    seconds = [r for r in rows if r.get("turn") == 2]
    if not seconds:
        return {}
    first = [bool(r["first_correct"]) for r in seconds]
    second = [bool(r["correct"]) for r in seconds]
    n = len(seconds)
    return {
        "accuracy_t1": accuracy(first),
        "accuracy_t2": accuracy(second),
        "delta": accuracy(second) - accuracy(first),
        "delta_i2c": sum(not a and b for a, b in zip(first, second)) / n,
        "delta_c2i": sum(a and not b for a, b in zip(first, second)) / n,
        "edit_distance": sum(edit_distance(r["first_completion"], r["completion"]) for r in seconds) / n,
    }
