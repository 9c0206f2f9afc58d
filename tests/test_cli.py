"""The command line ``python -m vefi``: exit codes, messages, and no half-written output."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vefi.book import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setenv("VEFI_QUICK", "1")
    monkeypatch.setenv("VEFI_PROGRESS", "off")


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv", [[], ["explain", "--help"], ["select", "--help"], ["fetch", "--help"]])
def test_help_everywhere_documents_the_exit_codes(argv, capsys):
    code, out, err = run(argv or ["--help"], capsys)
    assert code == 0
    assert "exit codes" in out and "3  data not found" in out and "4  bad value" in out


@pytest.mark.parametrize("argv, message", [
    (["explain", "--dataset", "mnist", "--index", "0"], "--out"),  # missing a required flag
    (["explain", "--dataset", "imagenet", "--index", "0", "--out", "x.png"], "invalid choice: 'imagenet'"),
    (["explain", "--dataset", "mnist", "--index", "-1", "--out", "x.png"], "expected an integer >= 0"),
    (["explain", "--dataset", "mnist", "--index", "0", "--out", "x.png", "--k", "0"], "positive integer"),
    (["select", "--dataset", "mnist", "--mu", "0"], "positive finite number"),
    (["select", "--dataset", "mnist", "--mu", "nan"], "positive finite number"),
    (["select", "--dataset", "mnist", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == cli.EXIT_USAGE
    assert message in err
    assert list(tmp_path.iterdir()) == []


def _fail_if_called(*args, **kwargs):
    raise AssertionError("computed before checking the output path")


@pytest.mark.parametrize("make_out, message", [
    (lambda d: d / "missing" / "fig.png", "does not exist"),
    (lambda d: d, "it is a folder"),
    (lambda d: d / "fig.txt", "expected a file name ending in .png"),
])
def test_unwritable_output_is_refused_before_computing(make_out, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_split", _fail_if_called)
    out_path = make_out(tmp_path)
    code, out, err = run(["explain", "--dataset", "mnist", "--index", "0", "--out", str(out_path)], capsys)
    assert code == cli.EXIT_VALUE
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_split", _fail_if_called)
    if os.geteuid() == 0:  # root may write into a read-only folder: give the answer the kernel gives others
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode, **kwargs: (
            not (mode & os.W_OK and Path(path) == tmp_path) and real_access(path, mode, **kwargs)))
    tmp_path.chmod(0o500)
    try:
        code, out, err = run(["explain", "--dataset", "mnist", "--index", "0",
                              "--out", str(tmp_path / "fig.png")], capsys)
    finally:
        tmp_path.chmod(0o700)
    assert code == cli.EXIT_VALUE and "permission denied" in err
    assert list(tmp_path.iterdir()) == []


def test_index_and_class_out_of_range_exit_4(tmp_path, capsys):
    out_path = tmp_path / "fig.png"
    code, out, err = run(["explain", "--dataset", "an8flower-single", "--index", "100000",
                          "--out", str(out_path)], capsys)
    assert code == cli.EXIT_VALUE
    assert "--index 100000 is out of range" in err and "test split of an8flower-single" in err
    code, out, err = run(["explain", "--dataset", "an8flower-single", "--index", "3", "--class", "6",
                          "--out", str(out_path)], capsys)
    assert code == cli.EXIT_VALUE
    assert "--class 6 is out of range" in err and "(0 to 5)" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_data_exits_3(tmp_path, capsys, monkeypatch):
    from vefi.book.data import DataNotFoundError

    def missing(name, split):
        raise DataNotFoundError(f"{name} is not here; run make data")

    monkeypatch.setattr(cli, "_load_split", missing)
    code, out, err = run(["explain", "--dataset", "mnist", "--index", "0", "--out", str(tmp_path / "f.png")],
                         capsys)
    assert code == cli.EXIT_DATA and "data not found" in err and "run make data" in err
    assert list(tmp_path.iterdir()) == []


def test_a_crash_while_computing_exits_1_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    import vefi.book.relevant

    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(vefi.book.relevant, "relevant_features", crash)
    code, out, err = run(["select", "--dataset", "mnist", "--out", str(tmp_path / "features.csv")], capsys)
    assert code == cli.EXIT_UNEXPECTED
    assert "RuntimeError: boom" in err and "unexpected error" in err
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_of_the_output_exits_4_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    import vefi.book._cache

    target = tmp_path / "features.csv"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(vefi.book._cache.os, "fsync", disk_full)
    with pytest.raises(cli.BadValue, match="No space left"):
        cli.write_output(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["features.csv"]


def test_select_writes_every_class_as_csv(tmp_path, capsys):
    from vefi.book.relevant import relevant_features

    umask = os.umask(0o027)
    os.umask(umask)
    out_path = tmp_path / "features.csv"
    code, out, err = run(["select", "--dataset", "mnist", "--mu", "10", "--only-conv", "--out", str(out_path)],
                         capsys)
    assert code == 0, err
    rows = list(csv.DictReader(out_path.open()))
    relevant = relevant_features("mnist", mu=10, only_conv=True)
    assert len(rows) == sum(len(f) for f in relevant.per_class.values()) > 0
    assert {r["kind"] for r in rows} <= {"conv", "relu", "pool", "norm"}
    for r in rows:
        column = relevant.index.column(int(r["layer_number"]), int(r["channel"]))
        assert float(r["weight"]) == pytest.approx(relevant.selector.coef_[int(r["class"]), column], rel=1e-5)
    assert f"wrote {len(rows)} rows" in out
    assert (out_path.stat().st_mode & 0o777) == 0o666 & ~umask  # like any file the user makes, not 0600
    selector = relevant.selector
    assert selector.converged_
    assert f"mu-Lasso converged in {selector.n_iter_} iterations" in out and "did not converge" not in err
    code, out, err = run(["select", "--dataset", "mnist", "--only-conv"], capsys)
    assert code == 0 and out.count("\nclass ") == 10 and "OnlyConv" in out
    assert f"mu-Lasso converged in {selector.n_iter_} iterations" in out


def test_select_warns_when_the_solver_did_not_converge(tmp_path, capsys, monkeypatch):
    import vefi.book.relevant

    real = vefi.book.relevant.relevant_features

    def stopped_early(name, mu, only_conv=False):
        relevant = real(name, mu=mu, only_conv=only_conv)
        gram, _ = vefi.book.relevant.training_gram(name, relevant.model)
        with pytest.warns(Warning, match="raise max_iter"):
            relevant.selector.set_params(max_iter=2).fit(gram)
        return relevant

    monkeypatch.setattr(vefi.book.relevant, "relevant_features", stopped_early)
    out_path = tmp_path / "features.csv"
    code, out, err = run(["select", "--dataset", "mnist", "--out", str(out_path)], capsys)
    assert code == 0, err
    assert "mu-Lasso did not converge in 2 iterations" in out
    assert "warning: mu-Lasso did not converge in 2 iterations" in err and "relative duality gap" in err
    assert "max_iter" in err  # the solver's reason and what to do reach the user
    assert out_path.exists()


def test_explain_end_to_end_in_a_subprocess(tmp_path):
    out_path = tmp_path / "fig.png"
    env = dict(os.environ, VEFI_QUICK="1", VEFI_PROGRESS="off")
    proc = subprocess.run([sys.executable, "-m", "vefi", "explain", "--dataset", "mnist", "--index", "3",
                           "--k", "2", "--out", str(out_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mnist test image 3" in proc.stdout and f"wrote {out_path}" in proc.stdout
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]  # no temporary file left behind
