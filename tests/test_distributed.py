"""The streamed statistics across processes: two processes on this machine (gloo backend, spawned, a free
port, a timeout) each stream their shard, and select exactly what one process selects from all the data."""

from __future__ import annotations

import os
import socket
import time
import traceback
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_statistics import class_images, small_net
from vefi.descriptors import synthetic_descriptors
from vefi.lasso import GramAccumulator
from vefi.selection import one_hot
from vefi.statistics import ArrayStream, estimate_memory, fit_relevant, gram_statistics

WORLD = 2
TIMEOUT = 300  # seconds for the whole group; a hang fails the test instead of blocking the suite


def synthetic():
    return synthetic_descriptors(1200, [50, 100, 150, 200] * 3, n_classes=5, seed=7)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    """One process: its shard of every case, results saved for the parent to compare."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    out = {}
    try:
        X, y = synthetic()
        shard = ArrayStream(X[rank::WORLD], y[rank::WORLD], batch_size=150)
        gram, _ = gram_statistics(shard)
        out.update(Q=gram.Q, q=gram.q, lsq=gram.lsq, n=gram.n_samples)
        for mu in (2.0, 20.0):
            for ws in (False, True):
                sel, _ = fit_relevant(shard, mu=mu, working_set=ws)
                key = f"mu{mu:g}_{'ws' if ws else 'dense'}"
                out[key + "_coef"] = sel.coef_
                out[key + "_converged"] = sel.converged_
                out[key + "_passes"] = sel.n_passes_
        # budgets that differ between the processes: the smallest decides for all (no process goes dense alone)
        need = estimate_memory(X.shape[1], 5)
        sel, _ = fit_relevant(shard, mu=2.0, max_memory=10 * need if rank == 0 else need // 2)
        out["mixed_budget_method"] = sel.method_
        # unequal shards, one of them empty: the empty process still takes part in every sum
        cut = 1000
        part = ArrayStream(X[:cut], y[:cut], batch_size=128) if rank == 0 else ArrayStream(X[cut:], y[cut:])
        if rank == 1:
            part = ArrayStream(X[:0], y[:0])
        sel, _ = fit_relevant(part, mu=5.0, working_set=True)
        out["uneven_coef"] = sel.coef_
        # a real model: each process streams the descriptors of its images
        net = small_net()
        images, labels = class_images(240)
        sel, _ = fit_relevant(net, images[rank::WORLD], 3.0, labels=labels[rank::WORLD], working_set=True,
                              show_progress=False)
        out["model_coef"] = sel.coef_
        out["model_converged"] = sel.converged_
        # an error on one process: every process raises instead of waiting for it
        bad = y[rank::WORLD] + (10 if rank == 1 else 0)
        try:
            fit_relevant(ArrayStream(X[rank::WORLD], bad, batch_size=150), mu=2.0, working_set=True,
                         classes=range(5))
            out["error"] = "none"
        except (ValueError, RuntimeError) as error:
            out["error"] = f"{type(error).__name__}: {error}"
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    except Exception:  # noqa: BLE001 - written for the parent, then re-raised
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("distributed"))
    ctx = mp.start_processes(_worker, args=(free_port(), out_dir), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD} processes did not finish within {TIMEOUT} s (a hang in a collective?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [dict(np.load(os.path.join(out_dir, f"rank{r}.npz"))) for r in range(WORLD)]


def support(coef):
    mag = np.abs(coef)
    return mag > 1e-6 * mag.max(axis=-1, keepdims=True)  # the selector's default threshold


def same(a, b, rtol=1e-6):
    """The tolerances of tests/test_statistics.py's assert_same_fit, on saved coefficient arrays."""
    np.testing.assert_array_equal(support(a), support(b))
    scale = np.abs(b).max(axis=1, keepdims=True)
    assert np.all(np.abs(a - b) <= rtol * 10 * scale)


def test_sums_over_processes_equal_one_process(results):
    X, y = synthetic()
    ref = GramAccumulator.from_data(X, one_hot(y))
    for r in results:
        np.testing.assert_allclose(r["Q"], ref.Q, rtol=0, atol=1e-12 * np.abs(ref.Q).max())
        np.testing.assert_allclose(r["q"], ref.q, rtol=0, atol=1e-12 * np.abs(ref.q).max())
        np.testing.assert_array_equal(r["lsq"], ref.lsq)
        assert int(r["n"]) == X.shape[0]
    np.testing.assert_array_equal(results[0]["Q"], results[1]["Q"])  # the same sums on every process


@pytest.mark.parametrize("mu", [2.0, 20.0])
@pytest.mark.parametrize("method", ["dense", "ws"])
def test_two_processes_select_what_one_process_selects(results, mu, method):
    X, y = synthetic()
    one, _ = fit_relevant(ArrayStream(X, y, batch_size=300), mu=mu, working_set=method == "ws")
    key = f"mu{mu:g}_{method}"
    for r in results:
        assert bool(r[key + "_converged"])
        same(r[key + "_coef"], one.coef_)
        assert int(r[key + "_passes"]) == one.n_passes_
    np.testing.assert_array_equal(results[0][key + "_coef"], results[1][key + "_coef"])


def test_processes_take_the_same_path_whatever_their_memory(results):
    assert [str(r["mixed_budget_method"]) for r in results] == ["working_set"] * WORLD


def test_uneven_and_empty_shards(results):
    X, y = synthetic()
    one, _ = fit_relevant(ArrayStream(X[:1000], y[:1000]), mu=5.0, working_set=True)
    for r in results:
        same(r["uneven_coef"], one.coef_)


def test_real_model_shards(results):
    net = small_net()
    images, labels = class_images(240)
    one, _ = fit_relevant(net, images, 3.0, labels=labels, working_set=True, show_progress=False)
    assert one.converged_
    for r in results:
        assert bool(r["model_converged"])
        same(r["model_coef"], one.coef_)


def test_an_error_on_one_process_raises_on_every_process(results):
    assert "not among the classes of interest" in str(results[1]["error"])
    assert str(results[0]["error"]).startswith("RuntimeError: another process")
