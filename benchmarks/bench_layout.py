"""Benchmark: the book's nets as :mod:`vefi.book.models` builds them (channels-last weights, the an8Flower
net's :class:`~vefi.book.models.FastLocalResponseNorm`) against the same nets in the default NCHW layout with
PyTorch's ``LocalResponseNorm``, same weights, same inputs.

Two workloads the book spends its build on: an ablation's forward passes (``vefi.ablation.ablation_accuracy``,
configurations batched along the batch axis) and a training step (Adam, cross-entropy). The script checks
that both predict the same classes and prints the ratio plain time / book's time.

Run: ``.venv/bin/python benchmarks/bench_layout.py``
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from _timing import median_time  # benchmarks/ is on sys.path when run as a script
from vefi.ablation import ablation_accuracy
from vefi.book.models import FastLocalResponseNorm, build_model

REPEATS = 3
CASES = [("mnist", 1000, 128), ("an8flower-single", 200, 64)]  # dataset, ablation images, training batch


def main() -> None:
    threads = torch.get_num_threads()
    for name, n_images, batch in CASES:
        torch.manual_seed(0)
        fast = build_model(name).eval()
        slow = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
        for child, module in slow.named_children():
            if isinstance(module, FastLocalResponseNorm):
                setattr(slow, child, nn.LocalResponseNorm(module.size, module.alpha, module.beta, module.k))
        shape = fast.input_shape
        g = torch.Generator().manual_seed(1)
        images = torch.rand(n_images, *shape, generator=g)
        labels = torch.randint(0, len(fast.classes), (n_images,), generator=g)
        configs = [[], [("conv1", 0), ("conv2", 1)], [("relu1", 2)], [(len(list(fast.children())) - 1, 0)]]

        def ablate(model):
            return ablation_accuracy(model, images, labels, configs, max_rows=4 * n_images, desc="",
                                     return_predictions=True)[1]

        same = (ablate(fast) == ablate(slow)).mean()
        t_fast, t_slow = median_time(lambda: ablate(fast), REPEATS), median_time(lambda: ablate(slow), REPEATS)
        print(f"ablation {name} {len(configs)}x{n_images} images {threads} thread(s), same predictions "
              f"{same:.4f}: book's {t_fast:.3f} s | plain {t_slow:.3f} s ({t_slow / t_fast:.2f}x)")

        x, y = images[:batch], labels[:batch]
        times = {}
        for label, model in (("book's", fast), ("plain", slow)):
            net = copy.deepcopy(model).train()
            opt = torch.optim.Adam(net.parameters())

            def step(net=net, opt=opt):
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            times[label] = median_time(step, 5 * REPEATS, warmup=2)
        ours, plain = times["book's"], times["plain"]
        print(f"training step {name} batch {batch} {threads} thread(s): book's {ours:.4f} s | plain {plain:.4f} s "
              f"({plain / ours:.2f}x)")


if __name__ == "__main__":
    main()
