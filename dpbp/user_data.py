"""The user's own data: image folders, arrays in an .npz file, and any torchvision-style dataset.

    dpbp train data=imagefolder data.root=DIR      # DIR/train/<class>/*.png and DIR/val/<class>/...
    dpbp train data=arrays data.path=FILE.npz      # x_train, y_train, x_test, y_test
    dpbp train data=custom data._target_=torchvision.datasets.MNIST data.root=DIR

`decode` reads any of them into CPU tensors (uint8 images (N, C, H, W), or float32 features
(N, D) / float images, and int64 labels) with the normalisation statistics of the training set;
data.py puts them on the device like every other dataset. An image folder whose training set is
streamed (`data.stream`: true, or auto when count x C x H x W of its first image exceeds
`data.stream_budget_mb`) is not decoded at all: `FolderItems` opens, decodes and resizes one
image per item, and its statistics come from one streaming pass (`folder_statistics`); only its
test split (small) is decoded into memory.

Without a test split (no `val/` or `test/` folder, no x_test in the file, a dataset class
without one) a fraction `data.holdout` of the training set is held out, drawn by
`data.split_seed`. Bad input (a missing folder or file, no images, images of mixed sizes without
`data.resize`, arrays of mismatched lengths, labels out of range) is a ConfigError in one
sentence.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpbp import custom
from dpbp.errors import ConfigError

NAMES = ("imagefolder", "arrays", "custom")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
_COMMON = {"holdout", "split_seed", "mean", "std", "num_classes"}
_KEYS = {"imagefolder": {"root", "resize"}, "arrays": {"path"},
         "custom": {"_target_", "args", "root", "download", "resize"}}


def keys(name: str) -> set[str]:
    """The data.* settings that apply to dataset `name` (one of NAMES)."""
    return _COMMON | _KEYS[name]


@dataclass
class Decoded:
    """A dataset read into CPU tensors, before it goes to the device."""

    train_x: torch.Tensor  # uint8 (N, C, H, W) images, or float32 (N, D) features / images
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: torch.Tensor  # float32, one per channel (images) or feature; uint8: in [0, 1] units
    std: torch.Tensor
    # streamed from disk: the training set as FolderItems; train_x then holds its first image only
    train_items: Any = None


def decode(cfg: Any, holdout_generator: torch.Generator,
           streams: Callable[[int], bool] | None = None) -> Decoded:
    """Read the dataset that `cfg` (a DataConfig with name in NAMES) names; hold out a test
    split with `holdout_generator` when the source has none. `streams(nbytes)`: whether a
    training set of that decoded size is streamed; an image folder's then stays on disk."""
    if cfg.name == "imagefolder":
        lazy = _lazy_folder(cfg, holdout_generator, streams)
        if lazy is not None:
            return lazy
        x, y, tx, ty = _image_folder(cfg)
    elif cfg.name == "arrays":
        x, y, tx, ty = _arrays(cfg)
    else:
        x, y, tx, ty = _dataset_class(cfg)
    if tx is None:
        x, y, tx, ty = _hold_out(x, y, cfg.holdout, holdout_generator)
    num_classes = _check_labels(y, ty, cfg.num_classes)
    if not x.is_floating_point() and x.dim() != 4:
        x, tx = x.float(), tx.float()  # uint8 features (not images): normalised as numbers
    mean, std = _statistics(x, cfg.mean, cfg.std)
    return Decoded(x, y, tx, ty, num_classes, mean, std)


# ----------------------------------------------------------------------------------------------
# Image folders (torchvision's ImageFolder layout)


