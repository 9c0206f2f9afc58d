"""Figures shared by the chapters: image grids, masks, confusion matrices, layer tables, and explorers of
precomputed figures that work in a static HTML page.

Every function returns the matplotlib figure it drew, so a notebook can caption it (myst-nb ``glue``);
:func:`offline_explorer` returns an :class:`OfflineExplorer`, whose HTML needs no kernel and no network.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure

from vefi._progress import progress
from vefi.layers import Layer

__all__ = ["to_display", "image_grid", "masks_figure", "confusion_figure", "format_layer_table",
           "LAYER_COLOURS", "METHOD_COLOURS", "offline_explorer", "OfflineExplorer"]

#: The paper colours heatmaps of convolutional features green and fully connected ones pink.
LAYER_COLOURS = {"conv": "#2ca02c", "fc": "#e377c2"}

#: One colour per method of :data:`vefi.heatmaps.METHODS`, the same in every figure that compares methods; the
#: paper's method is the only red.
METHOD_COLOURS = {"ours": "#c44e52", "deconv-gb": "#ff7f0e", "upsampled-activations": "#8c564b",
                  "gradient": "#1f77b4", "gradient-x-input": "#17becf", "lrp-epsilon": "#9467bd",
                  "lrp-zplus": "#393b79", "lrp-alpha1beta0": "#637939", "lrp-alpha2beta1": "#e7ba52",
                  "lrp-composite": "#bcbd22", "occlusion": "#e377c2", "grad-cam": "#2ca02c",
                  "meaningful-perturbation": "#7b4173", "random": "#7f7f7f"}


def to_display(image) -> np.ndarray:
    """An image as matplotlib wants it: (H, W) for one channel, (H, W, 3) for colour; floats in [0, 1]."""
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.dtype == np.uint8:
        array = array / 255.0
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return np.clip(array, 0.0, 1.0)


def image_grid(images: Sequence, titles: Sequence[str] | None = None, *, ncols: int = 10,
               size: float = 1.2, cmap: str = "gray"):
    """A grid of images with optional titles."""
    n = len(images)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows * 1.15), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_display(images[i]), cmap=cmap, vmin=0, vmax=1)
            if titles is not None:
                ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def masks_figure(images, masks, parts, part_names: Sequence[str], titles: Sequence[str]):
    """One row per image: the image, its discriminative-part mask, and every part in its own colour."""
    part_colours = np.array([(0.95, 0.55, 0.75), (0.95, 0.85, 0.1), (0.2, 0.6, 0.2), (0.5, 0.85, 0.4),
                             (0.6, 0.6, 0.9), (0.9, 0.6, 0.3)])[: len(part_names)]
    n = len(images)
    fig, axes = plt.subplots(n, 3, figsize=(6.3, 2.1 * n), squeeze=False)
    for i in range(n):
        image = to_display(images[i])
        mask = np.asarray(masks[i], dtype=bool)
        overlay = image * 0.35
        overlay[mask] = image[mask]
        labels = np.zeros(mask.shape + (3,))
        for p, colour in enumerate(part_colours):
            labels[np.asarray(parts[i][p], dtype=bool)] = colour
        for ax, shown, title in zip(axes[i], (image, overlay, labels),
                                    (titles[i], "discriminative part", "parts")):
            ax.imshow(shown)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in part_colours]
    fig.legend(handles, part_names, loc="lower center", ncol=len(part_names), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def confusion_figure(confusions: dict[str, np.ndarray], classes: dict[str, Sequence[str]], *, ncols: int = 2,
                     size: float = 4.6):
    """Row-normalised confusion matrices (rows: true class, columns: predicted), ``ncols`` to a row, with one
    shared colour bar from 0 to 1: the share of a true class's images given each predicted class."""
    n = len(confusions)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols + 1.2, (size + 0.4) * nrows), squeeze=False,
                             layout="constrained")
    shown = None
    for ax, (name, confusion) in zip(axes.flat, confusions.items()):
        rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
        shown = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        ticks = np.arange(len(classes[name]))
        ax.set_xticks(ticks, classes[name], rotation=90, fontsize=8)
        ax.set_yticks(ticks, classes[name], fontsize=8)
        ax.set_xlabel("predicted class", fontsize=9)
        ax.set_ylabel("true class", fontsize=9)
        ax.set_title(name, fontsize=10)
    for ax in axes.flat[n:]:
        ax.axis("off")
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes, shrink=0.6, label="share of the true class's images")
        bar.ax.tick_params(labelsize=8)
    return fig


