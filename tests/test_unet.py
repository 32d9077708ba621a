"""The ADM UNet against guided-diffusion's key lists and test vectors (shared/reference/)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.presets import PRESETS, build_unet, unet_kwargs
from pipeline.nn.unet import Dropout, UNetModel, timestep_embedding

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
BACKENDS = ("sdpa", "math")
TOL = dict(rtol=1e-5, atol=1e-5)


def reference_file(name: str) -> Path:
    """A file of shared/reference/; a missing one fails the test rather than skipping it."""
    path = REFERENCE / name
    if not path.is_file():
        pytest.fail(f"reference file {path} is missing: check out shared/ beside the repository")
    return path


@pytest.fixture(scope="module")
def unet_vectors() -> dict:
    return torch.load(reference_file("unet_vectors.pt"), weights_only=True)


def reference_model(case: dict, backend: str) -> UNetModel:
    """The UNet of a stored case with its decoded weights, in eval mode."""
    kwargs = dict(case["unet_kwargs"])
    # guided-diffusion options we do not offer must be at the values we implement.
    assert kwargs.pop("dims") == 2
    assert kwargs.pop("use_checkpoint") is False
    assert kwargs.pop("use_fp16") is False
    model = UNetModel(**kwargs, attention_backend=backend)
    state_dict = {
        key: case["weights_offset"][key] + case["weights_scale"] * q.to(torch.float32)
        for key, q in case["weights_int8"].items()
    }
    assert list(model.state_dict()) == case["state_dict_keys"]
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Redraw every parameter (zero-initialised ones included) so all paths carry signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = 0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype)
                centre = 1.0 if isinstance(module, nn.GroupNorm) and name == "weight" else 0.0
                p.copy_(centre + noise)
    return model


# ----------------------------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize(
    "preset, key_file, n_params",
    [("cifar10", "adm_cifar10_keys.txt", 57_094_662), ("adm64", "adm_64px_keys.txt", 295_136_454)],
)
def test_state_dict_matches_guided_diffusion(preset: str, key_file: str, n_params: int) -> None:
    want = reference_file(key_file).read_text().splitlines()
    with torch.device("meta"):
        model = build_unet(preset)
    got = [f"{key}\t{'x'.join(map(str, t.shape))}" for key, t in model.state_dict().items()]
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_presets_convert_attention_pixels_to_factors() -> None:
    assert set(PRESETS) >= {"cifar10", "adm64", "demo", "tiny"}
    assert unet_kwargs("cifar10")["attention_resolutions"] == (2, 4)
    assert unet_kwargs("adm64")["attention_resolutions"] == (2, 4, 8)
    demo = unet_kwargs("demo", in_channels=1)
    assert (demo["in_channels"], demo["out_channels"]) == (1, 2)
    assert unet_kwargs("demo", in_channels=1, learn_sigma=False)["out_channels"] == 1
    assert unet_kwargs("tiny", image_size=32)["attention_resolutions"] == (4,)
    with torch.device("meta"):
        # The counts documented in presets.py.
        assert sum(p.numel() for p in build_unet("demo", in_channels=1).parameters()) == 983_746
        assert sum(p.numel() for p in build_unet("tiny").parameters()) == 828_358
        assert sum(p.numel() for p in build_unet("fmnist16", in_channels=1).parameters()) == 345_154
    with pytest.raises(KeyError):
        unet_kwargs("no-such-preset")
    with pytest.raises(TypeError):
        unet_kwargs("tiny", use_checkpoint=True)


def test_norm_groups_reach_every_group_norm() -> None:
    """fmnist16 runs 16-channel levels, which ADM's 32 groups cannot divide: every norm takes 8."""
    model = build_unet("fmnist16", in_channels=1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and {m.num_groups for m in norms} == {8}
    assert {m.num_groups for m in build_unet("tiny").modules() if isinstance(m, torch.nn.GroupNorm)} == {32}
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 900]))
    assert out.shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="divisible"):
        build_unet("fmnist16", in_channels=1, norm_groups=32)


def test_pixel_resolutions_given_as_factors_are_rejected() -> None:
    # "16,8" at image 32 must be converted to factors (2, 4); 16 is no level of a 4-level UNet.
    with pytest.raises(ValueError, match="downsample factors"):
        UNetModel(32, 3, 32, 6, 1, attention_resolutions=(16, 8), channel_mult=(1, 2, 2, 2))