def folder_samples(directory: Path, class_to_idx: dict[str, int] | None = None
                   ) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """(path, class index) of every image under `directory`/<class>/, as torchvision's
    ImageFolder finds them, and the class -> index map (`class_to_idx` given: use it)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        if class_to_idx is None:
            _, class_to_idx = find_classes(str(directory))
        samples = make_dataset(str(directory), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise ConfigError(f"no images in {directory}: {custom.first_line(e)} (the layout is "
                          f"{directory}/<class>/<image>.png, one folder per class).") from None
    return samples, class_to_idx


def _folder_split(cfg: Any) -> tuple[Path, list[tuple[str, int]], Path, list[tuple[str, int]]
                                     | None]:
    """The training folder and its (path, class) samples, the test folder and its samples (None:
    no test folder)."""
    if not cfg.root or cfg.root == custom.MISSING:
        raise ConfigError("data=imagefolder needs data.root=DIR: a folder with train/<class>/ "
                          "and val/<class>/ subfolders (or <class>/ ones).")
    root = Path(os.fspath(cfg.root)).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={cfg.root} is not a folder; point data.root at a folder "
                          "with train/<class>/ and val/<class>/ subfolders (or <class>/ ones).")
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    samples, classes = folder_samples(train_dir)
    test = None
    if test_dir is not None and train_dir != root:
        extra = sorted(set(folder_samples(test_dir)[1]) - set(classes))
        if extra:
            raise ConfigError(f"{test_dir} has the class folder {extra[0]!r} that "
                              f"{train_dir} lacks; give both the same classes.")
        test = folder_samples(test_dir, classes)[0]
    return train_dir, samples, test_dir or root, test


def _image_folder(cfg: Any) -> tuple[torch.Tensor | None, ...]:
    train_dir, samples, test_dir, test = _folder_split(cfg)
    size = _resize_arg(cfg.resize)
    x, y = _stack(((_open(p), c) for p, c in samples), size, "image", [p for p, _ in samples])
    if test is None:
        return x, y, None, None
    tx, ty = _stack(((_open(p), c) for p, c in test), size, "image", [p for p, _ in test])
    _same_kind(x, tx, str(train_dir), str(test_dir))
    return x, y, tx, ty


def _open(path: str) -> np.ndarray:
    """One image file as uint8 (H, W) or (H, W, 3)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return _pil_array(img)
    except OSError as e:
        raise ConfigError(f"{path} is not a readable image ({custom.first_line(e)}); "
                          "remove or replace it.") from None


def _pil_array(img: Any) -> np.ndarray:
    """A PIL image as uint8 grey (H, W) or RGB (H, W, 3)."""
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# Image folders streamed from disk


class FolderItems(torch.utils.data.Dataset):
    """An image folder's training set as (x uint8 (C, H, W), y int64) items, decoded one image
    per item exactly as `_stack` decodes the whole set: resized to `size` (else every image must
    have `shape`'s H x W), grey images given shape[0] equal channels. `targets`: the labels,
    known without reading an image."""

    def __init__(self, samples: list[tuple[str, int]], size: tuple[int, int] | None,
                 shape: tuple[int, int, int]) -> None:
        self.paths = [p for p, _ in samples]
        self.targets = torch.tensor([c for _, c in samples], dtype=torch.int64)
        self.size, self.shape = size, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chw(_open(self.paths[i]), i), self.targets[i]

    def chw(self, image: np.ndarray, i: int) -> torch.Tensor:
        """Item i's decoded image (H, W) or (H, W, 3) as the stored (C, H, W) tensor."""
        if self.size is not None:
            image = _resized(image, self.size)
        elif image.shape[:2] != self.shape[1:]:
            raise ConfigError(f"images of mixed sizes: {self.paths[0]} is {self.shape[1]}x"
                              f"{self.shape[2]} but {self.paths[i]} is {_hw(image)}; set "
                              "data.resize=[H,W] to resize them all.")
        image = image if image.ndim == 3 else image[:, :, None]
        if image.shape[2] != self.shape[0]:
            image = np.repeat(image, self.shape[0], axis=2)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _lazy_folder(cfg: Any, gen: torch.Generator, streams: Callable[[int], bool] | None
                 ) -> Decoded | None:
    """An image folder whose training set is streamed (`streams` of its estimated decoded size,
    count x C x H x W of its first image, says so) as FolderItems; None: decode it in memory
    (`gen` untouched). The test split (a val/ folder, or the held-out share drawn by `gen` as
    `_hold_out` draws it) is decoded into memory: it is small."""
    if streams is None:
        return None
    train_dir, samples, test_dir, test = _folder_split(cfg)
    if test is None:
        index = torch.arange(len(samples))
        labels = torch.tensor([c for _, c in samples], dtype=torch.int64)
        draw = torch.Generator().set_state(gen.get_state())  # gen: untouched if not streamed
        tr, _, te, _ = _hold_out(index, labels, cfg.holdout, draw)
        samples, test = [samples[i] for i in tr.tolist()], [samples[i] for i in te.tolist()]
    size = _resize_arg(cfg.resize)
    first = _open(samples[0][0])
    first = _resized(first, size) if size is not None else first
    channels = 3 if first.ndim == 3 else 1
    if size is None or channels == 1:  # the headers (no pixels) say what _stack would find
        for path, _ in samples:
            mode, hw = _header(path)
            channels = 3 if mode != "L" else channels  # grey and colour: three channels
            if size is None and hw != first.shape[:2]:
                raise ConfigError(f"images of mixed sizes: {samples[0][0]} is {_hw(first)} but "
                                  f"{path} is {hw[0]}x{hw[1]}; set data.resize=[H,W] to resize "
                                  "them all.")
    shape = (channels, *first.shape[:2])
    if not streams(len(samples) * int(np.prod(shape)) + 8 * len(samples)):
        return None
    items = FolderItems(samples, size, shape)
    x = items.chw(first, 0)[None]
    tx, ty = _stack(((_open(p), c) for p, c in test), size, "image", [p for p, _ in test])
    _same_kind(x, tx, str(train_dir), str(test_dir))
    num_classes = _check_labels(items.targets, ty, cfg.num_classes)
    mean, std = folder_statistics(items, cfg.mean, cfg.std, cfg.loader_workers)
    return Decoded(x, items.targets, tx, ty, num_classes, mean, std, items)


