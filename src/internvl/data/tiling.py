"""Dynamic tiling and pixel normalisation: how an image becomes the tiles InternVL's vision encoder sees.

An image is resized to the grid of square tiles (columns x rows) whose aspect ratio is closest to its own, then
cut into tiles, left to right and top to bottom; with `use_thumbnail`, the whole image shrunk to one tile follows.
Each tile is then normalised with a mean and std: ImageNet's by default, CLIP's or SigLIP's by the official
`--normalize_type`. Without tiling, `--pad2square` first pads an image to a square of the mean colour. The results
equal the official functions' (`dynamic_preprocess`, `build_transform`, `expand2square` and the model cards'
`load_image`) pixel for pixel.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official `normalize_type` choices: (mean, std) per channel.
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": ((0.4814546, 0.4578275, 0.40821073), (0.2686295, 0.2613025, 0.2757711)),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """Every (columns, rows) grid with min_num <= columns * rows <= max_num, fewest tiles first.

    The order among grids of equal tile count decides ties in `tile_grid`, so it is the official one: the grids
    are collected into a set in the same insertion order as the official code, then stably sorted by tile count.
    """
    grids = set()
    for n in range(min_num, max_num + 1):
        for columns in range(1, n + 1):
            for rows in range(1, n + 1):
                if min_num <= columns * rows <= max_num:
                    grids.add((columns, rows))
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def tile_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The (columns, rows) grid for an image of width x height pixels (official `find_closest_aspect_ratio`).

    The grid whose aspect ratio is closest to the image's wins; on a tie, the later (larger) grid wins when the
    image has more pixels than half the grid's. With no candidate grid (min_num > max_num) the answer is (1, 1).
    """
    aspect_ratio = width / height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * columns * rows:
            best = (columns, rows)
    return best


def count_tiles(width: int, height: int, min_num: int, max_num: int, image_size: int, use_thumbnail: bool) -> int:
    """How many tiles `dynamic_preprocess` makes of a width x height image, without touching any pixel."""
    columns, rows = tile_grid(width, height, min_num, max_num, image_size)
    tiles = columns * rows
    return tiles + 1 if use_thumbnail and tiles > 1 else tiles


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    """Cut an image into image_size x image_size tiles on its closest grid, row by row (+ a thumbnail)."""
    columns, rows = tile_grid(image.width, image.height, min_num, max_num, image_size)
    # No resample argument, as the official code: PIL's default (bicubic, nearest for modes "1" and "P").
    resized = image.resize((columns * image_size, rows * image_size))
    tiles = [
        resized.crop((x * image_size, y * image_size, (x + 1) * image_size, (y + 1) * image_size))
        for y in range(rows)
        for x in range(columns)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def _pixels(image: Image.Image, input_size: int) -> torch.Tensor:
    """An image as RGB uint8 [3, input_size, input_size], bicubically resized (a no-op for a tile of that size)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = image.resize((input_size, input_size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # [H, W, 3] -> [3, H, W]


def _normalize(pixels: torch.Tensor, normalize_type: str = "imagenet") -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 scaled to [0, 1], minus the mean, over the std of `normalize_type`."""
    mean, std = (torch.tensor(values, dtype=torch.float32).view(3, 1, 1) for values in NORMALIZATIONS[normalize_type])
    return pixels.to(torch.float32).div_(255).sub_(mean).div_(std)


def expand_to_square(image: Image.Image, normalize_type: str = "imagenet") -> Image.Image:
    """The image centred on a square of the normalisation's mean colour (the official `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    background = tuple(int(value * 255) for value in NORMALIZATIONS[normalize_type][0])
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def normalize_tile(image: Image.Image, input_size: int) -> torch.Tensor:
    """One image as a normalised FloatTensor [3, input_size, input_size] (what `build_transform` returns).

    The steps and float32 arithmetic of torchvision's Resize(BICUBIC) + ToTensor + Normalize on a PIL image, whose
    results this equals bit for bit; torchvision itself is not used, as it does not import beside our torch build.
    """
    return _normalize(_pixels(image, input_size))


def build_transform(input_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The official evaluation transform: RGB, bicubic resize to input_size, ToTensor, ImageNet normalisation."""
    # A partial pickles (into DataLoader workers, say); a closure would not.
    return functools.partial(normalize_tile, input_size=input_size)


def tiles_to_tensor(tiles: list[Image.Image], input_size: int, normalize_type: str = "imagenet") -> torch.Tensor:
    """Normalise and stack tiles: FloatTensor [n_tiles, 3, input_size, input_size].

    Equal to stacking `build_transform(input_size)` of each tile; normalising them all at once is faster.
    """
    return _normalize(torch.stack([_pixels(tile, input_size) for tile in tiles]), normalize_type)


def load_image(path: str | os.PathLike, input_size: int = 448, max_num: int = 12) -> torch.Tensor:
    """An image file as the model cards prepare it for chat: tiles + thumbnail, [n_tiles, 3, H, W]."""
    with Image.open(path) as image:
        image = image.convert("RGB")
    tiles = dynamic_preprocess(image, image_size=input_size, use_thumbnail=True, max_num=max_num)
    return tiles_to_tensor(tiles, input_size)


def tiles_per_image(max_dynamic_patch: int, n_images: int) -> int:
    """The tile budget of each image when a sample has n_images >= 1: the sample's budget shared, at least one."""
    return max(1, max_dynamic_patch // n_images)
