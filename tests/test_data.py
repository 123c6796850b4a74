"""Tests for dpbp.data: loaders (digits, CIFAR python format, synthetic) and augmentation."""

from __future__ import annotations

import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from dpbp.data import (
    DataConfig,
    Dataset,
    augment,
    batch_generator,
    epoch_permutation,
    load_dataset,
    normalize,
    test_batches,
    train_batch,
)
from dpbp.errors import ConfigError

# pytest would otherwise try to collect the imported generator function as a test.
test_batches.__test__ = False  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# Tiny CIFAR archives in the real python format


def _images(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows whose bytes differ per image, channel and position."""
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """5 train batches of 4 images and a test batch of 3, as cifar-10-batches-py/ under root."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_rows, train_labels = [], []
    for i in range(1, 6):
        rows = _images(4, i)
        labels = [(i * 4 + j) % 10 for j in range(4)]
        _dump(folder / f"data_batch_{i}", {b"batch_label": b"x", b"data": rows, b"labels": labels})
        train_rows.append(rows)
        train_labels += labels
    test_rows, test_labels = _images(3, 99), [9, 0, 5]
    _dump(folder / "test_batch", {b"data": test_rows, b"labels": test_labels})
    _dump(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)]})
    return np.concatenate(train_rows), np.array(train_labels), test_rows, np.array(test_labels)


def write_cifar100(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A train file of 6 images and a test file of 2, as cifar-100-python/ under root."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train_rows, train_labels = _images(6, 7), [0, 99, 42, 7, 63, 1]
    test_rows, test_labels = _images(2, 8), [98, 3]
    files = (("train", train_rows, train_labels), ("test", test_rows, test_labels))
    for name, rows, labels in files:
        coarse = [lab // 5 for lab in labels]
        _dump(folder / name, {b"data": rows, b"fine_labels": labels, b"coarse_labels": coarse})
    _dump(folder / "meta", {b"fine_label_names": [b"f%d" % i for i in range(100)]})
    return train_rows, np.array(train_labels), test_rows, np.array(test_labels)


def _check_cifar(ds: Dataset, expected: tuple[np.ndarray, ...], num_classes: int) -> None:
    train_rows, train_labels, test_rows, test_labels = expected
    n, m = len(train_rows), len(test_rows)
    assert ds.train_x.shape == (n, 3, 32, 32) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (m, 3, 32, 32) and ds.test_x.dtype == torch.uint8
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    assert ds.train_y.tolist() == train_labels.tolist()
    assert ds.test_y.tolist() == test_labels.tolist()
    assert ds.num_classes == num_classes and ds.in_channels == 3 and ds.image_size == 32
    # Channel-major rows: bytes 0..1023 are R (row-major), 1024.. G, 2048.. B.
    k = n - 1
    assert ds.train_x[k, 0, 0, 0] == train_rows[k, 0]
    assert ds.train_x[k, 0, 1, 2] == train_rows[k, 32 + 2]
    assert ds.train_x[k, 1, 0, 0] == train_rows[k, 1024]
    assert ds.train_x[k, 2, 31, 31] == train_rows[k, 3071]
    assert ds.test_x[1, 1, 5, 7] == test_rows[1, 1024 + 5 * 32 + 7]
    assert np.array_equal(ds.train_x.reshape(n, -1).numpy(), train_rows)
    assert np.array_equal(ds.test_x.reshape(m, -1).numpy(), test_rows)


def test_cifar10_tiny_archive(tmp_path: Path) -> None:
    expected = write_cifar10(tmp_path)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    _check_cifar(ds, expected, 10)
    assert ds.pad == 4 and ds.flip
    assert torch.allclose(ds.mean, torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.allclose(ds.std, torch.tensor([0.2470, 0.2435, 0.2616]))


def test_cifar100_tiny_archive(tmp_path: Path) -> None:
    expected = write_cifar100(tmp_path)
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))
    _check_cifar(ds, expected, 100)
    assert torch.allclose(ds.mean, torch.tensor([0.5071, 0.4865, 0.4409]))


def test_cifar10_from_tarball_offline(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = write_cifar10(src)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    ds = load_dataset(DataConfig(name="cifar10", root=str(root), download=False))
    _check_cifar(ds, expected, 10)


def test_cifar_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data=digits") as info:
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert "cifar-10-batches-py" in str(info.value)


def test_cifar_download_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_network)
    with pytest.raises(ConfigError, match="could not download CIFAR-100") as info:
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=True))
    assert str(tmp_path) in str(info.value) and "data=digits" in str(info.value)


