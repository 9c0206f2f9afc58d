"""The mu-Lasso's verdict does not depend on the processor: the same problems, solved under every OpenBLAS
kernel this CPU can run (one interpreter each, since OpenBLAS reads ``OPENBLAS_CORETYPE`` when it loads) and
with one or two BLAS threads, converge alike, to answers that agree within tolerances no kernel can break."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from benchmarks.lasso_problems import FAMILIES, family_problem
from vefi.lasso import solve_mu_lasso

ROOT = Path(__file__).resolve().parents[1]

# OpenBLAS kernels of a DYNAMIC_ARCH x86-64 build, with the CPU flags each needs (from OpenBLAS's
# driver/others/dynamic.c: the kernel uses those instruction sets; Zen runs the Haswell kernels).
KERNELS = {
    "Prescott": {"pni"},  # /proc/cpuinfo calls SSE3 "pni"
    "Core2": {"ssse3"},
    "Nehalem": {"sse4_2"},
    "Sandybridge": {"avx"},
    "Haswell": {"avx2", "fma"},
    "SkylakeX": {"avx512f", "avx512bw", "avx512vl"},
    "Cooperlake": {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"},
}

# Small problems of every family (both shapes, radii 0.01-1000), so that one interpreter per kernel stays fast.
SCRIPT = """
import json, sys
from threadpoolctl import threadpool_info
from benchmarks.lasso_problems import FAMILIES, family_problem
from vefi.lasso import solve_mu_lasso
import warnings
warnings.simplefilter("ignore")
out = {"architectures": sorted({str(i.get("architecture")) for i in threadpool_info() if i["user_api"] == "blas"}),
       "problems": []}
for family in FAMILIES:
    for seed in range(3):
        p = family_problem(family, seed, max_n=80, max_m=60)
        r = solve_mu_lasso(p.gram, p.mu)
        out["problems"].append({"name": p.name, "converged": r.converged, "status": r.status,
                                "objective": r.objective.tolist(), "floor": 1e-2 * float(p.gram.lsq.sum()),
                                "l1": abs(r.W).sum(0).tolist(), "mu": p.mu})
json.dump(out, sys.stdout)
"""


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def numpy_uses_dynamic_openblas() -> str | None:
    """Why the kernel cannot be chosen here, or None when it can (numpy's bundled OpenBLAS, x86-64)."""
    blas = [i for i in threadpool_info() if i["user_api"] == "blas"]
    if not blas or any(i["internal_api"] != "openblas" for i in blas):
        return f"the BLAS is not OpenBLAS ({[i['internal_api'] for i in blas]})"
    if not cpu_flags():
        return "no /proc/cpuinfo flags (not x86-64 Linux): OPENBLAS_CORETYPE names x86-64 kernels"
    return None


def run_under(kernel: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if kernel is not None:
        env["OPENBLAS_CORETYPE"] = kernel
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"kernel {kernel}: the interpreter failed: {done.stderr[-2000:]}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def reference():
    return run_under(None)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_same_verdict_and_answers_under_every_kernel(kernel, reference):
    why = numpy_uses_dynamic_openblas()
    if why:
        pytest.skip(why)
    missing = KERNELS[kernel] - cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {sorted(missing)}, which OpenBLAS's {kernel} kernel needs")
    got = run_under(kernel)
    assert len(got["problems"]) == len(reference["problems"])
    for ref, p in zip(reference["problems"], got["problems"], strict=True):
        assert p["name"] == ref["name"]
        assert p["converged"] and ref["converged"], (p["name"], p["status"], ref["status"])
        assert all(v <= p["mu"] * (1 + 1e-12) for v in p["l1"])
        # both certified to a gap of 1e-8 of max(objective, floor): they agree to twice that
        tol = 2e-8 * np.maximum(np.array(ref["objective"]), ref["floor"])
        assert np.all(np.abs(np.array(p["objective"]) - np.array(ref["objective"])) <= tol), p["name"]
    # Did it really switch? threadpoolctl reports the kernel in use for every OpenBLAS loaded (numpy's and
    # scipy's). A build without that kernel falls back to another one (the answers above were still checked).
    # Which kernel a build falls back to depends on the build and the processor (on an AVX-512 machine,
    # Cooperlake may fall back to the default SkylakeX), so a fallback is a skip that says what ran; that the
    # switch itself works is required once, for Nehalem, which every DYNAMIC_ARCH x86-64 build has.
    used = {a.lower() for a in got["architectures"]}
    if used != {kernel.lower()}:
        assert kernel != "Nehalem", f"OPENBLAS_CORETYPE=Nehalem ran {got['architectures']}: the switch failed"
        default = used == {a.lower() for a in reference["architectures"]}
        pytest.skip(f"this OpenBLAS build has no {kernel} kernel: it ran {got['architectures']} instead"
                    + (" (the default kernel here)" if default else "") + " (answers checked under that kernel)")


def test_the_reference_interpreter_converges_everywhere(reference):
    assert len(reference["problems"]) == 3 * len(FAMILIES)
    assert all(p["converged"] for p in reference["problems"]), [p["name"] for p in reference["problems"]
                                                                 if not p["converged"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_or_two_blas_threads_give_the_same_answer(family):
    # The solver runs one BLAS thread whatever the caller set, so its answer from a given Gram pair is the
    # same bit for bit; the Gram pair itself, accumulated with 1 or 2 threads, differs in rounding only, and
    # the verdict and objectives then agree within the certified tolerance.
    p = family_problem(family, 1, max_n=80, max_m=60)
    results = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            gram = type(p.gram).from_data(p.X, p.L)
            results.append((solve_mu_lasso(p.gram, p.mu), solve_mu_lasso(gram, p.mu)))
    (same1, own1), (same2, own2) = results
    np.testing.assert_array_equal(same1.W, same2.W)
    assert own1.converged and own2.converged and same1.converged
    floor = np.maximum(own1.objective, 1e-2 * p.gram.lsq.sum())
    assert np.all(np.abs(own1.objective - own2.objective) <= 2e-8 * floor)
