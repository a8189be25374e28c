"""Print the requirements of pyproject.toml (runtime, plus the extras named as arguments) that the current
Python does not satisfy, one per line, torch and triton left out (scripts/install.sh keeps the ones you have)."""

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

KEPT = {"torch", "triton"}

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
wanted = [*project["dependencies"], *(r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra])]
try:
    from packaging.requirements import Requirement
except ImportError:  # a bare Python: let pip decide
    print("\n".join(text for text in wanted if text.split(">")[0].split("<")[0].split("=")[0] not in KEPT))
    sys.exit()
for text in wanted:
    requirement = Requirement(text)
    if requirement.name in KEPT:
        continue
    try:
        satisfied = requirement.specifier.contains(version(requirement.name), prereleases=True)
    except PackageNotFoundError:
        satisfied = False
    if not satisfied:
        print(text)