def _header(path: str) -> tuple[str, tuple[int, int]]:
    """An image file's PIL mode and (H, W), from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, (img.height, img.width)
    except OSError as e:
        raise ConfigError(f"{path} is not a readable image ({custom.first_line(e)}); "
                          "remove or replace it.") from None


def folder_statistics(items: FolderItems, mean: Any, std: Any, workers: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`_statistics` of the images of `items` in one streaming pass (one image in memory per
    loader worker): per-channel sums of the pixels and their squares, exact in int64, give the
    mean and std in [0, 1] units. Given values (data.mean, data.std) skip the pass: a run's
    pre-flight takes it once and hands the values to its workers (launch.keep_statistics)."""
    m = s = None
    if mean is None or std is None:
        total = torch.zeros(items.shape[0], dtype=torch.int64)
        squares = torch.zeros(items.shape[0], dtype=torch.int64)
        for x, _ in torch.utils.data.DataLoader(items, batch_size=None, num_workers=workers):
            v = x.flatten(1).long()
            total += v.sum(1)
            squares += (v * v).sum(1)
        n = len(items) * items.shape[1] * items.shape[2]
        m = total.double() / n
        s = (squares.double() / n - m * m).clamp(min=0).sqrt() / 255.0
        m = m / 255.0
        s = torch.where(s > 0, s, torch.ones_like(s))  # a constant channel: leave it as it is
    return _given(m, s, mean, std, items.shape[0])


# ----------------------------------------------------------------------------------------------
# Arrays in an .npz file


