"""The reproduction's verdicts: each claim of the paper measured on every independently trained network.

A claim is measured once per network seed (:data:`vefi.book.train.NETWORK_SEEDS`). Its rule is fixed before
the numbers are seen, and is as strict as the paper's sentence: an ordering claim ("ours higher than both
baselines", "selected hurts more than random") holds on a network when the paper's direction holds beyond
the uncertainty of that network's measurement (a paired 95% bootstrap interval over the images that excludes
zero, or a percentile of a random distribution); the verdict then says on how many networks it holds:
"holds on 3 of 3" is *reproduced*, anything less is *not robust* (some) or *not reproduced* (none).

Also here, the two claims the chapters do not measure on their own: MNIST features that support gaps
(Fig. 6, :func:`gap_support`) and the class purity of a feature's top images on an8Flower (Fig. 5,
:func:`interpretation_purity`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from vefi.ablation import random_like
from vefi.backproject import backproject, heatmap
from vefi.book.config import quick_mode
from vefi.book.data import load_dataset
from vefi.book.relevant import relevant_features
from vefi.book.train import pretrained
from vefi.explain import Explanation, background_ratio, explain
from vefi.interpret import average_images
from vefi.saliency import sensitivity

__all__ = ["Claim", "GAP_PAIRS", "ablation_claims", "agreement", "bootstrap_mean", "change_in_words", "claims_table",
           "gap_support", "interpretation_purity", "interval", "listed", "markdown_table", "network_seeds",
           "paired_bootstrap", "spread", "text_table"]

#: The paper's examples of features that support gaps (Fig. 6): "for class 2 how it speaks against 0 and for 6
#: how it goes against 4".
GAP_PAIRS = ((2, 0), (6, 4))


def bootstrap_mean(values, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``values`` with a 95% percentile-bootstrap interval: ``(mean, low, high)``.

    Examples
    --------
    >>> mean, low, high = bootstrap_mean(np.ones(10))
    >>> (mean, low, high)
    (1.0, 1.0, 1.0)
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("no values to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (int(n_boot), values.size))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (images) with its 95% bootstrap interval: ``(mean, low, high)``."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired values must match: {a.shape} against {b.shape}")
    return bootstrap_mean(a - b, n_boot, seed)


def agreement(holds) -> str:
    """The verdict over networks: ``"reproduced: holds on 3 of 3"``, ``"not robust: holds on 2 of 3"`` or
    ``"not reproduced: holds on 0 of 3"``.

    Examples
    --------
    >>> agreement([True, True, True]), agreement([True, False, True]), agreement([False] * 3)
    ('reproduced: holds on 3 of 3', 'not robust: holds on 2 of 3', 'not reproduced: holds on 0 of 3')
    """
    holds = [bool(h) for h in holds]
    if not holds:
        raise ValueError("no networks measured")
    k, n = sum(holds), len(holds)
    word = "reproduced" if k == n else ("not robust" if k else "not reproduced")
    return f"{word}: holds on {k} of {n}"


@dataclass
class Claim:
    """One claim of the paper, measured on each network.

    Attributes
    ----------
    section, text, rule, paper : str
        Where the paper makes it, what it says, the rule that decides it on one network (stated before the
        numbers), and the paper's own number or direction.
    values : list of str
        What each network measured, as shown.
    holds : list of bool
        Whether the rule holds, per network. Empty when the claim cannot be compared (``why`` says why).
    why : str
    """

    section: str
    text: str
    rule: str
    paper: str
    values: list = field(default_factory=list)
    holds: list = field(default_factory=list)
    why: str = ""

    def add(self, value: str, holds: bool) -> None:
        self.values.append(value)
        self.holds.append(bool(holds))

    @property
    def verdict(self) -> str:
        return agreement(self.holds) if self.holds else "not comparable"

    @property
    def reproduced(self) -> bool:
        return bool(self.holds) and all(self.holds)


def interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """A value with its interval, signed: ``"+0.012 [+0.004, +0.020]"``.

    Examples
    --------
    >>> interval(-0.0123, -0.02, -0.004)
    '-0.012 [-0.020, -0.004]'
    """
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def spread(values, digits: int = 0) -> str:
    """The mean of a measurement over the networks, with their range when there are several.

    Examples
    --------
    >>> spread([0.991, 0.992, 0.994], 3)
    '0.992 (0.991-0.994)'
    >>> spread([34])
    '34'
    """
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.{digits}f}" + (f" ({v.min():.{digits}f}-{v.max():.{digits}f})" if len(v) > 1 else "")


def listed(items) -> str:
    """Items in words, for a sentence.

    Examples
    --------
    >>> listed(["a"]), listed([1, 2]), listed("abc")
    ('a', '1 and 2', 'a, b and c')
    """
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def text_table(rows: Sequence[dict], digits: int = 3) -> str:
    """Rows (dicts with the same keys) as an aligned text table, floats with ``digits`` decimals.

    Examples
    --------
    >>> print(text_table([{"unit": "conv1 #3", "IoU": 0.25}, {"unit": "fc1 #10", "IoU": 0.5}]))
        unit    IoU
    conv1 #3  0.250
     fc1 #10  0.500
    """
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in r.values()] for r in rows]
    heads = list(rows[0])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [heads, *cells])


def change_in_words(ratio: float) -> str:
    """What multiplying a count by ``ratio`` does, for a sentence: within 10% it "leaves it about the same".

    Examples
    --------
    >>> change_in_words(1.05), change_in_words(0.7)
    ('leaves it about the same', 'multiplies it by 0.70')
    """
    return "leaves it about the same" if abs(np.log(ratio)) < np.log(1.1) else f"multiplies it by {ratio:.2f}"


def ablation_claims(label: str, results: Sequence, paper_counts: str) -> list[Claim]:
    """Claims 1-3 of Sec. 4.1 (chapter 10) on the networks of ``results``, one
    :func:`vefi.book.studies.ablation_study` result per network, under the rules chapter 10 states first:

    1. few features are relevant: both selections keep fewer than 10% of their candidates;
    2. ablating the selected features hurts more than random ones of the same layers, for All and for OnlyConv
       separately: at most 5% of the random draws leave an accuracy as low;
    3. All hurts more than OnlyConv: the paired 95% bootstrap interval over the test images of (accuracy with
       All ablated) minus (with OnlyConv ablated) lies below zero.

    ``label`` names the network in the claims' text; ``paper_counts`` is the paper's count shown beside ours.
    """
    if not results:
        raise ValueError("no networks measured")
    few = Claim("4.1", f"{label}: few features selected at mu={results[0].mu:g} (All / OnlyConv)",
                "fewer than 10% of candidates", paper_counts)
    for r in results:
        few.add(f"{r.n_all} of {r.candidates_all} / {r.n_onlyconv} of {r.candidates_onlyconv}",
                r.n_all < 0.1 * r.candidates_all and r.n_onlyconv < 0.1 * r.candidates_onlyconv)
    claims = [few]
    for part in ("All", "OnlyConv"):
        c = Claim("4.1", f"{label}: ablating the selected ({part}) hurts more than random",
                  "at most 5% of the random draws as low", "selected < random (Fig. 4, bars)")
        for r in results:
            value, draws = (r.all, r.random_all) if part == "All" else (r.onlyconv, r.random_onlyconv)
            share = r.random_share_below(part.lower())
            c.add(f"{value:.3f} vs random {np.median(draws):.3f} (median of {len(draws)}; {share:.0%} as low)",
                  share <= 0.05)
        claims.append(c)
    c = Claim("4.1", f"{label}: All hurts more than OnlyConv", "paired 95% interval of All - OnlyConv below 0",
              "All < OnlyConv (Fig. 4)")
    for r in results:
        diff = r.bootstrap_difference(1, 2)
        # a difference of exactly 0 has a reason worth saying: All kept no feature outside the convolutional part
        counts_all, counts_conv = ({k: v for k, v in d.items() if v} for d in (r.counts_all, r.counts_onlyconv))
        same = counts_all == counts_conv and np.array_equal(r.predicted[1], r.predicted[2])
        c.add(f"{r.all:.3f} vs {r.onlyconv:.3f}: {interval(*diff)}"
              + (" (All selected OnlyConv's features per layer, none fully connected: the same ablation)"
                 if same else ""), diff[2] < 0)
    claims.append(c)
    return claims


def _gap_ratio(images: torch.Tensor, maps: torch.Tensor) -> np.ndarray:
    """Per image, the largest background ratio among its maps (:func:`vefi.explain.background_ratio`)."""
    n = images.shape[0]
    stub = Explanation(images, torch.zeros(n), torch.zeros(n), [[None] * maps.shape[1]] * n,
                       [[0.0] * maps.shape[1]] * n, maps, maps.amax(1))
    return background_ratio(stub, threshold=0.1, margin=2).amax(1).numpy()


def gap_support(network: int = 0, *, n_per_class: int | None = None, k: int = 3, seed: int = 0) -> dict:
    """Do the relevant features of MNIST speak for empty space (Fig. 6), more than chance would?

    For the test images of each class of :data:`GAP_PAIRS` (the first ``n_per_class`` of each: 100, or 25 in
    quick mode), three sets
    of ``k`` maps, each map min-max normalised: the explanation's (the top-``k`` relevant features of the
    class, back-projected with guided backprop and the stride fix); as many random features of the same
    layers, back-projected the same way (:func:`vefi.ablation.random_like`); and the plain gradient map of
    the class (one map). How much an image's maps speak for empty space is the largest *background ratio*
    among them (:func:`vefi.explain.background_ratio`: a map's mean over background pixels, those more than 2
    pixels from any stroke, over its mean on the strokes; 1 means as bright on empty space as on ink).

    Returns
    -------
    dict
        ``"selected"``, ``"random"``, ``"gradient"``: the largest background ratio of each image's maps
        (arrays over the same images: paired); ``"labels"``; ``"n"``.
    """
    if n_per_class is None:
        n_per_class = 25 if quick_mode() else 100
    model = pretrained("mnist", network)
    relevant = relevant_features("mnist", network=network)
    data = load_dataset("mnist", "test")
    rows = np.concatenate([np.flatnonzero(data.labels.numpy() == c)[:n_per_class] for c, _ in GAP_PAIRS])
    images = data.batch(torch.from_numpy(rows))
    labels = data.labels[rows]
    explanation = explain(model, images, relevant, target=labels, k=k)
    k = explanation.maps.shape[1]
    # for each image, as many random features of the same layers as its explanation has (at least one)
    random_rows = []
    for i, row in enumerate(explanation.features):
        drawn = random_like(row or relevant.features[:1], relevant.index, seed * 100_003 + i)
        pairs = [(f.layer_number, f.channel) for f in drawn]
        random_rows.append(pairs + pairs[:1] * (k - len(pairs)))
    random_maps = heatmap(backproject(model, images, random_rows, rule="guided", stride_fix=True,
                                      source="map")).float().cpu()
    for i, row in enumerate(explanation.features):  # as many maps as the explanation has, the rest zero
        random_maps[i, max(len(row), 1):] = 0
    grad = sensitivity(model, images, labels).flatten(1)
    low, high = grad.amin(1, keepdim=True), grad.amax(1, keepdim=True)
    grad = ((grad - low) / (high - low).clamp_min(1e-30)).view(-1, 1, *images.shape[-2:])
    out = {"labels": labels.numpy(), "n": len(rows)}
    for name, maps in (("selected", explanation.maps), ("random", random_maps), ("gradient", grad)):
        out[name] = _gap_ratio(images, maps).astype(np.float64)
    return out


def interpretation_purity(name: str, network: int = 0, *, per_class: int = 3, top: int = 100) -> dict:
    """How many of a relevant feature's top images come from the class it was selected for (Fig. 5)?

    For each class, its ``per_class`` strongest relevant features (by weight); for each, the ``top`` test
    images by response (:func:`vefi.interpret.average_images`); its *purity* is the fraction of those from
    the feature's class. Chance is the class's share of the test set (1 / C on a balanced set).

    Returns
    -------
    dict
        ``"purity"`` (one per feature), ``"chance"`` (the same features' chance levels), ``"classes"``,
        ``"features"``.
    """
    model = pretrained(name, network)
    relevant = relevant_features(name, network=network)
    data = load_dataset(name, "test")
    labels = data.labels.numpy()
    share = np.bincount(labels, minlength=len(data.classes)) / len(labels)
    features, classes = [], []
    for c, feats in relevant.per_class.items():
        for f in feats[:per_class]:
            features.append(f)
            classes.append(c)
    if not features:
        raise ValueError(f"no relevant features for {name!r} (network {network})")
    top = min(int(top), len(data))
    averages = average_images(model, data, features, top=top, show_progress=False)
    purity = np.array([float(np.mean(labels[a.indices] == c)) for a, c in zip(averages, classes)])
    return {"purity": purity, "chance": share[np.array(classes)], "classes": np.array(classes),
            "features": features}


def network_seeds() -> tuple[int, ...]:
    """The networks every claim is measured on: :data:`vefi.book.train.NETWORK_SEEDS` in full mode; in quick
    mode (what the tests run, to check that the page executes) the first one only."""
    from vefi.book.train import NETWORK_SEEDS

    return NETWORK_SEEDS[:1] if quick_mode() else NETWORK_SEEDS


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table (the book renders it as an HTML table); ``|`` and newlines in cells are escaped.

    Examples
    --------
    >>> print(markdown_table(["a", "b"], [[1, "x|y"]]))
    | a | b |
    |---|---|
    | 1 | x\\|y |
    """
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"a row has {len(row)} cells and the header {len(header)}: {row!r}")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def claims_table(claims: list[Claim]) -> str:
    """The claims as a Markdown table: section, claim, rule, paper, what each network measured, verdict."""
    rows = [(c.section, c.text, c.rule, c.paper, "; ".join(f"#{i}: {v}" for i, v in enumerate(c.values)),
             c.verdict + (f" ({c.why})" if c.why else "")) for c in claims]
    return markdown_table(["section", "claim", "rule (fixed before the numbers)", "paper", "ours, per network",
                           "verdict"], rows)
