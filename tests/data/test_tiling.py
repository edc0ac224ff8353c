"""Dynamic tiling and the pixel transform follow the official rules (cases worked out from the official code)."""

import numpy as np
import pytest
import torch
from PIL import Image

from internvl.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transform,
    candidate_grids,
    count_tiles,
    dynamic_preprocess,
    load_image,
    tile_grid,
    tiles_per_image,
)


def test_candidate_grids_are_every_grid_within_the_tile_budget_fewest_tiles_first():
    grids = candidate_grids(1, 6)
    assert sorted(grids) == sorted((c, r) for c in range(1, 7) for r in range(1, 7) if c * r <= 6)
    counts = [c * r for c, r in grids]
    assert counts == sorted(counts)
    assert sorted(candidate_grids(3, 4)) == [(1, 3), (1, 4), (2, 2), (3, 1), (4, 1)]


@pytest.mark.parametrize(
    "size, max_num, grid",
    [
        ((448, 448), 6, (1, 1)),  # square; (2, 2) ties but the image is not larger than half of 4 tiles
        ((896, 448), 6, (2, 1)),  # 2:1 landscape
        ((1344, 448), 6, (3, 1)),  # 3:1 landscape
        ((448, 1344), 6, (1, 3)),  # 1:3 portrait
        ((4000, 100), 6, (6, 1)),  # far wider than any grid: the widest
        ((800, 600), 6, (3, 2)),  # 4:3 is closer to 3:2 than to 1:1
        ((560, 480), 6, (1, 1)),  # 7:6 is closer to 1:1 than to 3:2
        ((900, 600), 6, (3, 2)),  # exactly 3:2
    ],
)
def test_grid_has_the_closest_aspect_ratio(size, max_num, grid):
    assert tile_grid(*size, 1, max_num, 448) == grid


def test_ties_go_to_the_larger_grid_only_for_images_larger_than_half_of_it():
    # 1:1 ties between (1,1), (2,2) and (3,3); a later grid wins when area > 0.5 * 448^2 * tiles.
    assert tile_grid(448, 448, 1, 9, 448) == (1, 1)
    assert tile_grid(900, 900, 1, 9, 448) == (2, 2)  # 810000 > 401408, but not > 903168
    assert tile_grid(1000, 1000, 1, 9, 448) == (3, 3)  # 1000000 > 903168
    # 5:4 is exactly between 1:2 and 2:1 when neither 1:1 nor a 3-tile grid is closer; the official grid order puts
    # (1, 2) first, so a small image keeps that portrait grid (official behaviour, kept for identical tiles).
    assert tile_grid(500, 400, 2, 3, 448) == (1, 2)  # 200000 <= 0.5 * 448^2 * 2
    assert tile_grid(560, 448, 2, 3, 448) == (2, 1)  # 250880 > 200704


def test_min_num_above_max_num_falls_back_to_one_tile():
    assert tile_grid(900, 300, 4, 2, 448) == (1, 1)


def blocks_image(columns: int, rows: int, side: int) -> tuple[Image.Image, list[tuple[int, int, int]]]:
    """An image of columns x rows solid blocks of side pixels, each of its own colour (listed row by row)."""
    colors = [(40 * i % 256, 255 - 30 * i % 256, 90) for i in range(columns * rows)]
    image = Image.new("RGB", (columns * side, rows * side))
    for i, color in enumerate(colors):
        x, y = (i % columns) * side, (i // columns) * side
        image.paste(color, (x, y, x + side, y + side))
    return image, colors


def test_tiles_are_cut_row_by_row_and_the_thumbnail_comes_last():
    image, colors = blocks_image(columns=3, rows=2, side=8)  # already the grid's size, so no resampling blur
    tiles = dynamic_preprocess(image, max_num=6, image_size=8, use_thumbnail=True)
    assert len(tiles) == 7
    for tile, color in zip(tiles, colors):
        assert tile.size == (8, 8)
        assert (np.asarray(tile) == color).all()
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((8, 8))))


def test_images_are_resized_to_the_grid_before_cutting():
    image = Image.new("RGB", (301, 97), (10, 20, 30))
    image.paste((250, 0, 0), (0, 0, 150, 97))
    tiles = dynamic_preprocess(image, max_num=6, image_size=16)
    grid = tile_grid(301, 97, 1, 6, 16)
    resized = np.asarray(image.resize((grid[0] * 16, grid[1] * 16)))
    assert grid == (3, 1) and len(tiles) == 3
    for i, tile in enumerate(tiles):
        assert np.array_equal(np.asarray(tile), resized[:, i * 16 : (i + 1) * 16])


def test_no_thumbnail_for_a_single_tile():
    image = Image.new("RGB", (30, 30))
    assert len(dynamic_preprocess(image, max_num=6, image_size=32, use_thumbnail=True)) == 1
    assert len(dynamic_preprocess(image, max_num=1, image_size=8, use_thumbnail=True)) == 1


@pytest.mark.parametrize("use_thumbnail", [False, True])
@pytest.mark.parametrize("min_num, max_num", [(1, 6), (1, 12), (2, 4), (1, 1)])
def test_count_tiles_agrees_with_dynamic_preprocess(use_thumbnail, min_num, max_num):
    for width, height in [(16, 16), (40, 9), (9, 40), (33, 20), (100, 51), (5, 70), (64, 48)]:
        image = Image.new("RGB", (width, height))
        tiles = dynamic_preprocess(image, min_num, max_num, image_size=8, use_thumbnail=use_thumbnail)
        assert count_tiles(width, height, min_num, max_num, 8, use_thumbnail) == len(tiles)


def reference_transform(image: Image.Image, size: int) -> np.ndarray:
    """torchvision's Resize(BICUBIC) + ToTensor + Normalize written out with PIL and numpy, [3, size, size]."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(resized, dtype=np.float32) / np.float32(255)
    normalized = (pixels - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return normalized.transpose(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_transform_matches_the_reference(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).convert(mode)
    result = build_transform(24)(image)
    assert result.dtype == torch.float32 and result.shape == (3, 24, 24)
    np.testing.assert_array_equal(result.numpy(), reference_transform(image, 24))  # same float32 steps: exact


def test_transform_of_white_and_black():
    white = build_transform(4)(Image.new("RGB", (4, 4), (255, 255, 255)))
    black = build_transform(4)(Image.new("RGB", (4, 4), (0, 0, 0)))
    for channel in range(3):
        mean, std = IMAGENET_MEAN[channel], IMAGENET_STD[channel]
        assert torch.allclose(white[channel], torch.tensor((1 - mean) / std))
        assert torch.allclose(black[channel], torch.tensor(-mean / std))


def test_load_image_tiles_with_a_thumbnail(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (100, 50), (0, 128, 255)).save(path)
    pixels = load_image(path, input_size=28, max_num=12)
    # 2:1 ties between (2,1) and (4,2); 100*50 > 0.5 * 28^2 * 8, so 4 x 2 tiles, + the thumbnail.
    assert pixels.shape == (9, 3, 28, 28)
    image = Image.open(path).convert("RGB")
    tiles = dynamic_preprocess(image, max_num=12, image_size=28, use_thumbnail=True)
    expected = torch.stack([build_transform(28)(tile) for tile in tiles])
    assert torch.equal(pixels, expected)


@pytest.mark.parametrize("budget, images, per_image", [(6, 1, 6), (6, 2, 3), (6, 4, 1), (6, 12, 1), (12, 5, 2)])
def test_tiles_per_image_shares_the_budget(budget, images, per_image):
    assert tiles_per_image(budget, images) == per_image