def _arrays(cfg: Any) -> tuple[torch.Tensor | None, ...]:
    if not cfg.path or cfg.path == custom.MISSING:
        raise ConfigError("data=arrays needs data.path=FILE.npz (arrays x_train, y_train and "
                          "optionally x_test, y_test).")
    path = Path(os.fspath(cfg.path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path={cfg.path} is not a file; give an .npz file with arrays "
                          "x_train, y_train, x_test, y_test (numpy.savez).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files if k in ARRAY_KEYS}
            present = list(npz.files)
    except Exception as e:  # not a zip, a pickled object array, a truncated file
        raise ConfigError(f"{path} is not a readable .npz file ({custom.first_line(e)}); "
                          "write it with numpy.savez(x_train=..., y_train=..., ...).") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise ConfigError(f"{path} has no array {key} (it has {', '.join(present) or 'none'})"
                              "; save x_train, y_train and optionally x_test, y_test.")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"{path} has only one of x_test and y_test; save both, or neither "
                          "(then data.holdout of the training set is held out).")
    x, y = _array_pair(arrays["x_train"], arrays["y_train"], "x_train", "y_train", path)
    if "x_test" not in arrays:
        return x, y, None, None
    tx, ty = _array_pair(arrays["x_test"], arrays["y_test"], "x_test", "y_test", path)
    if tx.shape[1:] != x.shape[1:] or tx.dtype != x.dtype:
        raise ConfigError(f"{path}: x_test's samples are {_kind(tx)} but x_train's are "
                          f"{_kind(x)}; save both with the same shape and type.")
    return x, y, tx, ty


def _kind(x: torch.Tensor) -> str:
    return f"{str(x.dtype).removeprefix('torch.')} {list(x.shape[1:])}"


def _array_pair(x: np.ndarray, y: np.ndarray, xs: str, ys: str, path: Path
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (uint8 NCHW/NHWC/NHW) or features (N, D), and their labels, as torch tensors."""
    if x.dtype.kind not in "uifb" or x.ndim not in (2, 3, 4) or len(x) == 0:
        raise ConfigError(f"{path}: {xs} is a {x.dtype} array of shape {list(x.shape)}; give "
                          "images (N, C, H, W), (N, H, W, C), (N, H, W) or features (N, D).")
    if len(x) != len(y) or y.ndim != 1:
        raise ConfigError(f"{path}: {xs} has {len(x)} samples but {ys} has shape "
                          f"{list(y.shape)}; give one label per sample.")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
    return tensor, _labels(y, f"{path}: {ys}")


def _labels(y: Any, what: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iu":
        raise ConfigError(f"{what} holds {y.dtype} values; labels must be integer class "
                          "indices 0..C-1.")
    return torch.from_numpy(y.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Any torchvision-style dataset class: cls(root=..., train=True/False, ...)[i] = (image, label)


def _dataset_class(cfg: Any) -> tuple[torch.Tensor | None, ...]:
    path = getattr(cfg, "_target_", None)
    if not path or path == custom.MISSING:
        raise ConfigError("data=custom needs data._target_=module.Class: a torchvision-style "
                          "dataset class (cls(root, train=True/False)[i] is (image, label)).")
    cls = custom.locate(path, "data._target_")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    given = {"root": str(Path(os.fspath(cfg.root)).expanduser()), "download": cfg.download}
    args = {**{k: v for k, v in given.items() if k in params}, **(cfg.args or {})}
    size = _resize_arg(cfg.resize)
    x, y = _stack(_items(_instance(cls, path, args, True)), size, f"{path} item")
    if "train" not in params:
        return x, y, None, None
    tx, ty = _stack(_items(_instance(cls, path, args, False)), size, f"{path}(train=False) item")
    _same_kind(x, tx, f"{path}(train=True)", f"{path}(train=False)")
    return x, y, tx, ty


def _instance(cls: Any, path: str, args: dict[str, Any], train: bool) -> Any:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        return cls(**args, **({"train": train} if "train" in params else {}))
    except Exception as e:
        raise ConfigError(f"data._target_={path} failed with {args} ({type(e).__name__}: "
                          f"{custom.first_line(e)}); fix data.root or data.args.") from None


def _items(ds: Any) -> Iterable[tuple[Any, Any]]:
    """(image, label) of every item of a map-style dataset."""
    for i in range(len(ds)):
        item = ds[i]
        yield _sample(item[0]), item[1]


def stack_dataset(ds: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) item of a map-style dataset, stacked: (N, C, H, W), (N,)."""
    return _stack(_items(ds), None, what)


def _sample(image: Any) -> np.ndarray:
    """A dataset's image (PIL, a CHW tensor, an HW/HWC array) as a numpy HW or HWC array."""
    if hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
        return _pil_array(image)
    if isinstance(image, torch.Tensor):
        image = image.numpy()
        return image.transpose(1, 2, 0) if image.ndim == 3 else image  # CHW -> HWC
    return np.asarray(image)


# ----------------------------------------------------------------------------------------------
# Shared: stacking images, held-out split, labels, statistics


def _resize_arg(resize: Any) -> tuple[int, int] | None:
    if resize is None:
        return None
    size = [resize] if isinstance(resize, int) else list(resize)
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                             for s in size):
        raise ConfigError(f"data.resize={resize!r}: give [H, W] (or one side S for S x S) in "
                          "pixels, or null to keep the images' own size.")
    return size[0], size[1]


def _resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An HW/HWC image resized to `size` (H, W): uint8 with PIL's bilinear filter."""
    if image.shape[:2] == size:
        return image
    if image.dtype == np.uint8:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((size[1], size[0]),
                                                        Image.Resampling.BILINEAR))
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    chw = t[None, None] if t.dim() == 2 else t.permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(chw, size=size, mode="bilinear", align_corners=False)
    return out[0, 0].numpy() if t.dim() == 2 else out[0].permute(1, 2, 0).numpy()


