"""Config composition (Hydra's Compose API over the shipped YAML) and dpbp.config's dataclasses."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import compose_dict

from dpbp.cli import GROUPS, group_options
from dpbp.config import RunConfig, from_dict, validate
from dpbp.errors import ConfigError


def run_config(*overrides: str) -> RunConfig:
    cfg = from_dict(compose_dict(*overrides))
    validate(cfg)
    return cfg


def test_defaults_are_bp_resnet20_on_digits():
    cfg = run_config()
    assert (cfg.algo.name, cfg.model, cfg.data.name) == ("bp", "resnet20", "digits")
    assert (cfg.gpus, cfg.device, cfg.executor, cfg.seed, cfg.resume) == (1, "auto", "dist", 0,
                                                                          False)
    assert cfg.optim.name == "sgd" and cfg.sched.name == "multistep"
    assert cfg.trainer.max_steps is None and cfg.split.balance is None
    assert cfg.modules == 1


def test_experiment_fdg_cifar_is_the_fdg_recipe():
    cfg = run_config("experiment=fdg_cifar")
    assert cfg.data.name == "cifar10"
    assert cfg.optim.lr == 0.1 and cfg.optim.momentum == 0.9 and cfg.optim.nesterov is False
    assert cfg.optim.weight_decay == 5e-4
    assert cfg.sched.milestones == [150, 225, 275] and cfg.sched.gamma == 0.1
    assert cfg.trainer.epochs == 300 and cfg.trainer.batch_size == 128
    assert cfg.algo.name == "bp"  # the recipe fixes the training setup, not the algorithm


def test_experiment_ddg_cifar_is_the_ddg_recipe():
    cfg = run_config("experiment=ddg_cifar", "algo=ddg")
    assert cfg.data.name == "cifar10" and cfg.algo.name == "ddg"
    assert cfg.optim.lr == 0.01 and cfg.optim.nesterov is True
    assert cfg.sched.milestones == [150, 225]
    assert cfg.trainer.epochs == 300


def test_command_line_overrides_win_over_an_experiment():
    cfg = run_config("experiment=fdg_cifar", "optim.lr=0.05", "trainer.epochs=3")
    assert cfg.optim.lr == 0.05 and cfg.trainer.epochs == 3
    assert cfg.sched.milestones == [150, 225, 275]


def test_algo_options_carry_their_settings():
    fdg = run_config("algo=fdg", "gpus=2")
    assert fdg.algo.beta == 0.5 and fdg.algo.weights == "stash" and fdg.modules == 2
    assert run_config("algo=ddg").algo.weights == "stash"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_of_every_group_composes_and_validates(group):
    options = group_options(group)
    assert options, f"no YAML files in conf/{group}"
    for option in options:
        # dp_fdg's 2 replicas need at least 2 workers; gpipe one process per stage
        # and the language model and text go together
        workers = {"dp_fdg": ["gpus=4"], "gpipe": ["gpus=2"], "gpt": ["data=text"],
                   "text": ["model=gpt"]}.get(option, [])
        if (group, option) == ("model", "custom"):  # the user names the builder
            workers = ["model._target_=torch.nn.Sequential"]
        d = compose_dict(f"{group}={option}", *workers)
        cfg = from_dict(d)  # every key of every YAML file is a known setting of the right type
        validate(cfg)
        if group == "model":
            assert cfg.model == (option if option != "custom" else "torch.nn.Sequential")
        elif group in ("algo", "data", "optim", "sched"):
            assert getattr(cfg, group).name == option
        # the dict the parent hands to its workers rebuilds the same config
        assert from_dict(cfg.to_dict()) == cfg


def test_group_listing_matches_the_shipped_files():
    assert {"bp", "ddg", "fr", "fdg"} <= set(group_options("algo"))
    assert {"digits", "cifar10", "cifar100", "synthetic"} <= set(group_options("data"))
    assert {"fdg_cifar", "ddg_cifar", "debug"} <= set(group_options("experiment"))


def test_synthetic_shape_becomes_a_tuple_and_round_trips():
    cfg = run_config("data=synthetic", "data.shape=[1,8,8]")
    assert cfg.data.shape == (1, 8, 8)
    assert cfg.to_dict()["data"]["shape"] == [1, 8, 8]
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("d, key", [
    ({"trainer": {"foo": 1}}, "trainer.foo"),
    ({"algo": {"name": "bp", "betta": 0.5}}, "algo.betta"),
    ({"data": {"name": "digits", "rot": "/x"}}, "data.rot"),
    ({"split": {"balence": [1, 2]}}, "split.balence"),
    ({"gpu": 2}, "gpu"),
])
def test_from_dict_names_an_unknown_key(d, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(_full(d))


def _full(d: dict) -> dict:
    """The composed config of an FDG run with `d` merged into it (nested dicts merged)."""
    out = compose_dict("algo=fdg", "gpus=2")
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v:
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def test_a_misspelled_key_gets_a_suggestion_and_a_missing_one_is_named():
    with pytest.raises(ConfigError, match=r"trainer\.epoch \(did you mean trainer\.epochs\?\)"):
        from_dict(_full({"trainer": {"epoch": 2}}))
    d = _full({})
    del d["trainer"]["epochs"]
    with pytest.raises(ConfigError, match=r"the config has no trainer\.epochs"):
        from_dict(d)


def test_each_algorithm_has_only_its_own_keys():
    """A run's config holds what applies to it: bp has no beta, fdg no microbatches."""
    assert set(run_config("algo=bp").to_dict()["algo"]) == {"name", "replicas"}
    assert set(run_config("algo=fdg", "gpus=2").to_dict()["algo"]) == {
        "name", "replicas", "weights", "weight_prediction", "beta"}
    with pytest.raises(ConfigError, match=r"unknown setting algo\.beta"):
        from_dict(compose_dict("algo=bp", "+algo.beta=0.5"))


