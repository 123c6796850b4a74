"""Datasets held on the training device as uint8, with batched on-device augmentation.

No DataLoader for data that fits: a whole dataset (CIFAR is 150 MB as uint8) fits on any
accelerator, and gathering, cropping, flipping and normalizing a batch with a handful of tensor
ops is much faster than per-sample Python transforms, which would otherwise starve pipelined
model stages. A training set larger than `data.stream_budget_mb` (or any, with
`data.stream=true`) stays on the host as a dataset of (x, y) items and is streamed through a
DataLoader (stream.py); its batches get the same on-device augmentation and normalization. A
streamed image folder is read from disk image by image (user_data.FolderItems).
"""

from __future__ import annotations

import codecs
import hashlib
import os
import pickle
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpbp import user_data
from dpbp.errors import ConfigError
from dpbp.stream import TensorItems, in_order, wanted

DATASET_NAMES = ("digits", "cifar10", "cifar100", "synthetic", "text", *user_data.NAMES)
AUGMENT_MODES = ("auto", "crop_flip", "crop", "none")


@dataclass
class DataConfig:
    """Which dataset to load and how to augment it (the `data` section of the config)."""

    name: str = "digits"  # digits | cifar10 | cifar100 | synthetic | text
    root: str = "~/.cache/dpbp"  # where cifar lives / is downloaded to (expanduser)
    download: bool = True
    # auto: cifar -> crop_flip (pad 4), digits -> crop (pad 1), synthetic -> none
    augment: str = "auto"
    pad: int | None = None  # None = dataset default (cifar 4, digits 1); ignored for augment=none
    split_seed: int = 0  # digits: fixed 80/20 train/test split by this seed
    shape: tuple[int, int, int] = (3, 32, 32)  # synthetic only
    num_classes: int | None = 10  # synthetic; user data: null = count the training labels
    train_size: int = 50000  # synthetic only
    test_size: int = 10000  # synthetic only
    # the user's data (user_data.py): imagefolder (root), arrays (path), custom (_target_)
    path: str | None = None  # arrays: the .npz file; text: a UTF-8 text file
    resize: int | list[int] | None = None  # images of mixed sizes: [H, W] (or S) for all
    holdout: float = 0.2  # no test split given: this fraction of the training set, by split_seed
    mean: list[float] | None = None  # normalisation; null: from the training set
    std: list[float] | None = None
    _target_: str | None = None  # custom: a torchvision-style dataset class
    args: dict[str, Any] | None = None  # custom: more keyword arguments for it
    context: int = 64  # text only: tokens per sample (the transformer's context length)
    test_fraction: float = 0.1  # text only: the held-out tail of the text
    # training set through a DataLoader: auto (when larger than stream_budget_mb) | true | false
    stream: str | bool = "auto"
    stream_budget_mb: float = 4096.0
    loader_workers: int = 2  # DataLoader worker processes of the streaming path

    def task(self) -> str:
        """What the data is for: "lm" (next-token prediction, data=text) or "classify"."""
        return "lm" if self.name == "text" else "classify"

    def applicable(self) -> dict[str, Any]:
        """The keys that apply to this dataset (a run's summary shows only these)."""
        own = {"digits": {"split_seed"}, "cifar10": {"root", "download"},
               "cifar100": {"root", "download"},
               "synthetic": {"shape", "num_classes", "train_size", "test_size"},
               "text": {"path", "context", "test_fraction"},
               **{n: user_data.keys(n) for n in user_data.NAMES}}
        specific = set().union(*own.values())
        keep = own.get(self.name, specific)
        d = {f: getattr(self, f) for f in self.__dataclass_fields__
             if f not in specific or f in keep}
        if "shape" in d:
            d["shape"] = list(d["shape"])
        return d


