"""The ``selmatch`` command line.

    selmatch --help
    selmatch config show --config configs/quickstart.yaml --distill.alpha 0.3
    selmatch data list

Every command that takes ``--config F`` also takes dotted overrides of config fields
(``--distill.alpha 0.3``, ``--run_dir /tmp/r``). Library code raises; the command's exception
becomes a message on stderr and a non-zero exit status (2 for bad input, 1 for a run that went
wrong) by the one map of launch/exits.py, which ``python -m tune`` and ``distill/main.py`` share,
so a Ray Tune trial or a CI job never mistakes a failure for a success.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from distill.config import ConfigError
from distill.config_io import load_config
from launch.exits import arguments_text, command_overrides, run_guarded

# name -> (help, "module:function"); the handler is imported only when its command runs, so that
# `selmatch --help` stays fast and Ray/DeepSpeed are imported only by the commands that use them.
COMMANDS: dict[str, tuple[str, str]] = {
    "config": ("show the resolved configuration (config show --config F)", "launch.cli:cmd_config"),
    "data": ("list the datasets and whether they are available here (data list)", "launch.cli:cmd_data"),
    "experts": ("train expert trajectories (Ray workers; --workers 0 = in-process)",
                "launch.experts:cmd_experts"),
    "scores": ("compute or import difficulty scores (scores/<kind>.npy)", "launch.scores:cmd_scores"),
    "distill": ("select and distill the synthetic set (same as distill/main.py; --resume, "
                "--force)", "launch.distillation:cmd_distill"),
    "window": ("sliding-window search over beta (window/results.json, synset/window.pt)",
               "launch.pipeline:cmd_window"),
    "evaluate": ("evaluate every synthetic set in synset/ (eval/<method>.json)",
                 "launch.pipeline:cmd_evaluate"),
    "run": ("the whole pipeline up to the report, skipping finished stages",
            "launch.pipeline:cmd_run"),
    "tune": ("App. E search: beta, then alpha at the best beta, on Ray Tune (tune/selected.yaml)",
             "tune.main:cmd_tune"),
    "estimate": ("memory per rank, storage, communication and time of the matching step",
                 "launch.estimate:cmd_estimate"),
    "export": ("a row's set as class folders of PNGs, labels, metadata and plain tensors",
               "launch.export:cmd_export"),
    "unlock": ("remove the run directory's lock once the command that held it is gone",
               "launch.unlock:cmd_unlock"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selmatch", allow_abbrev=False,
        description="SelMatch dataset distillation: selection-based initialisation plus partial "
                    "trajectory-matching updates. Commands that take --config F also take dotted "
                    "overrides such as --distill.alpha 0.3.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        if name == "config":
            p.add_argument("action", choices=["show"])
            p.add_argument("--config", help="YAML config file (path or fsspec URL)")
            add_config_flags(p)
        elif name == "data":
            p.add_argument("action", choices=["list"])
        else:
            p.add_argument("--config", required=True, help="YAML config file (path or fsspec URL)")
            _extra_args(name, p)
    return parser


def _extra_args(name: str, p: argparse.ArgumentParser) -> None:
    if name in ("experts", "run", "evaluate"):
        p.add_argument("--workers", type=int, default=None,
                       help="parallel Ray workers (0 = train in-process without Ray; default: Ray decides)")
        p.add_argument("--ray-address", default=None, help="join a Ray cluster (e.g. auto)")
    add_config_flags(p)
    if name == "distill":
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        p.add_argument("--force", action="store_true",
                       help="distil again even when the result is present and fresh")
    if name == "estimate":
        p.add_argument("--gpus", type=int, default=1, help="ranks (GPUs) sharing each step")
        p.add_argument("--device-memory", default=None,
                       help="memory per device, e.g. 80GiB or 141GB (default: this machine's)")
        p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                       help="whose coefficients and profiles to use (default cuda)")
    if name == "export":
        p.add_argument("--row", default="selmatch", help="the report row whose set to export")
        p.add_argument("--repetition", type=int, default=None, metavar="SEED",
                       help="the repetition seed's set (default: the run seed)")
        p.add_argument("--out", required=True, help="folder to write (path or fsspec URL)")
        p.add_argument("--no-test", action="store_true",
                       help="do not write the dataset's test images as val/")
    if name == "tune":
        p.add_argument("--ray-address", default=None, help="join a Ray cluster (e.g. auto)")
        p.add_argument("--no-ray", action="store_true",
                       help="run the trials one after another in this process (hosts without Ray)")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The two config fields every command that takes --config also takes as flags."""
    p.add_argument("--seeds", nargs="+", default=None, metavar="S",
                   help="repetition seeds of selmatch run (selection, distillation and "
                        "evaluation repeated on the same experts; the report pools them): "
                        "--seeds 0 1 2 or --seeds '[0, 1, 2]'; = the config field seeds")
    p.add_argument("--tuned", action="store_true",
                   help="take select.init, select.beta and distill.alpha from "
                        "<run_dir>/tune/selected.yaml (= the config field tuned)")


def _load(target: str) -> Callable[..., int | None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# --------------------------------------------------------------------------------------------
# Built-in commands
# --------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from distill.config_io import dump_yaml

    cfg = load_config(args.config, overrides)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def cmd_data(args: argparse.Namespace, overrides: list[str]) -> int:
    from distill import data

    if overrides:
        raise ConfigError([f"data list takes no overrides, got {' '.join(overrides)}"])
    rows = []
    for name in data.dataset_names():
        ok, where = data.dataset_status(name)
        try:
            info = data.get_info(name)
            classes, shape = str(info.num_classes), "x".join(str(s) for s in info.image_shape)
        except data.DatasetNotFoundError:  # imagefolder: its facts are its files (data.root)
            classes, shape = "-", "-"
        rows.append((name, "yes" if ok else "no", classes, shape, where))
    header = ("dataset", "available", "classes", "shape", "where / how to get it")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.command is None:
        parser.print_help()
        return 2
    handler = _load(COMMANDS[args.command][1])

    def work() -> int | None:
        return handler(args, command_overrides(args, overrides))

    return run_guarded(f"selmatch {args.command}", work,
                       arguments=arguments_text(getattr(args, "config", None), overrides))


if __name__ == "__main__":
    sys.exit(main())
