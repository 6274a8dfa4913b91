"""Tokenwise rejection sampling with backtracking (Botta et al. 2502.12123).

Before each token a *process verifier* judges every row's prefix: can it still be completed to a
valid answer? Where it says no (P(error) >= threshold) and the row has quota left, the row erases its
last `block` tokens and samples again from the shorter prefix; `quota` counts these backtracks, not
tokens. With `same_prefix_once` (the paper's job setting) a row never backtracks twice at the same
prefix, so a verifier that keeps rejecting cannot make it loop. Query cost = tokens generated + tokens
erased, recorded per row with the number of backtracks and whether the quota ran out.

The erase works on the KV cache as it is: the erased tokens' columns are masked out, and the last
kept token is fed again (its old column masked too) to get the logits that follow the shorter prefix,
so a backtracking row costs one forward like any other row, and rows backtrack independently.

Verifiers map (rows, prefixes, ...) to P(error) per row:
- `TaskVerifier`: the task's exact prefix check (`task.prefix_error`): the Dyck task's stack check,
  the arithmetic task's answer format.
- `Probe`: a logistic probe on the model's hidden state at the prefix's last token, fitted on the
  loop's own checked samples (`fit_probe`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from selfimprove.sampling.prefix import forward_inputs, left_pad

if TYPE_CHECKING:  # the config imports the samplers' checks, not the other way round
    from selfimprove.config import BacktrackConfig


class TaskVerifier:
    """The task's exact prefix check on each row's decoded completion so far."""

    reads_hidden = False
    name = "task"

    def __init__(self, task, problems: list, tokenizer) -> None:
        if not hasattr(task, "prefix_error"):
            raise ValueError(
                f"sampler.backtrack.verifier=task: task {type(task).__name__} has no prefix check"
            )
        self.task, self.problems, self.tokenizer = task, problems, tokenizer

    def __call__(self, rows, prefixes, ended, remaining, hidden) -> list[float]:
        texts = self.tokenizer.batch_decode(prefixes, skip_special_tokens=True)
        return [
            float(self.task.prefix_error(self.problems[r], t, e, n))
            for r, t, e, n in zip(rows, texts, ended, remaining)
        ]


class Probe:
    """P(error | prefix) = sigmoid(w · standardised hidden state + b), at hidden layer `layer`."""

    reads_hidden = True
    name = "probe"

    def __init__(
        self, weight: torch.Tensor, bias: float, mean: torch.Tensor, scale: torch.Tensor, layer: int
    ):
        self.weight, self.bias, self.mean, self.scale, self.layer = weight, bias, mean, scale, layer

    def predict(self, hidden: torch.Tensor) -> torch.Tensor:
        z = (hidden.float().cpu() - self.mean) / self.scale
        return torch.sigmoid(z @ self.weight + self.bias)

    def __call__(self, rows, prefixes, ended, remaining, hidden) -> list[float]:
        return self.predict(hidden).tolist()


def fit_probe(hidden: torch.Tensor, error: torch.Tensor, layer: int, l2: float = 1e-2) -> Probe:
    """Logistic regression by full-batch L-BFGS (deterministic: the same rows give the same probe),
    classes weighted to balance, features standardised."""
    x = hidden.float().cpu()
    y = error.float().cpu()
    mean, scale = x.mean(0), x.std(0).clamp(min=1e-6)
    x = (x - mean) / scale
    positive = y.mean().clamp(1e-3, 1 - 1e-3)
    weights = torch.where(y > 0.5, 0.5 / positive, 0.5 / (1 - positive))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (
            weights * torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")
        ).mean()
        loss = loss + l2 * w.pow(2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(w.detach(), float(b.detach()), mean, scale, layer)


@torch.no_grad()
def prefix_hidden_states(
    model, prompts: list[list[int]], completions: list[list[int]], pad: int, layer: int, batch_size: int = 32
) -> list[torch.Tensor]:
    """Per row, the hidden state [len(completion), d] at each completion token: the state the sampler
    holds after that token, i.e. the probe's input for the prefix ending there."""
    out: list[torch.Tensor] = []
    device = next(model.parameters()).device
    for s in range(0, len(prompts), batch_size):
        seqs = [p + c for p, c in zip(prompts[s : s + batch_size], completions[s : s + batch_size])]
        ids, mask = left_pad(seqs, pad)
        states = model(**forward_inputs(ids, mask, device), output_hidden_states=True).hidden_states[layer]
        for i, c in enumerate(completions[s : s + batch_size]):
            out.append(states[i, ids.shape[1] - len(c) :].float().cpu())
    return out


