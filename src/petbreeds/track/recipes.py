"""The book's runs as recipes: ``recipes/<name>.yaml`` holds the params.yaml keys of one run, applied with ``-S``.

    $ petbreeds recipe                                     # the recipes, one line each
    $ petbreeds recipe book-fine-tune                      # its overrides: -S fetch.source=oxford-iiit-pet -S ...
    $ dvc exp run -n book-fine-tune $(petbreeds recipe book-fine-tune)

A recipe file::

    description: one line for the list
    params:            # a part of params.yaml: the keys the run sets (nested as there)
      train_frozen:
        epochs: 3

Each key becomes a DVC ``-S key=value`` (Hydra's override grammar, what ``dvc exp run -S`` parses), so the
experiment's params.yaml differs from the baseline's in those keys only and ``dvc exp show`` lists them. Printed
as one line of words without spaces or quotes: ``$(...)`` splits it into arguments as it is.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from petbreeds.config import flatten, load_params
from petbreeds.errors import PetbreedsError
from petbreeds.runtime import project_root

RECIPES_DIR = "recipes"
# A string Hydra's grammar reads as that string when unquoted, and the shell passes as one word unquoted.
_PLAIN = re.compile(r"^[A-Za-z0-9_./:-]+$")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    params: dict[str, Any]  # flattened: {"train_frozen.epochs": 3, ...}

    def overrides(self) -> list[str]:
        """``key=value`` for each key, as ``dvc exp run -S`` (and ``dvc.utils.hydra.apply_overrides``) take them."""
        return [f"{key}={override_value(value)}" for key, value in self.params.items()]


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: floats in Python's notation (``1e-05``), lists as ``[a,b]``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, str) and _PLAIN.match(value):
        return value
    raise ValueError(f"{value!r} is not a plain number, word or list")


def load_recipe(path: Path) -> Recipe:
    """One ``recipes/<name>.yaml``; a :class:`PetbreedsError` naming the file when it is not a recipe."""
    try:
        raw = YAML(typ="safe").load(path.read_text(encoding="utf-8"))
    except (OSError, YAMLError) as e:
        raise PetbreedsError(f"{path}: not readable YAML ({e})") from None
    if not (isinstance(raw, dict) and set(raw) == {"description", "params"} and isinstance(raw["params"], dict)):
        raise PetbreedsError(f"{path}: a recipe is a mapping of description (a line) and params (part of params.yaml)")
    recipe = Recipe(path.stem, str(raw["description"]), flatten(raw["params"]))
    for key, value in recipe.params.items():
        try:
            override_value(value)
        except ValueError as e:
            raise PetbreedsError(f"{path}: {key}: {e}; `-S` could not pass it unquoted") from None
    return recipe


def recipes(root: Path) -> dict[str, Recipe]:
    """The recipes of the project at ``root``, by name."""
    return {path.stem: load_recipe(path) for path in sorted((root / RECIPES_DIR).glob("*.yaml"))}


def find_recipe(root: Path, name: str) -> Recipe:
    """The recipe ``name``, its keys checked against the project's params.yaml."""
    known = recipes(root)
    if name not in known:
        listed = ", ".join(known) or "none"
        raise PetbreedsError(f"no recipe {name!r} in {root / RECIPES_DIR} (the recipes: {listed})")
    recipe = known[name]
    params = flatten(load_params(root / "params.yaml"))
    unknown = [key for key in recipe.params if key not in params]
    if unknown:
        raise PetbreedsError(
            f"{root / RECIPES_DIR / name}.yaml: {', '.join(unknown)} not in params.yaml (`dvc exp run -S` changes "
            "only the keys it has): rename or remove them"
        )
    return recipe


def recipe_cli(argv: list[str]) -> int:
    """``petbreeds recipe [NAME]``: list the recipes, or print one's ``-S`` arguments for ``dvc exp run``."""
    parser = argparse.ArgumentParser(
        prog="petbreeds recipe",
        description="The book's runs as named params presets. Without NAME: list them. With NAME: print its -S "
        "arguments, for `dvc exp run -n NAME $(petbreeds recipe NAME)`.",
    )
    parser.add_argument("name", nargs="?", help="a recipe (a file recipes/NAME.yaml)")
    args = parser.parse_args(argv)
    root = project_root()
    if args.name is None:
        known = recipes(root)
        width = max((len(name) for name in known), default=0)
        for recipe in known.values():
            print(f"{recipe.name:<{width}}  {recipe.description}")
        print("\nrun one: dvc exp run -n NAME $(petbreeds recipe NAME)")
        return 0
    print(" ".join(f"-S {override}" for override in find_recipe(root, args.name).overrides()))
    return 0
