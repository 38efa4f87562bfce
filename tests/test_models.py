"""The book's UNet layer for layer, the vectorised time encoding against the book's loop, and the
ImprovedUNet's promises (shapes, zero-initialised residual branches, FLOP budget)."""
from __future__ import annotations

import math

import pytest
import torch

from core.config import PRESETS, ModelConfig
from core.bench.flops import flops_per_image
from core.models import ImprovedUNet, UNet, build_model, count_parameters
from core.models.embedding import sinusoidal_encoding


def book_pos_encoding(timesteps: torch.Tensor, output_dim: int) -> torch.Tensor:
    """A direct transcription of the book's step-9 loop (one vector per sample)."""
    def one(t, D):
        v = torch.zeros(D)
        i = torch.arange(0, D)
        div_term = torch.exp(i / D * math.log(10000))
        v[0::2] = torch.sin(t / div_term[0::2])
        v[1::2] = torch.cos(t / div_term[1::2])
        return v
    v = torch.zeros(len(timesteps), output_dim)
    for i in range(len(timesteps)):
        v[i] = one(timesteps[i], output_dim)
    return v


@pytest.mark.parametrize("dim", [100, 16, 2])
def test_vectorised_encoding_equals_the_books_loop(dim):
    t = torch.tensor([1, 2, 17, 500, 999, 1000])
    assert torch.allclose(sinusoidal_encoding(t, dim), book_pos_encoding(t, dim), atol=1e-6)


def test_encoding_differs_between_timesteps():
    v = sinusoidal_encoding(torch.arange(1, 1001), 100)
    assert v.shape == (1000, 100)
    assert torch.cdist(v, v).add(torch.eye(1000) * 1e3).min() > 1e-3  # every t has its own code


def test_book_unet_has_the_books_layers_and_size():
    model = UNet()
    assert count_parameters(model) == 2_167_784  # the book's network: 2.17 M
    widths = [(b.convs[0].in_channels, b.convs[0].out_channels)
              for b in (model.down1, model.down2, model.bot1, model.up2, model.up1)]
    assert widths == [(1, 64), (64, 128), (128, 256), (384, 128), (192, 64)]
    assert model.down1.mlp[0].in_features == 100 and model.out.kernel_size == (1, 1)
    forward = flops_per_image(model, train=False) / 1e9
    assert 0.65 < forward < 0.75  # the book's network: about 0.70 GFLOP forward


@pytest.mark.parametrize("name", ["unet", "improved_unet"])
def test_models_map_noise_shape_to_noise_shape(name):
    model = build_model(ModelConfig(name=name, base_channels=8, channel_mults=(1, 2, 2)))
    x = torch.randn(3, 1, 28, 28)
    out = model(x, torch.tensor([1, 500, 1000]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_improved_unet_residual_branches_start_as_identity():
    model = ImprovedUNet(base_channels=8, channel_mults=(1, 2), attention=True)
    for name, module in model.named_modules():
        if name.endswith("conv2") or name.endswith("mid_attn.proj"):
            assert all(p.abs().sum() == 0 for p in module.parameters()), name
    # with zero residual branches the attention block passes its input through unchanged
    x = torch.randn(2, 16, 14, 14)
    assert torch.equal(model.mid_attn(x), x)


def test_improved_unet_time_changes_the_output():
    torch.manual_seed(0)
    model = ImprovedUNet(base_channels=8, channel_mults=(1, 2))
    for p in model.parameters():  # leave the zero init so time has a path to the output
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(1, 1, 28, 28)
    assert not torch.allclose(model(x, torch.tensor([1])), model(x, torch.tensor([900])))


def test_batchnorm_variant_and_group_norm_choice():
    bn = build_model(ModelConfig(name="improved_unet", base_channels=8, norm="batch"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    gn = build_model(ModelConfig(name="improved_unet", base_channels=8))
    assert any(isinstance(m, torch.nn.GroupNorm) for m in gn.modules())


def test_improved_preset_costs_at_most_one_and_a_half_book_unets():
    book = flops_per_image(build_model(PRESETS["book"].model), train=True)
    improved = flops_per_image(build_model(PRESETS["improved"].model), train=True)
    assert improved <= 1.5 * book