def fit_round_probe(
    engine, samples: Path, layer: int, label: str = "correct", weights: str = "policy"
) -> tuple[Probe | None, str]:
    """A probe fitted on a round's sampled rows (`samples`: its unit shards), every prefix of a row
    labelled by whether the row ended wrong (`label` false), read from the hidden states of `weights`
    (the engine's name: the weights that will sample with it, policy or ema, so the probe reads the
    states it was fitted on). Returns (probe, "") or (None, why not): no rows yet (the first round) or
    one class only."""
    from selfimprove.checkpoint import read_table

    rows = [row for shard in sorted(samples.glob("unit-*.parquet")) for row in read_table(shard)]
    rows = [r for r in rows if r["completion_ids"]]
    if not rows:
        return None, "no earlier round's samples to fit it on"
    classes = {bool(r[label]) for r in rows}
    if len(classes) < 2:
        return None, f"the last round's {len(rows)} samples all have {label}={classes.pop()}, one class only"
    with engine.model_with(weights) as model:
        states = prefix_hidden_states(
            model,
            [list(r["prompt_ids"]) for r in rows],
            [list(r["completion_ids"]) for r in rows],
            engine.pad,
            layer,
        )
    error = torch.cat([torch.full((len(s),), float(not r[label])) for s, r in zip(states, rows)])
    return fit_probe(torch.cat(states), error, layer), ""


