"""SAM / ASAM, fSGLD, EMA and SWA against closed forms and against torch's own optimisers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.optim.averages import EMA, SWA
from pipeline.optim.fsgld import FSGLD, coupled_sigma
from pipeline.optim.sam import SAM


def make_spd(n: int, generator: torch.Generator) -> torch.Tensor:
    """A symmetric positive definite [n, n] float64 matrix."""
    m = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def make_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# SAM

def test_sam_first_and_second_step_on_quadratic() -> None:
    g = torch.Generator().manual_seed(0)
    a = make_spd(5, g)
    theta0 = torch.randn(5, generator=g, dtype=torch.float64)
    theta = nn.Parameter(theta0.clone())
    rho, lr = 0.1, 0.05
    opt = SAM([theta], torch.optim.SGD, rho=rho, lr=lr)

    theta.grad = a @ theta.detach()
    opt.first_step()
    e = theta.detach() - theta0
    assert torch.linalg.vector_norm(e).item() == pytest.approx(rho, rel=1e-12)
    grad0 = a @ theta0
    torch.testing.assert_close(e / rho, grad0 / torch.linalg.vector_norm(grad0), rtol=1e-12, atol=1e-15)
    assert opt.perturbation_norm == pytest.approx(rho, rel=1e-12)

    # Pass 2: the gradient at theta0 + e; the base step must start from theta0 exactly.
    perturbed = theta.detach().clone()
    opt.zero_grad()
    theta.grad = a @ perturbed
    opt.second_step()
    expected = theta0.clone().add_(a @ perturbed, alpha=-lr)
    assert torch.equal(theta.detach(), expected)


def test_sam_restore_is_exact_and_idempotent() -> None:
    model = make_mlp(1)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=1e-3)
    mse(model, make_batches(1)[0]).backward()
    opt.first_step()
    assert opt.is_perturbed
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError):
        opt.first_step()
    opt.restore()
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError):
        opt.second_step()


def test_asam_direction() -> None:
    g = torch.Generator().manual_seed(2)
    w1 = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
    w2 = nn.Parameter(torch.randn(7, generator=g, dtype=torch.float64))
    grads = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)]
    rho, eta = 0.5, 0.01
    opt = SAM([w1, w2], torch.optim.SGD, rho=rho, adaptive=True, asam_eta=eta, lr=0.1)
    starts = [w1.detach().clone(), w2.detach().clone()]
    w1.grad, w2.grad = grads[0].clone(), grads[1].clone()
    opt.first_step()

    scales = [s.abs() + eta for s in starts]
    norm = torch.sqrt(sum(((t * gr) ** 2).sum() for t, gr in zip(scales, grads)))
    expected = [rho * t * t * gr / norm for t, gr in zip(scales, grads)]
    for p, s, e in zip((w1, w2), starts, expected):
        torch.testing.assert_close(p.detach() - s, e, rtol=1e-10, atol=1e-14)
    e_norm = torch.sqrt(sum((e ** 2).sum() for e in expected)).item()
    assert opt.perturbation_norm == pytest.approx(e_norm, rel=1e-10)


def run_sam(model: nn.Module, opt: SAM, batches: list) -> None:
    for batch in batches:
        opt.zero_grad()
        mse(model, batch).backward()
        opt.first_step()
        opt.zero_grad()
        mse(model, batch).backward()
        opt.second_step()


def test_sam_rho_zero_equals_adamw_bit_for_bit() -> None:
    batches = make_batches(5)
    model_ref, model_sam = make_mlp(3), make_mlp(3)
    ref = torch.optim.AdamW(model_ref.parameters(), lr=1e-2, weight_decay=0.0)
    for batch in batches:
        ref.zero_grad()
        mse(model_ref, batch).backward()
        ref.step()
    run_sam(model_sam, SAM(model_sam.parameters(), torch.optim.AdamW, rho=0.0, lr=1e-2, weight_decay=0.0), batches)
    for p, q in zip(model_ref.parameters(), model_sam.parameters()):
        assert torch.equal(p, q)


def test_sam_state_dict_round_trip() -> None:
    batches = make_batches(6)
    model = make_mlp(4)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    run_sam(model, opt, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run_sam(model, opt, batches[3:])

    resumed = make_mlp(99)
    resumed.load_state_dict(saved_model)
    opt2 = SAM(resumed.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-2)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == 0.05
    run_sam(resumed, opt2, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# fSGLD

def test_fsgld_coupled_sigma() -> None:
    p = nn.Parameter(torch.zeros(3))
    opt = FSGLD([p], lr=0.1, seed=0, beta_inv=1e-8, eta=0.01)
    assert opt.sigma == 1e-8 ** (1.01 / 4) == coupled_sigma(1e-8, 0.01)
    assert opt.sigma == pytest.approx(9.5e-3, abs=5e-5)
    assert opt.describe()["sigma_mode"] == "coupled"
    ablation = FSGLD([p], lr=0.1, seed=0, sigma=0.003)
    assert ablation.sigma == 0.003 and ablation.describe()["sigma_mode"] == "decoupled"


def test_fsgld_perturbation_statistics_and_exact_restore() -> None:
    n = 1_000_000
    p = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(5)))
    before = p.detach().clone()
    opt = FSGLD([p], lr=0.1, seed=7)
    opt.perturb()
    eps = (p.detach() - before).double()
    assert abs(eps.mean().item()) < 5 * opt.sigma / math.sqrt(n)
    assert eps.std().item() == pytest.approx(opt.sigma, rel=0.01)
    with pytest.raises(RuntimeError):
        opt.perturb()
    opt.restore()
    assert torch.equal(p.detach(), before)


def test_fsgld_antithetic_pair_and_gradient_mean() -> None:
    p = nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(6)))
    start = p.detach().clone()
    c = torch.linspace(-1, 1, 1000)
    opt = FSGLD([p], lr=0.5, seed=1, beta_inv=0.0, sigma=0.1, n_pert=2, antithetic=True, weight_decay=0.0)
    opt.zero_grad()
    shifts = []
    for _ in range(2):
        opt.perturb()
        shifts.append(p.detach() - start)
        (c * p).sum().backward()  # gradient c at every draw
        opt.restore()
    torch.testing.assert_close(shifts[1], -shifts[0])
    opt.step()
    # The accumulated 2c is averaged back to c before the SGD step.
    assert torch.equal(p.detach(), start.clone().add_(c, alpha=-0.5))


def test_fsgld_langevin_noise_std() -> None:
    n = 1_000_000
    lr, beta_inv = 0.1, 1e-2
    p = nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(8)))
    opt = FSGLD([p], lr=lr, seed=3, beta_inv=beta_inv, sigma=0.0, weight_decay=0.0)
    before = p.detach().clone()
    opt.perturb()
    p.grad = torch.zeros(n)
    opt.restore()
    opt.step()
    noise = (p.detach() - before).double()
    std = math.sqrt(2 * lr * beta_inv)
    assert abs(noise.mean().item()) < 5 * std / math.sqrt(n)
    assert noise.std().item() == pytest.approx(std, rel=0.01)


def run_fsgld(model: nn.Module, opt: FSGLD, batches: list) -> None:
    for batch in batches:
        opt.zero_grad()
        for _ in range(opt.n_pert):
            opt.perturb()
            mse(model, batch).backward()
            opt.restore()
        opt.step()


def test_fsgld_without_noise_equals_sgd() -> None:
    batches = make_batches(5)
    model_ref, model_f = make_mlp(10), make_mlp(10)
    ref = torch.optim.SGD(model_ref.parameters(), lr=0.05, momentum=0.0, weight_decay=5e-4)
    for batch in batches:
        ref.zero_grad()
        mse(model_ref, batch).backward()
        ref.step()
    opt = FSGLD(model_f.parameters(), lr=0.05, seed=0, beta_inv=0.0)  # coupled sigma = 0
    assert opt.sigma == 0.0 and opt.weight_decay == 5e-4
    run_fsgld(model_f, opt, batches)
    for p, q in zip(model_ref.parameters(), model_f.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("base, n_pert, antithetic", [("sgd", 1, False), ("adam", 2, True)])
def test_fsgld_state_dict_round_trip(base: str, n_pert: int, antithetic: bool) -> None:
    batches = make_batches(4)
    kwargs = dict(lr=1e-2, beta_inv=1e-6, n_pert=n_pert, antithetic=antithetic, base=base)
    model = make_mlp(11)
    opt = FSGLD(model.parameters(), seed=21, **kwargs)
    run_fsgld(model, opt, batches[:2])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    run_fsgld(model, opt, batches[2:])

    resumed = make_mlp(12)
    resumed.load_state_dict(saved_model)
    opt2 = FSGLD(resumed.parameters(), seed=999, **kwargs)  # the checkpoint's generator state wins
    opt2.load_state_dict(saved_opt)
    run_fsgld(resumed, opt2, batches[2:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)

    other = FSGLD(make_mlp(12).parameters(), seed=0, **{**kwargs, "beta_inv": 1e-7})
    with pytest.raises(PipelineError, match="beta_inv"):
        other.load_state_dict(saved_opt)


def test_fsgld_protocol_errors_and_description() -> None:
    model = make_mlp(13)
    opt = FSGLD(model.parameters(), lr=1e-4, seed=0, base="adam")
    info = opt.describe()
    assert info["base_optimizer"] == "torch.optim.AdamW" and not info["faithful"]
    assert "OUR EXTENSION" in info["note"] and info["weight_decay"] == 0.0
    with pytest.raises(RuntimeError):
        opt.step()  # no perturb() round yet
    opt.perturb()
    with pytest.raises(RuntimeError):
        opt.state_dict()
    with pytest.raises(ValueError):
        FSGLD(model.parameters(), lr=0.1, seed=0, n_pert=1, antithetic=True)


# ---------------------------------------------------------------------------------------------
# EMA and SWA

def set_weights(model: nn.Module, value: torch.Tensor) -> None:
    with torch.no_grad():
        model.weight.copy_(value)


def weight_sequence(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(30)
    return [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(n)]


def test_ema_matches_hand_computed_average() -> None:
    model = nn.Linear(3, 2, bias=False).double()
    values = weight_sequence(5)
    set_weights(model, values[0])
    decay = 0.9
    ema = EMA(model, decay=decay)
    expected = values[0].clone()
    for v in values[1:]:
        set_weights(model, v)
        ema.update(model)
        expected = decay * expected + (1 - decay) * v
    averaged = ema.averaged_state_dict()
    assert list(averaged) == list(model.state_dict())
    torch.testing.assert_close(averaged["weight"], expected, rtol=0, atol=1e-14)
    assert ema.num_updates == 4
    # Closed form: decay^k * init + (1 - decay) * sum_i decay^(k - i) * theta_i.
    closed = decay ** 4 * values[0] + sum((1 - decay) * decay ** (4 - i) * values[i] for i in range(1, 5))
    torch.testing.assert_close(averaged["weight"], closed, rtol=0, atol=1e-14)


def test_ema_state_dict_round_trip() -> None:
    model = nn.Linear(3, 2, bias=False).double()
    values = weight_sequence(6)
    ema = EMA(model, decay=0.5)
    for v in values[:3]:
        set_weights(model, v)
        ema.update(model)
    state = copy.deepcopy(ema.state_dict())
    other = EMA(nn.Linear(3, 2, bias=False).double(), decay=0.5)
    other.load_state_dict(state)
    for v in values[3:]:
        set_weights(model, v)
        ema.update(model)
        other.update(model)
    assert other.num_updates == ema.num_updates == 6
    assert torch.equal(other.averaged_state_dict()["weight"], ema.averaged_state_dict()["weight"])
    with pytest.raises(PipelineError, match="decay"):
        EMA(model, decay=0.9).load_state_dict(state)


def test_swa_matches_hand_computed_average() -> None:
    model = nn.Linear(3, 2, bias=False).double()
    values = weight_sequence(11)
    set_weights(model, values[0])
    swa = SWA(model, start_fraction=0.5, every=2, total_steps=10)
    assert list(swa.collection_steps()) == [5, 7, 9]
    taken = [step for step in range(1, 11) if (set_weights(model, values[step]), swa.update(model, step))[1]]
    assert taken == [5, 7, 9]
    expected = (values[5] + values[7] + values[9]) / 3
    torch.testing.assert_close(swa.averaged_state_dict()["weight"], expected, rtol=0, atol=1e-14)
    assert list(swa.averaged_state_dict()) == ["weight"]
    with pytest.raises(RuntimeError):
        swa.update(model, 9)  # the same snapshot twice


def test_swa_paper_schedule() -> None:
    swa = SWA(nn.Linear(2, 2), start_fraction=0.9, every=100, total_steps=200_000)
    steps = swa.collection_steps()
    assert swa.start_step == 180_000 and steps[0] == 180_000 and steps[-1] == 200_000
    assert len(steps) == 201
    assert swa.is_collection_step(180_000) and swa.is_collection_step(200_000)
    assert not swa.is_collection_step(179_900)
    assert not swa.is_collection_step(180_050)
    assert not swa.is_collection_step(200_100)


def test_swa_without_snapshot_raises() -> None:
    model = nn.Linear(2, 2)
    swa = SWA(model, start_fraction=0.9, every=100, total_steps=1000)
    for step in range(1, 900):
        swa.update(model, step)
    with pytest.raises(PipelineError, match="no snapshot"):
        swa.averaged_state_dict()


def test_swa_state_dict_round_trip() -> None:
    model = nn.Linear(3, 2, bias=False).double()
    values = weight_sequence(11)
    swa = SWA(model, start_fraction=0.5, every=2, total_steps=10)
    other = SWA(nn.Linear(3, 2, bias=False).double(), start_fraction=0.5, every=2, total_steps=10)
    for step in range(1, 11):
        set_weights(model, values[step])
        swa.update(model, step)
        if step == 6:
            other.load_state_dict(copy.deepcopy(swa.state_dict()))
        elif step > 6:
            other.update(model, step)
    assert other.n_averaged == swa.n_averaged == 3
    assert torch.equal(other.averaged_state_dict()["weight"], swa.averaged_state_dict()["weight"])