@pytest.mark.parametrize("d, key", [
    ({"trainer": {"epochs": "abc"}}, "trainer.epochs"),
    ({"gpus": "two"}, "gpus"),
    ({"trainer": {"max_steps": 1.5}}, "trainer.max_steps"),
    ({"split": {"balance": 5}}, "split.balance"),
    ({"split": {"balance": [5, "x"]}}, "split.balance"),
    ({"algo": {"beta": True}}, "algo.beta"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"data": {"shape": 5}}, "data.shape"),
    ({"resume": 1}, "resume"),
    ({"model": {"name": "resnet20", "width": 2}}, "model"),
])
def test_from_dict_names_a_wrong_type(d, key):
    # Hydra passes `trainer.epochs=abc` through as a string: it must fail here, in one sentence,
    # not as a TypeError deep inside the run
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(_full(d))


def test_from_dict_accepts_what_yaml_gives():
    cfg = from_dict(_full({"algo": {"beta": 1}, "resume": "/runs/a",
                           "model": {"name": "resnet56"}, "split": {"balance": [10, 19]},
                           "trainer": {"max_steps": None, "threads": None},
                           "data": {"shape": [3, 8, 8]}}))
    assert cfg.algo.beta == 1 and cfg.resume == "/runs/a" and cfg.model == "resnet56"
    assert cfg.split.balance == [10, 19] and cfg.data.shape == (3, 8, 8)


def _with(cfg: RunConfig, **changes) -> RunConfig:
    """A copy of cfg with dotted-path changes, e.g. _with(cfg, **{"algo.beta": 2.0})."""
    cfg = from_dict(cfg.to_dict())
    for path, value in changes.items():
        *parents, name = path.split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, name, value)
    return cfg


@pytest.mark.parametrize("change, words", [
    ({"algo.name": "foo"}, "algo"),
    ({"algo.beta": 0.0}, "beta"),
    ({"algo.beta": 1.5}, "beta"),
    ({"algo.weights": "old"}, "weights"),
    ({"gpus": 0}, "gpus"),
    ({"gpus": 3, "algo.replicas": 2}, "replicas"),
    ({"device": "tpu"}, "device"),
    ({"executor": "ray"}, "executor"),
    ({"trainer.epochs": 0}, "epochs"),
    ({"trainer.batch_size": 0}, "batch_size"),
    ({"trainer.max_steps": 0}, "max_steps"),
    ({"optim.name": "adam"}, "optim"),
    ({"optim.lr": 0.0}, "lr"),
    ({"sched.name": "step"}, "sched"),
    ({"split.by": "params"}, "split.by"),
    ({"gpus": 2, "split.balance": [11]}, "split.balance"),
    ({"dist.backend": "mpi"}, "backend"),
])
def test_validate_rejects_bad_settings_naming_them(change, words):
    cfg = _with(run_config("algo=fdg", "gpus=2"), **change)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_validate_accepts_the_boundaries():
    validate(_with(run_config(), **{"algo.beta": 1.0, "gpus": 2, "algo.replicas": 1,
                                    "split.balance": [5, 6], "trainer.max_steps": 1}))


def test_replicas_belong_to_dp_fdg_and_to_processes():
    with pytest.raises(ConfigError, match="use algo=dp_fdg"):
        validate(_with(run_config(), **{"gpus": 4, "algo.replicas": 2}))
    with pytest.raises(ConfigError, match="executor=dist"):
        validate(_with(run_config("algo=dp_fdg", "gpus=4", "executor=local")))
    with pytest.raises(ConfigError, match="follows gpus"):
        validate(_with(run_config("algo=ddp", "gpus=4"), **{"algo.replicas": 2}))
    assert run_config("algo=ddp", "gpus=3").algo.replicas == 3
    cfg = run_config("algo=dp_fdg", "gpus=6", "algo.replicas=3")
    validate(cfg)
    assert (cfg.modules, cfg.algo.replicas) == (2, 3)


def test_run_config_fields_match_the_primary_yaml():
    # train.yaml and RunConfig must name the same top-level settings (the groups are nested)
    top = set(compose_dict())
    # model_args: what a model=custom section holds besides its _target_ (no key of its own);
    # model_options: the model group's own keys besides model.name (conf/model/gpt.yaml)
    assert top | {"model_options"} == {f.name for f in dataclasses.fields(RunConfig)} - {
        "model_args"}