def test_untrained_model_outputs_zero() -> None:
    model = build_unet("tiny")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    out = model(x, torch.tensor([3, 700]))
    assert out.shape == (2, 6, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))


# ----------------------------------------------------------------------------------------------
# Numbers from guided-diffusion.


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding(unet_vectors: dict, dim: int) -> None:
    ref = unet_vectors["timestep_embedding"]
    got = timestep_embedding(ref["t"], dim, max_period=ref["max_period"])
    # Tighter than TOL: float64 frequencies would move t = 999 by 9e-6.
    torch.testing.assert_close(got, ref["out"][f"dim_{dim}"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", ["a", "b", "c"])
def test_outputs_match_reference(unet_vectors: dict, case_name: str, backend: str) -> None:
    case = unet_vectors["cases"][case_name]
    model = reference_model(case, backend)
    with torch.no_grad():
        out = model(case["x"], case["t"])
    torch.testing.assert_close(out, case["out"], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", ["a", "b"])
def test_block_activations_match_reference(unet_vectors: dict, case_name: str, backend: str) -> None:
    case = unet_vectors["cases"][case_name]
    model = reference_model(case, backend)
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str):
        return lambda module, args, output: captured.__setitem__(name, output)

    model.time_embed.register_forward_hook(keep("time_embed"))
    model.middle_block.register_forward_hook(keep("middle_block"))
    for group in ("input_blocks", "output_blocks"):
        for i, block in enumerate(getattr(model, group)):
            block.register_forward_hook(keep(f"{group}.{i}"))
    with torch.no_grad():
        model(case["x"], case["t"])

    expected = {k: v for k, v in case["debug"].items() if isinstance(v, torch.Tensor)}
    assert set(expected) == set(captured)
    # In block order, so a failure names the first block that diverges.
    for name in ["time_embed", *[k for k in captured if k != "time_embed"]]:
        got = captured[name] if name == "time_embed" else captured[name][:1]
        torch.testing.assert_close(got, expected[name], **TOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------------
# Behaviour.


def test_math_attention_supports_hessian_vector_products() -> None:
    # Float64 so that a central finite difference of gradients is an accurate check.
    model = randomize_(build_unet("tiny"), seed=1).double().eval().set_attention_backend("math")
    params = [p for p in model.parameters()]
    generator = torch.Generator().manual_seed(2)
    # 8x8 input keeps it quick; attention then runs at 4x4 and in the middle block.
    x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    t = torch.tensor([5, 900])
    target = torch.randn(2, 6, 8, 8, generator=generator, dtype=torch.float64)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum(v.square().sum() for v in direction))
    direction = [v / norm for v in direction]  # unit length keeps the finite difference local

    def loss() -> torch.Tensor:
        return ((model(x, t) - target) ** 2).mean()

    grads = torch.autograd.grad(loss(), params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, direction))
    hvp = torch.cat([h.flatten() for h in torch.autograd.grad(dot, params)])
    assert torch.isfinite(hvp).all() and hvp.abs().max() > 0

    step = 1e-3
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(step * v)
    grad_plus = torch.cat([g.flatten() for g in torch.autograd.grad(loss(), params)])
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.sub_(2 * step * v)
    grad_minus = torch.cat([g.flatten() for g in torch.autograd.grad(loss(), params)])
    finite_difference = (grad_plus - grad_minus) / (2 * step)
    torch.testing.assert_close(hvp, finite_difference, rtol=1e-4, atol=1e-6 * hvp.abs().max().item())


def test_attention_backends_agree_with_gradients(torch_device) -> None:
    model = randomize_(build_unet("tiny"), seed=3).to(torch_device)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=generator).to(torch_device)
    t = torch.tensor([10, 400], device=torch_device)
    results = {}
    for backend in BACKENDS:
        model.set_attention_backend(backend)
        assert model.attention_backend == backend
        out = model(x, t)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        results[backend] = (out.detach(), torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(results["sdpa"][0], results["math"][0], **TOL)
    torch.testing.assert_close(results["sdpa"][1], results["math"][1], **TOL)
    with pytest.raises(ValueError):
        model.set_attention_backend("flash")


def test_dropout_is_inverted_bernoulli() -> None:
    layer = Dropout(p=0.3)
    x = torch.ones(1_000_000)
    y = layer(x)
    kept = y != 0
    # 10 standard deviations of the kept fraction: a wrong rate fails, chance does not.
    assert abs(kept.double().mean().item() - 0.7) < 5e-3
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert layer.eval()(x) is x
    assert Dropout(p=0.0).train()(x) is x


def test_class_conditioning() -> None:
    model = build_unet("tiny", num_classes=10)
    assert model.state_dict()["label_emb.weight"].shape == (10, 128)
    assert "label_emb.weight" not in build_unet("tiny").state_dict()
    randomize_(model, seed=5).eval()
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 16, 16, generator=generator)
    t = torch.tensor([100, 100])
    with torch.no_grad():
        out_a = model(x, t, y=torch.tensor([0, 1]))
        out_b = model(x, t, y=torch.tensor([0, 7]))
    torch.testing.assert_close(out_a[0], out_b[0], rtol=0, atol=0)
    assert (out_a[1] - out_b[1]).abs().max() > 1e-3
    with pytest.raises(ValueError):
        model(x, t)


