"""Make the installed ``tensorrt-stubs`` usable by mypy (run once after installing them).

``pip install --no-deps tensorrt-stubs==10.13.0.35.1`` installs ``tensorrt/__init__.pyi`` and
``tensorrt_bindings/{__init__,tensorrt}.pyi`` with three defects that silently defeat the type
check of the TensorRT code:

1. no ``py.typed`` marker: mypy refuses the stubs ("missing library stubs or py.typed marker")
   and, where that error is ignored, types every TensorRT object as ``Any`` — a check that
   cannot fail;
2. parameters named after a Python keyword (``in`` in ``IPluginV3.on_shape_change``,
   ``configure_plugin`` and ``get_workspace_size``): a syntax error;
3. a parameter without a default after defaulted ones (``add_scale_nd(..., power: Weights =
   None, channel_axis: int)``): a syntax error.

This script adds the markers and repairs exactly the lines that ``ast`` rejects (renaming a
keyword parameter ``in`` to ``in_``, giving a trailing parameter the default ``...``). It is
idempotent, prints what it changed, and exits 1 when the stubs are missing or a line cannot be
repaired.

    python scripts/tensorrt_stubs.py [--site DIR]
"""

from __future__ import annotations

import argparse
import ast
import keyword
import os
import re
import site
import sys
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")
INSTALL = "pip install --no-deps tensorrt-stubs==10.13.0.35.1"
_DEF = re.compile(r"^(?P<head>\s*def\s+(?P<name>\w+)\s*\()(?P<params>.*)(?P<tail>\)\s*(->.*)?:.*)$")


def find_site(candidates: list[str]) -> Path | None:
    """The first directory holding both stub packages."""
    for folder in candidates:
        root = Path(folder)
        if all((root / package / "__init__.pyi").is_file() for package in PACKAGES):
            return root
    return None


def split_params(text: str) -> list[str]:
    """Split a parameter list at top-level commas (annotations nest brackets and strings)."""
    parts, depth, start, quote = [], 0, 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def repair_def(line: str) -> tuple[str, list[str]]:
    """The def line with keyword-named parameters renamed and missing trailing defaults added;
    and what was changed, in words."""
    body = line.rstrip("\r\n")
    match = _DEF.match(body)
    if match is None:
        return line, []
    notes: list[str] = []
    params, seen_default = [], False
    for param in split_params(match["params"]):
        name, colon, rest = param.partition(":")
        stripped = name.strip()
        if keyword.iskeyword(stripped):
            name = name.replace(stripped, stripped + "_")
            notes.append(f"renamed parameter {stripped} → {stripped}_")
        param = name + colon + rest
        bare = stripped.lstrip("*")
        if "=" in param:
            seen_default = True
        elif seen_default and bare and bare != "/" and not stripped.startswith("*"):
            param = param.rstrip() + " = ..."
            notes.append(f"gave parameter {stripped} the default ...")
        params.append(param)
    return match["head"] + ",".join(params) + match["tail"] + line[len(body) :], [
        f"{match['name']}: {note}" for note in notes
    ]


def repair_stub(path: Path) -> list[str]:
    """Repair the def lines of one stub file that Python cannot parse; returns the changes made.

    Each one-line def is parsed on its own (the parser's error position can point at the
    docstring before it); the file must parse as a whole afterwards.
    """
    # bytes in and out: the stubs ship with CRLF line ends, which a text round trip would rewrite
    lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    changes: list[str] = []
    for index, line in enumerate(lines):
        if _DEF.match(line) and not _parses(line):
            fixed, notes = repair_def(line)
            if _parses(fixed):
                lines[index] = fixed
                changes += [f"{path}:{index + 1}: {note}" for note in notes]
    try:
        ast.parse("".join(lines), filename=str(path))
    except SyntaxError as exc:
        raise SystemExit(
            f"{path}:{exc.lineno}: cannot repair this stub ({exc.msg}): {(exc.text or '').strip()}"
        ) from None
    if changes:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes("".join(lines).encode("utf-8"))
        os.replace(tmp, path)
    return changes


# stubgen leaves untyped the methods whose docstring names a C++ type (``nvinfer1::IRuntimeCache``
# in TensorRT-RTX's IRuntimeConfig): typed here from their docstrings, so that mypy checks the
# runtime-cache calls too.
CPP_TYPED = {
    "    def create_runtime_cache(self, *args, **kwargs): ...":
        "    def create_runtime_cache(self) -> IRuntimeCache: ...",
    "    def get_runtime_cache(self, *args, **kwargs): ...":
        "    def get_runtime_cache(self) -> IRuntimeCache: ...",
    "    def set_runtime_cache(self, cache=...) -> bool: ...":
        "    def set_runtime_cache(self, cache: IRuntimeCache | None = ...) -> bool: ...",
}  # fmt: skip


def type_cpp_methods(path: Path) -> list[str]:
    """Type the methods of ``CPP_TYPED`` in one generated stub; returns the changes made."""
    lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    changes = []
    for index, line in enumerate(lines):
        body = line.rstrip("\r\n")
        if body in CPP_TYPED:
            lines[index] = CPP_TYPED[body] + line[len(body) :]
            changes.append(f"{path}:{index + 1}: typed {body.strip().split('(')[0][4:]}")
    if changes:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes("".join(lines).encode("utf-8"))
        os.replace(tmp, path)
    return changes


def _parses(def_line: str) -> bool:
    text = def_line.strip()  # a def with its body on the next line gets one
    try:
        ast.parse(text + " ..." if text.endswith(":") else text)
    except SyntaxError:
        return False
    return True


def fix_stubs(root: Path) -> list[str]:
    """Add the py.typed markers and repair every stub file under ``root``'s stub packages."""
    changes: list[str] = []
    for package in PACKAGES:
        folder = root / package
        marker = folder / "py.typed"
        if not marker.exists():
            marker.write_text("", encoding="utf-8")
            changes.append(f"{marker}: created (mypy reads the stubs only with this marker)")
        for stub in sorted(folder.glob("*.pyi")):
            changes += repair_stub(stub)
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, help="the site-packages folder holding the stubs")
    parser.add_argument(
        "--stub", type=Path, action="append", default=[], metavar="FILE",
        help="repair these stub files instead (the tensorrt_rtx stubs stubgen makes)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.stub:
        try:
            changes = [
                change
                for path in args.stub
                for change in [*repair_stub(path), *type_cpp_methods(path)]
            ]
        except (SystemExit, OSError) as exc:
            print(exc, file=sys.stderr)
            return 1
        print("\n".join(changes) or "the stubs parse; nothing to change")
        return 0
    candidates = (
        [str(args.site)] if args.site else [*site.getsitepackages(), site.getusersitepackages()]
    )
    root = find_site(candidates + ([] if args.site else sys.path))
    if root is None:
        print(
            f"tensorrt-stubs is not installed (no {'/'.join(PACKAGES)} stub packages in "
            f"{', '.join(candidates)}); install them with: {INSTALL}",
            file=sys.stderr,
        )
        return 1
    try:
        changes = fix_stubs(root)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    for change in changes:
        print(change)
    if not changes:
        print(f"tensorrt stubs in {root} are already usable by mypy; nothing to change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