def test_cifar_download_then_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    written = {}

    def fake_download(root: str, train: bool, download: bool) -> None:
        assert download
        written["expected"] = write_cifar10(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=True))
    _check_cifar(ds, written["expected"], 10)


class _ForeignGlobal:
    """Unpickles to a perfectly shaped array, but through a global no CIFAR file references."""

    def __reduce__(self) -> tuple:
        return (np.zeros, ((4, 3072), "uint8"))


@pytest.mark.parametrize(
    "content",
    [
        b"\x00garbage bytes, not a pickle",
        pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}),  # no labels
        pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}),
        pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1]}),
        pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}),
        pickle.dumps({b"data": _ForeignGlobal(), b"labels": [0, 1, 2, 3]}),
    ],
    ids=["garbage", "keys", "size", "label-count", "label-range", "foreign-global"],
)
def test_cifar_corrupt_file(tmp_path: Path, content: bytes) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(content)
    with pytest.raises(ConfigError, match="data_batch_3"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_cifar_missing_batch_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(ConfigError, match="test_batch"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))


# ----------------------------------------------------------------------------------------------
# digits, synthetic, config errors


def test_digits_shapes() -> None:
    ds = load_dataset(DataConfig(name="digits"))
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 8
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    assert set(ds.train_y.tolist()) == set(range(10))
    assert ds.pad == 1 and not ds.flip
    expected_mean = ds.train_x.float().div(255).mean()
    assert ds.mean.shape == (1,) and torch.allclose(ds.mean, expected_mean.reshape(1))
    assert ds.std.shape == (1,) and 0.1 < float(ds.std) < 0.6


def test_digits_pixel_scaling() -> None:
    from sklearn.datasets import load_digits

    raw = load_digits().images
    ds = load_dataset(DataConfig(name="digits"))
    all_x = torch.cat([ds.train_x, ds.test_x]).reshape(-1, 64).numpy().astype(np.int64)
    expected = np.round(raw.reshape(-1, 64) * 255 / 16).astype(np.int64)
    # The split is a permutation of the samples, so compare as sorted rows.
    assert np.array_equal(np.unique(all_x, axis=0), np.unique(expected, axis=0))
    assert all_x.sum() == expected.sum()


def test_digits_split_seed() -> None:
    a = load_dataset(DataConfig(name="digits", split_seed=0))
    b = load_dataset(DataConfig(name="digits", split_seed=0))
    c = load_dataset(DataConfig(name="digits", split_seed=1))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert not torch.equal(a.test_y, c.test_y)


def test_synthetic() -> None:
    cfg = DataConfig(name="synthetic", shape=(2, 12, 12), num_classes=5, train_size=40, test_size=7)
    a = load_dataset(cfg, seed=3)
    assert a.train_x.shape == (40, 2, 12, 12) and a.test_x.shape == (7, 2, 12, 12)
    assert a.train_x.dtype == torch.uint8 and a.num_classes == 5
    assert 0 <= int(a.train_y.min()) and int(a.train_y.max()) < 5
    assert torch.equal(a.mean, torch.full((2,), 0.5)) and torch.equal(a.std, torch.full((2,), 0.25))
    assert a.pad == 0 and not a.flip
    b = load_dataset(cfg, seed=3)
    c = load_dataset(cfg, seed=4)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)