class Backtracker:
    """The per-row state of one batch's backtracking, driven by `decode.sample`."""

    def __init__(self, settings: BacktrackConfig, verifier) -> None:
        self.settings, self.verifier = settings, verifier
        self.reads_hidden = verifier.reads_hidden
        self.layer = settings.layer

    def start(self, rows: int, prompt_last: torch.Tensor, prompt_column: int, pad: int) -> None:
        self.prompt_last, self.pad = prompt_last, pad
        self.prompt_column = torch.full((rows,), prompt_column, dtype=torch.long)
        self.columns: dict[tuple[int, int], int] = {}  # (row, token index) -> its cache column
        self.quota = [self.settings.quota] * rows
        self.backtracks = [0] * rows
        self.erased = [0] * rows
        self.seen: list[set[tuple[int, ...]]] = [set() for _ in range(rows)]

    def step(self, active, tokens, stats, length, attention, hidden, max_new_tokens: int, eos):
        """(feed, attention): feed is -1 for a row that samples next, else the token it feeds again
        after erasing; the erased columns are masked in the attention returned, the erased tokens and
        their statistics (`stats`) reset in place."""
        feed = torch.full((len(active),), -1, dtype=torch.long, device=tokens.device)
        ask = []  # positions in `active` whose prefix the verifier judges
        rows, lengths = active.tolist(), length[active].tolist()
        eligible = [i for i, row in enumerate(rows) if lengths[i] > 0 and self.quota[row] > 0]
        held = tokens[active[eligible]].tolist() if eligible else []  # one copy, not one per row
        for i, toks in zip(eligible, held):
            prefix = tuple(toks[: lengths[i]])
            if not (self.settings.same_prefix_once and prefix in self.seen[rows[i]]):
                ask.append((i, rows[i], prefix))
        if not ask:
            return feed, attention
        rows = [row for _, row, _ in ask]
        ended = [eos is not None and p[-1] == eos for _, _, p in ask]
        texts = [list(p[:-1]) if e else list(p) for (_, _, p), e in zip(ask, ended)]
        remaining = [max_new_tokens - len(p) for _, _, p in ask]
        states = hidden[[i for i, _, _ in ask]] if hidden is not None else None
        try:
            probs = [float(p) for p in self.verifier(rows, texts, ended, remaining, states)]
        except Exception as e:
            raise RuntimeError(f"sampler.backtrack.verifier={self.verifier.name} failed: {e!r}") from e
        if len(probs) != len(ask) or any(math.isnan(p) for p in probs):
            raise RuntimeError(
                f"sampler.backtrack.verifier={self.verifier.name} returned {probs[:8]} for {len(ask)} prefixes: "
                "one probability in [0, 1] per prefix, never NaN"
            )
        attention = attention.clone()
        for (i, row, prefix), p in zip(ask, probs):
            if p < self.settings.threshold:
                continue
            n = len(prefix)
            kept = n - min(self.settings.block, n)
            self.seen[row].add(prefix)
            # the erased tokens and the last kept one (fed again below) leave the attention
            for j in range(max(kept - 1, 0), n):
                attention[i, self.columns[row, j]] = 0
            if kept == 0:
                attention[i, self.prompt_column[row]] = 0
            tokens[row, kept:n] = self.pad
            for v in stats.values():  # an erased token's statistics go with it
                v[row, kept:n] = 0.0
            length[row] = kept
            feed[i] = tokens[row, kept - 1] if kept > 0 else self.prompt_last[row]
            self.quota[row] -= 1
            self.backtracks[row] += 1
            self.erased[row] += n - kept
        return feed, attention

    def finished(self, active, tokens, length, feed, max_new_tokens: int, eos) -> torch.Tensor:
        """Rows that keep their (accepted) last token and are complete: EOS or the length limit."""
        n = length[active]
        last = tokens[active, (n - 1).clamp(min=0)]
        complete = (n >= max_new_tokens) | ((n > 0) & (last == eos if eos is not None else False))
        return complete & (feed < 0)

    def fed(self, active, sampling, length, column: int) -> None:
        """Every active row feeds one token into cache column `column`: a new token, or the last kept
        one again (the prompt's last token when nothing is kept)."""
        for row, n in zip(active.tolist(), length[active].tolist()):
            if n > 0:
                self.columns[row, n - 1] = column
            else:
                self.prompt_column[row] = column

    def results(self) -> list[dict]:
        """Per row: backtracks, query cost (tokens generated + tokens erased), whether the quota ran out."""
        return [
            {
                "backtracks": self.backtracks[r],
                "query_cost": int(self.lengths[r]) + 2 * self.erased[r],
                "quota_spent": self.settings.quota > 0 and self.quota[r] == 0,
            }
            for r in range(len(self.quota))
        ]


class UniformBrackets(torch.nn.Module):
    """Botta et al.'s uniform-bracket check model: `model`'s forward (its KV cache, positions and masks) with the logits
    made uniform over the four space-led bracket tokens and EOS, so Q = 0 shows plain sampling's error
    rate on `task=dyck` and Q = ∞ with B = 1 must give only valid strings."""

    def __init__(self, model, tokenizer) -> None:
        super().__init__()
        ids = [tokenizer(b, add_special_tokens=False)["input_ids"] for b in (" (", " )", " [", " ]")]
        if any(len(i) != 1 for i in ids):
            raise ValueError("the tokenizer does not write each space-led bracket as one token")
        self.model, self.config = model, model.config
        self.allowed = [i[0] for i in ids] + [tokenizer.eos_token_id]

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        logits = torch.full_like(out.logits, -math.inf)
        logits[..., self.allowed] = 0.0
        out.logits = logits
        return out
