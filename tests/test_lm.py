"""Language modelling end to end (model=gpt data=text): the transformer split into K = 2 modules
with bp gives the numbers of K = 1 (split == whole) under both executors; perplexity is reported
(exp of the mean test token loss); the delayed algorithms train it; algorithms whose record does
not list the task, and model/data pairs that do not fit, are refused in one sentence."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import make_cfg
from test_text import write_text

from dpbp import algos, hparams, report
from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.config import validate
from dpbp.errors import ConfigError
from dpbp.launch import launch
from dpbp.train import train

TINY = ("model=gpt", "model.layers=2", "model.dim=32", "model.heads=2", "data=text",
        "data.context=16", "trainer.batch_size=16", "trainer.epochs=2", "sched=constant",
        "optim.lr=0.05", "seed=3", "trainer.check_every=5")


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    write_text(path, n=4000)
    return path


def lm_cfg(path, *overrides: str):
    return make_cfg(*TINY, f"data.path={path}", *overrides)


def params(run_dir, k: int) -> dict[str, torch.Tensor]:
    """Every module's weights from the last checkpoint, named by their block in the whole
    model."""
    merged, first = {}, 0
    for s in range(k):
        ck = torch.load(run_dir / "checkpoints" / f"stage{s}.pt", weights_only=True)["module"]
        blocks = {int(n.split(".", 1)[0]) for n in ck}
        for name, v in ck.items():
            idx, rest = name.split(".", 1)
            merged[f"{int(idx) + first}.{rest}"] = v
        first += max(blocks) + 1
    return merged


def untimed(summary):
    return [{k: v for k, v in e.items() if k != "train_seconds"} for e in summary["history"]]


def test_bp_on_two_modules_equals_bp_on_one(tmp_path, text_path):
    one = train(lm_cfg(text_path, "algo=bp", "gpus=1"), tmp_path / "one")
    two = train(lm_cfg(text_path, "algo=bp", "gpus=2", "executor=local"), tmp_path / "two")
    assert two["split"] == [2, 2] and one["split"] == [4]
    assert untimed(one) == untimed(two)
    whole, parts = params(tmp_path / "one", 1), params(tmp_path / "two", 2)
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name


def test_perplexity_is_reported(tmp_path, text_path, capsys):
    s = train(lm_cfg(text_path, "algo=bp", "gpus=1"), tmp_path)
    assert s["final_test_perplexity"] == pytest.approx(math.exp(s["final_test_loss"]))
    assert s["best_test_perplexity"] == min(e["test_perplexity"] for e in s["history"])
    for e in s["history"]:
        assert e["train_perplexity"] == pytest.approx(math.exp(e["train_loss"]))
    # it learned: below the untrained model's perplexity and the vocabulary size
    vocab = len(set(text_path.read_text()))
    assert s["final_test_perplexity"] < 0.7 * vocab
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["data_loading"] == "device" and on_disk["data"] == "text"
    # dpbp report gives it in its own column
    report.main([str(tmp_path)])
    row = capsys.readouterr().out.splitlines()[2]
    assert row.rstrip(" |").endswith(f"{s['final_test_perplexity']:.3f} ± 0.000")


@pytest.mark.parametrize("algo", ["ddg", "fdg"])
def test_the_delayed_algorithms_train_the_transformer(tmp_path, text_path, algo):
    s = train(lm_cfg(text_path, f"algo={algo}", "gpus=2", "executor=local"), tmp_path)
    first, last = s["history"][0], s["history"][-1]
    assert last["test_perplexity"] < first["test_perplexity"] or \
        last["train_loss"] < first["train_loss"]
    assert math.isfinite(s["final_test_perplexity"])
    assert s["updates"][0] < s["updates"][1]  # module 1 waited out its delay


def test_tensorboard_holds_perplexity_not_accuracy(tmp_path, text_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpbp.logs import RunLogger

    s = train(lm_cfg(text_path, "algo=bp", "gpus=1", "trainer.epochs=1"), tmp_path,
              logger_factory=RunLogger)
    # the HParams tab's first metrics are the perplexities (a classifier's: accuracies)
    assert [tag for tag, _ in hparams.metrics(s)[:2]] == ["perplexity/test",
                                                          "summary/best_test_perplexity"]
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "perplexity/test" in tags and "perplexity/train" in tags
    assert "accuracy/test" not in tags
    log = (tmp_path / "train.log").read_text()
    assert " ppl " in log and " acc " not in log.split("final / best")[0]


@pytest.mark.slow
def test_local_and_dist_give_identical_results(tmp_path, text_path):
    local = train(lm_cfg(text_path, "algo=bp", "gpus=2", "executor=local"), tmp_path / "local")
    dist = launch(lm_cfg(text_path, "algo=bp", "gpus=2", "executor=dist"), tmp_path / "dist")
    assert dist["executor"] == "dist"
    assert untimed(local) == untimed(dist)
    a, b = params(tmp_path / "local", 2), params(tmp_path / "dist", 2)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_algorithms_that_do_not_apply_are_refused(text_path, monkeypatch):
    """A record without "lm" in its tasks (e.g. one that trains a classifier head per module)
    is refused on text, by its record, in one sentence."""
    local_losses = Algorithm(name="local_heads", title="a classifier head per module",
                             family="tick", options=AlgoConfig, tasks=("classify",))
    registry = {**algos._registry(), "local_heads": local_losses}
    monkeypatch.setattr(algos, "_registry", lambda: registry)
    cfg = lm_cfg(text_path, "algo=bp", "gpus=1")
    cfg = dataclasses.replace(cfg, algo=AlgoConfig(name="local_heads", replicas=1))
    with pytest.raises(ConfigError, match="algo=local_heads does not apply to language "
                                          "modelling") as e:
        validate(cfg)
    assert "bp" in str(e.value) and "local_heads, " not in str(e.value)


@pytest.mark.parametrize("overrides", [("model=gpt", "data=digits"),
                                       ("model=resnet20", "data=text", "data.path=x")])
def test_model_and_data_must_fit(overrides):
    with pytest.raises(ConfigError, match="does not fit"):
        make_cfg(*overrides)


def test_only_the_model_s_own_keys(text_path):
    with pytest.raises(ConfigError, match="model=gpt takes only model.name, model.layers"):
        make_cfg(*TINY, f"data.path={text_path}", "+model.width=3")
