"""The algorithm registry: one record per algorithm, read everywhere instead of its name."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import compose_dict

from dpbp import algos, schedule
from dpbp.algorithm import AlgoConfig, Algorithm
from dpbp.cli import group_options
from dpbp.config import from_dict, validate
from dpbp.errors import ConfigError

PACKAGE = Path(algos.__file__).parents[1]
# string literals equal to an algorithm name that may stand outside the algorithm's own module:
# the papers' accuracy and speed tables are keyed by the papers' method names, and torch's
# pipeline schedules are called gpipe and 1f1b (the values of algo.pipeline, not the algorithm)
ALLOWED = {"paper.py": None, "paper_predict.py": None, "pipelining.py": {"gpipe"},
           "simulate.py": {"gpipe"}}


def test_every_config_file_has_a_record_and_every_record_a_config_file():
    assert set(group_options("algo")) == set(algos.names())


def test_the_reference_is_plain_backprop_and_listed_first():
    ref = algos.reference()
    assert ref.reference and algos.names()[0] == ref.name
    assert ref.delays(4) == [0, 0, 0, 0] and not ref.pipelined


@pytest.mark.parametrize("name", algos.names())
def test_each_record_is_consistent_with_its_options(name):
    rec = algos.get(name)
    assert isinstance(rec, Algorithm) and rec.name == name
    assert issubclass(rec.options, AlgoConfig) and dataclasses.is_dataclass(rec.options)
    workers = {"dp_fdg": 4}.get(name, max(2, rec.min_workers))
    cfg = from_dict(compose_dict(f"algo={name}", f"gpus={workers}"))
    validate(cfg)
    assert type(cfg.algo) is rec.options
    assert rec.layout(workers) is not None
    k, r = rec.layout(workers)
    assert k * r == workers


def test_unknown_algorithm_is_one_sentence_listing_the_choices():
    with pytest.raises(ConfigError, match=r"unknown algo 'fgd'; choose one of bp, "):
        algos.get("fgd")


def test_delays_come_from_the_records():
    """The delays of the papers (module k = s+1 of K): DDG/FR K-k, FDG 2(K-k), BP none."""
    assert [schedule.delay("ddg", s, 4) for s in range(4)] == [3, 2, 1, 0]
    assert [schedule.delay("fr", s, 3) for s in range(3)] == [2, 1, 0]
    assert [schedule.delay("fdg", s, 3) for s in range(3)] == [4, 2, 0]
    assert algos.get("dp_fdg").delays(3) == algos.get("fdg").delays(3)
    assert schedule.pipelined("fdg") and not schedule.pipelined("ddg")


def _name_literals(path: Path) -> set[str]:
    names = set(algos.names())
    return {n.value for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names}


def test_algorithm_names_appear_only_in_their_own_module():
    """Nothing outside dpbp/algos/ tests an algorithm's name (the listed data excepted)."""
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        allowed = ALLOWED.get(path.name, set())
        if allowed is None:
            continue
        extra = _name_literals(path) - allowed
        if extra:
            found[path.name] = sorted(extra)
    assert found == {}


def test_a_plug_in_from_an_entry_point_joins_the_registry(monkeypatch, tmp_path):
    """A researcher's own algorithm, in a package of their own, registered by entry point."""
    (tmp_path / "my_algo.py").write_text(
        "from dpbp.algorithm import Algorithm, DelayedConfig\n"
        "ALGORITHM = Algorithm(name='late', title='a test plug-in', family='tick',\n"
        "                      options=DelayedConfig, delay=lambda s, k: 2 * (k - 1 - s))\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    class EntryPoint:
        def load(self):
            import my_algo

            return my_algo

    monkeypatch.setattr(algos, "entry_points", lambda group: [EntryPoint()])
    algos._registry.cache_clear()
    try:
        assert "late" in algos.names()
        assert schedule.delay("late", 0, 3) == 4
    finally:
        monkeypatch.undo()
        algos._registry.cache_clear()
    assert "late" not in algos.names()
