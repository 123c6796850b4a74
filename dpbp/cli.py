"""The `dpbp` command: a thin dispatcher in front of one Hydra app per subcommand.

    dpbp train                                   # ResNet-20 on digits, CPU, about a minute
    dpbp train algo=ddg model=resnet110 data=cifar10 gpus=4
    dpbp train -m algo=bp,ddg,fdg gpus=2,4       # a sweep: one run directory per job
    dpbp train --help | --cfg job                # Hydra's own help and config printing

Exit status: 0 done, 1 the run failed, 2 bad input (one sentence on stderr, no traceback),
128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM) after writing a checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dpbp import cmdline
from dpbp.cmdline import GROUPS
from dpbp.errors import ConfigError, Interrupted, Stopped

USAGE = """usage: dpbp <command> [KEY=VALUE ...]

commands:
  train   train a model with any algo (a Hydra app: overrides, -m sweeps, --help, --cfg)
  bench   timed short runs of each algo on 1..W workers: speedup, efficiency, ceiling, memory
  report  the accuracy/speed table of runs or sweeps against BP, from their summary.json files
  schedule ALGO K [BATCHES]  print what each module does at each tick (e.g. schedule adl 3)

examples:
  dpbp train                                       ResNet-20 on digits on the CPU
  dpbp train algo=fdg gpus=2 device=cpu            FDG, 2 modules in 2 processes
  dpbp train -m algo=bp,ddg,fdg gpus=1,2           a sweep, BP on 1 worker (the baseline) in it
  tensorboard --logdir multirun/<date>/<time>      its runs, named by what varies
  dpbp train --help                                config groups and keys
  dpbp bench gpus=[1,2] predict=true               speedup of every algo over BP, measured
  dpbp report multirun/<date>/<time>               speedup and time to accuracy against BP
