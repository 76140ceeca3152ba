"""The ``petbreeds`` command: what a user does around the pipeline.

    petbreeds [-v] COMMAND [ARGS...]   # -v: the libraries' INFO lines too (as PETBREEDS_VERBOSE=1)
    petbreeds --version
    petbreeds predict IMAGE_OR_FOLDER [--model models/model.pt] [--top-k 3]
    petbreeds export [--model models/model.pt] [--out models/model.onnx]  # ONNX, preprocessing inside
    petbreeds show-batch      # PNG grids of an augmented training batch and a validation batch
    petbreeds summary         # walk one sample and one batch through every data step
    petbreeds mlflow-relog    # (re)build the MLflow run of the current DVC outputs
    petbreeds register EXP --alias champion  # an experiment's MLflow model into the Model Registry, to serve
    petbreeds recipe [NAME]   # the book's runs; NAME: its -S arguments for `dvc exp run`
    petbreeds push EXP...     # share experiments: dvc exp push, data and run cache included
    petbreeds pull EXP        # a teammate's experiment into the workspace: dvc exp pull, dvc exp apply
    petbreeds resume [--clean [--all]]  # the resume states interrupted training stages left; remove stale ones

Each subcommand lives in the module that does the work; this file only dispatches, so that
``petbreeds --help`` does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys

from petbreeds.errors import PetbreedsError
from petbreeds.runtime import VERBOSE_ENV, quiet_by_default

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "predict": ("petbreeds.serve.predict", "cli", "breed and probability for an image or a folder of images"),
    "export": ("petbreeds.serve.export", "cli", "the model as one ONNX file that runs without torch"),
    "show-batch": ("petbreeds.data.show", "show_batch_cli", "PNG grids of a training and a validation batch"),
    "summary": ("petbreeds.data.show", "summary_cli", "walk one sample and one batch through every data step"),
    "mlflow-relog": ("petbreeds.track.relog", "relog_cli", "log the current DVC outputs to MLflow again"),
    "register": (
        "petbreeds.track.registry",
        "register_cli",
        "an experiment's model into MLflow's Model Registry, aliased",
    ),
    "recipe": (
        "petbreeds.track.recipes",
        "recipe_cli",
        "the book's runs: list them, or print one's -S args for dvc exp run",
    ),
    "push": ("petbreeds.track.sharing", "push_cli", "share experiments with the team (dvc exp push, run cache too)"),
    "pull": ("petbreeds.track.sharing", "pull_cli", "a teammate's experiment into the workspace (dvc exp pull, apply)"),
    "resume": ("petbreeds.learn.resume", "resume_cli", "interrupted training's resume states: list, --clean the stale"),
}


def _usage() -> str:
    lines = ["usage: petbreeds [-v] COMMAND [ARGS...]", "       petbreeds --version", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "options:", f"  {'-v, --verbose':<14} the libraries' INFO lines too (MLflow's); or {VERBOSE_ENV}=1"]
    lines += [f"  {'--version':<14} print the version", ""]
    lines += ["petbreeds COMMAND --help for the arguments of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-v"], ["--verbose"]):
        os.environ[VERBOSE_ENV] = "1"  # the environment, so that anything the command starts is verbose too
        argv = argv[1:]
    if not argv:
        print(_usage(), file=sys.stderr)  # argparse's convention for a missing command
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"petbreeds {importlib.metadata.version('petbreeds')}")
        return 0
    quiet_by_default()
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"petbreeds: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except PetbreedsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
