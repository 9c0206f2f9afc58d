"""Benchmark: LRP heatmaps of a batch on the an8Flower net, vefi vs zennit, same rules, same run.

Both sides compute the same relevance (the script checks it and prints the largest difference): the epsilon
rule everywhere, and the composite (z^B first layer, alpha1-beta0 convolutions, epsilon dense layers). zennit
gets an out-of-place twin of the model (its backward hooks cannot take in-place ReLUs) and ``Pass`` at local
response normalisation, which is what vefi does there. Seeded random weights: the work, and so the time, does
not depend on training.

Run: ``.venv/bin/python benchmarks/bench_lrp.py``
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vefi.lrp import lrp
from _timing import median_time as _median_time  # benchmarks/ is on sys.path when run as a script
from vefi.book.models import build_model

REPEATS = 7
BATCH = 16



def median_time(fn, repeats: int = REPEATS, warmup: int = 2) -> float:
    return _median_time(fn, repeats, warmup)


def main() -> None:
    from zennit.attribution import Gradient
    from zennit.composites import LayerMapComposite, SpecialFirstLayerMapComposite
    from zennit.rules import AlphaBeta, Epsilon, Pass, ZBox

    torch.manual_seed(0)
    model = build_model("an8flower-single").eval()
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    images = torch.rand(BATCH, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    target = torch.arange(BATCH) % 6
    base = [(nn.ReLU, Pass()), (nn.LocalResponseNorm, Pass())]
    composites = {
        "epsilon": lambda: LayerMapComposite(layer_map=base + [(nn.Conv2d, Epsilon(0.25)),
                                                               (nn.Linear, Epsilon(0.25))]),
        "composite": lambda: SpecialFirstLayerMapComposite(
            layer_map=base + [(nn.Conv2d, AlphaBeta(1.0, 0.0)), (nn.Linear, Epsilon(0.25))],
            first_map=[(nn.Conv2d, ZBox(0.0, 1.0))]),
    }
    threads = torch.get_num_threads()
    for rule, make in composites.items():
        def ours(rule=rule):
            return lrp(model, images, target, rule=rule, epsilon=0.25)

        def theirs(make=make):
            with Gradient(model=twin, composite=make()) as attributor:
                return attributor(images, lambda out: F.one_hot(target, out.shape[1]).to(out) * out)[1]

        a, b = ours(), theirs()
        diff = float((a - b).abs().max() / b.abs().max())
        assert diff < 1e-4, f"vefi and zennit disagree on {rule}: max difference {diff:.1e} of the scale"
        t_ours, t_theirs = median_time(ours), median_time(theirs)
        print(f"lrp {rule} {BATCH}x3x112x112 {threads} thread(s), max diff {diff:.1e} of scale: "
              f"vefi {t_ours:.4f} s | zennit {t_theirs:.4f} s ({t_theirs / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
