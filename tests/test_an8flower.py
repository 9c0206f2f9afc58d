"""Tests of the procedural an8Flower generator: determinism, shapes, balance, masks and the class rule."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest

from vefi.book.an8flower import CLASS_RGB, PARTS, VARIANTS, FlowerSet, generate, render_flower
from vefi.book.data import COLOURS, dataset_info

CENTRE, PETALS = PARTS.index("centre"), PARTS.index("petals")
# Distances between chroma vectors (saturation times unit hue vector): the discriminative part's mean colour
# lies within NEAR of its class colour, every other region's beyond FAR from all class colours.
NEAR, FAR = 0.3, 0.35


def chroma(rgb) -> np.ndarray:
    """Saturation times the unit vector of the hue: insensitive to the multiplicative lighting."""
    hue, saturation, _ = colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255))
    return saturation * np.array([np.cos(2 * np.pi * hue), np.sin(2 * np.pi * hue)])


CLASS_CHROMA = np.stack([chroma(rgb) for rgb in CLASS_RGB])


def distances_to_classes(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.linalg.norm(CLASS_CHROMA - chroma(image[:, mask].mean(axis=1)), axis=1)


@pytest.fixture(scope="module", params=VARIANTS)
def flowers(request) -> FlowerSet:
    return generate(request.param, n_per_class=20 if request.param == "single" else 10, seed=3, progress=False)


def test_same_seed_gives_identical_bytes_and_another_seed_differs():
    first = generate("double", 2, seed=7, progress=False)
    again = generate("double", 2, seed=7, progress=False)
    other = generate("double", 2, seed=8, progress=False)
    for name in ("images", "labels", "masks", "parts"):
        assert getattr(first, name).tobytes() == getattr(again, name).tobytes()
    assert first.images.tobytes() != other.images.tobytes()
    assert first.labels.tolist() != other.labels.tolist()


def test_each_image_comes_from_its_own_generator():
    flowers = generate("single", 2, seed=5, size=64, progress=False)
    for i in (0, 7, 11):
        image, mask, parts = render_flower(np.random.default_rng([5, VARIANTS.index("single"), i]),
                                           int(flowers.labels[i]), "single", size=64)
        np.testing.assert_array_equal(image, flowers.images[i])
        np.testing.assert_array_equal(mask, flowers.masks[i])
        np.testing.assert_array_equal(parts, flowers.parts[i])


def test_shapes_dtypes_and_classes(flowers):
    n = len(flowers)
    assert flowers.images.shape == (n, 3, 112, 112) and flowers.images.dtype == np.uint8
    assert flowers.labels.shape == (n,) and flowers.labels.dtype == np.int64
    assert flowers.masks.shape == (n, 112, 112) and flowers.masks.dtype == bool
    assert flowers.parts.shape == (n, 4, 112, 112) and flowers.parts.dtype == bool
    assert flowers.classes == dataset_info(f"an8flower-{flowers.variant}").classes
    assert len(flowers.classes) == len(COLOURS) * (1 if flowers.variant == "single" else 2)


def test_classes_are_exactly_balanced_and_shuffled(flowers):
    counts = np.bincount(flowers.labels, minlength=len(flowers.classes))
    assert (counts == counts[0]).all() and counts.sum() == len(flowers)
    assert flowers.labels.tolist() != sorted(flowers.labels.tolist())


def test_discriminative_mask_is_the_coloured_part(flowers):
    for label, mask, parts in zip(flowers.labels, flowers.masks, flowers.parts):
        part = CENTRE if flowers.variant == "single" or label < len(COLOURS) else PETALS
        np.testing.assert_array_equal(mask, parts[part])
        # A centre of radius >= 5 px, squeezed by the head's slant to >= 0.8 of that.
        assert mask.sum() >= 0.8 * np.pi * 5 ** 2


def test_parts_are_disjoint_and_the_centre_sits_inside_the_petals(flowers):
    assert flowers.parts.sum(axis=1).max() <= 1
    for parts in flowers.parts:
        centre, petals = parts[CENTRE], parts[PETALS]
        assert petals.sum() > centre.sum()
        grown = centre.copy()
        for _ in range(2):
            grown[1:] |= grown[:-1].copy()
            grown[:-1] |= grown[1:].copy()
            grown[:, 1:] |= grown[:, :-1].copy()
            grown[:, :-1] |= grown[:, 1:].copy()
        ring = grown & ~centre
        assert petals[ring].mean() >= 0.5


def test_discriminative_colour_is_nearest_its_class_colour(flowers):
    for image, label, mask in zip(flowers.images, flowers.labels, flowers.masks):
        distances = distances_to_classes(image, mask)
        assert distances.argmin() == label % len(COLOURS)
        assert distances[label % len(COLOURS)] < NEAR


def test_other_regions_are_far_from_every_class_colour(flowers):
    checked = 0
    for image, mask, parts in zip(flowers.images, flowers.masks, flowers.parts):
        regions = [part for part in parts if part.sum() >= 10 and not (part == mask).all()]
        regions.append(~parts.any(axis=0))  # the background
        for region in regions:
            assert distances_to_classes(image, region).min() > FAR
            checked += 1
    assert checked >= 3 * len(flowers)


def test_other_sizes():
    for size in (32, 64):
        flowers = generate("double", 1, seed=0, size=size, progress=False)
        assert flowers.images.shape == (12, 3, size, size)
        assert all(mask.any() for mask in flowers.masks)


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "triple", "n_per_class": 1}, "single"),
    ({"variant": "single", "n_per_class": 0}, "n_per_class"),
    ({"variant": "single", "n_per_class": 1.5}, "n_per_class"),
    ({"variant": "single", "n_per_class": 1, "size": 31}, "size"),
])
def test_bad_input_to_generate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(progress=False, **kwargs)


@pytest.mark.parametrize("label, variant, size, match", [
    (6, "single", 112, "label"),
    (-1, "double", 112, "label"),
    (12, "double", 112, "label"),
    (0, "double-12c", 112, "variant"),
    (0, "single", 16, "size"),
])
def test_bad_input_to_render_flower(label, variant, size, match):
    with pytest.raises(ValueError, match=match):
        render_flower(np.random.default_rng(0), label, variant, size)
