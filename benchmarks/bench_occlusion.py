"""Benchmark: occlusion maps of a batch on the an8Flower net, vefi vs captum ``Occlusion``, same window,
stride, baseline and batch.

Both sides compute the same map (the script checks it and prints the largest difference). vefi runs
``batch_size`` occluded copies per forward pass; captum is given the same number through
``perturbations_per_eval`` (it evaluates that many occlusions of every image per pass), so the comparison is
of implementations, not of batch sizes. Seeded random weights.

Run: ``.venv/bin/python benchmarks/bench_occlusion.py``
"""

from __future__ import annotations

import warnings

import torch

from _timing import median_time as _median_time  # benchmarks/ is on sys.path when run as a script
from vefi.book.models import build_model
from vefi.occlusion import occlusion

REPEATS = 5
BATCH = 4
CASES = [(16, 8), (32, 16)]  # (window, stride)
PER_PASS = 64



def median_time(fn, repeats: int = REPEATS, warmup: int = 1) -> float:
    return _median_time(fn, repeats, warmup)


def main() -> None:
    from captum.attr import Occlusion

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model = build_model("an8flower-single").eval()
    images = torch.rand(BATCH, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    target = torch.arange(BATCH) % 6
    threads = torch.get_num_threads()
    for window, stride in CASES:
        def ours(window=window, stride=stride):
            return occlusion(model, images, target, window=window, stride=stride, baseline=0.5,
                             batch_size=PER_PASS * BATCH)

        def theirs(window=window, stride=stride):
            return Occlusion(model).attribute(images, sliding_window_shapes=(3, window, window),
                                              strides=(3, stride, stride), baselines=0.5, target=target,
                                              perturbations_per_eval=PER_PASS)[:, 0]

        a, b = ours(), theirs()
        diff = float((a - b).abs().max() / b.abs().max())
        assert diff < 1e-4, f"vefi and captum disagree: max difference {diff:.1e} of the scale"
        t_ours, t_theirs = median_time(ours), median_time(theirs)
        print(f"occlusion window {window} stride {stride} {BATCH}x3x112x112 {threads} thread(s), max diff "
              f"{diff:.1e} of scale: vefi {t_ours:.4f} s | captum {t_theirs:.4f} s ({t_theirs / t_ours:.1f}x)")


if __name__ == "__main__":
    main()
