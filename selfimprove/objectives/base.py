"""Contract 3, the objective's half: a loss on the log-probs of the scored tokens.

An objective is `objective(logps, batch, normalizer) -> (loss, metrics)`.

- `logps` [B, W]: log π(token) at the objective's `temperature` of each row's scored tokens,
  left-aligned (column t is the row's scored token t), 0 elsewhere. The update computes them however
  it likes (per row, or on a shared prefix tree: `selfimprove.logprobs`). The scored tokens are the
  completion's; an objective with `scope = "sequence"` (DITTO reads the previous copy inside the
  prompt) gets every token of prompt + completion but the first.
- `batch`: `scored` and `completion` ([B, W] bool masks), `tokens` [B, W], and the row columns the
  objective `reads` (required, checked at config time) or `optional`, under the row's own name: a
  per-token list column padded to [B, W] at its completion tokens, a per-row number stacked to [B]
  (`train.collate`). A sampled row's `logprobs` are the sampling policy's per-token log-probs at the
  temperature it sampled with, before truncation (top_p / typical_p choose only which tokens can be
  drawn): at the same `temperature` they are `logps` of the weights that sampled.
- `normalizer`: what `normalizer(rows)` returned for the whole optimizer step's rows, computed once
  by the update, the same on every rank; the returned loss is this micro-batch's share of the step's
  mean, so micro-batching and the number of ranks never change the gradient.
- `metrics` maps a name to (sum, count), summed over micro-batches and ranks and logged as sum / count.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALIZE = ("token", "sequence", "constant")


class Objective:
    """Shared by the objectives: the training softmax temperature and the normalisation.

    `normalize`: "token" — the mean over every completion token of the step (DAPO; SFT's default);
    "sequence" — the mean over sequences of each sequence's token-mean (GRPO); "constant" — the token
    sum divided by sequences × `constant_length` (Dr. GRPO: no bias towards short or long answers).
    `temperature` divides the logits before the softmax (GRPO trains at the sampling temperature; OSFT
    samples below the training temperature).
    """

    name = "objective"
    reads: tuple[str, ...] = ()  # row columns every training row must carry
    optional: tuple[str, ...] = ()  # row columns used when every row of a micro-batch carries them
    scope = "completion"  # or "sequence": the prompt's tokens are scored too (masked by `completion`)

    def __init__(
        self, normalize: str = "token", constant_length: int | None = None, temperature: float = 1.0
    ):
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize: {normalize!r} is not one of {'|'.join(NORMALIZE)}")
        if normalize == "constant" and not constant_length:
            raise ValueError("normalize=constant needs constant_length (e.g. the sampler's max_new_tokens)")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.normalize, self.constant_length, self.temperature = normalize, constant_length, temperature

    def step_examples(self, examples: list[dict], seed: int) -> list[dict]:
        """The rows one optimizer step draws its batch from (all of them; DITTO picks a view by a coin
        seeded per step, so a resumed run draws the same)."""
        return examples

    def normalizer(self, rows: list[dict]) -> float:
        """The step's divisor, from all the rows of the step (every rank computes the same)."""
        lengths = [len(r["completion_ids"]) for r in rows]
        sequences = sum(1 for n in lengths if n > 0)
        if self.normalize == "token":
            return float(max(sum(lengths), 1))
        if self.normalize == "sequence":
            return float(max(sequences, 1))
        return float(max(sequences, 1) * self.constant_length)

    def reduce(self, per_token: Tensor, batch: dict, normalizer: float) -> Tensor:
        """The completion tokens' losses summed, each scaled so that the step's sum is the named mean;
        a row's `weight` multiplies its tokens."""
        mask = batch["completion"]
        scale = torch.ones(mask.shape[0], device=mask.device)
        if "weight" in batch:
            scale = scale * batch["weight"].to(mask.device)
        if self.normalize == "sequence":
            scale = scale / mask.sum(1).clamp(min=1)
        return (torch.where(mask, per_token, 0.0) * scale[:, None]).sum() / normalizer

    def __call__(self, logps: Tensor, batch: dict, normalizer: float) -> tuple[Tensor, dict]:
        raise NotImplementedError


def mean_metric(values: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, count) of a detached tensor, for the update to average over micro-batches and ranks."""
    values = values.detach().float()
    return values.sum(), torch.tensor(float(values.numel()))


class Mix(Objective):
    """Several objectives with weights: Σ w_i · loss_i, each normalised its own way.

    `parts` maps a name to an objective (built by Hydra), `weights` a name to its weight. The parts
    share one forward pass, so they must agree on the training temperature and the scope."""

    name = "mix"

    def __init__(self, parts: dict[str, Objective], weights: dict[str, float]):
        if set(parts) != set(weights):
            raise ValueError(f"objective weights name {sorted(weights)}, the parts are {sorted(parts)}")
        temperatures = {p.temperature for p in parts.values()}
        scopes = {p.scope for p in parts.values()}
        if len(temperatures) > 1 or len(scopes) > 1:
            raise ValueError(
                f"objective parts must share temperature and scope, got {temperatures}, {scopes}"
            )
        super().__init__(temperature=temperatures.pop() if temperatures else 1.0)
        self.parts, self.weights = dict(parts), dict(weights)
        self.scope = scopes.pop() if scopes else "completion"
        self.reads = tuple(dict.fromkeys(c for p in self.parts.values() for c in p.reads))
        self.optional = tuple(dict.fromkeys(c for p in self.parts.values() for c in p.optional))

    def normalizer(self, rows: list[dict]) -> dict[str, float]:
        return {k: part.normalizer(rows) for k, part in self.parts.items()}

    def __call__(self, logps: Tensor, batch: dict, normalizer: dict[str, float]):
        loss, metrics = 0.0, {}
        for k, part in self.parts.items():
            part_loss, part_metrics = part(logps, batch, normalizer[k])
            loss = loss + self.weights[k] * part_loss
            metrics.update(part_metrics)
        return loss, metrics
