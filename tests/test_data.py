"""kdzoo.data: verified loading, stratified subsets, seeded batches, augmentation, normalisation.

Real CIFAR-10 comes from env KDZOO_DATA (fixture ``cifar_path`` in conftest.py).
"""
from __future__ import annotations

import hashlib
import math
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdzoo import KDZooError
from kdzoo import data as kdata
from kdzoo.data import Data
from kdzoo.data import prepare_data as _prepare
from kdzoo_plugins.cifar10 import CLASSES as CIFAR10_CLASSES
from kdzoo_plugins.cifar10 import FINGERPRINTS, load_cifar10
from kdzoo_plugins.cifar10 import MEAN as CIFAR10_MEAN
from kdzoo_plugins.cifar10 import STD as CIFAR10_STD


def prepare_data(source="auto", root=None, **subsets):
    """CIFAR-10 from ``source`` through its plugin, then kdzoo.data.prepare_data."""
    return _prepare(load_cifar10(source, root), **subsets)

KEYS = ("x_train", "y_train", "x_test", "y_test")
MEAN = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
STD = torch.tensor(CIFAR10_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def real_arrays(cifar_path):
    """The file's arrays, read here with plain numpy (independently of kdzoo.data)."""
    with np.load(cifar_path) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def full(cifar_path):
    return prepare_data(cifar_path)


@pytest.fixture(scope="module")
def small(cifar_path):
    return prepare_data(cifar_path, train_size=600, test_size=100, subset_seed=0)


def _to_uint8(xn: torch.Tensor) -> torch.Tensor:
    """Invert the normalisation; the result must be integral, else the batch is not a normalised uint8 image."""
    x = (xn * STD + MEAN) * 255
    r = x.round()
    assert (x - r).abs().max() < 1e-3
    return r.clamp(0, 255).to(torch.uint8)


def _match_table(aug: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """(B, 2, 9, 9) bool: aug[b] == window (dy, dx) of the zero-padded orig[b], unflipped [0] or flipped [1]."""
    padded = F.pad(orig, (4, 4, 4, 4))
    out = torch.zeros(len(aug), 2, 9, 9, dtype=torch.bool)
    for dy in range(9):
        for dx in range(9):
            win = padded[:, :, dy:dy + 32, dx:dx + 32]
            out[:, 0, dy, dx] = (win == aug).flatten(1).all(1)
            out[:, 1, dy, dx] = (win.flip(3) == aug).flatten(1).all(1)
    return out


def _epoch(d: Data, seed: int, epoch: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*d.train_batches(seed, epoch, batch_size=len(d.train_x), drop_last=False, **kw))
    return torch.cat(xs), torch.cat(ys)


def _save_npz(path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _small_arrays(n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "y_train": np.arange(n, dtype=np.int64) % 10,
            "x_test": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
            "y_test": np.arange(n, dtype=np.int64) % 10}


# ---------------------------------------------------------------------------------------------
# Loading and verification


def test_real_file_fingerprints_and_contents(cifar_path, real_arrays):
    for k in KEYS:  # independent hash of the file's arrays equals the published constants
        assert hashlib.sha256(real_arrays[k].tobytes()).hexdigest() == FINGERPRINTS[k]
    raw = load_cifar10(cifar_path)
    assert raw.x_train.shape == (50000, 32, 32, 3) and raw.x_train.dtype == np.uint8
    assert raw.y_test.shape == (10000,) and raw.y_test.dtype == np.int64
    for k in KEYS:
        assert np.array_equal(getattr(raw, k), real_arrays[k])
        assert not getattr(raw, k).flags.writeable  # the cached arrays are protected
    assert raw.class_names[:3] == ("airplane", "automobile", "bird") and len(raw.class_names) == 10
    assert raw.y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert np.bincount(raw.y_train).tolist() == [5000] * 10
    assert load_cifar10(cifar_path) is raw  # cached in-process


def test_auto_uses_kdzoo_data(cifar_path, monkeypatch):
    monkeypatch.setenv("KDZOO_DATA", cifar_path)
    assert load_cifar10("auto") is load_cifar10(cifar_path)


@pytest.mark.parametrize("name", ["x_train", "y_test"])
def test_one_flipped_value_is_caught(real_arrays, tmp_path, name):
    arrays = {k: real_arrays[k] for k in KEYS}
    bad = arrays[name].copy()
    if name.startswith("x"):
        bad.reshape(-1)[123_457] ^= 1
    else:
        bad[7] = (bad[7] + 1) % 10
    arrays[name] = bad
    path = _save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(KDZooError) as e:
        load_cifar10(path)
    msg = str(e.value)
    assert repr(name) in msg and "corrupt" in msg and "not CIFAR-10" in msg and "KDZOO_DATA" in msg
    for other in KEYS:  # only the bad array is named
        if other != name:
            assert repr(other) not in msg


def test_wrong_shape_and_dtype(real_arrays, tmp_path):
    path = _save_npz(tmp_path / "small.npz", **_small_arrays())
    with pytest.raises(KDZooError, match=r"'x_train' has shape \(10, 32, 32, 3\).*\(50000, 32, 32, 3\)"):
        load_cifar10(path)
    arrays = {k: real_arrays[k] for k in KEYS}
    arrays["y_train"] = arrays["y_train"].astype(np.float64)
    path = _save_npz(tmp_path / "float_labels.npz", **arrays)
    with pytest.raises(KDZooError, match=r"'y_train' .*dtype float64.*int64"):
        load_cifar10(path)


def test_int32_labels_are_accepted(real_arrays, tmp_path):
    arrays = {k: real_arrays[k] for k in KEYS}
    arrays["y_test"] = arrays["y_test"].astype(np.int32)  # same values: verified after the cast
    raw = load_cifar10(_save_npz(tmp_path / "int32.npz", **arrays))
    assert raw.y_test.dtype == np.int64 and np.array_equal(raw.y_test, real_arrays["y_test"])


def test_missing_keys(tmp_path):
    path = _save_npz(tmp_path / "partial.npz", x_train=_small_arrays()["x_train"])
    with pytest.raises(KDZooError) as e:
        load_cifar10(path)
    assert "'y_train', 'x_test', 'y_test'" in str(e.value) and "x_train" in str(e.value)


def test_truncated_and_not_an_archive(cifar_path, tmp_path):
    small = tmp_path / "small.npz"
    _save_npz(small, **_small_arrays())
    cut = tmp_path / "cut.npz"
    cut.write_bytes(small.read_bytes()[:1000])
    with pytest.raises(KDZooError, match="truncated"):
        load_cifar10(str(cut))
    with open(cifar_path, "rb") as f:  # the real file, cut short
        head = f.read(4_000_000)
    (tmp_path / "head.npz").write_bytes(head)
    with pytest.raises(KDZooError, match="truncated"):
        load_cifar10(str(tmp_path / "head.npz"))
    (tmp_path / "text.npz").write_text("not an archive\n" * 10)
    with pytest.raises(KDZooError, match="cannot be read"):
        load_cifar10(str(tmp_path / "text.npz"))
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(KDZooError, match="cannot be read"):
        load_cifar10(str(tmp_path / "one.npy"))


def test_missing_file(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "cifar10.npz"
    with pytest.raises(KDZooError) as e:
        load_cifar10(str(missing))
    assert str(missing) in str(e.value) and "KDZOO_DATA" in str(e.value) and "does not exist" in str(e.value)
    monkeypatch.setenv("KDZOO_DATA", str(missing))
    with pytest.raises(KDZooError, match="KDZOO_DATA"):
        prepare_data("auto")
    with pytest.raises(KDZooError, match="folder without cifar10.npz"):
        load_cifar10(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# torchvision source


class _FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10: ``.data`` uint8 NHWC, ``.targets`` a list of ints."""

    calls: list = []
    arrays: dict = {}

    def __init__(self, root, train=True, download=False, transform=None):
        type(self).calls.append((root, train, download))
        split = "train" if train else "test"
        self.data = self.arrays[f"x_{split}"]
        self.targets = self.arrays[f"y_{split}"].tolist()
        self.classes = list(CIFAR10_CLASSES)


@pytest.fixture
def fake_tv(monkeypatch, real_arrays):
    tvd = pytest.importorskip("torchvision.datasets")
    fake = type("Fake", (_FakeCIFAR10,), {"calls": [], "arrays": dict(real_arrays)})
    monkeypatch.setattr(tvd, "CIFAR10", fake)
    return fake


def test_torchvision_source_converts_and_verifies(fake_tv, tmp_path, monkeypatch, cifar_path, real_arrays):
    monkeypatch.delenv("KDZOO_DATA", raising=False)
    monkeypatch.setenv("KDZOO_CACHE", str(tmp_path))
    raw = load_cifar10("auto")  # no KDZOO_DATA: torchvision, under KDZOO_CACHE
    assert fake_tv.calls == [(str(tmp_path.resolve()), True, True), (str(tmp_path.resolve()), False, True)]
    assert raw.source.startswith("torchvision:")
    assert raw.y_train.dtype == np.int64 and np.array_equal(raw.y_train, real_arrays["y_train"])
    assert np.array_equal(raw.x_test, real_arrays["x_test"])
    assert real_arrays["x_train"].flags.writeable  # the source's own arrays were left writable
    # identical data from either source gives identical subsets and an identical fingerprint
    a = prepare_data("torchvision", root=str(tmp_path), train_size=100, test_size=50)
    b = prepare_data(cifar_path, train_size=100, test_size=50)
    assert a.fingerprint == b.fingerprint and torch.equal(a.train_x, b.train_x)


def test_torchvision_source_with_wrong_labels(fake_tv, tmp_path, real_arrays):
    y = real_arrays["y_train"].copy()
    y[0] = 0
    fake_tv.arrays = {**real_arrays, "y_train": y}
    with pytest.raises(KDZooError) as e:
        load_cifar10("torchvision", root=str(tmp_path))
    msg = str(e.value)
    assert "'y_train'" in msg and "corrupt" in msg and "cifar-10-batches-py" in msg and "KDZOO_DATA" in msg


@pytest.mark.parametrize("exc", [
    urllib.error.URLError(OSError(-3, "Temporary failure in name resolution")),
    RuntimeError("Dataset not found or corrupted. You can use download=True to download it"),
])
def test_torchvision_offline(monkeypatch, tmp_path, exc):
    tvd = pytest.importorskip("torchvision.datasets")

    def offline(*args, **kwargs):
        raise exc

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(KDZooError) as e:
        load_cifar10("torchvision", root=str(tmp_path))
    msg = str(e.value)
    assert "No internet?" in msg and "KDZOO_DATA=/path/to/cifar10.npz" in msg and "--data" in msg
    assert str(tmp_path.resolve()) in msg and type(exc).__name__ in msg


# ---------------------------------------------------------------------------------------------
# Subsets


def test_subset_sizes_strata_and_content(cifar_path):
    raw = load_cifar10(cifar_path)
    d = prepare_data(cifar_path, train_size=1003, test_size=505, val_size=200, subset_seed=0)
    assert d.train_x.shape == (1003, 3, 32, 32) and d.train_x.dtype == torch.uint8 and d.train_x.is_contiguous()
    assert d.val_x.shape == (200, 3, 32, 32) and d.test_x.shape == (505, 3, 32, 32)
    assert d.train_y.dtype == torch.int64
    assert torch.bincount(d.train_y).tolist() == [101] * 3 + [100] * 7
    assert torch.bincount(d.test_y).tolist() == [51] * 5 + [50] * 5
    assert torch.bincount(d.val_y).tolist() == [20] * 10
    tr, va, te = d.train_indices.numpy(), d.val_indices.numpy(), d.test_indices.numpy()
    assert len(set(tr)) == 1003 and len(set(va)) == 200 and not set(tr) & set(va)
    assert list(tr) == sorted(tr)
    # the tensors hold exactly the selected official images, NCHW
    assert torch.equal(d.train_x, torch.from_numpy(raw.x_train[tr]).permute(0, 3, 1, 2))
    assert torch.equal(d.val_x, torch.from_numpy(raw.x_train[va]).permute(0, 3, 1, 2))
    assert torch.equal(d.test_x, torch.from_numpy(raw.x_test[te]).permute(0, 3, 1, 2))
    assert d.test_y.tolist() == raw.y_test[te].tolist() and d.val_y.tolist() == raw.y_train[va].tolist()


def test_subsets_are_seeded(cifar_path):
    kw = dict(train_size=500, test_size=200, val_size=100)
    a = prepare_data(cifar_path, subset_seed=7, **kw)
    b = prepare_data(cifar_path, subset_seed=7, **kw)
    c = prepare_data(cifar_path, subset_seed=8, **kw)
    for name in ("train_indices", "val_indices", "test_indices"):
        assert torch.equal(getattr(a, name), getattr(b, name))
        assert not torch.equal(getattr(a, name), getattr(c, name))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    # the validation split depends on (val_size, seed), not on train_size
    e = prepare_data(cifar_path, subset_seed=7, train_size=2000, val_size=100)
    assert torch.equal(e.val_indices, a.val_indices)


def test_full_sets_and_val_carving(cifar_path, full):
    assert len(full.train_x) == 50000 and len(full.test_x) == 10000 and len(full.val_x) == 0
    assert torch.equal(full.train_indices, torch.arange(50000))
    same = prepare_data(cifar_path, train_size=50000, test_size=10000)
    assert same.fingerprint == full.fingerprint  # identical data, identical fingerprint
    d = prepare_data(cifar_path, val_size=5000, test_size=10)
    assert len(d.train_x) == 45000 and torch.bincount(d.train_y).tolist() == [4500] * 10
    both = torch.cat([d.train_indices, d.val_indices]).sort().values
    assert torch.equal(both, torch.arange(50000))
    assert d.fingerprint != full.fingerprint


@pytest.mark.parametrize("kwargs,name", [
    (dict(train_size=0), "train_size"), (dict(train_size=-5), "train_size"),
    (dict(train_size=50001), "train_size"), (dict(train_size=1.5), "train_size"),
    (dict(train_size=True), "train_size"), (dict(test_size=10001), "test_size"),
    (dict(test_size=0), "test_size"), (dict(val_size=-1), "val_size"),
    (dict(val_size=50000), "val_size"), (dict(train_size=49901, val_size=100), "train_size"),
])
def test_bad_sizes(cifar_path, kwargs, name):
    with pytest.raises(KDZooError, match=name):
        prepare_data(cifar_path, **kwargs)


@pytest.mark.parametrize("kwargs, name, n, missing", [
    (dict(train_size=7), "train_size", 7, "7 (horse), 8 (ship), 9 (truck)"),
    (dict(test_size=9), "test_size", 9, "9 (truck)"),
    (dict(val_size=1), "val_size", 1, "1 (automobile), 2 (bird)"),
])
def test_subset_smaller_than_the_classes_names_the_missing_ones(cifar_path, kwargs, name, n, missing):
    with pytest.raises(KDZooError) as e:
        prepare_data(cifar_path, **kwargs)
    assert str(e.value).startswith(f"{name}={n} is smaller than the 10 classes")
    assert f"none of classes {missing}" in str(e.value) and f"Use {name} >= 10" in str(e.value)
    d = prepare_data(cifar_path, train_size=10, test_size=10)  # one image per class is allowed
    assert sorted(d.train_y.tolist()) == list(range(10)) and sorted(d.test_y.tolist()) == list(range(10))


def test_train_batch_sizes_follow_the_engine():
    assert kdata.train_set_size(None, 0, 50000) == 50000 and kdata.train_set_size(None, 5000, 50000) == 45000
    assert kdata.train_set_size(384, 100, 50000) == 384
    for n, batch in ((384, 64), (385, 64), (64, 64), (20, 64), (1, 1)):
        d = Data(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n) % 10,
                      torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
        seen = {len(y) for _, y in d.train_batches(0, 0, batch)}
        assert seen == set(kdata.train_batch_sizes(n, batch)), (n, batch)


# ---------------------------------------------------------------------------------------------
# Batches: determinism, counts, coverage


def _batches(d, *args, **kw):
    return [(x.clone(), y.clone()) for x, y in d.train_batches(*args, **kw)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_are_a_pure_function_of_seed_and_epoch(cifar_path, small):
    ref = _batches(small, 1, 0, 128)
    assert _same(ref, _batches(small, 1, 0, 128))
    other = prepare_data(cifar_path, train_size=600, test_size=100, subset_seed=0)
    assert other is not small and other.train_x.data_ptr() != small.train_x.data_ptr()
    assert _same(ref, _batches(other, 1, 0, 128))  # two students, same seed: identical batches
    for diff in (_batches(small, 1, 1, 128), _batches(small, 2, 0, 128)):
        assert not torch.equal(diff[0][0], ref[0][0]) and not torch.equal(diff[0][1], ref[0][1])
    plain = _batches(small, 1, 0, 128, augment=False)
    assert torch.equal(plain[0][1], ref[0][1])  # same order with and without augmentation
    assert not torch.equal(plain[0][0], ref[0][0])


def test_batch_counts_and_drop_last(cifar_path, small):
    sizes = [len(x) for x, _ in small.train_batches(0, 0, 128)]
    assert sizes == [128] * 4 and small.steps_per_epoch(128) == 4
    sizes = [len(y) for _, y in small.train_batches(0, 0, 128, drop_last=False)]
    assert sizes == [128] * 4 + [88] and small.steps_per_epoch(128, drop_last=False) == 5
    tiny = prepare_data(cifar_path, train_size=100, test_size=10)
    assert [len(x) for x, _ in tiny.train_batches(0, 0, 128)] == [100] and tiny.steps_per_epoch(128) == 1
    x, y = next(small.train_batches(0, 0, 64))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 32, 32) and y.dtype == torch.int64


def test_each_image_once_per_epoch_with_its_label(small):
    x, y = _epoch(small, 5, 3, augment=False)
    u8 = _to_uint8(x)
    index = {small.train_x[i].numpy().tobytes(): i for i in range(len(small.train_x))}
    assert len(index) == len(small.train_x)  # no exact duplicates in this subset
    ids = [index[img.numpy().tobytes()] for img in u8]
    assert sorted(ids) == list(range(len(small.train_x)))
    assert y.tolist() == small.train_y[ids].tolist()


# ---------------------------------------------------------------------------------------------
# Augmentation


def test_augmented_images_are_padded_crops_with_fair_flips(cifar_path):
    d = prepare_data(cifar_path, train_size=1000, test_size=10, subset_seed=3)
    aug, y = _epoch(d, 11, 0)
    plain, y2 = _epoch(d, 11, 0, augment=False)  # same permutation: the originals, in order
    assert torch.equal(y, y2)
    table = _match_table(_to_uint8(aug), _to_uint8(plain))
    assert table.flatten(1).any(1).all()  # every image is a window of its padded self, maybe mirrored
    unflipped, flipped = table[:, 0].flatten(1).any(1), table[:, 1].flatten(1).any(1)
    clear = unflipped ^ flipped
    n = int(clear.sum())
    assert n >= 990
    k = int(flipped[clear].sum())
    assert abs(k - n / 2) <= 4 * math.sqrt(n / 4)  # flip rate 1/2, 4-sigma binomial bound
    unique = table.flatten(1).sum(1) == 1
    pos = table[unique].flatten(1).float().argmax(1) % 81
    for offs in (pos // 9, pos % 9):  # dy and dx each uniform on 0..8
        counts = torch.bincount(offs, minlength=9).float()
        m = len(offs) / 9
        assert ((counts - m).abs() <= 5 * math.sqrt(m * 8 / 9)).all(), counts
    assert int(table[:, 0, 4, 4].sum()) < 30  # the centre, unflipped, is ~1 in 162


def test_documented_draws(small):
    """The draw order in the module docstring, rebuilt here with explicit per-image slicing."""
    seed, epoch = 4, 2
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(600, generator=g)
    offsets = torch.randint(0, 9, (2, 600), generator=g)
    flips = torch.randint(0, 2, (600,), generator=g)
    x, _ = _epoch(small, seed, epoch)
    for k in range(0, 600, 37):
        img = F.pad(small.train_x[perm[k]], (4, 4, 4, 4))
        dy, dx = int(offsets[0, k]), int(offsets[1, k])
        win = img[:, dy:dy + 32, dx:dx + 32]
        if flips[k]:
            win = win.flip(2)
        assert torch.equal(_to_uint8(x[k]), win)


def test_alternating_flip(cifar_path):
    small = prepare_data(cifar_path, train_size=200, test_size=10, subset_seed=1)
    index = {small.train_x[i].numpy().tobytes(): i for i in range(len(small.train_x))}

    def flips_by_image(epoch, flip):
        aug, _ = _epoch(small, 3, epoch, flip=flip)
        plain, _ = _epoch(small, 3, epoch, flip=flip, augment=False)
        plain_u8 = _to_uint8(plain)
        ids = torch.tensor([index[img.numpy().tobytes()] for img in plain_u8])
        table = _match_table(_to_uint8(aug), plain_u8)
        unflipped, flipped = table[:, 0].flatten(1).any(1), table[:, 1].flatten(1).any(1)
        out = torch.full((len(ids),), -1)
        out[ids[flipped & ~unflipped]] = 1
        out[ids[unflipped & ~flipped]] = 0
        return out  # per image: 1 flipped, 0 not, -1 ambiguous

    f = [flips_by_image(e, "alternating") for e in range(4)]
    known = (f[0] >= 0) & (f[1] >= 0) & (f[2] >= 0) & (f[3] >= 0)
    assert known.sum() >= 195
    assert torch.equal(f[1][known], 1 - f[0][known])
    assert torch.equal(f[2][known], f[0][known])
    assert torch.equal(f[3][known], 1 - f[0][known])
    n = int(known.sum())
    assert abs(int(f[0][known].sum()) - n / 2) <= 4 * math.sqrt(n / 4)
    # with random flips, epoch 1 is not the complement of epoch 0
    r0, r1 = flips_by_image(0, "random"), flips_by_image(1, "random")
    both = (r0 >= 0) & (r1 >= 0)
    agree = int((r0[both] == r1[both]).sum())
    assert abs(agree - int(both.sum()) / 2) <= 4 * math.sqrt(int(both.sum()) / 4)
    with pytest.raises(KDZooError, match="flip"):
        next(small.train_batches(0, 0, 10, flip="sometimes"))


# ---------------------------------------------------------------------------------------------
# Normalisation and evaluation batches


def test_normalised_train_set_has_zero_mean_unit_std(full):
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    n = 0
    for x, _ in full.eval_batches("train", batch_size=10000):
        x = x.double()
        s += x.sum((0, 2, 3))
        s2 += (x * x).sum((0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean**2).sqrt()
    assert (mean.abs() < 0.01).all(), mean
    assert ((std - 1).abs() < 0.01).all(), std


def test_normalize_formula_and_eval_batches(small):
    x = small.test_x[:7]
    expected = (x.double() / 255 - MEAN.double()) / STD.double()
    got = small.normalize(x)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-5)
    sizes, xs = [], []
    for xb, yb in small.eval_batches("test", batch_size=30):
        sizes.append(len(yb))
        xs.append(xb)
    assert sizes == [30, 30, 30, 10]
    assert torch.equal(torch.cat(xs), small.normalize(small.test_x))
    with pytest.raises(KDZooError, match="val_size"):
        next(small.eval_batches("val"))


def test_direct_construction_fingerprints_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(40) % 10
    a = Data(x, y, x[:10], y[:10])
    b = Data(x.clone(), y.clone(), x[:10].clone(), y[:10].clone())
    x2 = x.clone()
    x2[5, 1, 2, 3] ^= 1
    c = Data(x2, y, x[:10], y[:10])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert _same(_batches(a, 0, 0, 16), _batches(b, 0, 0, 16))
    with pytest.raises(ValueError):
        Data(x.float(), y, x, y)


def test_cifar10_batches_are_unchanged_by_the_move_into_a_plugin(cifar_path):
    """Pinned before CIFAR-10 moved from the core into its plugin: the same fingerprints, the same batches."""
    d = prepare_data(cifar_path, train_size=1000, test_size=500, val_size=100, subset_seed=3)
    assert d.fingerprint == "559e2f58268766eecb11da1f417f5aa9df1cafefab387f4e3524c2f2fd2b2653"
    h = hashlib.sha256()
    for epoch in (0, 1):
        for flip in ("random", "alternating"):
            for i, (x, y) in enumerate(d.train_batches(seed=7, epoch=epoch, batch_size=128, flip=flip)):
                if i < 3:
                    h.update(x.numpy().tobytes())
                    h.update(y.numpy().tobytes())
    for x, y in d.eval_batches("val", 64):
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    assert h.hexdigest() == "1488c1b07e064d514ae6f26eb2c057e85a307b30ff7de09ce077625333246003"
    assert prepare_data(cifar_path).fingerprint == "059d4725e54a848e0f189e4ddc8996f48ad21619bb30980e3aea98a01da7a710"


# ---------------------------------------------------------------------------------------------
# Placement: images in host memory, batches on the training device


def test_placement_rule(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert kdata.choose_placement(10**12, cpu) == cpu  # on a CPU the host is the device
    assert kdata.choose_placement(10, gpu, "host") == cpu
    assert kdata.choose_placement(10**12, gpu, "device") == gpu
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 4000))
    assert kdata.choose_placement(int(kdata.DEVICE_FRACTION * 1000), gpu) == gpu
    assert kdata.choose_placement(int(kdata.DEVICE_FRACTION * 1000) + 1, gpu) == cpu
    with pytest.raises(KDZooError, match="auto, device, host"):
        kdata.choose_placement(10, gpu, "gpu")


def test_the_host_memory_path_gives_the_same_batches(small, monkeypatch):
    """The host path gathers each batch's images with the CPU permutation and moves them; on a CPU the
    move is a no-op, so forcing the path here checks its indexing against the on-device path."""
    ref = [(x.clone(), y.clone(), i.clone()) for x, y, i in small.train_batches(3, 1, 64, with_indices=True)]
    evals = [(x.clone(), y.clone()) for x, y in small.eval_batches("test", 64)]
    monkeypatch.setattr(Data, "on_host", property(lambda self: True))
    host = list(small.train_batches(3, 1, 64, with_indices=True))
    assert len(host) == len(ref) and all(
        torch.equal(a, b) for r, h in zip(ref, host) for a, b in zip(r, h))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(evals, small.eval_batches("test", 64)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_images_in_host_memory_give_the_device_batches(cifar_path):
    on_gpu = prepare_data(cifar_path, train_size=600, test_size=100, device="cuda", placement="device")
    on_host = prepare_data(cifar_path, train_size=600, test_size=100, device="cuda", placement="host")
    assert on_host.on_host and not on_gpu.on_host and on_host.train_x.device.type == "cpu"
    assert on_host.fingerprint == on_gpu.fingerprint
    for (a, b), (c, d) in zip(on_gpu.train_batches(1, 2, 128), on_host.train_batches(1, 2, 128)):
        assert c.device.type == "cuda" and torch.equal(a, c) and torch.equal(b, d)
    for (a, b), (c, d) in zip(on_gpu.eval_batches("test", 64), on_host.eval_batches("test", 64)):
        assert torch.equal(a, c) and torch.equal(b, d)
