"""Deterministic training of the book's models, cached by what determines the result.

:func:`pretrained` is what chapters call: it returns the trained model for a dataset, training it once (with a
progress bar) and caching the weights under ``data/models``. The cache key is a hash of the training data, the
architecture, the hyper-parameters, the ``vefi`` version and the training code, so changing any of them
trains anew and nothing stale is ever loaded.

The repository ships the full-mode weights of every network the book uses (:data:`BOOK_NETWORKS`) in
``book/networks/`` (:data:`SHIPPED`), written by ``make networks`` (``python -m vefi.book.train ship``) with
this very code: a first ``make book`` then trains nothing, and every reader's book stands on the same
networks. The shipped file of a network is the cache file, under the same key-carrying name, so it is used
only when data, architecture, schedule and training code are still the ones it was trained with; otherwise
:func:`pretrained` says so and trains anew.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

import vefi
from vefi._model_state import preserved
from vefi._progress import progress
from vefi._tensors import all_finite
from vefi.book._cache import atomic_write, read_verified, sha256_file, write_verified
from vefi.book.config import data_dir, quick_mode
from vefi.book.data import ImageSet, dataset_info, load_dataset
from vefi.book.models import build_model
from vefi.layers import channel_window, local_response_norm

__all__ = ["HyperParams", "HYPERPARAMS", "ARCHITECTURE_HYPERPARAMS", "NETWORK_SEEDS", "BOOK_NETWORKS", "SHIPPED",
           "train", "pretrained", "predict", "evaluate", "recalibrate_batchnorm", "training_set", "ship_networks"]


@dataclass(frozen=True)
class HyperParams:
    """Training settings: Adam with a cosine learning-rate schedule, cross-entropy loss."""

    epochs: int
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    #: Train on the first ``per_class`` training images of each class (None: all of them).
    per_class: int | None = None


QUICK_EPOCHS = 3

#: Full-mode settings per dataset (quick mode trains three epochs on the quick subset).
HYPERPARAMS = {
    "mnist": HyperParams(epochs=5),
    "fashion-mnist": HyperParams(epochs=6),
    "an8flower-single": HyperParams(epochs=4, batch_size=64),
    "an8flower-double": HyperParams(epochs=4, batch_size=64),
}

#: Settings for the other architectures of :data:`vefi.book.models.ARCHITECTURES`, on any dataset they take.
#: The authors' kind of MNIST network (chapter 10) gets the schedule of the book's MNIST net, so that the two
#: differ in architecture only (not MatConvNet's 20 epochs of plain SGD). The torchvision classifier (chapter
#: 15) gets a cheaper schedule, on 500 training images per class, so that the chapter trains its network in
#: about a minute on 2 CPU cores. Quick mode: three epochs on the quick subset.
ARCHITECTURE_HYPERPARAMS = {
    "matconvnet-mnist": HYPERPARAMS["mnist"],
    "mobilenet_v3_small": HyperParams(epochs=3, batch_size=64, lr=3e-3, per_class=500),
}


def _fingerprint(data: ImageSet) -> str:
    h = hashlib.sha256()
    h.update(data.images.numpy().tobytes())
    h.update(data.labels.numpy().tobytes())
    return h.hexdigest()


def train(model: nn.Module, data: ImageSet, hp: HyperParams, *, desc: str = "training") -> list[dict]:
    """Train ``model`` in place on ``data``; return the per-epoch history (mean loss, accuracy, seconds).

    Deterministic for a given machine: the batch order and dropout draw from generators seeded by ``hp.seed``.
    A model with BatchNorm layers gets their running statistics recomputed on ``data`` at the end
    (:func:`recalibrate_batchnorm`). ``hp.per_class`` is not applied here: pass the subset as ``data``.
    """
    torch.manual_seed(hp.seed)
    order_rng = torch.Generator().manual_seed(hp.seed)
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    n = len(data)
    steps = hp.epochs * ((n + hp.batch_size - 1) // hp.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    model.train()
    bar = progress(total=steps, desc=desc)
    try:
        for epoch in range(hp.epochs):
            start, total_loss, correct = time.perf_counter(), 0.0, 0
            for idx in torch.randperm(n, generator=order_rng).split(hp.batch_size):
                x, y = data.batch(idx), data.labels[idx]
                out = model(x)
                loss = loss_fn(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total_loss += loss.item() * len(idx)
                correct += (out.argmax(1) == y).sum().item()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch + 1, "loss": total_loss / n, "train_accuracy": correct / n,
                            "seconds": time.perf_counter() - start})
    finally:
        bar.close()
        model.eval()
    recalibrate_batchnorm(model, data, hp.batch_size)
    return history


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: ImageSet, batch_size: int = 128) -> int:
    """Recompute the running mean and variance of every BatchNorm layer of ``model`` over ``data`` with the
    trained weights (the average of the per-batch statistics, batches of ``batch_size`` images); return the
    number of layers recomputed (0 leaves the model untouched).

    Why: BatchNorm's running statistics are an exponential average over the training steps, of activations
    of weights that kept changing. With a short schedule and a small momentum (torchvision's MobileNetV3
    uses 0.01: a step's weight in the average decays by 1% a step) they still remember the initial
    weights, and the network that was right in training mode is wrong in eval mode. One pass over the
    training data with the final weights gives the statistics eval mode should use. Every other layer stays
    in eval mode meanwhile (no dropout); the model is left in eval mode.
    """
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    model.eval()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        for start in range(0, len(data), batch_size):
            model(data.batch(slice(start, start + batch_size)))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return len(norms)


@torch.no_grad()
def predict(model: nn.Module, data: ImageSet, batch_size: int = 500) -> torch.Tensor:
    """Logits of ``model`` for every image of ``data`` (model left as found)."""
    with preserved(model):
        model.eval()
        return torch.cat([model(data.batch(slice(i, i + batch_size))) for i in range(0, len(data), batch_size)])


def evaluate(model: nn.Module, data: ImageSet) -> tuple[float, np.ndarray]:
    """Accuracy and confusion matrix (rows: true class, columns: predicted) of ``model`` on ``data``."""
    pred = predict(model, data).argmax(1).numpy()
    true = data.labels.numpy()
    c = len(data.classes)
    confusion = np.bincount(true * c + pred, minlength=c * c).reshape(c, c)
    return float((pred == true).mean()), confusion


def training_set(name: str, architecture: str | None = None) -> ImageSet:
    """The images :func:`pretrained` trains the ``architecture`` network of dataset ``name`` on: the training
    split, or its first ``per_class`` images of each class when the schedule says so (in their order).

    Examples
    --------
    >>> data = training_set("an8flower-single", "mobilenet_v3_small")  # doctest: +SKIP
    >>> len(data)  # 500 of each of the 6 classes (quick mode: all 60)  # doctest: +SKIP
    3000
    """
    hp = _schedule(name, architecture)
    data = load_dataset(name, "train")
    return data if hp.per_class is None else _first_per_class(data, hp.per_class)


def _schedule(name: str, architecture: str | None) -> HyperParams:
    dataset_info(name)  # a clear error for an unknown name
    if architecture is None:
        return HYPERPARAMS[name]
    if architecture not in ARCHITECTURE_HYPERPARAMS:
        raise ValueError(f"unknown architecture {architecture!r}; the book trains "
                         f"{', '.join(ARCHITECTURE_HYPERPARAMS)} (or None, the book's own net for the dataset)")
    return ARCHITECTURE_HYPERPARAMS[architecture]


def _first_per_class(data: ImageSet, n: int) -> ImageSet:
    labels = data.labels.numpy()
    rows = np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c in range(len(data.classes))]))
    pick = (lambda a: None if a is None else a[rows].numpy())
    return ImageSet(data.info, data.split, pick(data.images), pick(data.labels), pick(data.masks),
                    pick(data.parts), data.part_names)


def _training_code() -> str:
    """A hash of the code a trained network depends on: the architectures (all of ``vefi.book.models``), the
    training loop, the subset rule and the library's functions the networks call; not the caching around them,
    so that a change in how weights are stored or shipped does not make them stale."""
    from vefi.book import models

    h = hashlib.sha256(sha256_file(Path(models.__file__)).encode())
    for f in _TRAINING_FUNCTIONS:
        h.update(inspect.getsource(f).encode())
    return h.hexdigest()


# what _training_code hashes, bound once (the functions as defined here, whatever a caller patches later)
_TRAINING_FUNCTIONS = (HyperParams, train, recalibrate_batchnorm, _first_per_class, local_response_norm,
                       channel_window)


def _cache_key(name: str, model: nn.Module, data: ImageSet, hp: HyperParams) -> str:
    code = _training_code()
    parts = {"dataset": name, "data": _fingerprint(data), "architecture": repr(model),
             "hyperparams": asdict(hp), "version": vefi.__version__, "code": code}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _parse_stored(payload: bytes, model: nn.Module) -> tuple[dict, list, float]:
    """The state dict, history and test accuracy of a cached model; ``ValueError`` if they do not fit ``model``
    (checked before anything is loaded into it, so a refused file leaves it as built)."""
    try:
        stored = torch.load(io.BytesIO(payload), weights_only=True)
        state, history = stored["state_dict"], json.loads(stored["history"])
        accuracy = float(stored["test_accuracy"])
    except Exception as err:  # noqa: BLE001 - whatever the file holds, it is not a model cache of ours
        raise ValueError(f"not a model cache: {type(err).__name__}: {err}") from err
    expected = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise ValueError(f"its weights are not those of {type(model).__name__}")
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != value.shape or got.dtype != value.dtype:
            what = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise ValueError(f"weight {key} is {what}, expected {tuple(value.shape)} {value.dtype}")
        if got.is_floating_point() and not all_finite(got):
            raise ValueError(f"weight {key} is not finite")
    if not isinstance(history, list) or not 0 <= accuracy <= 1:
        raise ValueError(f"its history or test accuracy ({accuracy}) is not what training records")
    return state, history, accuracy


#: Seeds of the independently trained networks every claim of the reproduction is measured on (chapter 10).
NETWORK_SEEDS = (0, 1, 2)

#: Every network the book trains, as ``(dataset, seed, architecture)``: the book's net of each dataset and the
#: authors' kind of MNIST network on every seed of :data:`NETWORK_SEEDS` (chapters 1-10), and chapter 15's
#: torchvision classifier on seed 0. ``make networks`` trains them all and ships their weights.
BOOK_NETWORKS = tuple(
    [(name, seed, None) for name in HYPERPARAMS for seed in NETWORK_SEEDS]
    + [("mnist", seed, "matconvnet-mnist") for seed in NETWORK_SEEDS]
    + [("an8flower-single", 0, "mobilenet_v3_small")])

#: Where the repository keeps the shipped weights of :data:`BOOK_NETWORKS` (None when vefi is installed
#: without the repository).
SHIPPED = Path(__file__).resolve().parents[2] / "book" / "networks"
if not (SHIPPED.parent.parent / "pyproject.toml").exists():
    SHIPPED = None


def pretrained(name: str, seed: int = 0, *, architecture: str | None = None) -> nn.Module:
    """The book's trained model for dataset ``name``, in eval mode; trained on first use, then cached.

    ``architecture`` None is the book's own net for the dataset (a :class:`~vefi.book.models.VefiNet`); a name
    of :data:`vefi.book.models.ARCHITECTURES` is that network trained on the dataset with
    :data:`ARCHITECTURE_HYPERPARAMS` (the authors' kind of MNIST network, chapter 10; a torchvision classifier,
    chapter 15).

    ``seed`` draws the initial weights, the batch order and dropout: each seed is an independently trained
    network of the same architecture and schedule (the chapters use seed 0; the reproduction summary every
    seed of :data:`NETWORK_SEEDS`).

    In full mode a network the repository ships (:data:`SHIPPED`, for the same data and training code) is
    loaded instead of trained. In quick mode (``VEFI_QUICK=1``) the model is trained for three epochs on the
    quick subset: good enough to run every chapter, not to report accuracies. The training history and test
    accuracy are in ``model.history`` and ``model.test_accuracy``, the cached weights file in
    ``model.weights_file``, and where the weights came from in ``model.weights_origin``: ``"trained"`` now,
    ``"cache"`` (trained by an earlier call) or ``"shipped"`` (the repository's).

    Examples
    --------
    >>> model = pretrained("mnist")  # doctest: +SKIP
    >>> model.test_accuracy  # doctest: +SKIP
    """
    dataset_info(name)  # a clear error for an unknown name
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    torch.manual_seed(seed)
    model = build_model(name, architecture)  # a clear error for an unknown architecture
    hp = replace(_schedule(name, architecture), seed=seed)
    if quick_mode():
        hp = replace(hp, epochs=QUICK_EPOCHS)
    data = training_set(name, architecture)
    stem = _stem(name, seed, architecture)
    path = data_dir() / "models" / f"{stem}-{_cache_key(name, model, data, hp)}.pt"
    parse = (lambda payload: _parse_stored(payload, model))
    stored, origin = read_verified(path, parse), "cache"
    if stored is None and not quick_mode():
        stored, origin = _from_shipped(path, parse, stem), "shipped"
    model.weights_file, model.weights_origin = path, origin if stored is not None else "trained"
    if stored is not None:
        state, model.history, model.test_accuracy = stored
        model.load_state_dict(state)
    else:
        history = train(model, data, hp, desc=f"training {stem}")
        accuracy, _ = evaluate(model, load_dataset(name, "test"))
        buf = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "history": json.dumps(history),
                    "test_accuracy": accuracy}, buf)
        write_verified(path, buf.getvalue())
        model.history, model.test_accuracy = history, accuracy
    return model.eval()


def _stem(name: str, seed: int, architecture: str | None) -> str:
    """The start of a weights file's name: dataset, architecture (the book's own net: none) and seed."""
    return (name if architecture is None else f"{name}-{architecture}") + f"-seed{seed}"


def _from_shipped(path: Path, parse, stem: str):
    """The shipped weights stored under ``path``'s name (copied into the cache at ``path``), or None; a warning
    when the repository ships this network for other data or code, which is then trained anew."""
    if SHIPPED is None:
        return None
    shipped = SHIPPED / path.name
    if not shipped.is_file():
        others = sorted(p.name for p in SHIPPED.glob(f"{stem}-*.pt"))
        if others:
            warnings.warn(f"the shipped weights of {stem} ({', '.join(others)}) were trained with other data or "
                          f"training code than this vefi's: training anew; run 'make networks' to ship the "
                          f"weights of the present code", RuntimeWarning, stacklevel=3)
        return None
    stored = read_verified(shipped, parse, remove_bad=False)
    if stored is not None:
        atomic_write(path, shipped.read_bytes())
    return stored


def ship_networks(folder: Path | None = None) -> list[Path]:
    """Train (or take from the cache) every network of :data:`BOOK_NETWORKS` in full mode and put its weights
    file in ``folder`` (default :data:`SHIPPED`), removing the files of networks no longer trained; return the
    files. What ``make networks`` runs, after any change to the training code, data or schedules."""
    folder = Path(folder) if folder is not None else SHIPPED
    if folder is None:
        raise ValueError("vefi is installed without its repository: pass the folder to ship the weights to")
    if quick_mode():
        raise ValueError("the shipped weights are the full-mode networks: unset VEFI_QUICK")
    folder.mkdir(parents=True, exist_ok=True)
    kept = []
    for name, seed, architecture in BOOK_NETWORKS:
        cached = pretrained(name, seed, architecture=architecture).weights_file
        target = folder / cached.name
        if not target.is_file() or target.read_bytes() != cached.read_bytes():
            atomic_write(target, cached.read_bytes())
        kept.append(target)
    for stale in set(folder.glob("*.pt")) - set(kept):
        stale.unlink()
    return kept


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vefi.book.train",
                                     description="Train the book's networks in full mode and ship their weights.")
    parser.add_argument("command", choices=["ship"], help=f"train every network of the book and copy its weights "
                        f"to {SHIPPED}")
    parser.parse_args(argv)
    for path in ship_networks():
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
