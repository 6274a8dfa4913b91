"""Contract 3, the objective's half: token log-probs of the labels, and the normalisation.

An objective is `objective(logits, batch) -> (loss_sum, normalizer, metrics)`. `batch` is what
`train.collate` built: `input_ids`, `attention_mask`, `labels` (-100 off the completions) and every
token-aligned column the rows carried (`old_logprobs`, `ref_logprobs`, `advantages`), each shaped like
`labels` with values at the completion positions, plus per-sequence `weights`. The update divides the
summed loss of a whole optimizer step by `normalizer(step's micro-batches)` once, so micro-batching and
the number of ranks never change the gradient. `metrics` maps a name to (sum, count), summed over
micro-batches and ranks and logged as sum / count.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100
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

    def token_logprobs(self, logits: Tensor, batch: dict) -> tuple[Tensor, Tensor]:
        """(log π(y_t) at the training temperature for every completion token [N], mask [B, T-1]).

        `logits[:, t]` predicts `labels[:, t+1]`; only the N scored positions are upcast (half precision to fp32)."""
        labels = batch["labels"][:, 1:]
        mask = labels != IGNORE_INDEX
        return self.label_logprobs(logits[:, :-1][mask], labels[mask]), mask

    def label_logprobs(self, picked: Tensor, tokens: Tensor) -> Tensor:
        """log π(token) at the training temperature from the logits `picked` [N, V] that predict
        `tokens` [N] (half precision upcast to fp32 here, only for these N positions)."""
        picked = (picked.float() if picked.element_size() < 4 else picked) / self.temperature
        return torch.log_softmax(picked, dim=-1).gather(1, tokens[:, None])[:, 0]

    def reduce(self, per_token: Tensor, mask: Tensor, batch: dict) -> Tensor:
        """Sum of the per-token losses, each scaled so that dividing by `normalizer` gives the named
        mean; per-sequence `weights` multiply a sequence's tokens."""
        lengths = mask.sum(1)
        scale = batch["weights"][:, None].expand_as(mask)[mask] if "weights" in batch else 1.0
        if self.normalize == "sequence":
            scale = scale / lengths[:, None].expand_as(mask)[mask].clamp(min=1)
        return (per_token * scale).sum()

    def normalizer(self, batches: list[dict]) -> float:
        """The step's divisor, from every micro-batch of the step (all ranks compute the same)."""
        tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        sequences = sum(int(((b["labels"][:, 1:] != IGNORE_INDEX).sum(1) > 0).sum()) for b in batches)
        if self.normalize == "token":
            return float(max(tokens, 1))
        if self.normalize == "sequence":
            return float(max(sequences, 1))
        return float(max(sequences, 1) * self.constant_length)

    def __call__(self, logits: Tensor, batch: dict) -> tuple[Tensor, float, dict[str, tuple[Tensor, Tensor]]]:
        raise NotImplementedError


def mean_metric(values: Tensor) -> tuple[Tensor, Tensor]:
    """(sum, count) of a detached tensor, for the update to average over micro-batches and ranks."""
    values = values.detach().float()
    return values.sum(), torch.tensor(float(values.numel()))


class Mix(Objective):
    """Several objectives with weights: Σ w_i · loss_i / normalizer_i, each normalised its own way.

    `parts` maps a name to an objective (built by Hydra), `weights` a name to its weight."""

    name = "mix"

    def __init__(self, parts: dict[str, Objective], weights: dict[str, float]):
        super().__init__()
        if set(parts) != set(weights):
            raise ValueError(f"objective weights name {sorted(weights)}, the parts are {sorted(parts)}")
        self.parts, self.weights = dict(parts), dict(weights)
        self.reads = tuple(c for part in self.parts.values() for c in getattr(part, "reads", ()))
        self._totals: dict[str, float] = {}

    def normalizer(self, batches: list[dict]) -> float:
        self._totals = {k: part.normalizer(batches) for k, part in self.parts.items()}
        return 1.0

    def __call__(self, logits: Tensor, batch: dict):
        if not self._totals:
            self.normalizer([batch])
        loss, metrics = 0.0, {}
        for k, part in self.parts.items():
            part_sum, _, part_metrics = part(logits, batch)
            loss = loss + self.weights[k] * part_sum / self._totals[k]
            metrics.update(part_metrics)
        return loss, 1.0, metrics
