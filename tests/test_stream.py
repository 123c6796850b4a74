"""The streaming path (stream.py): a DataLoader over a dataset of (x, y) items gives the batches
of the in-memory path (same order, same augmentation), the same final parameters under
executor=local, and an exact resume from a checkpoint inside an epoch."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import make_cfg
from test_resume import assert_same_run, reference, settings, signal_at

from dpbp.config import from_dict
from dpbp.data import DataConfig, load_dataset
from dpbp.errors import ConfigError, Interrupted
from dpbp.feed import Feed
from dpbp.interrupt import StopRequest
from dpbp.launch import data_path, launch
from dpbp.stream import TensorItems
from dpbp.train import train

CPU = torch.device("cpu")


def feeds(workers: int = 0, replica: int = 0, replicas: int = 1, items=None):
    """An in-memory and a streamed Feed over digits (crop augmentation on)."""
    held = load_dataset(DataConfig(name="digits", stream=False))
    streamed = load_dataset(DataConfig(name="digits", stream=True))
    assert not held.streamed and streamed.streamed
    if items is not None:
        streamed.train_items = items(streamed)
    return (Feed(held, 64, 5, CPU, replica, replicas),
            Feed(streamed, 64, 5, CPU, replica, replicas, workers=workers))


def assert_same_batches(a: Feed, b: Feed, batches) -> None:
    for n in batches:
        assert torch.equal(a.inputs(n), b.inputs(n)), n
        assert torch.equal(a.labels(n), b.labels(n)), n


def test_streamed_batches_are_the_in_memory_batches():
    held, streamed = feeds()
    assert held.steps == streamed.steps == 1437 // 64
    assert_same_batches(held, streamed, range(0, 2 * held.steps + 3))  # across epoch ends
    assert streamed.stream.restarts == 1  # one loader for the whole run
    # a batch asked for again (as after a resume) restarts the loader there: same batch
    assert_same_batches(held, streamed, [4, 5, 40])
    assert streamed.stream.restarts == 2


def test_replicas_take_their_shares():
    held, streamed = feeds(replica=1, replicas=2)
    assert_same_batches(held, streamed, range(12))


class NoTargets(torch.utils.data.Dataset):
    """A dataset of (x, y) items that does not list its labels (no `targets`)."""

    def __init__(self, ds) -> None:
        self.x, self.y = ds.train_x, ds.train_y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_items_without_targets_stream_their_labels():
    held, streamed = feeds(items=NoTargets)
    assert streamed.stream.targets is None
    # the last module asks for labels a few batches after the first asks for inputs
    for n in range(10):
        assert torch.equal(held.inputs(n), streamed.inputs(n))
        if n >= 3:
            assert torch.equal(held.labels(n - 3), streamed.labels(n - 3))
    assert streamed.stream.restarts == 1
    assert len(streamed.stream.cache) == 3  # the labels not yet taken


@pytest.mark.slow
def test_loader_workers_give_the_same_batches():
    held, streamed = feeds(workers=2)
    assert_same_batches(held, streamed, range(0, held.steps + 4))


def test_auto_streams_what_exceeds_the_budget():
    # digits: 1437 images of 8x8 bytes and their labels, 0.1 MiB
    assert load_dataset(DataConfig(name="digits", stream="auto", stream_budget_mb=0.05)).streamed
    kept = load_dataset(DataConfig(name="digits", stream="auto", stream_budget_mb=4096))
    assert not kept.streamed
    assert isinstance(load_dataset(DataConfig(name="digits", stream=True)).train_items,
                      TensorItems)


@pytest.mark.parametrize("key,value,match", [
    ("stream", "sometimes", "data.stream must be auto, true or false"),
    ("stream_budget_mb", 0, "data.stream_budget_mb must be a positive number"),
    ("loader_workers", -1, "data.loader_workers must be an integer >= 0"),
])
def test_bad_stream_settings_are_one_sentence(key, value, match):
    with pytest.raises(ConfigError, match=match):
        load_dataset(DataConfig(name="digits", **{key: value}))


def test_the_header_says_which_path():
    cfg = make_cfg("data.stream=true", "data.loader_workers=3")
    line = data_path(cfg, load_dataset(cfg.data))
    assert "streamed through a DataLoader with 3 worker(s)" in line and "1437" in line
    cfg = make_cfg()
    assert "held on the device" in data_path(cfg, load_dataset(cfg.data))


def test_training_on_the_streaming_path_gives_the_same_parameters(tmp_path, tmp_path_factory):
    """ddg at K = 2 (augmented digits, resnet8, across an epoch end): streamed == in memory."""
    ref_dir, ref = reference(tmp_path_factory, "ddg", 2, "stash")
    s = train(make_cfg(*settings("ddg", 2), "data.stream=true", "data.loader_workers=0"),
              tmp_path)
    assert s["data_loading"] == "stream" and ref["data_loading"] == "device"
    assert_same_run(ref_dir, ref, tmp_path, s, 2)


def test_resume_on_the_streaming_path_is_exact(tmp_path, tmp_path_factory):
    """Stopped by a signal inside epoch 2 and resumed, streaming throughout: the numbers of the
    run that was never stopped."""
    ref_dir, ref = reference(tmp_path_factory, "fdg", 2, "stash")
    streamed = (*settings("fdg", 2), "data.stream=true", "data.loader_workers=0")
    stop = StopRequest()
    with pytest.raises(Interrupted, match="stopped by SIGTERM at tick 15"):
        train(make_cfg(*streamed), tmp_path, logger_factory=signal_at(stop, 13), stop=stop)
    resumed = train(make_cfg(*streamed, "resume=true"), tmp_path)
    assert resumed["data_loading"] == "stream"
    assert_same_run(ref_dir, ref, tmp_path, resumed, 2)


def test_stream_settings_survive_the_trip_to_the_workers():
    cfg = make_cfg("data.stream=true", "data.stream_budget_mb=10", "data.loader_workers=1")
    again = from_dict(cfg.to_dict())
    assert (again.data.stream, again.data.stream_budget_mb, again.data.loader_workers) == \
        (True, 10, 1)



def test_threads_share_one_stream(tmp_path):
    """Forward threads (asgd.py) ask for batches concurrently and a little out of order: each
    gets the batch it names; pdasgd trains on the streaming path."""
    held, streamed = feeds()
    todo, got, lock = iter(range(40)), {}, threading.Lock()

    def worker():
        while True:
            with lock:
                n = next(todo, None)
            if n is None:
                return
            got[n] = (streamed.inputs(n), streamed.labels(n))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n, (x, y) in got.items():
        assert torch.equal(x, held.inputs(n)) and torch.equal(y, held.labels(n)), n
    s = train(make_cfg("algo=pdasgd", "gpus=1", "model.name=resnet8", "trainer.epochs=1",
                       "trainer.max_steps=12", "data.stream=true", "data.loader_workers=0"),
              tmp_path)
    assert s["data_loading"] == "stream" and s["steps"] == 12
    assert math.isfinite(s["history"][-1]["train_loss"])



@pytest.mark.slow
def test_every_process_of_a_pipeline_streams_the_same_batches(tmp_path):
    """executor=dist: each module's process reads through its own DataLoader (a worker
    process each); the run equals the in-memory run in one process (across an epoch end)."""
    short = ("algo=ddg", "gpus=2", "model.name=resnet8", "trainer.batch_size=128",
             "trainer.epochs=2", "trainer.max_steps=14", "seed=4")
    ref = train(make_cfg(*short, "executor=local"), tmp_path / "local")
    s = launch(make_cfg(*short, "executor=dist", "data.stream=true", "data.loader_workers=1"),
               tmp_path / "dist")
    assert s["executor"] == "dist" and s["data_loading"] == "stream"
    assert_same_run(tmp_path / "local", ref, tmp_path / "dist", s, 2)


def test_a_finished_run_stops_its_loader():
    _, streamed = feeds(workers=0)
    streamed.inputs(0)
    assert streamed.stream.it is not None
    streamed.close()
    assert streamed.stream.it is None and not streamed.stream.cache
    assert torch.equal(streamed.inputs(1), feeds()[0].inputs(1))  # asked again: a new loader
