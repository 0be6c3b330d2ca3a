"""The lock file of the README's commands: write it, compare it, check an environment against it.

Used by scripts/venv.sh and scripts/lock.sh (standard library only: it runs before anything is installed).

  python scripts/lockfile.py tag                      the lock's name for this interpreter and machine
  python scripts/lockfile.py write FREEZE REPORT OUT  pins from `pip freeze`, hashes from a `pip install --report`
  python scripts/lockfile.py diff OLD NEW             what moved (package: old -> new), added, removed
  python scripts/lockfile.py verify LOCK              this interpreter's environment against LOCK (exit 1 if not)
  python scripts/lockfile.py constraints LOCK OUT     the same pins without hashes, torch without its +cpu tag
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

HEADER = """\
# The exact environment of ./train.sh, ./test.sh, eval.sh and CI ({tag}), with hashes.
# Written by scripts/lock.sh (do not edit by hand): re-resolved to the newest versions pyproject.toml allows,
# installed into a fresh venv and written only after the default test tier passed there.
# Installed by scripts/venv.sh with `pip install --require-hashes --no-deps`; torch is the CPU build.
"""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tag() -> str:
    impl = "py" if sys.implementation.name == "cpython" else sys.implementation.name
    return f"{impl}{sys.version_info[0]}{sys.version_info[1]}-{sys.platform}-{platform.machine().lower()}-cpu"


def read_pins(path: str | Path) -> dict[str, tuple[str, str]]:
    """name -> (name as written, version) from a lock, constraints or freeze file."""
    pins = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line or line.startswith("-") or "==" not in line:
            continue
        name, version = line.split("==", 1)
        version = version.split(";", 1)[0].split()[0]
        pins[norm(name)] = (name.strip(), version)
    return pins


def write(freeze: str, report: str, out: str) -> None:
    pins = read_pins(freeze)
    hashes: dict[str, list[str]] = {}
    for item in json.loads(Path(report).read_text())["install"]:
        name = norm(item["metadata"]["name"])
        archive = item.get("download_info", {}).get("archive_info", {})
        values = dict(archive.get("hashes", {}))
        if not values and archive.get("hash"):
            algo, _, value = archive["hash"].partition("=")
            values[algo] = value
        if "sha256" in values:
            hashes[name] = [values["sha256"]]
    missing = sorted(set(pins) - set(hashes))
    if missing:
        sys.exit(f"lockfile: no sha256 for {', '.join(missing)} in {report}")
    lines = [HEADER.format(tag=tag())]
    for key in sorted(pins):
        name, version = pins[key]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{hashes[key][0]}")
    Path(out).write_text("\n".join(lines) + "\n")


def diff(old: str, new: str) -> int:
    a = read_pins(old) if Path(old).exists() else {}
    b = read_pins(new)
    moved = [f"  {b[k][0]}: {a[k][1]} -> {b[k][1]}" for k in sorted(a.keys() & b.keys()) if a[k][1] != b[k][1]]
    added = [f"  {b[k][0]}: new {b[k][1]}" for k in sorted(b.keys() - a.keys())]
    gone = [f"  {a[k][0]}: removed (was {a[k][1]})" for k in sorted(a.keys() - b.keys())]
    print(f"{len(moved)} moved, {len(added)} added, {len(gone)} removed")
    for line in moved + added + gone:
        print(line)
    return 0


def installed() -> dict[str, tuple[str, str]]:
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name)] = (name, version.strip())
    pins.pop("pip", None)
    return pins


def verify(lock: str) -> int:
    want, have = read_pins(lock), installed()
    problems = [f"{want[k][0]}: locked {want[k][1]}, installed {have[k][1] if k in have else 'nothing'}"
                for k in sorted(want) if have.get(k, (None, None))[1] != want[k][1]]
    problems += [f"{have[k][0]}: installed {have[k][1]}, not in the lock" for k in sorted(have.keys() - want.keys())]
    if problems:
        print(f"the environment of {sys.executable} differs from {lock}:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def constraints(lock: str, out: str) -> None:
    lines = ["# The lock's pins without hashes, for your own environment (e.g. with the CUDA build of torch):",
             f"#   pip install torch==<version below> && pip install -c {out} -e '.[gpu]'",
             f"# Written by scripts/lock.sh from {Path(lock).name}."]
    for key, (name, version) in sorted(read_pins(lock).items()):
        lines.append(f"{name}=={version.split('+', 1)[0] if key == 'torch' else version}")
    Path(out).write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "tag":
        print(tag())
    elif cmd == "write":
        write(*args)
    elif cmd == "diff":
        return diff(*args)
    elif cmd == "verify":
        return verify(*args)
    elif cmd == "constraints":
        constraints(*args)
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