# ------------------------------------------------------------------------------------------
# GroupNorm on channels-last CPU activations (pipeline.nn.channels_last_norm), as sampling runs it.

@pytest.mark.parametrize("shape, groups", [((5, 32, 16, 16), 8), ((3, 64, 8, 8), 32), ((2, 96, 4, 4), 8),
                                           ((1, 16, 2, 2), 8)])
def test_channels_last_group_norm_is_group_norm_to_fp32_rounding(shape, groups) -> None:
    from pipeline.nn.channels_last_norm import group_norm_channels_last

    generator = torch.Generator().manual_seed(0)
    # An offset mean, as activations have: a one-pass variance would lose digits here.
    x = (torch.randn(shape, generator=generator) * 0.5 + 3.0).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(shape[1], generator=generator), torch.randn(shape[1], generator=generator)
    exact = F.group_norm(x.double(), groups, weight.double(), bias.double(), 1e-5)
    ours = group_norm_channels_last(x, groups, weight, bias, 1e-5)
    torchs = F.group_norm(x, groups, weight, bias, 1e-5)
    assert ours.shape == x.shape and ours.is_contiguous(memory_format=torch.channels_last)
    error, torch_error = (ours.double() - exact).abs().max(), (torchs.double() - exact).abs().max()
    assert error <= 2 * torch_error + 1e-7, (float(error), float(torch_error))


def test_sampling_model_swaps_group_norm_and_keeps_parameters_and_fallbacks() -> None:
    from pipeline.nn.channels_last_norm import ChannelsLastGroupNorm, use_channels_last_group_norm
    from pipeline.nn.unet import GroupNorm32

    model = randomize_(build_unet("tiny"), seed=5).eval()
    reference = copy.deepcopy(model)
    weights = {name: p for name, p in model.named_parameters()}
    use_channels_last_group_norm(model.to(memory_format=torch.channels_last))
    norms = [m for m in model.modules() if isinstance(m, GroupNorm32)]
    assert norms and all(type(m) is ChannelsLastGroupNorm for m in norms)
    assert all(p is weights[name] for name, p in model.named_parameters())  # in-place edits reach them
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([1, 500, 999])
    x_last = x.contiguous(memory_format=torch.channels_last)
    torchs = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(x.double(), t)
        error = (model(x_last, t).double() - exact).abs().max()
        torch_error = (torchs(x_last, t).double() - exact).abs().max()
        assert error <= 2 * torch_error, (float(error), float(torch_error))  # the whole forward, as accurate
        plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        assert torch.equal(plain(x, t), reference(x, t))  # NCHW input: PyTorch's own kernel, same bits
        assert not torch.equal(model(x_last, t), torchs(x_last, t))  # channels-last: ours
    # With autograd on, the norm is PyTorch's (ours is for sampling's no-grad forwards).
    assert torch.equal(model(x_last, t), torchs(x_last, t))


def test_sample_stage_builds_channels_last_norms_on_cpu() -> None:
    from pipeline.nn.channels_last_norm import ChannelsLastGroupNorm
    from pipeline.stages.sample import build_sampling_model

    unet = build_unet("tiny")
    settings = {"preset": "tiny", "resolution": unet.image_size,
                "diffusion": {"steps": 1000, "noise_schedule": "cosine", "learn_sigma": True}}
    model = build_sampling_model(settings, unet.state_dict(), torch.device("cpu"))
    assert any(type(m) is ChannelsLastGroupNorm for m in model.modules())
