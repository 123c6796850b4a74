"""The user's data (user_data.py through data.load_dataset): image folders of PNG files, .npz
arrays and torchvision-style dataset classes that the tests write, read back exactly, with the
training set's statistics; and one sentence (exit 2 from the command) for each bad input."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg
from PIL import Image
from test_cli import assert_one_line_error, call_main

from dpbp import user_data
from dpbp.data import DataConfig, load_dataset, train_batch
from dpbp.errors import ConfigError

CPU = torch.device("cpu")


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def pixels(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_folder(root: Path, classes=("cat", "dog", "emu"), per_class=4, shape=(6, 5),
                 val: int | None = 2) -> dict[str, list[np.ndarray]]:
    """root/train/<class>/i.png (and root/val/<class>/i.png); returns the arrays by split/class."""
    written: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    for split, n in (("train", per_class), ("val", val)):
        if n is None:
            continue
        for c, name in enumerate(classes):
            for i in range(n):
                a = pixels(100 * c + i + (0 if split == "train" else 50), shape)
                write_png(root / split / name / f"{i}.png", a)
                written[split].append(a)
    return written


def folder(root: Path, **kw) -> DataConfig:
    return DataConfig(name="imagefolder", root=str(root), **{"num_classes": None,
                                                             "augment": "none", **kw})


def arrays(path: Path, **kw) -> DataConfig:
    return DataConfig(name="arrays", path=str(path), **{"num_classes": None, "augment": "none",
                                                        **kw})


# ----------------------------------------------------------------------------------------------
# Image folders


def test_an_image_folder_with_train_and_val_is_read_exactly(tmp_path):
    written = write_folder(tmp_path)
    ds = load_dataset(folder(tmp_path))
    assert ds.train_x.shape == (12, 1, 6, 5) and ds.train_x.dtype == torch.uint8  # grey PNGs
    assert ds.test_x.shape == (6, 1, 6, 5)
    assert ds.num_classes == 3
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4  # sorted class folders
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(ds.train_x[:, 0].numpy(), np.stack(written["train"]))  # lossless
    assert np.array_equal(ds.test_x[:, 0].numpy(), np.stack(written["val"]))
    scaled = np.stack(written["train"]).astype(np.float64) / 255  # statistics of train only
    assert ds.mean.item() == pytest.approx(scaled.mean(), rel=1e-6)
    assert ds.std.item() == pytest.approx(scaled.std(), rel=1e-6)


def test_without_val_a_seeded_share_is_held_out(tmp_path):
    write_folder(tmp_path / "d", per_class=5, val=None)
    root = tmp_path / "d" / "train"  # also: the class folders directly under data.root
    a = load_dataset(folder(root, holdout=0.2, split_seed=1))
    b = load_dataset(folder(root, holdout=0.2, split_seed=1))
    c = load_dataset(folder(root, holdout=0.2, split_seed=2))
    assert (len(a.train_y), len(a.test_y)) == (12, 3)
    assert torch.equal(a.test_x, b.test_x) and not torch.equal(a.test_x, c.test_x)
    both = torch.cat([a.train_x, a.test_x]).flatten(1)
    assert len({tuple(r.tolist()) for r in both}) == 15  # every image once


def test_grey_and_colour_images_give_three_channels(tmp_path):
    write_png(tmp_path / "a" / "grey.png", pixels(1, (4, 4)))
    colour = pixels(2, (4, 4, 3))
    write_png(tmp_path / "b" / "rgb.png", colour)
    write_png(tmp_path / "b" / "rgb2.png", colour)
    ds = load_dataset(folder(tmp_path, holdout=0.34, num_classes=2))
    assert ds.in_channels == 3 and ds.mean.shape == (3,)


def test_resize_makes_mixed_sizes_one(tmp_path):
    write_png(tmp_path / "train" / "a" / "0.png", pixels(1, (8, 8)))
    write_png(tmp_path / "train" / "a" / "1.png", pixels(2, (5, 7)))
    write_png(tmp_path / "val" / "a" / "0.png", pixels(3, (9, 9)))
    ds = load_dataset(folder(tmp_path, resize=[6, 4]))
    assert ds.train_x.shape == (2, 1, 6, 4) and ds.test_x.shape == (1, 1, 6, 4)
    assert load_dataset(folder(tmp_path, resize=5)).train_x.shape[-2:] == (5, 5)


# ----------------------------------------------------------------------------------------------
# Arrays


def test_uint8_images_nhwc_nchw_and_nhw(tmp_path):
    nhwc = pixels(1, (10, 5, 6, 3))
    np.savez(tmp_path / "a.npz", x_train=nhwc, y_train=np.arange(10) % 4,
             x_test=nhwc[:3], y_test=np.array([0, 1, 3]))
    ds = load_dataset(arrays(tmp_path / "a.npz"))
    assert ds.train_x.shape == (10, 3, 5, 6)
    assert torch.equal(ds.train_x, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert ds.num_classes == 4 and ds.test_y.tolist() == [0, 1, 3]
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    np.savez(tmp_path / "b.npz", x_train=nchw, y_train=np.arange(10) % 4, x_test=nchw[:2],
             y_test=np.array([1, 2]))
    assert torch.equal(load_dataset(arrays(tmp_path / "b.npz")).train_x, torch.from_numpy(nchw))
    np.savez(tmp_path / "c.npz", x_train=nhwc[..., 0], y_train=np.arange(10) % 4)
    assert load_dataset(arrays(tmp_path / "c.npz")).train_x.shape[1:] == (1, 5, 6)


def test_float_features_are_normalised_per_feature(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(40, 3)) * [1.0, 10.0, 0.1] + [5.0, -2.0, 0.0]).astype(np.float32)
    y = np.arange(40) % 2
    np.savez(tmp_path / "f.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    ds = load_dataset(arrays(tmp_path / "f.npz"))
    assert ds.sample_shape == (3,) and ds.train_x.dtype == torch.float32
    assert np.allclose(ds.mean.numpy(), x[:30].mean(0), atol=1e-5)
    assert np.allclose(ds.std.numpy(), x[:30].std(0), rtol=1e-5)
    xb, yb = train_batch(ds, torch.arange(30), None)
    expected = (x[:30] - x[:30].mean(0)) / x[:30].std(0)
    assert np.allclose(xb.numpy(), expected, atol=1e-5) and yb.tolist() == y[:30].tolist()


def test_given_statistics_are_used_as_they_are(tmp_path):
    np.savez(tmp_path / "f.npz", x_train=np.ones((4, 2), np.float32), y_train=np.arange(4) % 2)
    ds = load_dataset(arrays(tmp_path / "f.npz", mean=[1, 2], std=[0.5, 4], holdout=0.25))
    assert ds.mean.tolist() == [1, 2] and ds.std.tolist() == [0.5, 4]
    with pytest.raises(ConfigError, match="data.std=\\[0.5\\] must give 2 values"):
        load_dataset(arrays(tmp_path / "f.npz", std=[0.5], holdout=0.25))
    with pytest.raises(ConfigError, match="data.augment=crop crops and flips images"):
        load_dataset(DataConfig(name="arrays", path=str(tmp_path / "f.npz"), num_classes=None,
                                augment="crop", holdout=0.25))


# ----------------------------------------------------------------------------------------------
# Dataset classes (data._target_)

DATASETS = "dpbp_test_datasets"
DATASET_SOURCE = textwrap.dedent('''
    import numpy as np
    import torch
    from PIL import Image

    class Tiny:
        """torchvision-style: root, train, download; PIL images and int labels."""
        def __init__(self, root, train=True, download=False, n=6):
            self.root, self.train, self.n = root, train, n if train else 3

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            a = np.full((4, 4), 10 * i + (0 if self.train else 100), dtype=np.uint8)
            return Image.fromarray(a), i % 3

    class Tensors:
        """No train split; float (C, H, W) tensors and tensor labels."""
        def __init__(self, root):
            self.root = root

        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.full((2, 3, 3), float(i)), torch.tensor(i % 2)
''')


@pytest.fixture
def datasets_module(tmp_path, monkeypatch):
    (tmp_path / f"{DATASETS}.py").write_text(DATASET_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, DATASETS, raising=False)
    return tmp_path


def test_a_torchvision_style_class_gives_train_and_test(datasets_module):
    ds = load_dataset(DataConfig(name="custom", _target_=f"{DATASETS}.Tiny", root="~/x",
                                 num_classes=None, args={"n": 5}, augment="none"))
    assert ds.train_x.shape == (5, 1, 4, 4) and ds.test_x.shape == (3, 1, 4, 4)
    assert ds.train_x[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40]
    assert ds.test_x[:, 0, 0, 0].tolist() == [100, 110, 120]
    assert ds.train_y.tolist() == [0, 1, 2, 0, 1] and ds.num_classes == 3


def test_a_class_of_float_tensors_without_a_test_split(datasets_module):
    ds = load_dataset(DataConfig(name="custom", _target_=f"{DATASETS}.Tensors",
                                 num_classes=None, holdout=0.3, augment="none"))
    assert ds.train_x.dtype == torch.float32 and ds.sample_shape == (2, 3, 3)
    assert (len(ds.train_y), len(ds.test_y)) == (7, 3) and ds.num_classes == 2
    assert sorted(torch.cat([ds.train_x, ds.test_x])[:, 0, 0, 0].tolist()) == list(range(10))


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence, exit 2, from the command


def _bad_files(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    (tmp / "noimg" / "a").mkdir(parents=True)
    (tmp / "noimg" / "a" / "notes.txt").write_text("no image here")
    write_png(tmp / "mixed" / "a" / "0.png", pixels(1, (8, 8)))
    write_png(tmp / "mixed" / "b" / "1.png", pixels(2, (6, 8)))
    write_png(tmp / "broken" / "a" / "0.png", pixels(1, (8, 8)))
    (tmp / "broken" / "a" / "1.png").write_bytes(b"not a png")
    write_folder(tmp / "extra", per_class=2, val=1)
    write_png(tmp / "extra" / "val" / "zebra" / "0.png", pixels(3, (6, 5)))
    x = pixels(1, (10, 1, 4, 4))
    np.savez(tmp / "short.npz", x_train=x, y_train=np.zeros(9, int))
    np.savez(tmp / "neg.npz", x_train=x, y_train=np.arange(10) - 1)
    np.savez(tmp / "beyond.npz", x_train=x, y_train=np.arange(10) % 3, x_test=x[:2],
             y_test=np.array([0, 5]))
    np.savez(tmp / "frac.npz", x_train=x, y_train=np.arange(10) * 0.5)
    np.savez(tmp / "nox.npz", y_train=np.zeros(10, int))
    np.savez(tmp / "shape.npz", x_train=x, y_train=np.arange(10) % 3, x_test=x[:2, :, :3],
             y_test=np.array([0, 1]))
    (tmp / "junk.npz").write_bytes(b"not a zip file")
    np.savez(tmp / "good.npz", x_train=x, y_train=np.arange(10) % 3)


BAD = [
    (["data=imagefolder", "data.root={tmp}/nowhere"], "data.root={tmp}/nowhere is not a folder"),
    (["data=imagefolder"], "data=imagefolder needs data.root=DIR"),
    (["data=imagefolder", "data.root={tmp}/empty"], "no images in {tmp}/empty"),
    (["data=imagefolder", "data.root={tmp}/noimg"], "no images in {tmp}/noimg"),
    (["data=imagefolder", "data.root={tmp}/mixed"], "images of mixed sizes: {tmp}/mixed/a/0.png "
     "is 8x8 but {tmp}/mixed/b/1.png is 6x8; set data.resize=[H,W]"),
    (["data=imagefolder", "data.root={tmp}/broken"], "{tmp}/broken/a/1.png is not a readable"),
    (["data=imagefolder", "data.root={tmp}/extra"], "has the class folder 'zebra'"),
    (["data=arrays"], "data=arrays needs data.path=FILE.npz"),
    (["data=arrays", "data.path={tmp}/none.npz"], "is not a file"),
    (["data=arrays", "data.path={tmp}/junk.npz"], "is not a readable .npz file"),
    (["data=arrays", "data.path={tmp}/nox.npz"], "has no array x_train (it has y_train)"),
    (["data=arrays", "data.path={tmp}/short.npz"], "x_train has 10 samples but y_train has "
     "shape [9]"),
    (["data=arrays", "data.path={tmp}/neg.npz"], "a training label is -1, outside the 9 classes"),
    (["data=arrays", "data.path={tmp}/beyond.npz"], "a test label is 5, outside the 3 classes "
     "0..2 that the training labels give"),
    (["data=arrays", "data.path={tmp}/beyond.npz", "data.num_classes=2"],
     "a training label is 2, outside the 2 classes 0..1 that data.num_classes give"),
    (["data=arrays", "data.path={tmp}/frac.npz"], "holds float64 values; labels must be integer"),
    (["data=arrays", "data.path={tmp}/shape.npz"], "x_test's samples are uint8 [1, 3, 4]"),
    (["data=custom"], "data=custom needs data._target_=module.Class"),
    (["data._target_=a.B"], "unknown setting data._target_"),
    (["data._target_=a.B"], "a dataset class of your own is data=custom data._target_=module"),
    (["data=custom", "data._target_=no_such_module.Data"], "cannot import data._target_"),
    (["data=arrays", "data.path={tmp}/good.npz", "data.holdout=1.5"], "data.holdout=1.5"),
]


@pytest.mark.parametrize("overrides, words", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_data_exits_2_with_one_line(overrides, words, tmp_path, monkeypatch, capsys):
    _bad_files(tmp_path)
    run_dir = tmp_path / "run"
    args = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    rc = call_main(["train", "device=cpu", "model=mlp", "trainer.epochs=1",
                    f"hydra.run.dir={run_dir}", *args], monkeypatch)
    out, err = capsys.readouterr()
    assert words.replace("{tmp}", str(tmp_path)) in assert_one_line_error(rc, out, err)
    assert not run_dir.exists()


def test_a_built_in_model_refuses_features(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "f.npz", x_train=np.ones((8, 3), np.float32), y_train=np.arange(8) % 2)
    rc = call_main(["train", "device=cpu", "model=mlp", "data=arrays",
                    f"data.path={tmp_path}/f.npz", "trainer.batch_size=4",
                    f"hydra.run.dir={tmp_path}/run"], monkeypatch)
    out, err = capsys.readouterr()
    assert "model=mlp takes images" in assert_one_line_error(rc, out, err)


# ----------------------------------------------------------------------------------------------
# Image folders streamed from disk (data.stream): one image decoded per item


def write_mixed(root: Path) -> None:
    """Grey images first, then colour ones, of mixed sizes (three channels; needs data.resize)."""
    for i in range(5):
        write_png(root / "train" / "a" / f"{i}.png", pixels(i, (7 + i, 6)))
        write_png(root / "train" / "b" / f"{i}.png", pixels(10 + i, (6, 5 + i, 3)))
    write_png(root / "val" / "a" / "0.png", pixels(20, (6, 6, 3)))
    write_png(root / "val" / "b" / "0.png", pixels(21, (9, 9)))


LAYOUTS = {"train and val": (lambda r: write_folder(r), {}),
           "held out": (lambda r: write_folder(r, per_class=5, val=None), {}),
           "resized grey and colour": (write_mixed, {"resize": [6, 4]})}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_streamed_folder_gives_the_in_memory_batches(layout, tmp_path):
    """data.stream=true reads the same training batches (augmented, across an epoch end), the
    same training-set evaluation, test split and statistics as the in-memory path."""
    from dpbp.data import test_batches
    from dpbp.feed import Feed

    write, kw = LAYOUTS[layout]
    write(tmp_path)
    kw = {**kw, "augment": "crop_flip", "loader_workers": 0}
    held = load_dataset(folder(tmp_path, stream=False, **kw))
    streamed = load_dataset(folder(tmp_path, stream=True, **kw))
    assert not held.streamed and streamed.streamed
    assert isinstance(streamed.train_items, user_data.FolderItems)
    assert streamed.num_train == held.num_train and streamed.sample_shape == held.sample_shape
    assert torch.equal(streamed.train_y, held.train_y)
    assert torch.equal(streamed.test_x, held.test_x) and torch.equal(streamed.test_y,
                                                                     held.test_y)
    assert torch.allclose(streamed.mean, held.mean, rtol=1e-6, atol=1e-7)
    assert torch.allclose(streamed.std, held.std, rtol=1e-6, atol=1e-7)
    a, b = Feed(held, 4, 3, CPU), Feed(streamed, 4, 3, CPU)
    for n in range(2 * a.steps + 1):
        assert torch.equal(a.inputs(n), b.inputs(n)) and torch.equal(a.labels(n), b.labels(n))
    for (x, y), (sx, sy) in zip(test_batches(held, 5, "train"), test_batches(streamed, 5, "train"),
                                strict=True):
        assert torch.equal(x, sx) and torch.equal(y, sy)
    assert torch.equal(streamed.example(2), held.example(2))


def test_the_parent_hands_a_streamed_folders_statistics_to_the_workers(tmp_path, monkeypatch):
    """The pre-flight computes them in its one pass over the images and fills data.mean/std, so
    a worker loading the data decodes no training image for them, and gets the same values."""
    from dpbp.launch import preflight

    write_folder(tmp_path)
    opened: list[str] = []
    real = user_data._open
    monkeypatch.setattr(user_data, "_open", lambda p: (opened.append(p), real(p))[1])
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path}", "data.stream=true",
                   "data.loader_workers=0", "data.augment=none", "model=custom",
                   f"model._target_={__name__}.tiny_blocks", "gpus=2", "trainer.batch_size=4")
    assert cfg.data.mean is None
    preflight(cfg, quiet=True)
    parent = load_dataset(folder(tmp_path, stream=True, loader_workers=0))
    assert cfg.data.mean == parent.mean.tolist() and cfg.data.std == parent.std.tolist()
    opened.clear()
    worker = load_dataset(cfg.data)
    assert len(opened) == 1 + 6  # its first image (the shape) and the test split, no pass
    assert torch.equal(worker.mean, parent.mean) and torch.equal(worker.std, parent.std)
    given = make_cfg("data=imagefolder", f"data.root={tmp_path}", "data.stream=true",
                     "data.mean=[0.5]", "data.std=[0.25]", "data.loader_workers=0",
                     "model=custom", f"model._target_={__name__}.tiny_blocks",
                     "trainer.batch_size=4")
    preflight(given, quiet=True)
    assert (given.data.mean, given.data.std) == ([0.5], [0.25])  # the user's stay


def tiny_blocks(in_channels: int, num_classes: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * 30, 8),
                               torch.nn.Linear(8, num_classes))


def test_a_streamed_folder_never_holds_its_decoded_training_set(tmp_path, monkeypatch):
    """Streamed, the training images are decoded one per item (and once each for the
    statistics): the dataset keeps only its first image; auto streams by the estimated size."""
    write_folder(tmp_path)  # 12 training images of 1 x 6 x 5 bytes, 6 test images
    opened: list[str] = []
    real = user_data._open
    monkeypatch.setattr(user_data, "_open", lambda p: (opened.append(p), real(p))[1])
    given = {"mean": [0.5], "std": [0.25], "loader_workers": 0}
    ds = load_dataset(folder(tmp_path, stream=True, **given))
    assert ds.train_x.shape == (1, 1, 6, 5) and ds.num_train == 12
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(opened) == 1 + 6  # the first training image (its shape), the test split
    x, y = ds.train_items[7]
    assert len(opened) == 8 and opened[-1].endswith("dog/3.png") and int(y) == 1
    assert ds.train_nbytes == 12 * 30 + 12 * 8
    opened.clear()
    ds = load_dataset(folder(tmp_path, stream="auto", stream_budget_mb=400 / 2**20,
                             loader_workers=0))
    assert ds.streamed and ds.train_x.shape[0] == 1
    assert len(opened) == 1 + 12 + 6  # and the statistics' pass: each training image once
    assert not load_dataset(folder(tmp_path, stream="auto", stream_budget_mb=500 / 2**20)
                            ).streamed


def test_a_streamed_folder_of_mixed_sizes_is_one_sentence(tmp_path):
    """Without data.resize the image headers are checked before training, as in memory."""
    write_mixed(tmp_path)
    for stream in (False, True):
        with pytest.raises(ConfigError, match=r"images of mixed sizes: .*a/0.png is 7x6 but "
                                              r".*a/1.png is 8x6; set data.resize"):
            load_dataset(folder(tmp_path, stream=stream))


def test_a_run_streams_an_image_folder_from_disk(tmp_path):
    from conftest import make_cfg

    from dpbp.train import train

    write_folder(tmp_path / "d")
    s = train(make_cfg("data=imagefolder", f"data.root={tmp_path / 'd'}", "data.stream=true",
                       "data.loader_workers=0", "model=mlp", "trainer.epochs=1",
                       "trainer.batch_size=4"), tmp_path / "run")
    assert s["data_loading"] == "stream" and s["steps"] == 3