def test_augment_option_resolution() -> None:
    ds = load_dataset(DataConfig(name="digits", augment="crop_flip", pad=2))
    assert (ds.pad, ds.flip) == (2, True)
    ds = load_dataset(DataConfig(name="digits", augment="none"))
    assert (ds.pad, ds.flip) == (0, False)
    ds = load_dataset(DataConfig(name="synthetic", augment="crop", train_size=2, test_size=2))
    assert (ds.pad, ds.flip) == (4, False)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (DataConfig(name="mnist"), "digits, cifar10, cifar100, synthetic"),
        (DataConfig(name="digits", augment="rotate"), "data.augment"),
        (DataConfig(name="digits", pad=-1), "data.pad"),
        (DataConfig(name="synthetic", shape=(3, 32)), "data.shape"),
        (DataConfig(name="synthetic", shape=(3, 32, 16)), "square"),
        (DataConfig(name="synthetic", num_classes=0), "data.num_classes"),
        (DataConfig(name="synthetic", train_size=0), "data.train_size"),
    ],
)
def test_config_errors(cfg: DataConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_dataset(cfg)


# ----------------------------------------------------------------------------------------------
# augmentation, normalization, batching, seeding


def _random_batch(b: int = 16, c: int = 3, h: int = 10, w: int = 12) -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(0, 256, (b, c, h, w), generator=gen, dtype=torch.uint8)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_augment_shape_and_determinism() -> None:
    x = _random_batch()
    out = augment(x, 4, True, _gen(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out, augment(x, 4, True, _gen(0)))
    assert not torch.equal(out, augment(x, 4, True, _gen(1)))


def test_augment_identity() -> None:
    x = _random_batch()
    assert torch.equal(augment(x, 0, False, _gen(0)), x)


def test_augment_crop_is_shifted_window() -> None:
    x = _random_batch(b=32)
    pad = 4
    out = augment(x, pad, False, _gen(5))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    _, _, h, w = x.shape
    offsets = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
        ]
        assert len(found) == 1, f"sample {i} is not a window of its padded input"
        offsets.add(found[0])
    # Per-sample offsets in both directions: a batch-wide or one-axis shift would fail this.
    assert len({dy for dy, _ in offsets}) > 3 and len({dx for _, dx in offsets}) > 3


def test_augment_flip() -> None:
    x = _random_batch(b=64)
    out = augment(x, 0, True, _gen(2))
    same = [torch.equal(out[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_augment_crop_and_flip_together() -> None:
    x = _random_batch(b=32)
    pad = 2
    out = augment(x, pad, True, _gen(9))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    _, _, h, w = x.shape
    kinds = set()
    for i in range(len(x)):
        windows = [
            padded[i, :, dy : dy + h, dx : dx + w]
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
        ]
        plain = any(torch.equal(out[i], win) for win in windows)
        flipped = any(torch.equal(out[i], win.flip(-1)) for win in windows)
        assert plain or flipped, f"sample {i} is neither a window nor a mirrored window"
        kinds |= {"plain"} if plain else {"flipped"}
    assert kinds == {"plain", "flipped"}


def test_normalize_known_values() -> None:
    x = torch.tensor([0, 255, 51, 255], dtype=torch.uint8).reshape(1, 2, 1, 2)
    mean = torch.tensor([0.5, 0.2])
    std = torch.tensor([0.25, 0.4])
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    expected = torch.tensor([[-2.0, 2.0], [0.0, 2.0]]).reshape(1, 2, 1, 2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_train_batch() -> None:
    ds = load_dataset(DataConfig(name="digits"))
    idx = torch.tensor([5, 0, 1436, 5])
    x, y = train_batch(ds, idx, None)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert torch.equal(y, ds.train_y[idx])
    assert torch.allclose(x, normalize(ds.train_x[idx], ds.mean, ds.std))
    big = torch.arange(256)
    xa, ya = train_batch(ds, big, batch_generator(0, 3, "cpu"))
    xb, _ = train_batch(ds, big, batch_generator(0, 3, "cpu"))
    assert torch.equal(ya, ds.train_y[big]) and torch.equal(xa, xb)
    assert not torch.allclose(xa, normalize(ds.train_x[big], ds.mean, ds.std))


def test_test_batches_cover_once() -> None:
    ds = load_dataset(DataConfig(name="digits"))
    batches = list(test_batches(ds, 128))
    assert [len(y) for _, y in batches] == [128, 128, 104]
    assert torch.equal(torch.cat([y for _, y in batches]), ds.test_y)
    xs = torch.cat([x for x, _ in batches])
    assert torch.allclose(xs, normalize(ds.test_x, ds.mean, ds.std))
    with pytest.raises(ConfigError):
        list(test_batches(ds, 0))


def test_epoch_permutation() -> None:
    p = epoch_permutation(1000, seed=1, epoch=0, device="cpu")
    assert torch.equal(p.sort().values, torch.arange(1000))
    assert torch.equal(p, epoch_permutation(1000, seed=1, epoch=0, device="cpu"))
    assert not torch.equal(p, epoch_permutation(1000, seed=1, epoch=1, device="cpu"))
    assert not torch.equal(p, epoch_permutation(1000, seed=2, epoch=0, device="cpu"))


def test_batch_generator() -> None:
    def draw(seed: int, batch: int) -> torch.Tensor:
        return torch.rand(8, generator=batch_generator(seed, batch, "cpu"))

    assert torch.equal(draw(0, 7), draw(0, 7))
    assert not torch.equal(draw(0, 7), draw(0, 8))
    assert not torch.equal(draw(0, 7), draw(1, 7))
    assert batch_generator(0, 0, "cpu").device == torch.device("cpu")
