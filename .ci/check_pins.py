"""Fail set-up when an installed package differs from its pinned version in constraints.txt (an old .venv, a pip
that ignored a pin): the suite is only known to work with the pinned set. Usage: python .ci/check_pins.py FILE"""
from __future__ import annotations

import re
import sys
from importlib import metadata


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def main(path: str) -> int:
    wrong = []
    for name, want in sorted(pins(path).items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # pinned for when it is installed (a dependency of an optional extra)
        if have != want:
            wrong.append(f"{name} {have} (pinned {want})")
    if wrong:
        print(f"installed versions differ from {path}: " + "; ".join(wrong) +
              ". Remove .venv and run .ci/setup again, or update the pins deliberately.", file=sys.stderr)
        return 1
    print(f"{len(pins(path))} pins checked against {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt"))
