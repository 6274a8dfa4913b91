import pytest
import torch
from torch import nn

from selfimprove.ema import EMA, ema_beta


def test_beta_schedule_hand_values():
    assert [ema_beta(t) for t in (11, 14, 110, 10010)] == pytest.approx(
        [0.7071, 0.4472, 0.0995, 0.01], abs=1e-4
    )
    assert all(ema_beta(t) == 1.0 for t in range(11))  # implicit warm-up: copy
    assert ema_beta(10**12) == 1e-4  # floor


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen: like a base weight under LoRA
    return model


def test_running_mean_with_power_one():
    model = _model()
    ema = EMA(model, warmup=0, power=1.0)
    iterates = []
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        iterates.append(model[1].weight.detach().clone())
        beta = ema.update(model, step)
        assert beta == pytest.approx(1 / (1 + step))
        assert torch.allclose(ema.shadow["1.weight"], torch.stack(iterates).mean(0), atol=1e-6)


def test_first_update_copies_and_only_trainable_tracked():
    model = _model()
    ema = EMA(model)
    assert set(ema.state_dict()) == {"0.bias", "1.weight", "1.bias"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ema.shadow.values())
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    ema.update(model, 0)
    assert torch.equal(ema.shadow["1.weight"], torch.full((2, 4), 3.0))
    with torch.no_grad():
        model[1].weight.fill_(5.0)
    ema.update(model, 14)  # beta = 1/sqrt(5)
    b = 5**-0.5
    assert ema.shadow["1.weight"][0, 0].item() == pytest.approx((1 - b) * 3 + b * 5, abs=1e-6)


def test_swap_restores_raw_weights_exactly():
    model = _model().to(torch.bfloat16)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(1.37).add_(0.11)
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model) as m:
        assert m is model
        assert torch.equal(model[1].weight, raw["1.weight"])  # EMA (= initial copy) in
        assert torch.equal(model[0].weight, raw["0.weight"])  # frozen untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, moved[k]), k
    with pytest.raises(RuntimeError), ema.swapped_in(model):
        raise RuntimeError("eval crashed")
    assert torch.equal(model[1].weight, moved["1.weight"])


def test_update_leaves_model_and_optimizer_alone():
    model = _model()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = repr(opt.state_dict())
    ema = EMA(model)
    ema.update(model, 3)
    with ema.swapped_in(model):
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert repr(opt.state_dict()) == opt_before


def test_state_dict_round_trip():
    model = _model()
    ema = EMA(model)
    sd = ema.state_dict()
    sd["1.bias"] += 1.0  # a copy: mutating it must not leak into the EMA
    assert not torch.equal(ema.shadow["1.bias"], sd["1.bias"])
    other = EMA(model)
    other.load_state_dict(sd)
    assert torch.equal(other.shadow["1.bias"], sd["1.bias"])
    with pytest.raises(KeyError):
        other.load_state_dict({"1.bias": sd["1.bias"]})
