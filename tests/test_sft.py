"""SFT through the update's forward: the token-mean NLL of the completions, equal to cross-entropy on
the model's full logits; an all-empty micro-batch and a bf16 model."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from selfimprove import models
from selfimprove.config import ModelConfig
from selfimprove.objectives import SFT
from selfimprove.train import micro_batch_loss

ROWS = [
    {"prompt_ids": [3, 4, 5], "completion_ids": [6, 7, 8]},
    {"prompt_ids": [9, 10], "completion_ids": [11, 12]},
    {"prompt_ids": [9], "completion_ids": [13]},
]


def _model(dtype="float32"):
    return models.load_model(OmegaConf.structured(ModelConfig(kind="tiny", dtype=dtype)))


def test_sft_equals_cross_entropy_of_each_completion_token():
    model = _model()
    loss, metrics = micro_batch_loss(model, ROWS, SFT(), 6.0, pad=0, share="false")
    want = []
    for r in ROWS:  # each row alone, unpadded: logits[t − 1] predicts token t
        ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
        logits = model(input_ids=ids).logits[0]
        n = len(r["completion_ids"])
        want.append(F.cross_entropy(logits[-n - 1 : -1], ids[0, -n:], reduction="sum"))
    assert loss.item() == pytest.approx(torch.stack(want).sum().item() / 6, rel=1e-5)
    assert metrics["sft/nll"][1] == 6  # (sum, count): 6 completion tokens


def test_an_empty_micro_batch_backpropagates_zero():
    model = _model()
    empty = [{"prompt_ids": [3, 4], "completion_ids": []}]
    for share in ("false", "true"):
        loss, _ = micro_batch_loss(model, empty, SFT(), 1.0, pad=0, share=share)
        loss.backward()  # must not fail
        assert loss.item() == 0.0


def test_bf16_logits_are_upcast_for_the_loss():
    model = _model("bfloat16")
    loss, _ = micro_batch_loss(model, ROWS, SFT(), 6.0, pad=0, share="false")
    assert loss.dtype == torch.float32
    full = _model()  # the same init, in fp32: within bf16's rounding
    want, _ = micro_batch_loss(full, ROWS, SFT(), 6.0, pad=0, share="false")
    assert loss.item() == pytest.approx(want.item(), rel=2e-2)
