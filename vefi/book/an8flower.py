"""an8Flower, re-created procedurally: flowers whose part colour decides the class.

The original an8Flower (Oramas, Wang & Tuytelaars, ICLR 2019) is a set of rendered 3D flowers that cannot be
reached offline, so this module draws its own with numpy and PIL, deterministically from a seed. Two variants:

- ``"single"`` (single-6c): the colour of the flower's centre decides the class, 6 classes.
- ``"double"`` (double-12c): exactly one of centre or petals carries a class colour and the other part a
  distractor colour; the class is the pair (part, colour), 12 classes.

Everything else (pose, scale, position, petal count and shape, stem, leaves, background, lighting, the colours
of the other parts) is drawn independently of the label, so that nothing but the discriminative part's colour
predicts the class. Every image comes with the mask of its discriminative part and with the masks of the
visible pixels of every part.

Examples
--------
>>> from vefi.book.an8flower import generate
>>> flowers = generate("single", n_per_class=2, seed=0, progress=False)
>>> flowers.images.shape, flowers.masks.shape, flowers.classes[0]
((12, 3, 112, 112), (12, 112, 112), 'centre red')
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vefi._progress import progress as progress_bar
from vefi.book.data import COLOURS, dataset_info

__all__ = ["PARTS", "VARIANTS", "CLASS_RGB", "FlowerSet", "generate", "render_flower"]

PARTS = ("petals", "centre", "stem", "leaves")
VARIANTS = ("single", "double")

# Saturated colours, in vefi.book.data.COLOURS order, spread over the hue circle (about 353, 26, 61, 187, 229 and
# 303 degrees) and far from green, so that no leaf or stem can pass for a class colour. Shading and lighting
# are multiplicative and so keep the hue; under the +-12 jitter per channel, the darkest shading and the
# brightest (clipping) light, neighbouring class hues still stay >= 17 degrees apart.
CLASS_RGB = np.array([
    (220, 20, 45),     # red
    (250, 115, 15),    # orange
    (228, 230, 35),    # yellow
    (35, 70, 225),     # blue
    (25, 200, 225),    # cyan
    (215, 35, 205),    # magenta
], dtype=np.float64)
_CLASS_JITTER = 12

# Distractor palettes: saturation (max - min) / max at most about 0.36, against >= 0.77 for the class colours,
# so a distractor part never looks like a class colour, whatever its hue.
_PETAL_DISTRACTORS = np.array([
    (240, 238, 232),   # white
    (238, 228, 196),   # cream
    (230, 225, 210),   # ivory
    (238, 208, 212),   # pale pink
    (196, 188, 208),   # lavender grey
    (236, 214, 196),   # pale peach
    (205, 205, 200),   # light grey
    (214, 204, 222),   # pale lilac
], dtype=np.float64)
_CENTRE_DISTRACTORS = np.array([
    (110, 90, 70),     # brown
    (78, 62, 50),      # dark brown
    (170, 150, 120),   # tan
    (230, 220, 190),   # cream
    (130, 120, 110),   # grey brown
    (235, 232, 220),   # off-white
    (150, 145, 140),   # warm grey
], dtype=np.float64)
_DISTRACTOR_JITTER = 8
# Hues between about 95 and 150 degrees: far from yellow (57) and cyan (187).
_GREENS = np.array([
    (60, 130, 50),
    (40, 100, 45),
    (90, 140, 60),
    (50, 110, 75),
    (100, 130, 70),
    (70, 120, 60),
    (35, 80, 40),
], dtype=np.float64)
_GREEN_JITTER = 8

# Anti-aliasing: parts are drawn as a label image at this many times the final size, and each final pixel's
# coverage by a part is the fraction of its sub-pixels carrying that part's label.
_SUPERSAMPLE = 4
# Sub-part labels of the hi-res drawing, in drawing (occlusion) order. Petals alternate between two labels
# and leaves are split along the midrib so that each half can be shaded on its own.
_BG, _STEM, _LEAF_A, _LEAF_B, _PETAL_EVEN, _PETAL_ODD, _CENTRE = range(7)
_SUBPART_OF_PART = {"petals": (_PETAL_EVEN, _PETAL_ODD), "centre": (_CENTRE,),
                    "stem": (_STEM,), "leaves": (_LEAF_A, _LEAF_B)}
_MIN_SIZE = 32


@dataclass
class FlowerSet:
    """A generated an8Flower set.

    Attributes
    ----------
    images : numpy.ndarray
        ``uint8`` array of shape ``(N, 3, H, W)``.
    labels : numpy.ndarray
        ``int64`` array of shape ``(N,)``; indices into ``classes``.
    masks : numpy.ndarray
        ``bool`` array of shape ``(N, H, W)``: the visible pixels of the discriminative part.
    parts : numpy.ndarray
        ``bool`` array of shape ``(N, 4, H, W)``: the visible pixels of each part, in ``PARTS`` order. The
        parts never overlap.
    variant : str
        ``"single"`` or ``"double"``.
    classes : tuple of str
        Class names, as in ``vefi.book.data.DATASETS["an8flower-<variant>"]``.
    """

    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray
    parts: np.ndarray
    variant: str
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def _check_variant(variant: str) -> int:
    if variant not in VARIANTS:
        raise ValueError(f"unknown an8Flower variant {variant!r}; expected one of {VARIANTS}")
    return VARIANTS.index(variant)


def _num_classes(variant: str) -> int:
    return len(COLOURS) * (1 if variant == "single" else 2)


def generate(variant: str, n_per_class: int, *, seed: int = 0, size: int = 112,
             progress: bool = True) -> FlowerSet:
    """Generate a class-balanced an8Flower set.

    Image ``i`` is drawn from its own generator ``numpy.random.default_rng([seed, variant_index, i])``, so it
    does not depend on the order of generation; the labels are ``i % num_classes`` in an order shuffled by
    ``default_rng([seed, variant_index])``. Make train and test sets with different seeds.

    Parameters
    ----------
    variant : {"single", "double"}
        ``"single"``: 6 classes, the centre's colour. ``"double"``: 12 classes, which of centre (labels 0-5)
        or petals (labels 6-11) carries which colour.
    n_per_class : int
        Number of images of each class, at least 1.
    seed : int, default 0
        Non-negative seed; the same seed gives byte-identical arrays.
    size : int, default 112
        Height and width of the images in pixels, at least 32.
    progress : bool, default True
        Show a progress bar.

    Returns
    -------
    FlowerSet
        ``n_per_class * num_classes`` images with labels, discriminative masks and part masks.

    Raises
    ------
    ValueError
        For an unknown variant, ``n_per_class < 1`` or ``size < 32``.
    """
    variant_index = _check_variant(variant)
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, (int, np.integer)) or n_per_class < 1:
        raise ValueError(f"n_per_class must be an integer >= 1, got {n_per_class!r}")
    _check_size(size)
    num_classes = _num_classes(variant)
    n = int(n_per_class) * num_classes
    order = np.random.default_rng([seed, variant_index]).permutation(n)
    labels = (order % num_classes).astype(np.int64)

    images = np.empty((n, 3, size, size), dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool)
    parts = np.empty((n, len(PARTS), size, size), dtype=bool)
    indices = range(n)
    if progress:
        indices = progress_bar(indices, total=n, desc=f"an8Flower {variant}")
    for i in indices:
        rng = np.random.default_rng([seed, variant_index, i])
        images[i], masks[i], parts[i] = render_flower(rng, int(labels[i]), variant, size)
    classes = dataset_info(f"an8flower-{variant}").classes
    return FlowerSet(images, labels, masks, parts, variant, classes)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < _MIN_SIZE:
        raise ValueError(f"size must be an integer >= {_MIN_SIZE}, got {size!r}")


def render_flower(rng: np.random.Generator, label: int, variant: str,
                  size: int = 112) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one flower of class ``label``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of every random choice; the same generator state gives the same flower.
    label : int
        Class index: the colour index (``vefi.book.data.COLOURS``) for ``"single"``; ``part * 6 + colour`` for
        ``"double"``, with part 0 the centre and part 1 the petals.
    variant : {"single", "double"}
    size : int, default 112
        Height and width in pixels, at least 32.

    Returns
    -------
    image : numpy.ndarray
        ``uint8``, shape ``(3, size, size)``.
    mask : numpy.ndarray
        ``bool``, shape ``(size, size)``: visible pixels of the discriminative part.
    parts : numpy.ndarray
        ``bool``, shape ``(4, size, size)``: visible pixels of each part, in ``PARTS`` order.
    """
    _check_variant(variant)
    _check_size(size)
    num_classes = _num_classes(variant)
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
        raise ValueError(f"label must be an integer in [0, {num_classes}) for variant {variant!r}, got {label!r}")
    part_index, colour_index = divmod(int(label), len(COLOURS))
    coloured_part = "centre" if part_index == 0 else "petals"

    shapes, head = _flower_shapes(rng, size)
    counts = _coverage_counts(shapes, size)
    part_masks = _visible_masks(counts)

    class_rgb = _jitter(rng, CLASS_RGB[colour_index], _CLASS_JITTER)
    petal_rgb = class_rgb if coloured_part == "petals" else _pick(rng, _PETAL_DISTRACTORS, _DISTRACTOR_JITTER)
    centre_rgb = class_rgb if coloured_part == "centre" else _pick(rng, _CENTRE_DISTRACTORS, _DISTRACTOR_JITTER)
    stem_rgb = _pick(rng, _GREENS, _GREEN_JITTER)
    leaf_rgb = _pick(rng, _GREENS, _GREEN_JITTER)

    image = _paint(rng, counts, head, size, petal_rgb=petal_rgb, centre_rgb=centre_rgb,
                   stem_rgb=stem_rgb, leaf_rgb=leaf_rgb)
    parts = np.stack([part_masks[p] for p in PARTS])
    return image, part_masks[coloured_part].copy(), parts


