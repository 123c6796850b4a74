"""TensorBoard's HParams tab for dpbp runs: the settings that tell runs apart, and the numbers
that compare them.

A run logs a short list of settings (algorithm, workers/modules/replicas, model, data, device,
seed, lr, batch, epochs and its algorithm's own `algo.*` keys), not its whole config (that stays
in summary.json). TensorBoard builds the table's columns from ONE run's experiment description,
whichever it reads first, so every run writes the same one: every registered algorithm's keys,
each run filling its own. TensorBoard shows five columns by default, those flagged `differs`
first: dpbp flags HEADLINE, the settings a comparison is about, so algo and gpus are visible.

Metrics are the last value of a scalar tag in the run: the final test accuracy is the last point
of `accuracy/test`; `summary/*` hold the run's totals (one point each, at the run's last step);
`vs_bp/*` (speedup and time to accuracy against the matching one-worker BP run) are written by
`dpbp report --tensorboard`, which alone sees the baseline.
"""

from __future__ import annotations

import dataclasses
import typing
from functools import cache
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboard.plugins.hparams import metadata
from tensorboard.plugins.hparams.api_pb2 import (
    DataType,
    Experiment,
    HParamInfo,
    MetricInfo,
    MetricName,
    Status,
)
from tensorboard.plugins.hparams.plugin_data_pb2 import (
    HParamsPluginData,
    SessionEndInfo,
    SessionStartInfo,
)

from dpbp import algos
from dpbp.algorithm import AlgoConfig

HEADLINE = ("algo", "gpus", "model", "data", "seed")  # the columns shown by default
SETTINGS = (*HEADLINE, "modules", "replicas", "device", "optim.lr", "trainer.batch_size",
            "trainer.epochs")
_STRINGS = {"algo", "model", "data", "device"}

# (scalar tag, column title); the first five are shown by default
METRICS = (
    ("accuracy/test", "final test acc"),
    ("summary/best_test_acc", "best test acc"),
    ("summary/images_per_second", "images/s"),
    ("vs_bp/speedup", "speedup vs BP (images/s)"),
    ("vs_bp/time_speedup", "speedup vs BP to BP's final acc - 1 point"),
    ("vs_bp/seconds_to_target", "seconds to BP's final acc - 1 point"),
    ("summary/seconds_to_final_minus_1pt", "seconds to own final acc - 1 point"),
    ("summary/train_seconds", "train seconds"),
    ("loss/test", "final test loss"),
)
# a language model (data=text) logs perplexity where a classifier logs accuracy
PERPLEXITY = {"accuracy/test": ("perplexity/test", "final test perplexity"),
              "summary/best_test_acc": ("summary/best_test_perplexity", "best test perplexity")}
# summary.json key -> the summary/* tag that carries it
SUMMARY_SCALARS = {"best_test_acc": "summary/best_test_acc",
                   "images_per_second": "summary/images_per_second",
                   "seconds_to_final_minus_1pt": "summary/seconds_to_final_minus_1pt",
                   "train_seconds": "summary/train_seconds",
                   "best_test_perplexity": "summary/best_test_perplexity"}


def _kind(tp: Any) -> str:
    """bool | number | string: how TensorBoard holds a value of Python type `tp`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if args[0] is bool:
        return "bool"
    return "number" if args[0] in (int, float) else "string"


@cache
def option_kinds() -> dict[str, str]:
    """`algo.<key>` -> kind, for every registered algorithm's own keys."""
    common = {f.name for f in dataclasses.fields(AlgoConfig)}
    kinds: dict[str, str] = {}
    for name in algos.names():
        cls = algos.get(name).options
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in common:
                kinds.setdefault(f"algo.{f.name}", _kind(hints[f.name]))
    return kinds


def run_values(summary: dict[str, Any]) -> dict[str, bool | float | str]:
    """The settings of a completed run (its summary.json) as HParams values."""
    cfg = summary["config"]
    values: dict[str, Any] = {
        "algo": summary["algo"], "gpus": summary["gpus"], "model": summary["model"],
        "data": summary["data"], "seed": summary["seed"], "modules": summary["modules"],
        "replicas": summary["replicas"], "device": summary["device"],
        "optim.lr": cfg["optim"]["lr"], "trainer.batch_size": cfg["trainer"]["batch_size"],
        "trainer.epochs": cfg["trainer"]["epochs"]}
    kinds = option_kinds()
    for key, value in cfg["algo"].items():
        name = f"algo.{key}"
        if name in kinds and value is not None:
            values[name] = value if kinds[name] != "string" else str(value)
    return values


def _plugin_summary(tag: str, data: HParamsPluginData) -> Summary:
    data.version = metadata.PLUGIN_DATA_VERSION
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def metrics(summary: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The metrics of a run: METRICS, with perplexity for accuracy for a language model."""
    if summary.get("final_test_perplexity") is None:
        return METRICS
    return tuple(PERPLEXITY.get(tag, (tag, title)) for tag, title in METRICS)


def experiment(columns: tuple[tuple[str, str], ...] = METRICS) -> Summary:
    """The table's columns: every setting any dpbp run logs, and the metrics."""
    types = {"bool": "DATA_TYPE_BOOL", "number": "DATA_TYPE_FLOAT64",
             "string": "DATA_TYPE_STRING"}
    kinds = {k: "string" if k in _STRINGS else "number" for k in SETTINGS} | option_kinds()
    infos = []
    for name, kind in kinds.items():
        info = HParamInfo(name=name, type=DataType.Value(types[kind]), differs=name in HEADLINE)
        if name == "algo":
            info.domain_discrete.extend(algos.names())
        infos.append(info)
    metrics = [MetricInfo(name=MetricName(tag=tag), display_name=title)
               for tag, title in columns]
    return _plugin_summary(metadata.EXPERIMENT_TAG, HParamsPluginData(
        experiment=Experiment(hparam_infos=infos, metric_infos=metrics)))


def session(values: dict[str, bool | float | str]) -> tuple[Summary, Summary]:
    """This run's row: its start (the settings) and its end (completed)."""
    start = SessionStartInfo()
    for name, value in values.items():
        if isinstance(value, bool):
            start.hparams[name].bool_value = value
        elif isinstance(value, (int, float)):
            start.hparams[name].number_value = value
        else:
            start.hparams[name].string_value = str(value)
    end = SessionEndInfo(status=Status.Value("STATUS_SUCCESS"))
    return (_plugin_summary(metadata.SESSION_START_INFO_TAG,
                            HParamsPluginData(session_start_info=start)),
            _plugin_summary(metadata.SESSION_END_INFO_TAG,
                            HParamsPluginData(session_end_info=end)))


def write(writer, summary: dict[str, Any], step: int, walltime: float | None) -> None:
    """Write a completed run's HParams row and its summary/* scalars (at its last step) with a
    torch SummaryWriter."""
    for key, tag in SUMMARY_SCALARS.items():
        if summary.get(key) is not None:
            writer.add_scalar(tag, summary[key], global_step=step, walltime=walltime)
    files = writer.file_writer
    start, end = session(run_values(summary))
    for s in (experiment(metrics(summary)), start, end):
        files.add_summary(s, global_step=step, walltime=walltime)
