"""Pixel shuffle, `mlp1` and the image token count, against the official InternVL rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from internvl.model.projector import build_mlp1, num_image_tokens, pixel_shuffle


def official_pixel_shuffle(x: torch.Tensor, scale: float, ps_version: str) -> torch.Tensor:
    """The official recipe, step by step: fold pairs along H into C, swap W and H, fold along the (new) second
    axis into C, and for v2 only swap back."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3)
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3) if ps_version == "v2" else x


def grid(n: int, w: int, h: int, c: int) -> torch.Tensor:
    """Small integers, every value distinct, so any misplaced element shows."""
    return torch.arange(n * w * h * c).reshape(n, w, h, c)


@pytest.mark.parametrize("ps_version", ["v1", "v2"])
@pytest.mark.parametrize("shape", [(1, 4, 4, 1), (2, 4, 6, 3), (1, 6, 2, 2)])
def test_pixel_shuffle_matches_the_official_steps(shape, ps_version):
    x = grid(*shape)
    assert torch.equal(pixel_shuffle(x, 0.5, ps_version), official_pixel_shuffle(x, 0.5, ps_version))


def test_v2_puts_each_2x2_block_in_one_token_in_row_major_order():
    x = grid(1, 4, 6, 2)
    out = pixel_shuffle(x, 0.5, "v2")
    assert out.shape == (1, 2, 3, 8)
    for i in range(2):
        for j in range(3):
            block = [x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1], x[0, 2 * i + 1, 2 * j], x[0, 2 * i + 1, 2 * j + 1]]
            assert torch.equal(out[0, i, j], torch.cat(block))


def test_v2_on_a_4x4_single_channel_grid_by_hand():
    x = grid(1, 4, 4, 1)  # rows 0..3 hold 0-3, 4-7, 8-11, 12-15
    out = pixel_shuffle(x, 0.5, "v2")
    assert out[0, 0, 0].tolist() == [0, 1, 4, 5]
    assert out[0, 0, 1].tolist() == [2, 3, 6, 7]
    assert out[0, 1, 0].tolist() == [8, 9, 12, 13]


def test_v1_is_v2_transposed():
    x = grid(2, 4, 6, 3)
    v1 = pixel_shuffle(x, 0.5, "v1")
    assert v1.shape == (2, 3, 2, 12)
    assert torch.equal(v1, pixel_shuffle(x, 0.5, "v2").transpose(1, 2))


def test_a_quarter_scale_merges_4x4_blocks():
    x = grid(1, 8, 8, 2)
    out = pixel_shuffle(x, 0.25, "v2")
    assert out.shape == (1, 2, 2, 32)
    assert torch.equal(out[0, 1, 0], x[0, 4:8, 0:4].reshape(-1))


def test_pixel_shuffle_rejects_a_grid_that_does_not_split_and_an_unknown_version():
    with pytest.raises(ValueError, match="does not split"):
        pixel_shuffle(grid(1, 3, 4, 1))
    with pytest.raises(ValueError, match="ps_version"):
        pixel_shuffle(grid(1, 4, 4, 1), ps_version="v3")


def test_mlp1_has_the_official_keys_and_shapes():
    mlp1 = build_mlp1(vit_hidden_size=32, llm_hidden_size=64, downsample_ratio=0.5)
    shapes = {name: tuple(p.shape) for name, p in mlp1.state_dict().items()}
    assert shapes == {
        "0.weight": (128,), "0.bias": (128,),
        "1.weight": (64, 128), "1.bias": (64,),
        "3.weight": (64, 64), "3.bias": (64,),
    }
    assert isinstance(mlp1[2], nn.GELU)
    assert mlp1(torch.randn(2, 4, 128)).shape == (2, 4, 64)


@pytest.mark.parametrize(
    "image_size, patch_size, ratio, expected",
    [(448, 14, 0.5, 256), (224, 14, 0.5, 64), (56, 14, 0.5, 4), (448, 14, 0.25, 64), (448, 14, 1.0, 1024)],
)
def test_num_image_tokens(image_size, patch_size, ratio, expected):
    assert num_image_tokens(image_size, patch_size, ratio) == expected