def _jitter(rng: np.random.Generator, rgb: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(rgb + rng.integers(-amount, amount + 1, size=3), 0, 255)


def _pick(rng: np.random.Generator, palette: np.ndarray, amount: int) -> np.ndarray:
    return _jitter(rng, palette[rng.integers(len(palette))], amount)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


def _flower_shapes(rng: np.random.Generator, size: int) -> tuple[list[tuple[int, np.ndarray]], dict]:
    """Outlines of all parts, in final-pixel coordinates, in drawing order.

    Returns ``(shapes, head)``: ``shapes`` is a list of ``(label, polygon)`` with polygons as ``(k, 2)``
    arrays of ``(x, y)``; ``head`` holds what shading needs to know of the head.
    """
    radius = size * rng.uniform(0.20, 0.32)                 # petal length
    centre_radius = radius * rng.uniform(0.30, 0.42)
    pose = rng.uniform(-np.pi / 3, np.pi / 3)               # 0: stem straight down
    # A head seen at a slant is foreshortened along one axis; the disc and petals are squeezed together.
    squeeze = np.diag([1.0, rng.uniform(0.8, 1.0)])
    tilt = rng.uniform(0, np.pi)
    head_map = _rotation(tilt) @ squeeze @ _rotation(-tilt)

    shapes: list[tuple[int, np.ndarray]] = []

    # Stem: a quadratic Bezier curve from the head's centre away along the pose direction.
    stem_length = radius * rng.uniform(1.3, 2.4)
    down = np.array([-np.sin(pose), np.cos(pose)])
    side = np.array([down[1], -down[0]])
    control = 0.5 * stem_length * down + rng.uniform(-0.3, 0.3) * stem_length * side
    end = stem_length * down
    t = np.linspace(0.0, 1.0, 20)[:, None]
    stem = 2 * (1 - t) * t * control + t ** 2 * end
    stem_width = max(radius * rng.uniform(0.08, 0.12), 1.2)
    shapes.append((_STEM, _thick_line(stem, stem_width)))

    # Leaves: one or two, pointing up and out from the stem, on alternate sides.
    n_leaves = int(rng.integers(1, 3))
    # Attached below the petals' reach, or the head hides them.
    lowest = max(0.45, 1.05 * radius / stem_length)
    positions = np.sort(rng.uniform(lowest, 0.92, size=n_leaves))
    first_side = rng.choice([-1.0, 1.0])
    for k, tl in enumerate(positions):
        base = 2 * (1 - tl) * tl * control + tl ** 2 * end
        tangent = 2 * (1 - tl) * control + 2 * tl * (end - control)
        upward = -tangent / np.linalg.norm(tangent)
        direction = _rotation(first_side * (-1) ** k * rng.uniform(0.6, 1.15)) @ upward
        length = radius * rng.uniform(0.55, 0.95)
        half_a, half_b = _leaf_halves(length, length * rng.uniform(0.16, 0.24), rng.uniform(0.6, 0.9),
                                      bend=rng.uniform(-0.12, 0.12) * length)
        frame = np.stack([direction, [-direction[1], direction[0]]], axis=1)
        shapes.append((_LEAF_A, base + half_a @ frame.T))
        shapes.append((_LEAF_B, base + half_b @ frame.T))

    # Petals: 5 to 8, one shape per flower, each with its own small jitter in length and angle.
    n_petals = int(rng.integers(5, 9))
    width = radius * rng.uniform(0.18, 0.46) * np.sqrt(6 / n_petals)
    widest = rng.uniform(0.55, 1.5)       # < 1: widest near the base, > 1: near the tip
    bluntness = rng.uniform(0.45, 1.1)    # < 1: rounded, > 1: pointed
    notch = rng.uniform(0.08, 0.16) if rng.random() < 0.3 else 0.0
    start = rng.uniform(0, 2 * np.pi)
    angles = start + 2 * np.pi * np.arange(n_petals) / n_petals + rng.uniform(-0.08, 0.08, size=n_petals)
    outlines = _petal_outlines(radius * rng.uniform(0.88, 1.0, size=n_petals), width, centre_radius,
                               widest, bluntness, notch)
    cos, sin = np.cos(angles), np.sin(angles)
    turns = head_map @ np.stack([np.stack([cos, -sin], axis=-1), np.stack([sin, cos], axis=-1)], axis=-2)
    for j, points in enumerate(np.einsum("nkj,nij->nki", outlines, turns)):
        shapes.append((_PETAL_EVEN if j % 2 == 0 else _PETAL_ODD, points))

    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    disc = centre_radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    shapes.append((_CENTRE, disc @ head_map.T))

    position = _head_position(rng, shapes, size)
    shapes = [(label, points + position) for label, points in shapes]
    head = {"centre": position, "radius": radius, "centre_radius": centre_radius, "map": head_map,
            "n_petals": n_petals, "start": start}
    return shapes, head


def _thick_line(points: np.ndarray, width: float) -> np.ndarray:
    """The outline of a polyline of the given width, by offsetting it along its normals."""
    tangent = np.gradient(points, axis=0)
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    normal *= 0.5 * width / np.linalg.norm(normal, axis=1, keepdims=True)
    return np.concatenate([points + normal, (points - normal)[::-1]])


def _petal_outlines(lengths: np.ndarray, width: float, centre_radius: float, widest: float, bluntness: float,
                    notch: float) -> np.ndarray:
    """Petals along +x from under the disc to ``lengths``, as ``(len(lengths), k, 2)`` outlines.

    The half-width at relative position ``t`` along the petal is ``width * sin(pi t^widest)^bluntness``.
    """
    t = np.linspace(0.0, 1.0, 14)
    if notch:
        t = t[:-1] * (1 - 0.5 * notch)  # stop short of the tip so that the notch cuts into a blunt end
    start = 0.3 * centre_radius
    x = start + t * (lengths[:, None] - start)
    half = np.broadcast_to(width * np.sin(np.pi * t ** widest) ** bluntness, x.shape)
    # Under the disc, petals are wide enough to close the ring around it: the background should not show
    # through right next to the centre.
    closing = min(np.pi * centre_radius / len(lengths), width)
    half = np.where(x <= centre_radius, np.maximum(half, closing), half)
    upper = np.stack([x, half], axis=-1)
    lower = np.stack([x, -half], axis=-1)[:, ::-1]
    if notch:
        tip = np.stack([x[:, -1] - notch * lengths * 0.5, np.zeros_like(lengths)], axis=-1)[:, None]
        return np.concatenate([upper, tip, lower], axis=1)
    return np.concatenate([upper, lower], axis=1)


def _leaf_halves(length: float, width: float, widest: float, bend: float) -> tuple[np.ndarray, np.ndarray]:
    """Two halves of a leaf along +x from the origin, split by a midrib bent sideways by ``bend``."""
    t = np.linspace(0.0, 1.0, 12)
    x = t * length
    mid = bend * t ** 2
    half = width * np.sin(np.pi * t ** widest) ** 0.8
    rib = np.stack([x, mid], axis=1)
    half_a = np.concatenate([rib, np.stack([x, mid + half], axis=1)[::-1]])
    half_b = np.concatenate([rib, np.stack([x, mid - half], axis=1)[::-1]])
    return half_a, half_b


def _head_position(rng: np.random.Generator, shapes: list, size: int) -> np.ndarray:
    """Where the head goes: the whole flower inside the frame if it fits, otherwise only the head.

    Along an axis where the flower is larger than the frame, positions between the two bounds spread the
    overflow between both sides; the head itself is always kept inside.
    """
    points = np.concatenate([points for _, points in shapes])
    margin = 0.03 * size
    low = margin - points.min(axis=0)
    high = size - margin - points.max(axis=0)
    position = rng.uniform(np.minimum(low, high), np.maximum(low, high))
    head_points = np.concatenate([points for label, points in shapes
                                  if label in (_PETAL_EVEN, _PETAL_ODD, _CENTRE)])
    head_low = margin - head_points.min(axis=0)
    head_high = size - margin - head_points.max(axis=0)
    return np.clip(position, head_low, head_high)


class _Workspace(threading.local):
    """Scratch arrays reused from one image to the next, one set per thread.

    Arrays above malloc's mmap threshold (~128 kB) are returned to the system when freed, and faulting their
    pages in again cost as much as all the arithmetic on them.
    """

    def get(self, size: int) -> dict[str, np.ndarray]:
        if getattr(self, "size", None) != size:
            s = _SUPERSAMPLE
            self.size = size
            self.arrays = {"shifts": np.empty((size * s, size * s), dtype=np.uint8),
                           "codes": np.empty((size * s, size * s), dtype=np.uint32),
                           "rows": np.empty((size, size * s), dtype=np.uint32),
                           "image": np.empty((3, size, size), dtype=np.float32),
                           "noise": np.empty((3, size, size), dtype=np.float32)}
        return self.arrays


_workspace = _Workspace()


def _coverage_counts(shapes: list, size: int) -> np.ndarray:
    """Per final pixel, how many of its ``_SUPERSAMPLE**2`` sub-pixels show each label: ``(7, size, size)``."""
    s = _SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), _BG)
    draw = ImageDraw.Draw(canvas)
    for label, points in shapes:
        # Final pixel i covers [i, i + 1); its sub-pixel centres sit at (i * s + k + 0.5) / s.
        draw.polygon((points * s - 0.5).ravel().tolist(), fill=label)
    work = _workspace.get(size)
    # Each label adds 1 << (5 * (label - 1)) to a 32-bit code (the background 0), so one integer sum over a
    # block of sub-pixels counts all six labels at once: a 4x4 block holds at most 16 < 32 of each. Shifting
    # is several times faster than a table look-up.
    shifts = np.multiply(np.asarray(canvas), np.uint8(5), out=work["shifts"])
    codes = np.left_shift(np.uint32(1), shifts, out=work["codes"], dtype=np.uint32)
    codes >>= np.uint32(5)
    codes = codes.reshape(size, s, size * s)
    # Summing slice by slice is several times faster than ``sum(axis=(1, 3))`` on the strided view.
    rows = np.add(codes[:, 0], codes[:, 1], out=work["rows"])
    for k in range(2, s):
        rows += codes[:, k]
    rows = rows.reshape(size, size, s)
    summed = rows[..., 0] + rows[..., 1]
    for k in range(2, s):
        summed += rows[..., k]
    counts = np.empty((7, size, size), dtype=np.uint8)
    for label in range(1, 7):
        counts[label] = (summed >> np.uint32(5 * (label - 1))) & np.uint32(31)
    counts[_BG] = s * s - counts[1:].sum(axis=0, dtype=np.uint8)
    return counts


