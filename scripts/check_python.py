"""Stop `make` with a clear message when the interpreter that would create .venv is older than pyproject.toml's
requires-python (``>=X.Y``): pip would otherwise fail later, deep in its resolver.

Run by that interpreter, whatever its version: Python 3.6 or newer parses it (no tomllib, which is 3.11's).
"""

import re
import sys

with open("pyproject.toml", encoding="utf-8") as f:
    found = re.search(r'^requires-python = ">=(\d+)\.(\d+)"', f.read(), re.MULTILINE)
need, have = (int(found.group(1)), int(found.group(2))), tuple(sys.version_info[:2])
if have < need:
    sys.exit(
        f"error: {sys.executable} is Python {have[0]}.{have[1]}; petbreeds needs Python {need[0]}.{need[1]} or newer "
        f"(pyproject.toml requires-python). Run make with a newer one: make PYTHON=python{need[0]}.{need[1]} ..."
    )
