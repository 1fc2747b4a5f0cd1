"""The first-party dataset plugins beyond CIFAR-10: cifar100, svhn and folder, and the guide's worked example.

No real CIFAR-100 or SVHN exists on the machines that run these tests, and nothing can be downloaded:
the loaders read small synthetic files written in the exact official formats (Python 2 pickles for
CIFAR-100, MATLAB .mat files for SVHN), the published md5s are swapped for those of the synthetic
files where a test needs a match, and download paths are exercised against local ``file://`` URLs.
The folder dataset is tested end to end on real images: part of the CIFAR-10 test set written as PNGs.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import tarfile
import threading
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from kdzoo import KDZooError
from kdzoo.data import clear_cache, prepare_data
from kdzoo.datasets import array_sha256
from kdzoo_plugins import cifar100, folder, svhn
from kdzoo_plugins.cifar100 import Cifar100
from kdzoo_plugins.folder import FolderWarning, ImageFolder
from kdzoo_plugins.svhn import Svhn

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "writing-plugins.md"


@pytest.fixture(autouse=True)
def fresh_loads():
    """Every test reads its files: no verified load is remembered from another test."""
    clear_cache()
    yield
    clear_cache()


def one_paragraph(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text.strip(), text
    return text


# ---------------------------------------------------------------------------------------------
# CIFAR-100: the official pickles, written as Python 2's cPickle writes them


class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """``cPickle.dump(obj, f, 2)`` of Python 2, as the CIFAR files were written: every string (``str`` or ``bytes``
    here) is a Python 2 byte string (SHORT_BINSTRING/BINSTRING); numpy arrays reduce as they always have."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def write_py2_pickle(path: Path, obj: object) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, 2).dump(obj)
    # numpy 2 names the module numpy._core; the files of 2009 say numpy.core (a GLOBAL opcode is plain text)
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))


def write_cifar100_folder(folder: Path, train_per_class: int = 2, test_per_class: int = 1, seed: int = 0
                          ) -> dict[str, np.ndarray]:
    """``folder`` (cifar-100-python) with ``train``, ``test`` and ``meta`` in the official format; returns the arrays
    they hold in kdzoo's layout."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    expected = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per)
        rng.shuffle(labels)
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        write_py2_pickle(folder / split, {
            "filenames": [f"synthetic_{split}_{i}.png" for i in range(len(labels))],
            "batch_label": f"{split}ing batch 1 of 1", "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(), "data": data})
        # row = 1024 red, 1024 green, 1024 blue values; each plane row-major
        expected[f"x_{split}"] = np.stack([data[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], -1)
        expected[f"y_{split}"] = labels.astype(np.int64)
    write_py2_pickle(folder / "meta", {"fine_label_names": list(cifar100.CLASSES),
                                       "coarse_label_names": [f"superclass_{i}" for i in range(20)]})
    return expected


def md5s_of(folder: Path) -> dict[str, str]:
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in ("train", "test", "meta")}


@pytest.fixture
def cifar100_folder(tmp_path, monkeypatch) -> tuple[Path, dict[str, np.ndarray]]:
    """A synthetic cifar-100-python folder whose md5s kdzoo accepts (as it accepts the published ones)."""
    folder = tmp_path / "data" / "cifar-100-python"
    expected = write_cifar100_folder(folder)
    monkeypatch.setattr(cifar100, "MD5", md5s_of(folder))
    return folder, expected


def write_cifar100_npz(path: Path, monkeypatch, train_per_class: int = 3, test_per_class: int = 1, seed: int = 1
                       ) -> dict[str, np.ndarray]:
    """An array file in cifar10.npz's layout with a few images per class; the expected SHAPES become its sizes."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        arrays[f"y_{split}"] = np.repeat(np.arange(100, dtype=np.int64), per)
        arrays[f"x_{split}"] = rng.integers(0, 256, (100 * per, 32, 32, 3), dtype=np.uint8)
    np.savez(path, **arrays)
    monkeypatch.setattr(cifar100, "SHAPES", {k: v.shape for k, v in arrays.items()})
    return arrays


def test_cifar100_reads_the_official_pickles(cifar100_folder, tmp_path, monkeypatch):
    folder, expected = cifar100_folder
    arrays = Cifar100().load(str(folder), tmp_path / "cache")
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(arrays, name), expected[name])
        assert arrays.fingerprints[name] == array_sha256(expected[name])
    assert arrays.class_names == cifar100.CLASSES and arrays.num_classes == 100 and arrays.image_size == (32, 32)
    assert (arrays.mean, arrays.std) == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))  # METHODS.md
    assert (arrays.pad, arrays.flip, arrays.dataset) == (4, True, "cifar100")
    assert arrays.source == f"cifar-100-python:{folder.resolve()}"

    # The synthetic files are what torchvision's own CIFAR100 reads: same pixels, labels and names.
    from torchvision.datasets import CIFAR100

    md5 = cifar100.MD5
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {"filename": "meta", "key": "fine_label_names", "md5": md5["meta"]})
    for train, split in ((True, "train"), (False, "test")):
        tv = CIFAR100(str(folder.parent), train=train)
        np.testing.assert_array_equal(tv.data, getattr(arrays, f"x_{split}"))
        assert tv.targets == getattr(arrays, f"y_{split}").tolist()
        assert tuple(tv.classes) == arrays.class_names

    # ... and a 100-class student is built for it.
    from kdzoo.plugins import load_plugins
    from kdzoo.runner import build_student

    net = build_student(load_plugins(), "resnet20", {}, seed=0, num_classes=arrays.num_classes,
                        input_size=arrays.image_size)
    data = prepare_data(arrays, train_size=100, test_size=100)
    assert net.model(data.normalize(data.test_x[:2])).shape == (2, 100) and data.num_classes == 100