def format_layer_table(layers: Sequence[Layer]) -> str:
    """The layer numbering as a text table: number, type, name, output shape, parameters, and the blocks each
    layer's output is also the output of (when there are any). A later call of a module shows its parameters
    as "shared" (they are the first call's)."""
    aliases = any(layer.aliases for layer in layers)
    rows = [("#", "type", "name", "output", "params") + (("also the output of",) if aliases else ())]
    for layer in layers:
        params = sum(p.numel() for p in layer.module.parameters(recurse=False))
        rows.append((str(layer.number), layer.kind, layer.name, "x".join(map(str, layer.output_shape)),
                     f"{params:,}" if layer.call == 1 else "shared")
                    + ((", ".join(layer.aliases),) if aliases else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i in (0, 4) else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


#: Above this many states :func:`offline_explorer` shows a progress bar.
_PROGRESS_FROM = 20


def _label(value) -> str:
    """How a control shows a value: floats without trailing zeros (10.0 as "10"), anything else as str."""
    return format(value, "g") if isinstance(value, float) else str(value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


class OfflineExplorer:
    """Every state of a figure, rendered once, behind controls that work in a static HTML page.

    Made by :func:`offline_explorer`. In a notebook or a built page it shows as HTML (``_repr_html_``): one
    control per name (a range slider for numbers, a drop-down list otherwise) and the PNG of the chosen state,
    swapped by a small inline script. Nothing is loaded from anywhere: the PNGs are in the page.

    Attributes
    ----------
    controls : dict of str to list
        The values of each control, in order.
    initial : dict
        The state shown first.
    nbytes : int
        The size of all PNGs together (the page carries them base64-encoded, a third more).
    seconds : float
        How long rendering every state took.
    """

    def __init__(self, controls: dict, pngs: list[bytes], initial: dict, alt: str, seconds: float = 0.0):
        self.controls = {name: list(values) for name, values in controls.items()}
        self._pngs = list(pngs)
        self.initial = dict(initial)
        self.alt = alt
        self.seconds = float(seconds)
        self.nbytes = sum(len(png) for png in self._pngs)

    def __len__(self) -> int:
        return len(self._pngs)

    def __repr__(self) -> str:
        shape = " x ".join(f"{len(v)} {name}" for name, v in self.controls.items())
        return f"OfflineExplorer({len(self)} states: {shape}; {self.nbytes / 1e6:.2f} MB of PNG)"

    def _index(self, state: Mapping) -> int:
        unknown = sorted(set(state) - set(self.controls))
        if unknown:
            raise ValueError(f"unknown controls {unknown}; the controls are {list(self.controls)}")
        index = 0
        for name, values in self.controls.items():
            value = state.get(name, self.initial[name])
            if value not in values:
                raise ValueError(f"{value!r} is not a value of control {name!r}: {values}")
            index = index * len(values) + values.index(value)
        return index

    def png(self, **state) -> bytes:
        """The PNG of one state (controls not named keep their initial value)."""
        return self._pngs[self._index(state)]

    def _repr_html_(self) -> str:
        # a fresh id at every rendering: two explorers, or one shown twice, never share an element id
        uid = f"vefi-explorer-{uuid.uuid4().hex[:12]}"
        rows = []
        for i, (name, values) in enumerate(self.controls.items()):
            labels = [_label(v) for v in values]
            chosen = values.index(self.initial[name])
            control_id = f"{uid}-c{i}"
            label = f'<label for="{control_id}" style="margin-right:0.4em">{html.escape(str(name))}</label>'
            if all(_is_number(v) for v in values) and len(values) > 1:
                widget = (f'<input type="range" id="{control_id}" min="0" max="{len(values) - 1}" step="1" '
                          f'value="{chosen}" style="vertical-align:middle">'
                          f'<output id="{control_id}-value" for="{control_id}" style="margin-left:0.4em;'
                          f'min-width:2.5em;display:inline-block">{html.escape(labels[chosen])}</output>')
            else:
                options = "".join(f'<option value="{j}"{" selected" if j == chosen else ""}>'
                                  f'{html.escape(text)}</option>' for j, text in enumerate(labels))
                widget = f'<select id="{control_id}">{options}</select>'
            rows.append(f'<span style="white-space:nowrap">{label}{widget}</span>')
        data = {"names": [str(n) for n in self.controls], "labels": [[_label(v) for v in vs] for vs in
                                                                     self.controls.values()],
                "alt": self.alt, "images": [base64.b64encode(png).decode("ascii") for png in self._pngs]}
        # "<" escaped: no label can close the script element
        payload = json.dumps(data).replace("<", "\\u003c")
        first = self._index({})
        state = ", ".join(f"{n}: {_label(self.initial[n])}" for n in self.controls)
        return (
            f'<div class="vefi-offline-explorer" id="{uid}">'
            f'<div style="display:flex;flex-wrap:wrap;gap:0.3em 1.5em;align-items:center;margin:0.3em 0">'
            f'{"".join(rows)}</div>'
            f'<img id="{uid}-img" src="data:image/png;base64,{data["images"][first]}" '
            f'alt="{html.escape(f"{self.alt} ({state})")}" style="max-width:100%;height:auto">'
            f'<script type="application/json" id="{uid}-states">{payload}</script>'
            f"<script>{_SCRIPT.replace('UID', uid)}</script></div>")


# Reads the states, then on every change of a control computes the state's index (row-major over the
# controls, as the PNGs were rendered) and swaps the image and its alt text.
_SCRIPT = """(function () {
  var data = JSON.parse(document.getElementById("UID-states").textContent);
  var img = document.getElementById("UID-img");
  var inputs = data.names.map(function (_, i) { return document.getElementById("UID-c" + i); });
  function show() {
    var index = 0, parts = [];
    inputs.forEach(function (input, i) {
      var j = Number(input.value), text = data.labels[i][j], out = document.getElementById("UID-c" + i + "-value");
      index = index * data.labels[i].length + j;
      parts.push(data.names[i] + ": " + text);
      if (out) { out.textContent = text; }
    });
    img.src = "data:image/png;base64," + data.images[index];
    img.alt = data.alt + " (" + parts.join(", ") + ")";
  }
  inputs.forEach(function (input) { input.addEventListener("input", show); input.addEventListener("change", show); });
})();"""


def offline_explorer(render: Callable[..., Figure], controls: Mapping[str, Sequence], *,
                     initial: Mapping | None = None, dpi: float | None = None, alt: str = "Figure of the chosen state",
                     max_states: int = 400, desc: str = "rendering states") -> OfflineExplorer:
    """An explorer of ``render``'s figures over every combination of the controls' values, precomputed.

    ``render(**state)`` draws one state (a dict of one value per control) as a matplotlib Figure. Every
    combination is rendered once, saved as PNG and closed; the result shows in a notebook or a static HTML
    page as controls (a range slider for numbers, a drop-down list otherwise) and the chosen state's image,
    swapped by an inline script. It needs neither a kernel nor the network: the page carries every PNG, so
    keep the grid and the ``dpi`` small (:attr:`OfflineExplorer.nbytes` says how much it weighs).

    Parameters
    ----------
    render : callable
        Called as ``render(**state)``; returns a :class:`matplotlib.figure.Figure`.
    controls : mapping of str to sequence
        Each control's name and its values, in order; a value's label is ``str(value)`` (floats as ``%g``).
    initial : mapping, optional
        The state shown first; default the first value of every control.
    dpi : float, optional
        Resolution of the PNGs; default matplotlib's ``figure.dpi``, the resolution of the page's other
        figures (a lower one shrinks the text with the image).
    alt : str
        Alt text of the image; the chosen state is appended to it.
    max_states : int
        At most this many combinations.
    desc : str
        The progress bar's label (shown when there are many states).

    Returns
    -------
    OfflineExplorer

    Raises
    ------
    ValueError
        No control, a control with no value or with two values of the same label, an initial value that is
        not one of its control's, or more than ``max_states`` combinations.
    RuntimeError
        ``render`` failed, or returned no Figure, for some state (named in the message): a state that cannot
        be drawn fails the build, it is never shown blank.

    Examples
    --------
    >>> def render(n, colour):
    ...     fig, ax = plt.subplots(figsize=(1, 1))
    ...     ax.plot(range(n), color=colour)
    ...     return fig
    >>> ex = offline_explorer(render, {"n": [2, 3, 4], "colour": ["red", "blue"]}, dpi=20)
    >>> len(ex), ex.initial
    (6, {'n': 2, 'colour': 'red'})
    >>> ex.png(n=3, colour="blue")[:4]
    b'\\x89PNG'
    >>> "https://" in ex._repr_html_(), '<option value="1">blue</option>' in ex._repr_html_()
    (False, True)
    """
    controls = {str(name): list(values) for name, values in controls.items()}
    if not controls:
        raise ValueError("no control: give at least one name with its values")
    for name, values in controls.items():
        if not values:
            raise ValueError(f"control {name!r} has no value")
        labels = [_label(v) for v in values]
        if len(set(labels)) < len(labels):
            raise ValueError(f"control {name!r} has values with the same label: {labels}")
    n = math.prod(len(v) for v in controls.values())
    if n > max_states:
        shape = " x ".join(f"{len(v)} {name}" for name, v in controls.items())
        raise ValueError(f"{n} states ({shape}) are more than max_states={max_states}: use fewer values "
                         f"(every state is one PNG in the page)")
    initial = dict(initial or {})
    unknown = sorted(set(initial) - set(controls))
    if unknown:
        raise ValueError(f"initial names unknown controls {unknown}; the controls are {list(controls)}")
    for name, values in controls.items():
        initial.setdefault(name, values[0])
        if initial[name] not in values:
            raise ValueError(f"initial value {initial[name]!r} is not a value of control {name!r}: {values}")

    start, pngs = time.perf_counter(), []
    for combination in progress(itertools.product(*controls.values()), total=n, desc=desc,
                                disable=n < _PROGRESS_FROM):
        state = dict(zip(controls, combination))
        opened, fig = set(plt.get_fignums()), None
        try:
            fig = render(**state)
            if not isinstance(fig, Figure):
                raise TypeError(f"render returned {type(fig).__name__}, not a matplotlib Figure")
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=plt.rcParams["figure.dpi"] if dpi is None else dpi,
                        bbox_inches="tight")
        except Exception as error:
            raise RuntimeError(f"rendering state {state} failed: {type(error).__name__}: {error}") from error
        finally:
            # every figure the render opened, also when it failed
            for number in set(plt.get_fignums()) - opened:
                plt.close(number)
            if isinstance(fig, Figure):
                plt.close(fig)
        pngs.append(buffer.getvalue())
    return OfflineExplorer(controls, pngs, initial, alt, time.perf_counter() - start)