@dataclass
class Dataset:
    """A train/test split resident on one device, plus what is needed to augment/normalize it.

    Streamed (`train_items` set): the training set is a dataset of (x, y) items on the host,
    read through a DataLoader, and the tensors here stay on the host; `device` is where the
    batches go. An image folder streamed from disk keeps only its first training image in
    train_x (for shapes and types) and every label in train_y.
    """

    name: str
    # uint8 (N, C, H, W) on device; user data: also float32 (N, D); text: int64 token ids (N, T)
    train_x: torch.Tensor
    train_y: torch.Tensor  # int64 (N,) on device; text: the next tokens (N, T)
    test_x: torch.Tensor  # uint8
    test_y: torch.Tensor
    mean: torch.Tensor | None  # float32 (C,) in [0,1] units, on device; None: no normalization
    std: torch.Tensor | None
    num_classes: int  # text: the vocabulary size
    pad: int  # crop padding (0 = no crop)
    flip: bool  # random horizontal flip
    task: str = "classify"  # classify | lm (next-token prediction: perplexity is reported)
    train_items: Any = None  # streamed: the training set as a dataset of (x, y) items
    device: torch.device | None = None  # streamed: where batches go (the data stays on the host)
    vocab: str | None = None  # text: the characters of the vocabulary, in token order

    @property
    def streamed(self) -> bool:
        """Whether training batches come through a DataLoader (stream.py)."""
        return self.train_items is not None

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return len(self.train_items) if self.streamed else int(self.train_x.shape[0])

    @property
    def train_nbytes(self) -> int:
        """The size of the decoded training set (streamed from disk: as if decoded)."""
        per_sample = self.train_x.nbytes // max(1, int(self.train_x.shape[0]))
        return per_sample * self.num_train + self.train_y.nbytes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one stored input: (C, H, W) for images, (D,) for features, (T,) for
        text."""
        return tuple(self.train_x.shape[1:])

    @property
    def in_channels(self) -> int:
        """Number of image channels (C)."""
        return int(self.sample_shape[0])

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return int(self.sample_shape[-1])

    @property
    def context(self) -> int | None:
        """Tokens per sample of a language-model dataset (None for images)."""
        return int(self.sample_shape[0]) if self.task == "lm" else None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Stored inputs -> model inputs: images normalized to float32; token ids as they are."""
        return x if self.mean is None else normalize(x, self.mean, self.std)

    def example(self, n: int) -> torch.Tensor:
        """n zero inputs as the model sees them, on the host (for shapes, flops, profiles)."""
        x = torch.zeros((n, *self.sample_shape), dtype=self.train_x.dtype)
        return x if self.mean is None else normalize(x, self.mean.cpu(), self.std.cpu())


# ----------------------------------------------------------------------------------------------
# Seeding


def _mix_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of values.

    Hashing instead of arithmetic (seed * K + epoch) so distinct tuples never collide and
    neighbouring seeds give unrelated streams.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device | str) -> torch.Tensor:
    """Deterministic shuffle of range(n) for (seed, epoch), identical on every process.

    Drawn on the CPU so the result does not depend on the device type or on CUDA RNG state.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix_seed("epoch_permutation", seed, epoch))
    return torch.randperm(n, generator=gen).to(device)


def batch_generator(seed: int, batch: int, device: torch.device | str) -> torch.Generator:
    """A generator on `device` for augmenting global batch number `batch`.

    Seeded from (seed, batch) alone, so a batch gets the same augmentation whether the run was
    resumed or how many batches came before, and every process agrees on it.
    """
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(_mix_seed("batch_augment", seed, batch))
    return gen


# ----------------------------------------------------------------------------------------------
# Batched augmentation and normalization


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero-padding by `pad` and random horizontal flip, batched on x's device.

    uint8 (B, C, H, W) -> uint8 (B, C, H, W). Each sample gets its own crop offset and flip coin.
    The crop and the flip are a single gather: flipping only reverses the column index.
    """
    if pad < 0:
        raise ConfigError(f"data.pad must be >= 0, got {pad}.")
    if pad == 0 and not flip:
        return x
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=dev)
    else:
        padded = x
        oy = torch.zeros(b, dtype=torch.long, device=dev)
        ox = torch.zeros(b, dtype=torch.long, device=dev)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols_fwd = torch.arange(w, device=dev)
    if flip:
        flipped = torch.rand(b, generator=generator, device=dev) < 0.5
        cols = ox[:, None] + torch.where(flipped[:, None], cols_fwd.flip(0), cols_fwd)
    else:
        cols = ox[:, None] + cols_fwd
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (x/255 - mean)/std, with per-channel mean/std of shape (C,).

    Float inputs (features (B, D), float images) are not scaled: (x - mean)/std, per feature
    or channel."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = mean.to(torch.float32).view(shape)
    s = std.to(torch.float32).view(shape)
    scaled = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
    return (scaled - m) / s