def test_cifar100_refuses_files_whose_md5_differs_without_unpickling_them(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    write_cifar100_folder(folder)
    monkeypatch.setattr(cifar100, "unpickle", lambda path: pytest.fail(f"unpickled unverified {path}"))
    with pytest.raises(KDZooError) as e:  # the published md5s: the synthetic files match none of them
        Cifar100().load(str(folder), tmp_path)
    text = one_paragraph(e)
    for name, md5 in cifar100.MD5.items():
        assert f"{name} has md5 " in text and f"expected {md5}" in text
    assert "does not unpickle files it cannot verify" in text

    good = md5s_of(folder)
    monkeypatch.setattr(cifar100, "MD5", good)
    data = bytearray((folder / "test").read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the pixels
    (folder / "test").write_bytes(bytes(data))
    with pytest.raises(KDZooError, match=r"\(test has md5 [0-9a-f]{32}, expected " + good["test"] + r"\)"):
        Cifar100().load(str(folder), tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(KDZooError, match="has no file 'meta'"):
        Cifar100().load(str(folder), tmp_path)


def test_cifar100_unpickler_builds_only_plain_data(tmp_path, monkeypatch):
    """Even a file whose md5 matches (here: injected) cannot run code: every global but numpy's array
    reconstruction is refused."""
    folder = tmp_path / "cifar-100-python"
    write_cifar100_folder(folder)
    marker = tmp_path / "pwned"
    (folder / "train").write_bytes(f"cbuiltins\nexec\n(Vopen({str(marker)!r}, 'w').close()\ntR.".encode())
    with pytest.raises(pickle.UnpicklingError, match="refusing to load the global builtins.exec"):
        cifar100.unpickle(folder / "train")
    monkeypatch.setattr(cifar100, "MD5", md5s_of(folder))
    with pytest.raises(KDZooError) as e:
        Cifar100().load(str(folder), tmp_path)
    assert "file 'train' matches its md5 but cannot be read as a CIFAR pickle" in one_paragraph(e)
    assert not marker.exists()
    assert cifar100.unpickle(folder / "meta")[b"fine_label_names"][:2] == [b"apple", b"aquarium_fish"]


def test_cifar100_array_file(tmp_path, monkeypatch):
    path = tmp_path / "cifar100.npz"
    expected = write_cifar100_npz(path, monkeypatch)
    arrays = Cifar100().load(str(path), tmp_path)
    np.testing.assert_array_equal(arrays.x_train, expected["x_train"])
    assert arrays.class_names == cifar100.CLASSES and arrays.source == f"npz:{path.resolve()}"
    assert Cifar100().load(str(tmp_path), tmp_path) is not None  # a folder holding cifar100.npz
    fingerprints = dict(arrays.fingerprints)

    # Pinned fingerprints (once someone has verified a copy): the same arrays pass, others are refused.
    monkeypatch.setattr(cifar100, "FINGERPRINTS", fingerprints)
    clear_cache()
    assert Cifar100().load(str(path), tmp_path).fingerprints == fingerprints
    other = tmp_path / "other.npz"
    x = expected["x_test"].copy()
    x[0, 0, 0, 0] ^= 1
    np.savez(other, **{**expected, "x_test": x})
    with pytest.raises(KDZooError, match="array 'x_test' does not match"):
        Cifar100().load(str(other), tmp_path)
    monkeypatch.setattr(cifar100, "FINGERPRINTS", None)

    bad_labels = expected["y_train"].copy()
    bad_labels[0] = 100
    np.savez(other, **{**expected, "y_train": bad_labels})
    with pytest.raises(KDZooError, match="labels lie in 0..100, outside the 100 classes"):
        Cifar100().load(str(other), tmp_path)
    np.savez(other, **{**expected, "y_train": np.sort(np.r_[expected["y_train"][1:], 7])})  # one 0 became a 7
    with pytest.raises(KDZooError) as e:
        Cifar100().load(str(other), tmp_path)
    assert "class 0 (apple) has 2 train images; CIFAR-100 has 3 of each class" in one_paragraph(e)
    monkeypatch.setattr(cifar100, "SHAPES", {"x_train": (50000, 32, 32, 3), "y_train": (50000,),
                                             "x_test": (10000, 32, 32, 3), "y_test": (10000,)})
    clear_cache()
    with pytest.raises(KDZooError, match=r"array 'x_train' has shape \(300, 32, 32, 3\).*expected shape \(50000"):
        Cifar100().load(str(path), tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(KDZooError, match="cannot be read as an .npz archive"):
        Cifar100().load(str(tmp_path / "junk.npz"), tmp_path)


def test_cifar100_sources(cifar100_folder, tmp_path, monkeypatch):
    folder, _ = cifar100_folder
    data_root, cache = folder.parent, tmp_path / "cache"
    npz = tmp_path / "arrays.npz"
    write_cifar100_npz(npz, monkeypatch)
    ds = Cifar100()
    monkeypatch.delenv(cifar100.ENV, raising=False)
    assert ds.locate("auto", cache) is None and ds.locate("download", cache) is None
    # auto, with the official folder under the cache folder: read it, no download
    assert ds.locate("auto", data_root) == str(folder)
    assert ds.load("auto", data_root).source.startswith("cifar-100-python:")
    # a path: the folder, the folder above it, or the array file
    assert ds.locate(str(data_root), cache) == str(folder) and ds.locate(str(npz), cache) == str(npz)
    assert ds.load(str(data_root), cache).source == f"cifar-100-python:{folder.resolve()}"
    # auto with $KDZOO_DATA_CIFAR100 set: that, whatever is in the cache folder
    monkeypatch.setenv(cifar100.ENV, str(npz))
    assert ds.locate("auto", data_root) == str(npz)
    assert ds.load("auto", data_root).source == f"npz:{npz.resolve()}"
    monkeypatch.setenv(cifar100.ENV, str(tmp_path / "nowhere"))
    assert ds.locate("auto", data_root) is None
    with pytest.raises(KDZooError) as e:
        ds.load("auto", data_root)
    assert one_paragraph(e).startswith(f"{cifar100.ENV}=") and "does not exist" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KDZooError, match="is a folder with neither a cifar-100-python folder"):
        ds.load(str(tmp_path / "empty"), cache)


@pytest.fixture
def serve(tmp_path):
    """``serve(path) -> URL`` of a file served over HTTP from 127.0.0.1 (torchvision's downloader needs HTTP's
    Content-Length, so file:// URLs cannot stand in for a server); stopped after the test."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    servers = []

    def start(path: Path) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(path.parent)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/{path.name}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_cifar100_download_through_torchvision(cifar100_folder, tmp_path, monkeypatch, serve):
    """The download path end to end against a local server: torchvision fetches the archive, checks its md5 and
    extracts it; kdzoo verifies and reads the files. A second load finds them and downloads nothing."""
    from torchvision.datasets import CIFAR100

    archive = tmp_path / "served" / "cifar-100-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar100_folder[0], arcname="cifar-100-python")
    monkeypatch.setattr(CIFAR100, "url", serve(archive))
    monkeypatch.setattr(CIFAR100, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.delenv(cifar100.ENV, raising=False)
    cache = tmp_path / "cache"
    arrays = Cifar100().load("download", cache)
    np.testing.assert_array_equal(arrays.x_test, cifar100_folder[1]["x_test"])
    assert (cache / "cifar-100-python" / "meta").is_file() and Cifar100().locate("auto", cache)
    monkeypatch.setattr(CIFAR100, "url", (tmp_path / "gone.tar.gz").as_uri())
    clear_cache()
    assert Cifar100().load("auto", cache).fingerprints == arrays.fingerprints


def test_cifar100_download_offline_is_one_clear_paragraph(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "url", (tmp_path / "unreachable" / "cifar-100-python.tar.gz").as_uri())
    monkeypatch.delenv(cifar100.ENV, raising=False)
    with pytest.raises(KDZooError) as e:
        Cifar100().load("auto", tmp_path / "cache")
    text = one_paragraph(e)
    assert text.startswith(f"Could not download CIFAR-100 through torchvision into '{(tmp_path / 'cache').resolve()}'")
    assert "URLError" in text and "No internet?" in text and cifar100.URL in text and cifar100.ENV in text
    assert "cifar-100-python.tar.gz" in text and CIFAR100.tgz_md5 in text


def test_cifar100_archive_placed_by_hand_is_used_offline(cifar100_folder, tmp_path, monkeypatch):
    """What the offline error advises: cifar-100-python.tar.gz put into the cache folder is checked and extracted,
    with no network."""
    from torchvision.datasets import CIFAR100

    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / CIFAR100.filename
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar100_folder[0], arcname="cifar-100-python")
    monkeypatch.setattr(CIFAR100, "url", (tmp_path / "unreachable.tar.gz").as_uri())
    monkeypatch.setattr(CIFAR100, "tgz_md5", hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.delenv(cifar100.ENV, raising=False)
    arrays = Cifar100().load("auto", cache)
    np.testing.assert_array_equal(arrays.y_train, cifar100_folder[1]["y_train"])


def test_cifar100_trains_a_100_class_student_from_the_command_line(tmp_path, monkeypatch, capsys, one_thread):
    from kdzoo.checkpoint import load_checkpoint
    from kdzoo.cli import main

    npz = tmp_path / "c100.npz"
    write_cifar100_npz(npz, monkeypatch)
    out = tmp_path / "run"
    rc = main(["train", "--dataset", "cifar100", "--data", str(npz), "--model", "resnet20", "--epochs", "1",
               "--train-size", "200", "--test-size", "100", "--batch-size", "50", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["num_classes"] == 100 and ckpt["meta"]["dataset"] == "cifar100"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["dataset"] == "cifar100" and (metrics["data"]["train"], metrics["data"]["test"]) == (200, 100)


# ---------------------------------------------------------------------------------------------
# SVHN: .mat files as the Stanford page serves them, read through torchvision


def write_svhn(folder: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split}_32x32.mat`` files: X (32, 32, 3, N) uint8 and y (N, 1) with labels 1..10 (10 = the digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in sizes.items():
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[:10, 0] = np.arange(1, 11)  # every label, 10 included
        savemat(folder / svhn.FILES[split], {"X": x, "y": y})
        written[split] = (x, y)
    return written


@pytest.fixture
def svhn_folder(tmp_path, monkeypatch) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    pytest.importorskip("scipy", reason="SVHN's .mat files need scipy: pip install 'kdzoo[svhn]'")
    from torchvision.datasets import SVHN

    folder = tmp_path / "svhn-files"
    written = write_svhn(folder, {"train": 30, "test": 20, "extra": 12})
    for split, (url, name, _) in list(SVHN.split_list.items()):  # torchvision verifies these md5s
        monkeypatch.setitem(SVHN.split_list, split, [url, name, hashlib.md5((folder / name).read_bytes()).hexdigest()])
    return folder, written


def test_svhn_reads_the_mat_files(svhn_folder, tmp_path):
    folder, written = svhn_folder
    arrays = Svhn().load(str(folder), tmp_path)
    x, y = written["train"]
    np.testing.assert_array_equal(arrays.x_train, x.transpose(3, 0, 1, 2))  # image i is X[:, :, :, i], HWC
    np.testing.assert_array_equal(arrays.y_train, y[:, 0].astype(np.int64) % 10)  # label 10 is the digit 0
    assert arrays.y_train[:10].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    np.testing.assert_array_equal(arrays.x_test, written["test"][0].transpose(3, 0, 1, 2))
    assert arrays.class_names == tuple("0123456789") and arrays.flip is False and arrays.pad == 4
    assert (arrays.mean, arrays.std) == (svhn.MEAN, svhn.STD)
    assert Svhn().locate(str(folder), tmp_path) == str(folder)

    extra = Svhn(extra=True).load(str(folder), tmp_path)
    assert len(extra.y_train) == 42 and len(extra.y_test) == 20
    np.testing.assert_array_equal(extra.x_train[:30], arrays.x_train)
    np.testing.assert_array_equal(extra.x_train[30:], written["extra"][0].transpose(3, 0, 1, 2))
    assert extra.fingerprints["x_test"] == arrays.fingerprints["x_test"]
    assert extra.fingerprints["x_train"] != arrays.fingerprints["x_train"]  # another dataset to run ids


def test_svhn_refuses_bad_files_and_options(svhn_folder, tmp_path, monkeypatch):
    folder, _ = svhn_folder
    from torchvision.datasets import SVHN

    url, name, _ = SVHN.split_list["test"]
    monkeypatch.setitem(SVHN.split_list, "test", [url, name, "0" * 32])
    with pytest.raises(KDZooError) as e:
        Svhn().load(str(folder), tmp_path)
    text = one_paragraph(e)
    assert f"SVHN file '{folder / 'test_32x32.mat'}' does not match its published md5 {'0' * 32}" in text
    (folder / "train_32x32.mat").unlink()
    with pytest.raises(KDZooError) as e:
        Svhn().load(str(folder), tmp_path)
    assert f"SVHN folder '{folder}' has no train_32x32.mat" in one_paragraph(e) and svhn.PAGE in str(e.value)
    with pytest.raises(KDZooError, match="option extra must be true or false, got 'maybe'"):
        Svhn(extra="maybe")
    with pytest.raises(KDZooError, match="Dataset 'svhn' has no option 'extras'. Did you mean 'extra'"):
        Svhn(extras=True)


def test_svhn_offline_download_is_one_clear_paragraph(tmp_path, monkeypatch):
    pytest.importorskip("scipy")
    from torchvision.datasets import SVHN

    for split, (_, name, md5) in list(SVHN.split_list.items()):
        monkeypatch.setitem(SVHN.split_list, split, [(tmp_path / "offline" / name).as_uri(), name, md5])
    monkeypatch.delenv(svhn.ENV, raising=False)
    with pytest.raises(KDZooError) as e:
        Svhn().load("auto", tmp_path / "cache")
    text = one_paragraph(e)
    where = (tmp_path / "cache" / "svhn").resolve()
    assert text.startswith(f"Could not get SVHN's train_32x32.mat through torchvision into '{where}' (URLError")
    assert f"Download train_32x32.mat, test_32x32.mat from {svhn.PAGE}" in text and f"into '{where}'" in text


def test_svhn_without_scipy_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(KDZooError) as e:
        Svhn().load(str(tmp_path), tmp_path)
    assert 'pip install "kdzoo[svhn]"' in one_paragraph(e)


# ---------------------------------------------------------------------------------------------
# folder: your own images


def write_images(folder: Path, counts: dict[str, int], size: tuple[int, int] = (12, 10), seed: int = 0,
                 ext: str = ".png") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / name / f"{i:03d}{ext}")


class CountingDecoder:
    """Stands in for ``folder.decode`` and counts the images it decodes (from several threads)."""

    def __init__(self) -> None:
        self.calls, self._lock, self._decode = 0, threading.Lock(), folder.decode

    def __call__(self, data: bytes, size: int):
        with self._lock:
            self.calls += 1
        return self._decode(data, size)


@pytest.fixture
def decoder(monkeypatch) -> CountingDecoder:
    counting = CountingDecoder()
    monkeypatch.setattr(folder, "decode", counting)
    return counting


def rows(x: np.ndarray) -> list[bytes]:
    return sorted(image.tobytes() for image in x)


def test_folder_resizes_exactly_as_torchvision(tmp_path):
    """Shorter side to ``size`` (bilinear), then the center square: torchvision's Resize + CenterCrop."""
    from PIL import Image
    from torchvision import transforms

    rng = np.random.default_rng(0)
    for w, h in ((50, 37), (37, 50), (64, 64), (20, 90), (32, 32), (9, 13)):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        for size in (16, 32):
            want = np.asarray(transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])(img))
            np.testing.assert_array_equal(folder.decode(buf.getvalue(), size), want, err_msg=f"{w}x{h} -> {size}")
    grey = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(grey, format="JPEG")
    assert folder.decode(grey.getvalue(), 8).shape == (8, 8, 3)  # grey, JPEG: RGB like every image


def test_folder_one_tree_is_split_stratified_by_content(tmp_path, decoder):
    root = tmp_path / "pets"
    write_images(root, {"dog": 10, "cat": 7, "emu": 5})
    arrays = ImageFolder(path=str(root), size=8).load("auto", tmp_path / "cache")
    assert arrays.class_names == ("cat", "dog", "emu") and arrays.dataset == "folder"  # sorted, as ImageFolder
    assert np.bincount(arrays.y_test).tolist() == [1, 2, 1]  # 20% of 7, 10, 5 rounded half up, at least one
    assert np.bincount(arrays.y_train).tolist() == [6, 8, 4]
    assert arrays.image_size == (8, 8) and arrays.pad == 1 and arrays.flip is True
    x = arrays.x_train.reshape(-1, 3) / 255
    np.testing.assert_allclose(arrays.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(arrays.std, x.std(0), rtol=1e-9)
    assert arrays.source == f"folder:{root.resolve()}" and decoder.calls == 22

    # The split follows the files' contents, not their names: renamed files, same split.
    for name in ("dog", "cat", "emu"):
        for f in sorted((root / name).iterdir()):
            f.rename(f.with_name(f"renamed-{f.stem[::-1]}{f.suffix}"))  # other names, in another order
    clear_cache()
    renamed = ImageFolder(path=str(root), size=8).load("auto", tmp_path / "cache")
    assert rows(renamed.x_test) == rows(arrays.x_test) and rows(renamed.x_train) == rows(arrays.x_train)
    other = ImageFolder(path=str(root), size=8, split_seed=1, test_fraction=0.5).load("auto", tmp_path / "cache")
    assert np.bincount(other.y_test).tolist() == [4, 5, 3] and rows(other.x_test) != rows(arrays.x_test)


def test_folder_train_and_test_folders_are_used_as_given(tmp_path):
    root = tmp_path / "given"
    write_images(root / "train", {"a": 3, "b": 2}, seed=1)
    write_images(root / "test", {"a": 1, "b": 2}, seed=2, ext=".jpg")
    arrays = ImageFolder(path=str(root), size=8).load("auto", tmp_path / "cache")
    assert arrays.y_train.tolist() == [0, 0, 0, 1, 1] and arrays.y_test.tolist() == [0, 1, 1]
    os.rename(root / "test", root / "val")  # val/ stands for test/
    clear_cache()
    assert ImageFolder(path=str(root), size=8).load("auto", tmp_path / "cache").y_test.tolist() == [0, 1, 1]


def test_folder_cache_is_reused_and_keyed_by_content(tmp_path, decoder):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    write_images(root, {"x": 4, "y": 4}, ext=".bmp")  # uncompressed: a pixel is a byte of the file
    first = ImageFolder(path=str(root), size=8).load("auto", cache)
    (cached,) = (cache / "folders").glob("*.npz")
    stamp = cached.stat().st_mtime_ns
    assert decoder.calls == 8
    clear_cache()  # a new process: only the file on disk is left
    again = ImageFolder(path=str(root), size=8).load("auto", cache)
    assert decoder.calls == 8 and cached.stat().st_mtime_ns == stamp  # read, not decoded or written again
    assert again.fingerprints == first.fingerprints and (again.mean, again.std) == (first.mean, first.std)

    # One pixel changed, the file's size and modification time kept: another cache.
    target = root / "x" / "000.bmp"
    before, data = target.stat(), bytearray(target.read_bytes())
    data[54 + 5 * 36 + 6 * 3] ^= 0xFF  # the middle pixel (after the 54-byte header; rows of 12 BGR pixels)
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    clear_cache()
    changed = ImageFolder(path=str(root), size=8).load("auto", cache)
    assert decoder.calls == 16 and len(list((cache / "folders").glob("*.npz"))) == 2
    assert changed.fingerprints["x_train"] != first.fingerprints["x_train"] or \
        changed.fingerprints["x_test"] != first.fingerprints["x_test"]

    # A damaged cache file is rebuilt, with a warning, into the same arrays.
    for f in (cache / "folders").glob("*.npz"):
        f.write_bytes(f.read_bytes()[:1000])  # truncated
    clear_cache()
    with pytest.warns(FolderWarning, match="is unreadable or damaged .*rebuilding it"):
        rebuilt = ImageFolder(path=str(root), size=8).load("auto", cache)
    assert rebuilt.fingerprints == changed.fingerprints and decoder.calls == 24
    clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is good: read without a warning
        assert ImageFolder(path=str(root), size=8).load("auto", cache).fingerprints == changed.fingerprints
    assert decoder.calls == 24


def test_folder_skips_damaged_and_non_image_files_with_a_warning(tmp_path):
    root = tmp_path / "imgs"
    write_images(root, {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)  # a PNG header, then nothing
    (root / "b" / "003.jpg").write_bytes((root / "b" / "000.png").read_bytes()[:60])  # truncated
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("beside the class folders: ignored")
    (root / "a" / ".DS_Store").write_bytes(b"hidden: ignored")
    with pytest.warns(FolderWarning) as record:
        arrays = ImageFolder(path=str(root), size=8).load("auto", tmp_path / "cache")
    messages = [str(w.message) for w in record]
    assert any("skipped 1 file that is not an image (by its extension): b/notes.txt." in m for m in messages), messages
    assert any("skipped 2 image files that could not be read or decoded: a/broken.png (" in m and "b/003.jpg (" in m
               for m in messages), messages
    assert len(arrays.y_train) + len(arrays.y_test) == 6
    # the skip is remembered by the cache and said again when the cache is used
    clear_cache()
    with pytest.warns(FolderWarning) as record:
        ImageFolder(path=str(root), size=8).load("auto", tmp_path / "cache")
    assert any("skipped 2 image files" in str(w.message) for w in record)


def expect_error(root: Path, match: str, **options) -> str:
    with pytest.raises(KDZooError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore", FolderWarning)  # skipped files; the error is what is tested here
        ImageFolder(path=str(root), **{"size": 8, **options}).load("auto", root.parent / "cache")
    text = one_paragraph(e)
    assert re.search(match, text), text
    return text


def test_folder_bad_input_is_a_clear_error(tmp_path):
    root = tmp_path / "imgs"
    expect_error(root, "does not exist. Give the folder of your images: --data-option path=DIR")
    root.mkdir()
    expect_error(root, "holds nothing. Put each class's images in a sub-folder named after the class")
    write_images(root, {"": 2})  # images, but no class folders
    expect_error(root, "holds 2 files but no class folders")
    write_images(root, {"cat": 3})
    expect_error(root, r"has 1 class folder \(cat\); a classifier needs at least two")
    (root / "dog").mkdir()
    (root / "owl").mkdir()
    (root / "owl" / "list.csv").write_text("1,2")
    expect_error(root, r"2 class folders have no images \(dog/ \(empty\), owl/ \(1 file, none an image\);")
    write_images(root, {"dog": 1, "owl": 2})
    expect_error(root, "class 'dog' has 1 usable image; splitting it into train and test needs at least two")
    write_images(root, {"dog": 2})
    for f in (root / "owl").glob("*.png"):
        f.write_bytes(b"garbage")
    expect_error(root, r"no image of class owl could be decoded \(2 files failed: owl/000.png \(")

    split = tmp_path / "split"
    write_images(split / "train", {"a": 2, "b": 2})
    expect_error(split, "has a train/ folder but no test/ \\(or val/\\) folder")
    write_images(split / "test", {"a": 1, "c": 1})
    expect_error(split, r"train/ and test/ must have the same class folders \(only in train/: b; only in test/: c\)")


def test_folder_options_are_checked_before_anything_is_read(tmp_path):
    with pytest.raises(KDZooError, match="needs the option path") as e:
        ImageFolder()
    assert "option" in one_paragraph(e)  # `kdzoo datasets` shows "(give its options)" for it
    for options, match in (({"size": 4}, "size must be a whole number of pixels, at least 8, got 4"),
                           ({"size": "big"}, "size must be"), ({"test_fraction": 1.0}, "test_fraction must be"),
                           ({"test_fraction": True}, "test_fraction must be"), ({"split_seed": 0.5}, "split_seed must"),
                           ({"sise": 32}, "has no option 'sise'. Did you mean 'size'")):
        with pytest.raises(KDZooError, match=match):
            ImageFolder(path=str(tmp_path), **options)
    with pytest.raises(KDZooError, match="reads the folder given by its path option"):
        ImageFolder(path=str(tmp_path)).load(str(tmp_path), tmp_path)
    assert ImageFolder(path=str(tmp_path)).locate("auto", tmp_path) == str(tmp_path.resolve())
    assert ImageFolder(path=str(tmp_path / "no")).locate("auto", tmp_path) is None


# -- on real images: part of the CIFAR-10 test set as PNG files --------------------------------

PER_CLASS = 100


@pytest.fixture(scope="module")
def cifar_tree(cifar_path, tmp_path_factory) -> tuple[Path, dict[int, np.ndarray]]:
    """The first PER_CLASS test images of each CIFAR-10 class as PNGs in a class tree; and those images."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar-pngs") / "cifar10"
    with np.load(cifar_path) as f:
        x, y, names = f["x_test"], f["y_test"], [str(n) for n in f["class_names"]]
    chosen = {}
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        idx = np.flatnonzero(y == c)[:PER_CLASS]
        for i in idx:
            Image.fromarray(x[i]).save(root / name / f"{i:05d}.png")
        chosen[c] = x[idx]
    return root, chosen


def test_folder_of_cifar_pngs_is_bit_exact(cifar_tree, tmp_path):
    root, chosen = cifar_tree
    arrays = ImageFolder(path=str(root)).load("auto", tmp_path)  # 32x32 PNGs at size 32: lossless
    assert arrays.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")
    for c, images in chosen.items():
        got = np.concatenate([arrays.x_train[arrays.y_train == c], arrays.x_test[arrays.y_test == c]])
        assert rows(got) == rows(images)
        assert (arrays.y_test == c).sum() == PER_CLASS // 5


def test_folder_of_cifar_pngs_with_a_corrupt_file_and_an_empty_class(cifar_tree, tmp_path):
    import shutil

    root = tmp_path / "three"
    for name in ("cat", "dog", "ship"):
        shutil.copytree(cifar_tree[0] / name, root / name)
    victim = sorted((root / "dog").iterdir())[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a PNG cut in half
    with pytest.warns(FolderWarning, match=rf"skipped 1 image file that could not be read or decoded: dog/{victim.name} \("):
        arrays = ImageFolder(path=str(root)).load("auto", tmp_path / "cache")
    assert np.bincount(arrays.y_train).tolist() == [80, 79, 80] and np.bincount(arrays.y_test).tolist() == [20, 20, 20]
    (root / "emu").mkdir()
    expect_error(root, r"1 class folder has no images \(emu/ \(empty\); images are files ending in .jpg")


def test_folder_trains_and_distils_from_the_command_line(cifar_tree, tmp_path, monkeypatch, decoder, capsys, one_thread):
    """`kdzoo train` then `kdzoo distill` on a folder of real images, at 16x16 (resized on decoding): both well
    above chance (10%); the second run reads the decoded cache instead of decoding again."""
    from kdzoo.cli import main

    root, _ = cifar_tree
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path / "cache"))
    data = ["--dataset", "folder", "--data-option", f"path={root}", "--data-option", "size=16"]
    recipe = ["--epochs", "8", "--batch-size", "32", "--lr", "0.05"]
    rc = main(["train", *data, "--model", "resnet20", *recipe, "--out", str(tmp_path / "teacher")])
    assert rc == 0, capsys.readouterr()
    assert decoder.calls == 10 * PER_CLASS
    (cached,) = (tmp_path / "cache" / "folders").glob("*.npz")
    stamp = cached.stat().st_mtime_ns
    teacher = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert teacher["data"]["dataset"] == "folder" and teacher["data"]["train"] == 8 * PER_CLASS

    clear_cache()  # what a new process sees: the cache file only
    rc = main(["distill", *data, "--teacher", str(tmp_path / "teacher" / "checkpoint.pt"), "--student", "wrn_16_1",
               "--method", "kd", *recipe, "--out", str(tmp_path / "student")])
    assert rc == 0, capsys.readouterr()
    assert decoder.calls == 10 * PER_CLASS and cached.stat().st_mtime_ns == stamp
    student = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert student["data"]["fingerprint"] == teacher["data"]["fingerprint"]
    assert teacher["last"]["top1"] > 25 and student["last"]["top1"] > 25, (teacher["last"], student["last"])


# ---------------------------------------------------------------------------------------------
# The registry, `kdzoo datasets`, and the guide's worked example


def test_kdzoo_datasets_lists_the_first_party_datasets(capsys, monkeypatch):
    from kdzoo.cli import main
    from kdzoo.plugins import load_plugins

    registry = load_plugins(strict=True)
    assert {"cifar10", "cifar100", "svhn", "folder"} <= set(registry.datasets)
    assert registry.dataset("cifar100") is Cifar100 and registry.dataset("folder") is ImageFolder
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("cifar10", "cifar100", "svhn", "folder"):
        assert re.search(rf"\b{name}\b", out), out
    assert "(give its options)" in out and "path=None" in out and "extra=False" in out


def guide_file(name: str) -> str:
    blocks = re.findall(r"^```\w*\n(.*?)^```$", GUIDE.read_text(), re.M | re.S)
    (body,) = [b for b in blocks if b.startswith(f"# {name}\n")]
    return body


def write_idx(path: Path, a: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(struct.pack(">I", n) for n in a.shape)
    path.write_bytes(gzip.compress(header + a.astype(np.uint8).tobytes()))


def test_the_guides_dataset_example_works(tmp_path, monkeypatch, one_thread):
    """docs/writing-plugins.md's MNIST plugin, run from the guide's own code block on IDX files in the official
    format: it registers, reads, refuses a bad checksum, and a network trains on it."""
    import tomllib

    import yaml

    from kdzoo.config import BenchConfig, RunConfig, parse
    from kdzoo.plugins import load_plugins
    from kdzoo.runner import run_single

    project = tomllib.loads(guide_file("kdzoo-mnist/pyproject.toml"))
    assert project["project"]["entry-points"]["kdzoo"] == {"mnist": "kdzoo_mnist"}
    module = types.ModuleType("kdzoo_mnist")
    exec(compile(guide_file("kdzoo-mnist/src/kdzoo_mnist/__init__.py"), "writing-plugins.md", "exec"), module.__dict__)

    rng = np.random.default_rng(0)
    files = tmp_path / "idx"
    files.mkdir()
    for split, n in (("train", 120), ("t10k", 60)):
        write_idx(files / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(files / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    registry = load_plugins(extra=[("mnist", module)])
    ds = registry.dataset("mnist")()
    with pytest.raises(KDZooError, match="does not match its published md5"):
        ds.load(str(files), tmp_path)
    monkeypatch.setattr(module, "FILES", {k: (f, hashlib.md5((files / f).read_bytes()).hexdigest())
                                          for k, (f, _) in module.FILES.items()})
    arrays = ds.load(str(files), tmp_path)
    assert arrays.x_train.shape == (120, 28, 28, 3) and arrays.y_test.tolist()[:3] == [0, 1, 2]
    assert ds.locate(str(files), tmp_path) == str(files) and ds.locate("auto", tmp_path) is None
    with pytest.raises(KDZooError, match="does not exist"):
        ds.load("auto", tmp_path)

    bench = parse(BenchConfig, yaml.safe_load(guide_file("kdzoo-mnist/bench.yaml")))
    assert bench.data.dataset == "mnist" and bench.data.train_size == 10000

    cfg = parse(RunConfig, {"model": "resnet20", "out": str(tmp_path / "run"),
                            "data": {"dataset": "mnist", "source": str(files), "train_size": 100, "test_size": 50},
                            "recipe": {"epochs": 1, "batch_size": 50}})
    result = run_single(cfg, registry)
    assert result["status"] == "ok" and result["data"]["dataset"] == "mnist"


def test_the_guide_documents_the_dataset_contract():
    import dataclasses
    import inspect

    from kdzoo.datasets import Arrays, Dataset, verified

    text = GUIDE.read_text()
    section = text.split("\n## Dataset plugins\n")[1]
    for f in dataclasses.fields(Arrays):
        if not f.name.startswith("_"):
            assert f"`{f.name}`" in section, f"Arrays.{f.name} missing from the guide"
    for attr in ("name", "description", "defaults", "reference"):
        assert f"| `{attr}` |" in section and attr in vars(Dataset)
    for method in ("load", "locate", "sizes"):
        assert f"**`{method}(" in section and method in vars(Dataset)
    params: list[str] = []
    for param in inspect.signature(verified).parameters.values():
        if param.kind is param.KEYWORD_ONLY and "*" not in params:
            params.append("*")
        params.append(param.name if param.default is param.empty else f"{param.name}={param.default!r}")
    documented = f"`verified({', '.join(params)})`".replace("''", '""')
    assert documented in section, documented
    for name in ("cifar10", "cifar100", "svhn", "folder"):
        assert f"| `{name}` |" in section
    assert "### `register_datasets(register)`" in text.split("\n## Hook reference\n")[1].split("\n## ")[0]
