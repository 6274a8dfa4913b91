"""Training objectives: map (logits, batch) to (loss_sum, n_tokens, metrics)."""

from selfimprove.objectives.sft import SFT, masked_nll

__all__ = ["SFT", "masked_nll"]