def _visible_masks(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Pixels at least half covered by a part; a tie goes to the part drawn on top."""
    half = _SUPERSAMPLE ** 2
    taken = np.zeros(counts.shape[1:], dtype=bool)
    masks = {}
    for part in ("centre", "petals", "leaves", "stem"):
        total = sum(counts[label].astype(np.int32) for label in _SUBPART_OF_PART[part])
        mask = (2 * total >= half) & ~taken
        taken |= mask
        masks[part] = mask
    return masks


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + hue / 60.0) % 6
    return value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


@functools.lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    xs.flags.writeable = ys.flags.writeable = False
    return xs, ys


def _paint(rng: np.random.Generator, counts: np.ndarray, head: dict, size: int, *, petal_rgb: np.ndarray,
           centre_rgb: np.ndarray, stem_rgb: np.ndarray, leaf_rgb: np.ndarray) -> np.ndarray:
    """Blend the parts' colours by coverage over a background, then light and add noise."""
    def coverage(label):
        return counts[label].astype(np.float32) * np.float32(1 / _SUPERSAMPLE ** 2)

    xs, ys = _pixel_grid(size)
    work = _workspace.get(size)
    image = work["image"]

    # Background: a gradient between two dark or muted colours (saturation <= 0.28, so never a class
    # colour), with a few soft waves so that it is not a plain ramp.
    colours = [_hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.28), rng.uniform(25, 150)) for _ in range(2)]
    ramp = _unit_ramp(xs, ys, rng.uniform(0, 2 * np.pi), size)
    waves = np.zeros((size, size), dtype=np.float32)
    for _ in range(3):
        fx, fy = rng.uniform(-3, 3, size=2) * 2 * np.pi / size
        waves += np.sin(np.float32(fx) * xs + np.float32(fy) * ys + np.float32(rng.uniform(0, 2 * np.pi)))
    waves *= np.float32(rng.uniform(2, 7))
    background_coverage = coverage(_BG)
    for c in range(3):
        np.multiply(np.float32(colours[0][c]) + np.float32(colours[1][c] - colours[0][c]) * ramp + waves,
                    background_coverage, out=image[c])

    # Shading that keeps the hue: petals darken towards their base and towards their edges (in the head's
    # own, unsqueezed frame), so that neighbouring petals stay apart; the disc is domed; leaves are lighter on
    # one side of the midrib.
    dx = xs - np.float32(head["centre"][0])
    dy = ys - np.float32(head["centre"][1])
    distance = np.hypot(dx, dy)
    unsqueeze = np.linalg.inv(head["map"]).astype(np.float32)
    angle = np.arctan2(unsqueeze[1, 0] * dx + unsqueeze[1, 1] * dy, unsqueeze[0, 0] * dx + unsqueeze[0, 1] * dy)
    edge = np.abs(np.cos(np.float32(head["n_petals"] / 2) * (angle - np.float32(head["start"]))))
    petal_shade = (0.8 + 0.2 * np.minimum(distance / np.float32(head["radius"]), 1)) * (0.8 + 0.2 * np.sqrt(edge))
    centre_shade = 1.06 - 0.18 * np.minimum(distance / np.float32(head["centre_radius"]), 1) ** 2

    layers = [(stem_rgb, 0.92 * coverage(_STEM)),
              (leaf_rgb, coverage(_LEAF_A) + 0.82 * coverage(_LEAF_B)),
              (petal_rgb, petal_shade * (coverage(_PETAL_EVEN) + 0.93 * coverage(_PETAL_ODD))),
              (centre_rgb, centre_shade * coverage(_CENTRE))]
    for rgb, weight in layers:
        for c in range(3):
            image[c] += np.float32(rgb[c]) * weight

    # Lighting: a smooth multiplicative ramp from `low` to `high` (within 0.75..1.15) across the frame; then
    # a little uniform pixel noise of standard deviation 1.5 to 4.
    low = rng.uniform(0.75, 0.95)
    high = rng.uniform(0.95, 1.15)
    image *= np.float32(low) + np.float32(high - low) * _unit_ramp(xs, ys, rng.uniform(0, 2 * np.pi), size)
    noise = rng.random(out=work["noise"], dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(rng.uniform(1.5, 4.0) * np.sqrt(12))
    image += noise
    np.rint(image, out=image)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def _outer(rgb: np.ndarray, field: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32)[:, None, None] * field


def _unit_ramp(xs: np.ndarray, ys: np.ndarray, angle: float, size: int) -> np.ndarray:
    """A linear ramp along ``angle``, 0 at one corner of the frame and 1 at the opposite one."""
    c, s = np.cos(angle), np.sin(angle)
    reach = size / 2 * (abs(c) + abs(s))
    return (np.float32(c / reach / 2) * xs + np.float32(s / reach / 2) * ys
            + np.float32(0.5 - size / 2 * (c + s) / reach / 2))
