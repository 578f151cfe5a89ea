"""Check the environment against a constraints file: ``python scripts/check_constraints.py constraints/cpu.txt``.

Every ``name==version`` pin of the file must be satisfied by the installed distribution of
that name (PEP 440: ``torch==2.13.0`` accepts the local build ``2.13.0+cpu``), and every
requirement of the installed ``visurf-engine`` and ``visurf-kernels`` (their test extra
included) must be pinned there, so the file covers what the project resolves. Prints each
mismatch and exits 1 if there is any; CI runs it after installing with ``-c``.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

PROJECT = ("visurf-engine", "visurf-kernels")


def pins(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the file's ``name==version`` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", line):
            out[canonicalize_name(m[1].split("[")[0])] = m[2]
    return out


def project_requirements() -> set[str]:
    """Canonical names the installed project distributions require (the ``test`` extra included)."""
    names = set()
    for dist in PROJECT:
        for raw in md.requires(dist) or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": "test"}):
                names.add(canonicalize_name(req.name))
    return names - {canonicalize_name(p) for p in PROJECT}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.split("\n\n")[0])
        return 2
    pinned = pins(Path(argv[0]))
    problems = []
    for name, version in sorted(pinned.items()):
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            continue  # pinned for another platform or extra
        if not SpecifierSet(f"=={version}").contains(installed, prereleases=True):
            problems.append(f"{name}: installed {installed}, {argv[0]} pins {version}")
    problems += [f"{name}: required by the project but not pinned in {argv[0]}"
                 for name in sorted(project_requirements() - set(pinned))]  # fmt: skip
    for p in problems:
        print(p)
    print(f"{argv[0]}: {len(pinned)} pins, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
