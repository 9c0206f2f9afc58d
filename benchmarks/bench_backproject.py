"""Benchmark: 10 features of one 112x112 image on the an8Flower net, vefi batched vs a loop of captum calls.

Both sides compute the same guided-backprop maps with the stride fix off (captum has no fix): each feature
back-projected from its actual activation map. captum is called once per feature (``NeuronGuidedBackprop``,
the activation map as seed through a callable ``neuron_selector``), as its API asks; vefi does all ten in one
forward and one backward pass. The script checks that the maps agree and prints the largest difference.

Run: ``.venv/bin/python benchmarks/bench_backproject.py``
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from vefi.backproject import backproject
from _timing import median_time as _median_time  # benchmarks/ is on sys.path when run as a script
from vefi.book.models import build_model

FEATURES = [("conv1", 3), ("conv2", 5), ("relu2", 6), ("pool2", 9), ("conv3", 7), ("relu3", 1),
            ("conv4", 7), ("relu4", 2), ("fc1", 10), ("relu5", 4)]
REPEATS = 9



def median_time(fn, repeats: int = REPEATS, warmup: int = 3) -> float:
    return _median_time(fn, repeats, warmup)


def main() -> None:
    from captum.attr import NeuronGuidedBackprop

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    # seeded random weights: the work (and so the time) does not depend on training
    model = build_model("an8flower-single").eval()
    twin = copy.deepcopy(model)  # captum's backward hooks cannot take in-place ReLUs
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    modules = dict(twin.named_modules())
    image = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))

    def ours():
        return backproject(model, image, FEATURES, rule="guided", stride_fix=False, source="map")

    def theirs():
        maps = []
        for name, channel in FEATURES:
            def selector(a, c=channel):  # d/da 0.5*sum(a_c^2) = a_c: the activation map as seed
                return 0.5 * (a[:, c] ** 2).reshape(a.shape[0], -1).sum(1)
            maps.append(NeuronGuidedBackprop(twin, modules[name]).attribute(image, selector))
        return torch.stack(maps, 1)

    a, b = ours(), theirs()
    assert a.shape == b.shape == (1, len(FEATURES), 3, 112, 112)
    scale = b.abs().amax(dim=(0, 2, 3, 4))
    assert torch.all(scale > 0), "a feature with an empty map makes a poor benchmark"
    diff = float(((a - b).abs().amax(dim=(0, 2, 3, 4)) / scale).max())
    assert diff < 1e-4, f"vefi and captum disagree: max difference {diff:.1e} of the map's scale"
    threads = torch.get_num_threads()
    for n_threads in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n_threads)
        t_ours, t_theirs = median_time(ours), median_time(theirs)
        print(f"backproject 10 features 1x3x112x112 guided fix-off {n_threads} thread(s), max diff {diff:.1e} "
              f"of scale: vefi {t_ours:.4f} s | captum {t_theirs:.4f} s ({t_theirs / t_ours:.1f}x)")
    torch.set_num_threads(threads)
    with_fix = median_time(lambda: backproject(model, image, FEATURES, stride_fix=True), repeats=5)
    print(f"backproject 10 features 1x3x112x112 guided stride-fix {threads} thread(s): vefi {with_fix:.4f} s "
          "| captum n/a (no stride fix)")

if __name__ == "__main__":
    main()
