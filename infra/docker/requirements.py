"""Print the project's pinned requirements from pyproject.toml, one per line (used by the Dockerfiles).

Installing these before copying the sources keeps the heavy layer (torch, ray) cached across code
changes, and the pins stay exactly those of pyproject.toml: nothing is repeated in the Dockerfiles.

    python requirements.py PYPROJECT [--extras hf,s3] [--only torch,torchvision] [--add ray=default]

`--add ray=default` adds extras to a pinned requirement without touching its version: Ray's dashboard
and job server (needed by `ray job submit`, KubeRay RayJobs and the dashboard) live in ray[default].
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"cannot read a package name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _add_extras(requirement: str, more: list[str]) -> str:
    match = re.match(r"(\s*[A-Za-z0-9][A-Za-z0-9._-]*)(\[([^\]]*)\])?(.*)", requirement)
    have = [e.strip() for e in (match.group(3) or "").split(",") if e.strip()]
    merged = have + [e for e in more if e not in have]
    return f"{match.group(1)}[{','.join(merged)}]{match.group(4)}"


def requirements(pyproject: str, extras: list[str], only: list[str] = (), exclude: list[str] = (),
                 add: dict[str, list[str]] | None = None) -> list[str]:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += [r for r in optional[extra] if r not in reqs]
    only_n = {_name(x) for x in only}
    exclude_n = {_name(x) for x in exclude}
    picked = [r for r in reqs if (not only_n or _name(r) in only_n) and _name(r) not in exclude_n]
    add = {_name(k): v for k, v in (add or {}).items()}
    unknown = set(add) - {_name(r) for r in reqs}
    if unknown:
        raise SystemExit(f"--add names packages not in pyproject.toml: {sorted(unknown)}")
    picked = [_add_extras(r, add[_name(r)]) if _name(r) in add else r for r in picked]
    missing = only_n - {_name(r) for r in picked}
    if missing:
        raise SystemExit(f"not in pyproject.toml: {sorted(missing)}")
    return picked


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pyproject")
    ap.add_argument("--extras", default="")
    ap.add_argument("--only", default="")
    ap.add_argument("--exclude", default="")
    ap.add_argument("--add", action="append", default=[], metavar="PKG=EXTRA[+EXTRA]")
    args = ap.parse_args(argv)

    def split(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    add = {}
    for item in args.add:
        pkg, _, extra = item.partition("=")
        add[pkg.strip()] = [e for e in extra.split("+") if e]
    sys.stdout.write("\n".join(requirements(args.pyproject, split(args.extras), split(args.only),
                                            split(args.exclude), add)) + "\n")


if __name__ == "__main__":
    main()
