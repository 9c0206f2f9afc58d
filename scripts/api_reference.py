"""Write the book's API reference page (book/api.md) from the package's docstrings.

Usage: python scripts/api_reference.py [OUT]   (default: book/api.md; `make book` and `make quickbook` run it)

Every public name (each module's ``__all__``) gets its signature and the first paragraph of its docstring,
with Sphinx roles (``:func:`x` ``) turned into code. The page opens with the library's vocabulary.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The general library, in reading order; the book's part follows.
GENERAL = ["vefi", "vefi.layers", "vefi.targets", "vefi.descriptors", "vefi.lasso", "vefi.selection",
           "vefi.statistics", "vefi.relevant", "vefi.backproject", "vefi.explain", "vefi.interpret",
           "vefi.receptive", "vefi.heatmaps", "vefi.saliency", "vefi.occlusion", "vefi.perturbation", "vefi.cam",
           "vefi.lrp", "vefi.actmax", "vefi.dissection", "vefi.ablation", "vefi.localisation", "vefi.boxocclusion",
           "vefi.criteria", "vefi.sanity", "vefi.gridness", "vefi.plotting"]
BOOK = ["vefi.book.config", "vefi.book.data", "vefi.book.an8flower", "vefi.book.models", "vefi.book.train", "vefi.book.relevant",
        "vefi.book.studies", "vefi.book.reproduction", "vefi.book.explorer", "vefi.book.cli"]

VOCABULARY = """\
## The vocabulary

Every function of the library uses these words in one sense:

- **model**: any `torch.nn.Module` whose forward takes a batch of images and returns class scores (logits).
  Every function leaves it exactly as it came (hooks removed, `training` and `requires_grad` restored), also
  when it raises.
- **images**: a float tensor (n, C, H, W) (or one image (C, H, W)), finite; moved to the model's device and
  dtype where the model is run.
- **target**: which class to explain or measure, in the same position (`target=`) everywhere: None (each
  image's predicted class), an int (that class for every image), or a sequence, array or integer tensor of one
  class per image; a class is an output unit of the model. `vefi.targets.resolve_target` is the one
  conversion.
- **layer**: one *call* of a module in the forward pass: a module name (`"features.3"`), with `":k"` for the
  k-th call of a module called several times (`"layer1.0.relu:2"`, the ReLU after a ResNet block's
  addition); the name of a block, whose output is a layer too (`"layer4"`); a module called once; or an entry
  of `vefi.layers.layer_table` (a `Layer`, which also knows its number in the forward pass, its type, its
  shapes and which call it is); a number is accepted as the table's numbering.
- **feature**: a `vefi.Feature`, a layer and a channel (with the layer's number, name and type): what the
  selection returns and what back-projection, ablation and average images take; `(layer, channel)` pairs
  are accepted wherever a feature is.
- **heatmap**: an (n, H, W) tensor, one map per image at the image's resolution; the methods return raw maps,
  and `vefi.heatmaps.normalise` is the one min-max normalisation (a constant map becomes zero).
- **data**: an image tensor with `labels=`, a `Dataset` of `(image, label)` items, a `DataLoader`, or any
  iterable of `(images, labels)` batches; streamed batch by batch.
- **batch_size**: the inputs the network sees in one forward (or backward) pass: images, or the copies a
  method makes of them (occluded or perturbed images; one row per image and feature, or image and layer, in
  back-projection), so that it bounds memory whatever the method. A DataLoader keeps its own batches; where
  no network runs (`ArrayStream`, `GramAccumulator.from_data`) it counts descriptor rows, one per image.
  Calling a method on many images a chunk at a time is `images_per_call`
  (`vefi.localisation.method_heatmaps`).
- **show_progress**: progress bars, on by default; `VEFI_PROGRESS=off` turns every one off.
"""


def _clean(text: str) -> str:
    text = re.sub(r":(?:func|class|meth|mod|data|attr|exc|obj):`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r":math:`([^`]+)`", r"$\1$", text)  # the page's Markdown typesets $...$ (dollarmath)
    return text.replace("``", "`")


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    first = doc.split("\n\n")[0].strip()
    return _clean(" ".join(first.split())) if first else "(no docstring)"


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return f"{name}{sig}"


def module_section(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    names = list(getattr(module, "__all__", []))
    lines = [f"### `{module_name}`", "", _summary(module), ""]
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            kind = "class" if inspect.isclass(obj) else "function"
            lines += [f"`{_signature(name, obj)}`", f": *{kind}.* {_summary(obj)}", ""]
        else:
            lines += [f"`{name}`", f": *constant.* `{_clean(repr(obj))[:160]}`", ""]
    return lines


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings of the package by `scripts/api_reference.py` at every build: every "
             "public name of every module (its `__all__`), with its signature and the first paragraph of its "
             "docstring. `help(name)` in Python gives the whole docstring.", "", VOCABULARY,
             "## The general library", "",
             "Takes any model and data; it knows nothing of the book's datasets, networks or caches.", ""]
    for name in GENERAL:
        lines += module_section(name)
    lines += ["## The book's part", "",
              "The book's datasets, networks, cached studies, explorer and command line, built on the library's "
              "public API.", ""]
    for name in BOOK:
        lines += module_section(name)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "book" / "api.md"
    text = render()
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
        print(f"wrote {out}")
