"""Print the installed version of each runtime dependency (pyproject.toml), for CI's log.

With ``--oldest``, exit non-zero unless ``.ci/oldest.txt`` pins each dependency at the
lower bound of its range and that version is the one installed: CI's oldest environment
then tests the versions the package claims as its oldest, and a raised bound cannot leave
the constraints file behind.
"""

import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

root = Path(__file__).resolve().parent.parent
pyproject = tomllib.loads((root / "pyproject.toml").read_text())
deps = [Requirement(d) for d in pyproject["project"]["dependencies"]]
installed = {d.name: Version(version(d.name)) for d in deps}
print(
    f"Python {sys.version.split()[0]}:",
    ", ".join(f"{name} {v}" for name, v in installed.items()),
)

if "--oldest" in sys.argv[1:]:
    pins = {}
    for line in (root / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name)] = Version(pinned)
    problems = []
    for d in deps:
        lower = [Version(s.version) for s in d.specifier if s.operator == ">="]
        pin = pins.get(canonicalize_name(d.name))
        if len(lower) != 1:
            problems.append(f"{d.name}: no single lower bound (>=) in pyproject.toml")
        elif pin != lower[0]:
            problems.append(f"{d.name}: .ci/oldest.txt pins {pin}, the lower bound is {lower[0]}")
        elif installed[d.name] != pin:
            problems.append(f"{d.name}: {installed[d.name]} installed, .ci/oldest.txt pins {pin}")
    if problems:
        sys.exit("not the oldest versions:\n  " + "\n  ".join(problems))