"""

_job_failed = False  # set when our own task function fails, to tell it from Hydra's own errors


def group_options(group: str) -> list[str]:
    folder = resources.files("dpbp.conf") / group
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def check_group_overrides(args: list[str]) -> None:
    """Name a bad config-group choice in one sentence before Hydra composes anything."""
    for arg in args:
        m = re.fullmatch(r"\+?(\w+)=(.*)", arg)
        if not m or m.group(1) not in GROUPS:
            continue
        group, values = m.group(1), m.group(2)
        values = re.sub(r"^(choice|glob)\((.*)\)$", r"\2", values)
        options = group_options(group)
        for value in (v.strip() for v in values.split(",")):
            if not value or value in options or value == "null" or "*" in value:
                continue
            if group == "model":
                from dpbp.models import build_blocks  # its message says what is wrong

                try:
                    build_blocks(value, 1, 2)
                except ConfigError:
                    raise
                raise ConfigError(f"model={value} has no config file; use e.g. "
                                  f"model=resnet20 model.name={value}.")
            raise ConfigError(f"unknown {group} '{value}'; choose one of {', '.join(options)}.")


def check_bench_keys(args: list[str]) -> None:
    """`dpbp bench` with a key it does not have (often a `dpbp train` key): one sentence naming
    bench's keys, before Hydra's three-line struct error."""
    keys = sorted(k for k in OmegaConf.load(resources.files("dpbp.conf") / "bench.yaml")
                  if k not in ("defaults", "hydra"))
    for arg in args:
        m = re.fullmatch(r"([A-Za-z_][\w.]*)=(.*)", arg)
        if m is None or m.group(1).split(".")[0] in (*keys, "model", "data", "hydra"):
            continue
        raise ConfigError(f"dpbp bench has no key {m.group(1)}; its keys are {', '.join(keys)} "
                          "(and model.*, data.*); a `dpbp train` key goes to every run with "
                          f"train=[{arg}].")


def check_output_dir(args: list[str]) -> Path | None:
    """Say in one sentence that the run directory cannot be made or written, before Hydra tries
    (it would fail with a traceback): the nearest existing folder of hydra.run.dir
    (hydra.sweep.dir with -m) must be a directory that takes a file. Return the run directory
    when the command line names it plainly (no interpolation, not a sweep), else None."""
    from dpbp.rundir import describe_os_error

    sweep = "-m" in args or "--multirun" in args
    key = "hydra.sweep.dir=" if sweep else "hydra.run.dir="
    given = [a[len(key):] for a in args if a.startswith(key)]
    target = given[-1] if given else ("multirun" if sweep else "outputs")
    path = Path(target.split("${")[0] or ".").expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    why = "is not a directory" if not path.is_dir() else None
    if why is None:
        try:  # permissions, a read-only or full disk, /proc: only a write tells (1 MiB: room
            # for Hydra's files and the records, or the run fails later with a traceback)
            with tempfile.TemporaryFile(dir=path, prefix=".dpbp-probe-") as f:
                f.write(b"\0" * 2**20)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            why = f"takes no files ({describe_os_error(e)})"
    if why:
        raise ConfigError(f"cannot create the run directory {target}: {path} {why}; choose "
                          f"another with {key}DIR.")
    plain = given and not sweep and "${" not in target
    return Path(target).expanduser().absolute() if plain else None


def discard_rejected(run_dir: Path) -> None:
    """Remove the directory Hydra made for a command dpbp rejected (exit 2), unless it holds
    more than Hydra's own files (a resumed run's checkpoints); then the <date>/<time> folders
    above it, and the default outputs/ root, that are left empty (a sweep keeps its runs)."""
    import shutil

    from dpbp.rundir import LOCK_FILE

    def hydra_only(folder: Path) -> bool:  # Hydra's config, its job log, a sweep's record,
        # the lock this process took on a named run directory
        return all(p.name in (".hydra", "multirun.yaml", LOCK_FILE) or p.suffix == ".log"
                   for p in folder.iterdir())

    if not run_dir.is_dir() or not hydra_only(run_dir):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:
        dated = re.match(r"\d{2,4}-\d{2}-\d{2}", parent.name)  # or the default root, empty
        if not (dated or parent.name in ("outputs", "multirun", "bench")) or \
                not hydra_only(parent):
            break
        shutil.rmtree(parent, ignore_errors=True)


def end_run(run_dir: Path, cfg: DictConfig, status: str, line: str, code: int | None) -> None:
    """A run that did not complete: summary.json with its one line (or a line saying why it
    could not be written), the line, how to go on; then exit with `code` (None: return)."""
    global _job_failed
    from dpbp import lifecycle
    from dpbp.logs import append_log

    resume_guard = lifecycle.defer_signals()
    _job_failed = True
    note = lifecycle.write_outcome(run_dir, {"status": status, "error": line,
                                             "config": OmegaConf.to_container(cfg, resolve=True)})
    shown = f"dpbp: {'run failed: ' if status == 'failed' else ''}{line}"
    print(shown, file=sys.stderr)
    with contextlib.suppress(OSError):  # train.log holds what the console showed
        append_log(run_dir, shown)
    if note:
        print(f"dpbp: {note}", file=sys.stderr)
    print(f"dpbp: {how_to_resume(cfg, run_dir)}", file=sys.stderr)
    if code is not None:
        sys.exit(code)
    resume_guard()


def how_to_resume(cfg: DictConfig | None, run_dir: Path) -> str:
    """One sentence on what the checkpoints of a stopped run allow."""
    ckpt = run_dir / "checkpoints"
    if not (ckpt / "run.pt").exists():
        return "there is no checkpoint yet: rerun the same command."
    import torch

    try:
        run = torch.load(ckpt / "run.pt", map_location="cpu", weights_only=True)
        where = f"epoch {run['epoch']}, tick {run['tick']}"
    except Exception:  # the resume itself will say what is wrong with it
        where = "the last one"
    return (f"continue from the checkpoint ({where}) with the same command plus "
            f"resume={run_dir}")


@hydra.main(version_base="1.3", config_path="pkg://dpbp.conf", config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    """The `dpbp train` Hydra job: resolve, validate, launch, print the summary."""
    from dpbp import lifecycle

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with lifecycle.held_signals():  # torch: seconds; a signal stops the run after them
            from dpbp.config import from_dict, validate
            from dpbp.launch import launch
            from dpbp.logs import echo, summary_table

        rc = from_dict(OmegaConf.to_container(cfg, resolve=True))
        validate(rc)
        summary = launch(rc, run_dir)
        resume_guard = lifecycle.defer_signals()  # the run is over: a late signal changes nothing
    except ConfigError as e:
        print(f"dpbp: {e}", file=sys.stderr)
        discard_rejected(run_dir)
        sys.exit(2)
    except Interrupted as e:  # stopped at an agreed tick, after a checkpoint there
        end_run(run_dir, cfg, "interrupted", str(e), 128 + e.signum)
    except KeyboardInterrupt as e:  # stopped at once (pre-flight, start-up, a second Ctrl-C)
        line = lifecycle.stopped_line(e) if isinstance(e, Stopped) else "interrupted"
        end_run(run_dir, cfg, "interrupted", line, 128 + getattr(e, "signum", signal.SIGINT))
    except Exception as e:
        line = lifecycle.failure_line(e, run_dir)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            end_run(run_dir, cfg, "failed", line, None)
            raise  # Hydra records the failed job and goes on with the rest of the sweep
        end_run(run_dir, cfg, "failed", line, 1)
    if summary is not None:
        sweep = (HydraConfig.get().sweep.dir if HydraConfig.get().mode == RunMode.MULTIRUN
                 else None)
        echo(run_dir, summary_table(summary), f"run directory: {run_dir}" + (
            f" (compare the sweep: tensorboard --logdir {sweep}; dpbp report {sweep})" if sweep
            else ""))
    resume_guard()  # the next job of a sweep starts with its pre-flight
    return None if summary is None else summary["final_test_acc"]


@hydra.main(version_base="1.3", config_path="pkg://dpbp.conf", config_name="bench")
def bench_app(cfg: DictConfig) -> None:
    """The `dpbp bench` Hydra job: every case timed, interleaved; tables and plot written."""
    global _job_failed
    from rich.console import Console

    from dpbp import algos
    from dpbp.bench import run_bench, table

    out = Path(HydraConfig.get().runtime.output_dir)
    plain = OmegaConf.to_container(cfg, resolve=True)
    bad = [a for a in plain["algos"] if a not in algos.names()]
    if bad or not plain["algos"]:
        print(f"dpbp: unknown algo {bad[0] if bad else '(none given)'} in algos; choose from "
              f"{', '.join(algos.names())}.", file=sys.stderr)
        discard_rejected(out)
        sys.exit(2)
    if any(not isinstance(w, int) or w < 1 for w in plain["gpus"]) or plain["epochs"] < 2 \
            or min(plain["repeats"], plain["steps_per_epoch"], plain["batch_size"]) < 1:
        print("dpbp: bench needs gpus >= 1 each, epochs >= 2 (the first is the warm-up), and "
              "repeats, steps_per_epoch, batch_size >= 1.", file=sys.stderr)
        discard_rejected(out)
        sys.exit(2)
    if plain["split"] not in ("flops", "time"):
        print(f"dpbp: bench's split must be time or flops, not '{plain['split']}'.",
              file=sys.stderr)
        discard_rejected(out)
        sys.exit(2)
    console = Console(stderr=True)
    result = run_bench(plain, out, console)
    console.print(table(result))
    print(f"bench directory: {out} (bench.json, bench.md, bench.png)", file=sys.stderr)
    if any(r["failed"] for r in result["rows"]):
        _job_failed = True
        print("dpbp: some bench runs failed; their bench.log files in runs/ say why.",
              file=sys.stderr)
        sys.exit(1)


def print_schedule(args: list[str]) -> int:
    """`dpbp schedule ALGO K [BATCHES] [algo.KEY=VALUE ...]`: the module x tick table of an
    algorithm's schedule, with its default options (ADL's steps follow algo.accumulate)."""
    from dpbp import algos
    from dpbp.schedule import format_table

    names = [n for n in algos.names() if algos.get(n).family == "tick"]
    overrides = [a for a in args if "=" in a]
    args = [a for a in args if "=" not in a]
    if len(args) not in (2, 3) or args[0] not in names or not all(a.isdigit() for a in args[1:]) \
            or int(args[1]) < 1 or not all(o.startswith("algo.") for o in overrides):
        print(f"dpbp: usage: dpbp schedule ALGO K [BATCHES] [algo.KEY=VALUE ...] with ALGO one "
              f"of {', '.join(names)} and K >= 1, e.g. dpbp schedule fdg 3.", file=sys.stderr)
        return 2
    algo, k = args[0], int(args[1])
    batches = int(args[2]) if len(args) == 3 else 2 * k + 2
    try:
        options = algo_options(algo, overrides)
        accumulate = options.accumulation()
        if accumulate < 1:
            options.check(None)  # says which key, in one sentence
            raise ConfigError(f"{algo} sums {accumulate} backwards per update; use at least 1.")
    except ConfigError as e:
        print(f"dpbp: {e}", file=sys.stderr)
        return 2
    every = f" (a step after every {accumulate} backwards)" if accumulate > 1 else ""
    print(f"{algo}, K={k}: F<b> forward batch b, B<b> backward, S step{every}; stage s is "
          "module s+1;\n>A/<A send/receive an activation, >G/<G an error gradient"
          + ("; L<b> the gradient of batch b trains the gradient predictor"
             if algos.get(algo).boundary == "synthetic" else ""))
    print(format_table(algo, k, batches, accumulate=accumulate))
    return 0


def algo_options(algo: str, overrides: list[str]):
    """The `algo` section of conf/algo/<algo>.yaml with these overrides, as its dataclass."""
    from dpbp.config import build_algo

    values = OmegaConf.to_container(OmegaConf.merge(
        OmegaConf.load(str(resources.files("dpbp.conf") / "algo" / f"{algo}.yaml")),
        OmegaConf.from_dotlist([o.removeprefix("algo.") for o in overrides])))
    values["replicas"] = 1  # one pipeline's schedule (ddp's ${gpus} does not resolve here)
    return build_algo(values)


def main(argv: list[str] | None = None) -> int:
    """Dispatch `dpbp <command> ...`; return the exit status (0 done, 1 failed, 2 bad input)."""
    global _job_failed
    _job_failed = False  # a failure of an earlier call in this process must not mask this one's
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "schedule":
        return print_schedule(rest)
    if command == "report":
        from dpbp.report import main as report_main

        return report_main(rest)
    if command not in ("train", "bench"):
        print(f"dpbp: unknown command '{command}'; run `dpbp --help` for the commands.",
              file=sys.stderr)
        return 2
    from dpbp import lifecycle, rundir

    # train: SIGINT/SIGTERM from here on end in one line and 128+N (lifecycle.py)
    restore = lifecycle.guard_preflight() if command == "train" else (lambda: None)
    try:
        check_group_overrides(rest)
        if command == "bench":
            check_bench_keys(rest)
        named = check_output_dir(rest)
        rest = cmdline.model_arguments(rest)  # model=custom: model.KEY is its builder's
        if command == "train":
            cmdline.check_keys(rest)
            rest = [*rest, *cmdline.run_name_overrides(rest)]
            cmdline.register_help()
        if named is not None and command == "train" and rundir.takes_lock():
            rundir.acquire(named)  # before Hydra writes there: two runs never share it
    except ConfigError as e:
        print(f"dpbp: {e}", file=sys.stderr)
        restore()
        return 2
    except Stopped as e:
        print(f"dpbp: {lifecycle.stopped_line(e)}", file=sys.stderr)
        restore()
        return 128 + e.signum
    sys.argv = [f"{sys.argv[0]} {command}", *rest]
    try:
        (train_app if command == "train" else bench_app)()
    except SystemExit as e:
        if e.code == 1 and not _job_failed:
            return 2  # Hydra rejected the command line or config (it printed why)
        if e.code is None:  # sys.exit() means success
            return 0
        return e.code if isinstance(e.code, int) else 1
    except Stopped as e:  # before the job began (Hydra composing the config)
        print(f"dpbp: {lifecycle.stopped_line(e)}", file=sys.stderr)
        if named is not None:
            lifecycle.write_outcome(named, {"status": "interrupted",
                                            "error": lifecycle.stopped_line(e)})
            print(f"dpbp: {how_to_resume(None, named)}", file=sys.stderr)
        return 128 + e.signum
    finally:
        if named is not None:
            rundir.release(named)
        restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
