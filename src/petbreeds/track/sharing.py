"""``petbreeds push`` and ``petbreeds pull``: share experiments through the team's git and DVC remotes.

    petbreeds push EXP [EXP ...]   # dvc exp push -r <default DVC remote> --run-cache origin EXP ...
    petbreeds pull EXP             # dvc exp pull -r <default DVC remote> --run-cache origin EXP; dvc exp apply EXP

DVC does the work; each command is printed before it runs and its output passes through. What this module adds
is the message after DVC's when a remote is missing or cannot be reached: which one, and what to configure.

What DVC 3.67 does, read in its source (``dvc/repo/experiments/{push,pull}.py``) and tried:

- ``dvc exp push`` pushes the experiment's DVC-cached outputs by default (``--no-cache`` skips them) and, with
  ``--run-cache``, the run cache: one command, no ``dvc push --run-cache`` after it.
- It takes the DVC remote from the experiment's commit (its ``.dvc/config``, plus ``.dvc/config.local``). With no
  remote there it pushes the git refs, skips the data and exits 0. Naming the remote (``-r``) makes that an error,
  so the default remote is named, and a project with none stops before anything is pushed.
- ``dvc exp pull`` fetches the experiment's outputs into the cache by default and ``dvc exp apply`` checks them
  out, so a ``dvc pull`` after them has nothing left to do. ``--run-cache`` brings the team's run cache.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from petbreeds.errors import PetbreedsError

GIT_REMOTE = "origin"
SEE = 'see README "Working as a team", "A DVC remote"'


@dataclass(frozen=True)
class Remotes:
    git: str
    git_url: str
    dvc: str
    dvc_url: str


def _run(args: Sequence[str], capture: bool = False) -> subprocess.CompletedProcess[str]:
    """``args`` printed, then run (``dvc`` is the DVC of this environment); its output passed through."""
    print(f"$ {shlex.join(args)}", flush=True)
    argv = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    if not capture:
        return subprocess.run(argv, text=True, check=False)
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    print(out.stdout, end="", flush=True)
    print(out.stderr, end="", file=sys.stderr, flush=True)
    return out


def _remotes(carries: str) -> Remotes:
    """The git remote and the default DVC remote, each named with its URL; a missing one is an error saying what to
    configure (``carries``: what would travel without it, for the message)."""
    git = _run(("git", "remote", "get-url", GIT_REMOTE), capture=True)
    if git.returncode != 0:
        raise PetbreedsError(
            f"no git remote '{GIT_REMOTE}': experiments travel as git refs through the team's git repository. "
            f"Add it: `git remote add {GIT_REMOTE} <url>`; {SEE}"
        )
    default = _run(("dvc", "remote", "default"), capture=True)
    if default.returncode != 0:
        raise PetbreedsError(
            f"no default DVC remote: it is where {carries} travel. Configure the team's storage once and commit it: "
            "`dvc remote add -d storage <url>` (s3://bucket/path, gs://bucket/path, ssh://host/path or a shared "
            f"folder), then `git add .dvc/config && git commit -m 'DVC remote'`; {SEE}"
        )
    name = default.stdout.strip()
    url = _run(("dvc", "config", f"remote.{name}.url"), capture=True)
    if url.returncode != 0:
        raise PetbreedsError(f"the default DVC remote '{name}' has no url: `dvc remote modify {name} url <url>`; {SEE}")
    return Remotes(GIT_REMOTE, git.stdout.strip(), name, url.stdout.strip())


def _transfer(args: Sequence[str], remotes: Remotes, again: str) -> None:
    """Run a DVC command that uses both remotes; on failure, find out which one does not answer and say so."""
    if _run(args).returncode == 0:
        return
    if _run(("git", "ls-remote", remotes.git, "HEAD"), capture=True).returncode != 0:
        raise PetbreedsError(
            f"git remote '{remotes.git}' ({remotes.git_url}) does not answer: check its URL "
            f"(`git remote set-url {remotes.git} <url>`), the network and your git credentials, then run "
            f"`{again}` again; {SEE}"
        )
    raise PetbreedsError(
        f"`{shlex.join(args)}` failed. Git remote '{remotes.git}' ({remotes.git_url}) answers, so unless DVC's "
        f"message above names another cause, DVC remote '{remotes.dvc}' ({remotes.dvc_url}) cannot be reached or "
        f"written from here. Check its URL (`dvc remote modify {remotes.dvc} url <url>`, committed in .dvc/config), "
        f"the network and your credentials for it (`dvc remote modify --local {remotes.dvc} ...`: "
        f".dvc/config.local, never committed), then run `{again}` again (it sends what is missing); {SEE}"
    )


def push_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="petbreeds push",
        description=f"Share experiments: their git refs go to git remote '{GIT_REMOTE}', their data, models and "
        "the run cache to the default DVC remote (dvc exp push --run-cache).",
    )
    parser.add_argument("experiments", nargs="+", metavar="EXP", help="experiment names (`dvc exp ls`)")
    args = parser.parse_args(argv)
    remotes = _remotes("the experiments' data, models and run cache")
    command = ("dvc", "exp", "push", "-r", remotes.dvc, "--run-cache", remotes.git, *args.experiments)
    _transfer(command, remotes, shlex.join(("petbreeds", "push", *args.experiments)))
    return 0


def pull_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="petbreeds pull",
        description=f"Take a teammate's experiment into the workspace: its git refs from git remote '{GIT_REMOTE}', "
        "its data, models and the team's run cache from the default DVC remote (dvc exp pull --run-cache), "
        "then dvc exp apply.",
    )
    parser.add_argument("experiment", metavar="EXP", help="the experiment's name (`dvc exp ls origin`)")
    args = parser.parse_args(argv)
    remotes = _remotes("the experiment's data, models and the run cache")
    command = ("dvc", "exp", "pull", "-r", remotes.dvc, "--run-cache", remotes.git, args.experiment)
    _transfer(command, remotes, shlex.join(("petbreeds", "pull", args.experiment)))
    if _run(("dvc", "exp", "apply", args.experiment)).returncode != 0:
        raise PetbreedsError(
            f"`dvc exp apply {args.experiment}` failed (DVC's message above). The experiment and its data are "
            f"pulled: do what DVC's message says, then run `dvc exp apply {args.experiment}`"
        )
    return 0
