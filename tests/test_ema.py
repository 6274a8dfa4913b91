from types import SimpleNamespace

import pytest
import torch
from torch import nn

from selfimprove.ema import EMA, ema_beta
from selfimprove.models import add_lora, load_model


def test_beta_schedule_hand_values():
    # β_t = max((1 + max(0, t − 10))^−0.5, 1e-4), the schedule of Block et al.'s code (abblock/bema):
    # t counts optimizer steps from 1; e.g. t = 14 gives 5^−0.5 = 0.4472.
    assert [ema_beta(t) for t in (11, 14, 110, 10010)] == pytest.approx(
        [0.7071, 0.4472, 0.0995, 0.01], abs=1e-4
    )
    assert all(ema_beta(t) == 1.0 for t in range(1, 11))  # implicit warm-up: the first ten steps copy
    assert ema_beta(10**12) == 1e-4  # floor


@pytest.mark.parametrize("t", [0, -1])
def test_steps_count_from_one(t):
    with pytest.raises(ValueError, match="from 1"):
        ema_beta(t)
    with pytest.raises(ValueError, match="from 1"):
        EMA(_model()).update(_model(), t)


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen: like a base weight under LoRA
    return model


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))


def test_running_mean_needs_warmup_one():
    # beta_t = (1 + max(0, t - warmup))^-power is 1/t with power 1 only when warmup = 1.
    model = _model()
    start = model[1].weight.detach().clone()
    ema, ema0 = EMA(model, warmup=1, power=1.0), EMA(model, warmup=0, power=1.0)
    iterates = []
    for t in range(1, 6):
        _perturb(model)
        iterates.append(model[1].weight.detach().clone())
        assert ema.update(model, t) == pytest.approx(1 / t)
        assert torch.allclose(ema.shadow["1.weight"], torch.stack(iterates).mean(0), atol=1e-6)
        # warmup=0 gives 1/(1+t): the mean that also counts the weights the EMA started from.
        assert ema0.update(model, t) == pytest.approx(1 / (1 + t))
        assert torch.allclose(ema0.shadow["1.weight"], torch.stack([start, *iterates]).mean(0), atol=1e-6)


def test_eleven_updates_match_hand_average():
    model = _model()
    ema = EMA(model)  # warmup 10, power 0.5
    iterates = []
    for t in range(1, 12):
        _perturb(model)
        iterates.append(model[1].weight.detach().clone())
        beta = ema.update(model, t)
        if t <= 10:
            assert beta == 1.0 and torch.equal(ema.shadow["1.weight"], iterates[-1])  # copies
    b = 2**-0.5
    assert beta == pytest.approx(b)
    assert torch.allclose(ema.shadow["1.weight"], (1 - b) * iterates[9] + b * iterates[10], atol=1e-6)


def test_first_update_copies_and_only_trainable_tracked():
    model = _model()
    ema = EMA(model)
    assert set(ema.state_dict()) == {"0.bias", "1.weight", "1.bias"}
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ema.shadow.values())
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    ema.update(model, 1)
    assert torch.equal(ema.shadow["1.weight"], torch.full((2, 4), 3.0))
    with torch.no_grad():
        model[1].weight.fill_(5.0)
    ema.update(model, 14)  # beta = 1/sqrt(5)
    b = 5**-0.5
    assert ema.shadow["1.weight"][0, 0].item() == pytest.approx((1 - b) * 3 + b * 5, abs=1e-6)


def test_lora_factors_are_averaged_separately():
    """The EMA averages A and B, so the averaged adapter applies avg(B) @ avg(A), not avg(B @ A)."""
    cfg = SimpleNamespace(
        kind="tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        init_seed=0,
        dtype="float32",
        attn_implementation="eager",
    )
    lora_cfg = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"])
    model = add_lora(load_model(cfg), lora_cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    params = dict(model.named_parameters())
    a_name = next(n for n in params if "layers.0.self_attn.q_proj.lora_A" in n)
    b_name = a_name.replace("lora_A", "lora_B")
    ema = EMA(model, warmup=1, power=1.0)  # beta_t = 1/t: the plain mean of the states it is given
    gen = torch.Generator().manual_seed(0)
    states = []
    for t in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=gen))
        states.append((params[a_name].detach().clone(), params[b_name].detach().clone()))
        ema.update(model, t)
    (a1, b1), (a2, b2) = states
    avg_a, avg_b = (a1 + a2) / 2, (b1 + b2) / 2
    assert torch.allclose(ema.shadow[a_name], avg_a, atol=1e-6)
    assert torch.allclose(ema.shadow[b_name], avg_b, atol=1e-6)
    scaling = layer.scaling["default"]
    with ema.swapped_in(model):
        delta = layer.get_delta_weight("default")
    assert torch.allclose(delta, scaling * avg_b @ avg_a, atol=1e-5)  # what the code does
    avg_update = scaling * (b1 @ a1 + b2 @ a2) / 2
    assert not torch.allclose(delta, avg_update, atol=1e-3)  # ... which is not the mean update


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
