"""`dpbp.fit`: train from a script or a notebook through the same path as `dpbp train`.

    import dpbp
    summary = dpbp.fit(blocks, (x_train, y_train), (x_test, y_test), algo="fdg", gpus=2,
                       trainer={"epochs": 5}, device="cpu")
    print(summary["final_test_acc"])

`fit` turns its arguments into `dpbp train` overrides and runs the command itself
(`cli.main`): the same config composition, validation, launcher, workers, logging, run directory
and summary.json. Objects reach the workers (fresh interpreters) as files in the run directory:
a model object is saved with torch.save (`inputs/model.pt`, loaded by every process through
`model=custom model._target_=dpbp.custom.load_saved`), data objects are written to
`inputs/data.npz` and read by `data=arrays`. So the layers of a model object must be importable
classes (torch's own, or defined in a module), as for any pickled PyTorch model.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpbp import cli, custom, user_data
from dpbp.errors import ConfigError, Interrupted


def fit(model: Any, train: Any = None, test: Any = None, *, algo: str | None = None,
        gpus: int | None = None,
        run_dir: str | Path | None = None, overrides: Sequence[str] = (),
        **settings: Any) -> dict[str, Any]:
    """Train `model` on `train`, test on `test`, as `dpbp train` would; return its summary.

    model: a built-in model's name ("resnet20"), the dotted path of a builder ("pkg.nets.build"),
      an importable builder function or class, an nn.Sequential or a list of nn.Module blocks.
    train, test: (x, y) arrays or tensors, a torchvision-style dataset ((image, label) items),
      an image folder or an .npz file path; train=None keeps the config's data (e.g.
      data="digits"); test=None holds out data.holdout of the training set.
    algo, gpus: as `dpbp train algo=... gpus=...` (None: the config's defaults).
    run_dir: where the run writes (default outputs/fit/<date>/<time>, like the command's).
    overrides: `dpbp train` overrides as strings ("trainer.epochs=2"; a builder's arguments:
      "model.width=16").
    settings: more of them as keywords; a dict is a section (trainer={"epochs": 2}).

    Raises ConfigError for bad input (what the command exits 2 for), RuntimeError when the run
    failed, Interrupted when a signal stopped it.
    """
    now = datetime.now()
    run = Path(run_dir or Path("outputs", "fit", f"{now:%Y-%m-%d}", f"{now:%H-%M-%S-%f}"))
    run = run.absolute()
    if (run / "summary.json").exists() and "resume" not in settings:
        raise ConfigError(f"{run} already holds a run; choose another run_dir, or pass "
                          "resume=True to continue it.")
    inputs = run / "inputs"
    try:
        chosen = {k: v for k, v in (("algo", algo), ("gpus", gpus)) if v is not None}
        args = [*_setting_args(chosen), *_model_args(model, inputs),
                *_data_args(train, test, inputs), *_setting_args(settings), *overrides,
                f"hydra.run.dir={run}"]
    except ConfigError:
        shutil.rmtree(inputs, ignore_errors=True)
        cli.discard_rejected(run)
        raise
    code, said = _run_command(["train", *args])
    if code == 0:
        return json.loads((run / "summary.json").read_text())
    if code == 2:
        shutil.rmtree(inputs, ignore_errors=True)
        cli.discard_rejected(run)  # a rejected run leaves nothing behind, as on the command line
        raise ConfigError(said)
    if code > 128:
        raise Interrupted(said, code - 128)
    raise RuntimeError(said)


def _model_args(model: Any, inputs: Path) -> list[str]:
    """The `model` overrides for a name, a builder's path, a builder, or blocks (saved)."""
    if isinstance(model, str):
        if model in cli.group_options("model"):
            return [f"model={model}"]
        return ["model=custom", f"model._target_={model}"]
    if callable(model) and not isinstance(model, nn.Module):
        qualname = getattr(model, "__qualname__", "")
        module = getattr(model, "__module__", None)
        if module and module != "__main__" and "<" not in qualname:
            return ["model=custom", f"model._target_={module}.{qualname}"]
        model = model()  # defined in a notebook or a script: workers could not import it
    blocks = custom.as_blocks(model, "the model given to dpbp.fit")
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / "model.pt"
    torch.save(blocks, path)
    return ["model=custom", "model._target_=dpbp.custom.load_saved",
            f"model.path={_value(str(path))}"]


def _data_args(train: Any, test: Any, inputs: Path) -> list[str]:
    """The `data` overrides for (x, y) arrays, datasets, a folder or an .npz file."""
    if train is None:
        if test is not None:
            raise ConfigError("dpbp.fit got test data but no training data; give both.")
        return []
    if isinstance(train, (str, Path)) and test is None:
        path = Path(train).expanduser().absolute()
        if path.is_dir():
            return ["data=imagefolder", f"data.root={_value(str(path))}"]
        return ["data=arrays", f"data.path={_value(str(path))}"]
    arrays = dict(zip(("x_train", "y_train"), _arrays(train, "train")))
    if test is not None:
        arrays.update(zip(("x_test", "y_test"), _arrays(test, "test")))
    inputs.mkdir(parents=True, exist_ok=True)
    path = inputs / "data.npz"
    np.savez(path, **arrays)
    return ["data=arrays", f"data.path={_value(str(path))}"]


def _arrays(data: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as numpy arrays from a pair of arrays/tensors or a map-style dataset."""
    if isinstance(data, (str, Path)):
        raise ConfigError(f"dpbp.fit's {which} data is the path {data} next to other data; give "
                          "a folder or an .npz file as train alone, with its test split inside "
                          "(a val/ folder, x_test and y_test).")
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = (d.detach().cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d)
                for d in data)
        return x, y
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        x, y = user_data.stack_dataset(data, f"{which} item")
        return x.numpy(), y.numpy()
    raise ConfigError(f"dpbp.fit's {which} data is a {type(data).__name__}; give (x, y) arrays, "
                      "a dataset of (image, label) items, an image folder or an .npz file.")


def _setting_args(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """Keyword settings as overrides: data="digits" -> data=digits, trainer={"epochs": 2} ->
    trainer.epochs=2."""
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += _setting_args(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={_value(value)}")
    return out


def _value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted unless plainly a word or a
    path)."""
    if isinstance(value, str):
        if re.fullmatch(r"[\w./:~+-]+", value):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return json.dumps(value).replace(" ", "")  # None, bools, numbers, lists


@contextlib.contextmanager
def _command_context() -> Iterator[list[str]]:
    """What cli.main changes in a process (sys.argv; Hydra's logging handlers) put back after,
    and the lines it writes to stderr collected (still shown)."""
    argv, root = sys.argv[:], logging.getLogger()
    handlers, level = root.handlers[:], root.level
    said: list[str] = []

    class Tee(io.TextIOBase):
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def write(self, text: str) -> int:
            said.append(text)
            return self.stream.write(text)

        def flush(self) -> None:
            self.stream.flush()

    sys.argv = ["dpbp"]
    try:
        with contextlib.redirect_stderr(Tee(sys.stderr)):
            yield said
    finally:
        sys.argv = argv
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def _run_command(args: list[str]) -> tuple[int, str]:
    """`dpbp ARGS` in this process: its exit status and its first 'dpbp:' line."""
    with _command_context() as said:
        code = cli.main(args)
    lines = [ln.removeprefix("dpbp: ") for ln in "".join(said).splitlines()
             if ln.startswith("dpbp: ")]
    return code, (lines[0] if lines else f"dpbp train exited with status {code}")