def _stack(items: Iterable[tuple[np.ndarray, Any]], size: tuple[int, int] | None, what: str,
           names: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, label) pairs -> (N, C, H, W) images, (N,) labels. Every image has the first's size
    (or `size`); grey images join colour ones as three equal channels."""
    images, labels = [], []
    for i, (image, label) in enumerate(items):
        name = names[i] if names else f"{what} {i}"
        if image.ndim not in (2, 3):
            raise ConfigError(f"{name} has shape {list(image.shape)}; an image is (H, W), "
                              "(H, W, C) or a (C, H, W) tensor.")
        if size is not None:
            image = _resized(image, size)
        elif images and image.shape[:2] != images[0].shape[:2]:
            first = names[0] if names else f"{what} 0"
            raise ConfigError(f"images of mixed sizes: {first} is {_hw(images[0])} but {name} "
                              f"is {_hw(image)}; set data.resize=[H,W] to resize them all.")
        images.append(image if image.ndim == 3 else image[:, :, None])
        try:
            labels.append(int(label))
        except (TypeError, ValueError, RuntimeError):
            raise ConfigError(f"{name} has the label {label!r}; labels must be integer class "
                              "indices 0..C-1.") from None
    if not images:
        raise ConfigError(f"no images: the {what}s are empty; give at least one per class.")
    channels = max(im.shape[2] for im in images)
    if any(im.shape[2] not in (1, channels) for im in images):
        raise ConfigError(f"the {what}s have {sorted({im.shape[2] for im in images})} channels; "
                          "give images with the same number of channels.")
    x = np.stack([np.repeat(im, channels, axis=2) if im.shape[2] != channels else im
                  for im in images]).transpose(0, 3, 1, 2)
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.dtype != torch.uint8:
        tensor = tensor.float()
    return tensor, torch.tensor(labels, dtype=torch.int64)


def _same_kind(x: torch.Tensor, tx: torch.Tensor, train: str, test: str) -> None:
    """The test images are stored like the training images (size, channels, type)."""
    if tx.shape[1:] != x.shape[1:] or tx.dtype != x.dtype:
        raise ConfigError(f"images of mixed sizes: {test} holds {_kind(tx)} images but {train} "
                          f"{_kind(x)} ones; set data.resize=[H,W] to resize them all.")


def _hw(image: np.ndarray) -> str:
    return f"{image.shape[0]}x{image.shape[1]}"


def _hold_out(x: torch.Tensor, y: torch.Tensor, fraction: float, gen: torch.Generator
              ) -> tuple[torch.Tensor, ...]:
    """A seeded random `fraction` of (x, y) as the test split."""
    if not 0 < fraction < 1:
        raise ConfigError(f"data.holdout={fraction}: the held-out test fraction must lie "
                          "between 0 and 1.")
    n_test = max(1, round(len(y) * fraction))
    if n_test >= len(y):
        raise ConfigError(f"the training set has {len(y)} samples: too few to hold out a test "
                          "split; give a test split (val/ folder, x_test) or more samples.")
    perm = torch.randperm(len(y), generator=gen)
    tr, te = perm[n_test:].sort().values, perm[:n_test].sort().values
    return x[tr], y[tr], x[te], y[te]


def _check_labels(y: torch.Tensor, ty: torch.Tensor, given: int | None) -> int:
    """The number of classes (given, or the largest training label + 1); every label in range."""
    if given is not None and (isinstance(given, bool) or not isinstance(given, int)
                              or given < 1):
        raise ConfigError(f"data.num_classes={given!r}: give a positive count, or null to "
                          "count the training labels.")
    num_classes = given if given is not None else int(y.max()) + 1
    for name, labels in (("training", y), ("test", ty)):
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            source = "data.num_classes" if given is not None else "the training labels"
            raise ConfigError(f"a {name} label is {bad}, outside the {num_classes} classes 0.."
                              f"{num_classes - 1} that {source} give; fix the labels or set "
                              "data.num_classes.")
    return num_classes


def _statistics(x: torch.Tensor, mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (images) or per-feature mean and std of the training set; uint8 images in
    [0, 1] units. Given values (data.mean, data.std) are checked and used instead."""
    dims = (0, 2, 3) if x.dim() == 4 else tuple(i for i in range(x.dim()) if i != 1)
    m = s = None
    if mean is None or std is None:
        scaled = x.double() / (255.0 if x.dtype == torch.uint8 else 1.0)
        m, s = scaled.mean(dim=dims), scaled.std(dim=dims, unbiased=False)
        s = torch.where(s > 0, s, torch.ones_like(s))  # a constant feature: leave it as it is
    return _given(m, s, mean, std, x.shape[1])


def _given(m: torch.Tensor | None, s: torch.Tensor | None, mean: Any, std: Any, n: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The computed statistics (float64, None where not computed), with the given ones (checked:
    `n` values) in their place, as float32."""
    if mean is not None:
        m = torch.tensor(_stat(mean, n, "data.mean", 0.0), dtype=torch.float64)
    if std is not None:
        s = torch.tensor(_stat(std, n, "data.std", None), dtype=torch.float64)
    assert m is not None and s is not None
    return m.float(), s.float()


def _stat(values: Any, n: int, key: str, floor: float | None) -> list[float]:
    values = list(values)
    if len(values) != n or (floor is None and any(v <= 0 for v in values)):
        raise ConfigError(f"{key}={values} must give {n} values (one per channel or feature)"
                          + ("" if floor is not None else ", each positive") + ".")
    return [float(v) for v in values]