def train_batch(
    ds: Dataset, indices: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ds.train_x[indices], augment (if a generator is given), normalize.

    Returns (x float32 (B, C, H, W), y int64 (B,)) on the dataset's device. Passing
    generator=None disables augmentation (e.g. for evaluating on the training set).
    """
    indices = indices.to(ds.train_x.device)
    x = ds.train_x[indices]
    y = ds.train_y[indices]
    return transform(ds, x, generator), y


def transform(ds: Dataset, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A batch of stored inputs on the training device -> model inputs: augmented (if a
    generator is given and the dataset augments), then normalized. The in-memory and the
    streaming path both end here, so they give the same batches."""
    if generator is not None and (ds.pad > 0 or ds.flip):
        x = augment(x, ds.pad, ds.flip, generator)
    return ds.prepare(x)


def test_batches(ds: Dataset, batch_size: int,
                 split: str = "test") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every test sample (or, split="train", training sample) exactly once, in order,
    normalized and not augmented.

    The last batch may be smaller: padding or repeating samples would bias the test accuracy.
    """
    if batch_size <= 0:
        raise ConfigError(f"the evaluation batch size must be positive, got {batch_size}.")
    xs, ys = (ds.train_x, ds.train_y) if split == "train" else (ds.test_x, ds.test_y)
    to = ds.device or xs.device  # streamed: the data stays on the host, batches move
    if split == "train" and xs.shape[0] < ds.num_train:  # streamed from disk: read in order
        for x, y in in_order(ds.train_items, batch_size):
            yield ds.prepare(x.to(to, non_blocking=True)), y.to(to, non_blocking=True)
        return
    for start in range(0, xs.shape[0], batch_size):
        x = xs[start : start + batch_size].to(to, non_blocking=True)
        yield ds.prepare(x), ys[start : start + batch_size].to(to, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# Loaders


def _check_int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be an integer >= {minimum}, got {value!r}.")
    return value


def _resolve_augment(cfg: DataConfig, image_size: int) -> tuple[int, bool]:
    """(pad, flip) from cfg.augment/cfg.pad and the dataset's defaults."""
    if cfg.augment not in AUGMENT_MODES:
        raise ConfigError(
            f"data.augment must be one of {', '.join(AUGMENT_MODES)}, got {cfg.augment!r}."
        )
    if cfg.pad is not None:
        _check_int(cfg.pad, "data.pad", 0)
    mode = cfg.augment
    if mode == "auto":
        mode = {"cifar10": "crop_flip", "cifar100": "crop_flip", "digits": "crop"}.get(
            cfg.name, "none"
        )
    if mode == "none":
        return 0, False
    if cfg.pad is not None:
        pad = cfg.pad
    elif cfg.name in ("cifar10", "cifar100"):
        pad = 4
    elif cfg.name == "digits":
        pad = 1
    else:
        # Same ratio as the two real datasets (32 -> 4, 8 -> 1).
        pad = max(1, image_size // 8)
    return pad, mode == "crop_flip"


def _load_digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = images[:, None, :, :]  # (N, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix_seed("digits_split", cfg.split_seed))
    perm = torch.randperm(len(labels), generator=gen).numpy()
    n_train = int(len(labels) * 0.8)
    tr, te = perm[:n_train], perm[n_train:]
    return images[tr], labels[tr], images[te], labels[te]


_CIFAR: dict[str, dict[str, Any]] = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "num_classes": 10,
        "title": "CIFAR-10",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "num_classes": 100,
        "title": "CIFAR-100",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

# The only globals a CIFAR pickle needs: numpy array reconstruction, and _codecs.encode which
# protocol-2 pickles written by Python 3 use for bytes. Anything else means the file is not a
# CIFAR batch, and refusing it keeps a planted pickle from running code.
_NP_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}") from None


def _read_cifar_file(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python-format pickle -> (uint8 (N, 3, 32, 32), int64 (N,))."""
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: delete {path.parent} and let it re-download, or use data=digits."
        )
    bad = f"{path} is not a valid CIFAR batch file"
    try:
        with open(path, "rb") as f:
            # CIFAR was pickled by Python 2; "bytes" keeps its str keys/values as bytes.
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as exc:
        raise ConfigError(f"{bad} ({exc}): delete it and re-download.") from exc
    if not isinstance(obj, dict) or b"data" not in obj or label_key not in obj:
        raise ConfigError(
            f"{bad} (expected keys b'data' and {label_key!r}): delete it and re-download."
        )
    data, labels = obj[b"data"], obj[label_key]
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == 3 * 32 * 32
    ):
        raise ConfigError(
            f"{bad} (b'data' must be a uint8 (N, 3072) array): delete it and re-download."
        )
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{bad} (labels are not integers): delete it and re-download.") from exc
    if labels.shape != (data.shape[0],) or (
        labels.size and (labels.min() < 0 or labels.max() >= num_classes)
    ):
        raise ConfigError(
            f"{bad} (need {data.shape[0]} labels in [0, {num_classes})): delete it and re-download."
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B, each row-major), i.e. already CHW.
    return data.reshape(-1, 3, 32, 32), labels


def _extract_archive(archive: Path, root: Path) -> None:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            if hasattr(tarfile, "data_filter"):
                # Refuses absolute paths, links outside root, devices, ...
                tar.extractall(root, filter="data")
            else:  # Python < 3.10.12 has no extraction filters: allow plain files/dirs only.
                for member in tar.getmembers():
                    parts = Path(member.name).parts
                    if member.name.startswith("/") or ".." in parts:
                        raise tarfile.TarError(f"unsafe path {member.name!r}")
                    if not (member.isfile() or member.isdir()):
                        raise tarfile.TarError(f"unexpected member type for {member.name!r}")
                tar.extractall(root)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConfigError(
            f"{archive} could not be extracted ({exc}): replace it with a good copy or delete it."
        ) from exc


def _download_cifar(name: str, root: Path, title: str) -> None:
    hint = (
        f"could not download {title} to {root} (no network?): put "
        f"{_CIFAR[name]['archive']} or the extracted {_CIFAR[name]['folder']}/ there, "
        "set data.root, or use data=digits."
    )
    try:
        # Lazy: torchvision is only needed for this one-off download.
        import torchvision.datasets as tvd

        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        cls(str(root), train=True, download=True)
    except Exception as exc:  # URLError, OSError, RuntimeError (checksum), ImportError, ...
        raise ConfigError(hint) from exc


def _load_cifar(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    spec = _CIFAR[cfg.name]
    root = Path(os.fspath(cfg.root)).expanduser()
    folder = root / spec["folder"]
    if not folder.is_dir():
        archive = root / spec["archive"]
        if archive.is_file():
            # Extracting ourselves works offline and with download=False.
            _extract_archive(archive, root)
        elif cfg.download:
            _download_cifar(cfg.name, root, spec["title"])
        else:
            raise ConfigError(
                f"{spec['title']} not found at {folder} and data.download is false: put "
                f"{spec['folder']}/ or {spec['archive']} in {root}, set data.download=true, "
                "or use data=digits."
            )
        if not folder.is_dir():
            raise ConfigError(
                f"{folder} is still missing after extracting/downloading: check data.root, "
                "or use data=digits."
            )

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        key, k = spec["label_key"], spec["num_classes"]
        parts = [_read_cifar_file(folder / f, key, k) for f in files]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    train_x, train_y = read(spec["train"])
    test_x, test_y = read(spec["test"])
    return train_x, train_y, test_x, test_y


def _synthetic_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ConfigError(f"data.shape must be three positive integers (C, H, W), got {shape!r}.")
    if dims[1] != dims[2]:
        raise ConfigError(f"data.shape must have square images (H == W), got {dims}.")
    return dims  # type: ignore[return-value]


def _synthetic(cfg: DataConfig, seed: int) -> Dataset:
    """Random uint8 images and labels of the configured shape, drawn from `seed` (on the host)."""
    c, h, w = _synthetic_shape(cfg.shape)
    num_classes = _check_int(cfg.num_classes, "data.num_classes", 1)
    n_train = _check_int(cfg.train_size, "data.train_size", 1)
    n_test = _check_int(cfg.test_size, "data.test_size", 1)
    pad, flip = _resolve_augment(cfg, h)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix_seed("synthetic", seed))
    tx = torch.randint(0, 256, (n_train, c, h, w), generator=gen, dtype=torch.uint8)
    ty = torch.randint(0, num_classes, (n_train,), generator=gen, dtype=torch.int64)
    vx = torch.randint(0, 256, (n_test, c, h, w), generator=gen, dtype=torch.uint8)
    vy = torch.randint(0, num_classes, (n_test,), generator=gen, dtype=torch.int64)
    return Dataset(name=cfg.name, train_x=tx, train_y=ty, test_x=vx, test_y=vy,
                   mean=torch.full((c,), 0.5, dtype=torch.float32),
                   std=torch.full((c,), 0.25, dtype=torch.float32),
                   num_classes=num_classes, pad=pad, flip=flip)


def _user(cfg: DataConfig) -> Dataset:
    """The user's images, arrays or dataset class (user_data.py), on the host."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix_seed("holdout", cfg.split_seed))
    d = user_data.decode(cfg, gen, lambda nbytes: streams(cfg, nbytes))
    if d.train_x.dim() == 4:
        pad, flip = _resolve_augment(cfg, int(d.train_x.shape[-1]))
    elif cfg.augment not in ("auto", "none"):
        raise ConfigError(f"data.augment={cfg.augment} crops and flips images; these samples "
                          f"have shape {list(d.train_x.shape[1:])}: use data.augment=none.")
    else:
        pad, flip = 0, False
    return Dataset(name=cfg.name, train_x=d.train_x, train_y=d.train_y, test_x=d.test_x,
                   test_y=d.test_y, mean=d.mean, std=d.std, num_classes=d.num_classes,
                   pad=pad, flip=flip, train_items=d.train_items)


def _text(cfg: DataConfig) -> Dataset:
    """Character-level language modelling on a text file (text.py): token windows, no
    normalization or augmentation."""
    from dpbp.text import load_text  # lazy: only data=text reads a text file

    if cfg.augment not in ("auto", "none"):
        raise ConfigError(f"data=text has no images to augment: drop data.augment={cfg.augment} "
                          "(or set it to none).")
    t = load_text(cfg.path, cfg.context, cfg.test_fraction)
    return Dataset(name=cfg.name, train_x=t.train_x, train_y=t.train_y, test_x=t.test_x,
                   test_y=t.test_y, mean=None, std=None, num_classes=len(t.vocab), pad=0,
                   flip=False, task="lm", vocab=t.vocab)


def streams(cfg: DataConfig, nbytes: int) -> bool:
    """Whether a training set of `nbytes` goes through the DataLoader (stream.wanted)."""
    return wanted(cfg.stream, cfg.stream_budget_mb, cfg.loader_workers, nbytes)


def _place(ds: Dataset, cfg: DataConfig, device: torch.device) -> Dataset:
    """Move a host dataset to `device`, or, when it is streamed, keep it on the host (pinned
    for CUDA copies) as a dataset of (x, y) items (already one: streamed from disk)."""
    if ds.streamed:
        ds.device = device
    elif streams(cfg, ds.train_nbytes):
        pin = device.type == "cuda"
        train_x, train_y = (ds.train_x.pin_memory(), ds.train_y.pin_memory()) if pin else \
            (ds.train_x, ds.train_y)
        ds.train_x, ds.train_y = train_x, train_y
        ds.train_items, ds.device = TensorItems(train_x, train_y), device
    else:
        ds.train_x, ds.train_y = ds.train_x.to(device), ds.train_y.to(device)
        ds.test_x, ds.test_y = ds.test_x.to(device), ds.test_y.to(device)
    if ds.mean is not None:
        ds.mean, ds.std = ds.mean.to(device), ds.std.to(device)
    return ds


def load_dataset(cfg: DataConfig, device: torch.device | str = "cpu", seed: int = 0) -> Dataset:
    """Load (or generate) the dataset named by cfg onto `device` as uint8 tensors (token ids
    for text), or keep it on the host for the streaming path (data.stream).

    `seed` only matters for the synthetic dataset; the digits split uses cfg.split_seed.
    Raises ConfigError for unknown names/options and for missing, undownloadable or corrupt data.
    """
    if cfg.name not in DATASET_NAMES:
        raise ConfigError(
            f"unknown dataset data.name={cfg.name!r}: use one of {', '.join(DATASET_NAMES)}."
        )
    device = torch.device(device)
    streams(cfg, 0)  # bad stream settings fail before any data is read
    if cfg.name == "synthetic":
        return _place(_synthetic(cfg, seed), cfg, device)
    if cfg.name == "text":
        return _place(_text(cfg), cfg, device)
    if cfg.name in user_data.NAMES:
        return _place(_user(cfg), cfg, device)
    if cfg.name == "digits":
        pad, flip = _resolve_augment(cfg, 8)
        train_x, train_y, test_x, test_y = _load_digits(cfg)
        num_classes = 10
        scaled = train_x.astype(np.float64) / 255.0
        mean = torch.tensor(scaled.mean(axis=(0, 2, 3)), dtype=torch.float32)
        std = torch.tensor(scaled.std(axis=(0, 2, 3)), dtype=torch.float32)
    else:
        # Validate options before touching the disk or network.
        pad, flip = _resolve_augment(cfg, 32)
        train_x, train_y, test_x, test_y = _load_cifar(cfg)
        spec = _CIFAR[cfg.name]
        num_classes = spec["num_classes"]
        mean = torch.tensor(spec["mean"], dtype=torch.float32)
        std = torch.tensor(spec["std"], dtype=torch.float32)

    ds = Dataset(
        name=cfg.name,
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(np.ascontiguousarray(train_y)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(np.ascontiguousarray(test_y)),
        mean=mean,
        std=std,
        num_classes=num_classes,
        pad=pad,
        flip=flip,
    )
    return _place(ds, cfg, device)
