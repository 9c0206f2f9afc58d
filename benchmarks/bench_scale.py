"""Benchmark of the streamed selection at the sizes of real networks: time and peak memory, beside SPAMS.

Usage: .venv/bin/python benchmarks/bench_scale.py [--n N] [--mu MU]

The descriptors: a synthetic descriptor stream (``SyntheticStream`` below: non-negative, sparse, L1-normalised
per layer block, a fifth of the features class-dependent, like :func:`vefi.descriptors.synthetic_descriptors`)
whose blocks are the layers of the default descriptor of torchvision's resnet18 (m = 12,160) and densenet121
(m = 93,824), read off the untrained networks; batches are generated on the fly, the same on every pass, so
the (N, m) matrix never exists. N = 3000 images, C = 10 classes, mu = 10.

Cases, each in its own subprocess so that its peak resident memory (``ru_maxrss``) is its own; the line
gives that peak and the process's memory before the fit (imports, the stream), and the wall and CPU time of
one run (``benchmarks/_timing.py``'s rule with one run: these take minutes; the solves from a given Gram
pair, vefi's and SPAMS's, take seconds: median of 3 after a warm-up):

* m = 12,160: vefi's dense fit (:func:`vefi.statistics.fit_relevant` with the m x m Gram pair, streamed),
  vefi's working-set fit (``working_set=True``: never forms the Gram matrix), and SPAMS
  (``spams.lasso(Q=, q=, mode=0)``, one thread) given the Gram pair vefi streamed; SPAMS's time excludes the
  Gram pair, its memory includes it (it needs it). Objectives compared with vefi's dense fit.
* m = 93,824 (densenet121): vefi's fit with ``max_memory`` = 4 GiB: the dense Gram matrix alone would be
  70 GB, so ``working_set="auto"`` takes the working set. SPAMS needs that matrix: not run.

Every process runs with OMP_NUM_THREADS=1 (a shared 2-core machine; set --threads to change).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import median_time  # noqa: E402

MU = 10.0
C = 10
GiB = 2**30


class SyntheticStream:
    """Descriptor-like batches generated on the fly from a seed: the same batches on every pass.

    ``index`` is the FeatureIndex of the network whose layer blocks shape the descriptor.
    """

    def __init__(self, index, n: int, n_classes: int, *, batch_size: int = 200, seed: int = 0,
                 informative: float = 0.2):
        self.index, self.n, self.C, self.batch_size, self.seed = index, n, n_classes, batch_size, seed
        m = len(index)
        rng = np.random.default_rng(seed)
        self.y = np.arange(n) % n_classes
        rng.shuffle(self.y)
        base = rng.gamma(2.0, 1.0, size=m)
        profile = np.tile(base, (n_classes, 1))
        tuned = rng.random(m) < informative
        profile[:, tuned] *= np.exp(rng.normal(0.0, 1.0, size=(n_classes, int(tuned.sum()))))
        self.profile = profile.astype(np.float32)
        self.starts = np.asarray(index.starts)
        self.n_batches = -(-n // batch_size)

    def __iter__(self):
        for b in range(self.n_batches):
            rng = np.random.default_rng([self.seed, b])
            y = self.y[b * self.batch_size:(b + 1) * self.batch_size]
            X = self.profile[y] * rng.standard_gamma(4.0, size=(y.size, self.profile.shape[1]), dtype=np.float32)
            X[rng.random(X.shape, dtype=np.float32) < 0.3] = 0.0
            sums = np.add.reduceat(X, self.starts, axis=1)
            sizes = np.diff(np.append(self.starts, X.shape[1]))
            X /= np.maximum(np.repeat(sums, sizes, axis=1), 1e-30)
            yield X, y


def network_index(name: str):
    import torch
    import torchvision

    from vefi.descriptors import DescriptorStream

    net = getattr(torchvision.models, name)(weights=None)
    return DescriptorStream(net, torch.zeros(1, 3, 224, 224), show_progress=False).index


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(case: str, net: str, n: int, mu: float) -> dict:
    """One case in this process; returns what the parent prints."""
    from vefi.lasso import ConvergenceWarning, mu_lasso_objective
    from vefi.statistics import fit_relevant, gram_statistics

    stream = SyntheticStream(network_index(net), n, C)
    m = len(stream.index)
    before = peak_rss()
    out = {"m": m, "before": before}
    cpu0 = time.process_time()
    if case == "dense":
        # fit_relevant's dense path, in its two steps, so that the solve is timed beside SPAMS's
        from vefi.selection import RelevantFeatureSelector

        holder = {}
        t = time.perf_counter()
        gram, _ = gram_statistics(stream)
        out["gram_time"] = time.perf_counter() - t

        def solve():
            holder["sel"] = RelevantFeatureSelector(mu=mu).fit(gram)

        cpu1 = time.process_time()
        out["solve_time"] = median_time(solve, repeats=3, warmup=1)
        out["cpu"] = (cpu1 - cpu0) + (time.process_time() - cpu1) / 4  # the Gram pair and one solve
        out["time"] = out["gram_time"] + out["solve_time"]
        sel = holder["sel"]
        out.update(method="dense", passes=1, working=m, converged=bool(sel.converged_),
                   rel_gap=float(sel.relative_gap_.max()), n_selected=int(sel.get_support().sum()),
                   objective=sel.objective_.tolist())
    elif case in ("working_set", "auto4g"):
        kw = {"working_set": dict(working_set=True), "auto4g": dict(working_set="auto", max_memory=4 * GiB)}[case]
        holder = {}

        def run():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the line
                holder["sel"] = fit_relevant(stream, mu=mu, **kw)[0]

        out["time"] = median_time(run, repeats=1, warmup=0)
        sel = holder["sel"]
        out.update(method=sel.method_, passes=sel.n_passes_, working=int(sel.working_set_.size),
                   converged=bool(sel.converged_), rel_gap=float(sel.relative_gap_.max()),
                   n_selected=int(sel.get_support().sum()), objective=sel.objective_.tolist())
    elif case == "spams":
        import spams

        t = time.perf_counter()
        gram, _ = gram_statistics(stream)
        out["gram_time"] = time.perf_counter() - t
        Qf, qf = gram.Q.T, np.asfortranarray(gram.q)  # Q symmetric: its transpose is a Fortran view, no copy
        Lf = np.asfortranarray(np.eye(C)[stream.y])  # the targets, as bench_lasso.py gives them
        holder = {}

        def run():
            holder["W"] = spams.lasso(Lf, Q=Qf, q=qf, lambda1=mu, mode=0, numThreads=1).toarray()

        out["time"] = median_time(run, repeats=3, warmup=1)
        W = holder["W"]
        out["finite"] = bool(np.all(np.isfinite(W)))
        out["in_ball"] = bool(np.all(np.abs(W).sum(0) <= mu * (1 + 1e-9)))
        out["objective"] = mu_lasso_objective(W, gram.Q, gram.q, gram.lsq).tolist()
        out["n_selected"] = int(np.any(W != 0, axis=1).sum())
    else:
        raise ValueError(case)
    out.setdefault("cpu", time.process_time() - cpu0)
    out["peak"] = peak_rss()
    return out


def run_case(case: str, net: str, n: int, mu: float, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), VEFI_PROGRESS="off")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case, "--net", net, "--n", str(n),
                           "--mu", str(mu)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} {net} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mem(r: dict) -> str:
    return f"peak RSS {r['peak'] / GiB:.2f} GiB ({r['before'] / GiB:.2f} GiB before the fit)"


def fit_line(name: str, r: dict) -> str:
    return (f"{name} {r['time']:.1f} s (CPU {r['cpu']:.1f} s), {mem(r)}, {r['passes']} pass(es), working set "
            f"{r['working']} of {r['m']}, {r['n_selected']} selected, converged {r['converged']}, max rel gap "
            f"{r['rel_gap']:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="images (default 3000)")
    parser.add_argument("--mu", type=float, default=MU)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per case (default 1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--net", default="resnet18", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.net, args.n, args.mu)), flush=True)
        return
    print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.threads} BLAS thread(s) per "
          f"case; synthetic descriptor stream (generated batch by batch) shaped as the named network's default "
          f"descriptor; N={args.n} C={C} mu={args.mu:g}", flush=True)
    dense = run_case("dense", "resnet18", args.n, args.mu, args.threads)
    ws = run_case("working_set", "resnet18", args.n, args.mu, args.threads)
    sp = run_case("spams", "resnet18", args.n, args.mu, args.threads)
    name = f"scale m={dense['m']} (resnet18 blocks) N={args.n} C={C} mu={args.mu:g}, synthetic descriptor stream"
    diff_ws = np.max(np.abs(np.subtract(ws["objective"], dense["objective"])) / np.asarray(dense["objective"]))
    diff_sp = np.max(np.abs(np.subtract(sp["objective"], dense["objective"])) / np.asarray(dense["objective"]))
    print(f"{name}: {fit_line('vefi dense', dense)} (Gram pair {dense['gram_time']:.1f} s, solve "
          f"{dense['solve_time']:.2f} s) | {fit_line('vefi working set', ws)} "
          f"({dense['time'] / ws['time']:.1f}x faster than dense, objectives max rel diff {diff_ws:.1e}) | SPAMS "
          f"{sp['time']:.1f} s given the Gram pair (+ {sp['gram_time']:.1f} s to stream it), {mem(sp)}, "
          f"{sp['n_selected']} selected, finite {sp['finite']}, in the ball {sp['in_ball']}, objectives max rel "
          f"diff to vefi {diff_sp:.1e}; solve SPAMS/vefi {sp['time'] / dense['solve_time']:.1f}x, SPAMS with its "
          f"Gram pair / vefi working set {(sp['time'] + sp['gram_time']) / ws['time']:.1f}x",
          flush=True)
    big = run_case("auto4g", "densenet121", args.n, args.mu, args.threads)
    need = 8 * big["m"] ** 2
    print(f"scale m={big['m']} (densenet121 blocks) N={args.n} C={C} mu={args.mu:g}, synthetic descriptor stream, "
          f"max_memory=4 GiB: {fit_line('vefi ' + big['method'].replace('_', ' '), big)} | SPAMS not run: it needs "
          f"the dense Gram matrix, {need / 1e9:.0f} GB", flush=True)


if __name__ == "__main__":
    main()
