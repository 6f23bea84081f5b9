"""Which tables of bench/RESULTS.md no longer describe the code: exit 1 when one is stale.

    python bench/stale.py [--results bench/RESULTS.md] [--json]

Every table is headed by the commit it was measured on and the command that measured it, in one
line of this form (the stamp), anywhere between the table and the heading or table before it::

    Measured on commit `c497243`: `python bench/split.py --rows fp32,amaq3 --seeds 5`

A stamp may be followed by a re-check on a later commit, for a table whose runs are repeatable
(a seed repeats a run bit for bit): the same script, run again on that commit for one seed of
every row, gave the table's figures for that seed to the last digit, so the code change since
the stamp did not reach what the table measures. The table is then judged from the re-check::

    Re-checked on commit `9f1e2d3`: `python bench/split.py --rows fp32,amaq3 --seed-list 0` (seed 0 of every row: the same to the last digit)

A table is **stale** when the code of a file its script exercises changed between that commit
(the re-check's, where there is one) and the working tree (committed or not; an edit of comments and docstrings alone is no change),
and **unstamped** when its section has no stamp; both make
the exit status 1, so a stale table is visible at a glance (and a CI step can refuse one).

What a script exercises is read from the source, not guessed: the script, the bench modules it
imports, and every ``fedtune`` module reachable from it through
- import statements, module level or inside functions (fedtune imports many modules lazily);
- module names written as strings (``importlib.import_module("fedtune.x")``, a table of lazy
  exports such as ``fedtune/__init__.py``'s): any string constant that names a fedtune module;
- discovery: a package that lists its own folder (``pkgutil.iter_modules`` or
  ``walk_packages``), as the codec package and the method folders do to register what they
  hold, counts every module under it, at any depth.
Tests (``test_*.py``, ``conftest.py``) are never counted. This over-counts a little (a lazily
imported module the run never reaches, a logger named like a module), never under-counts an
import that fedtune's own source names.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = re.compile(r"Measured on commit `([0-9a-f]{7,40})`[^`\n]*`(python (bench/[\w/]+\.py)[^`]*)`")
RECHECK = re.compile(r"Re-checked on commit `([0-9a-f]{7,40})`[^`\n]*`(python (bench/[\w/]+\.py)[^`]*)`")
HEADING = re.compile(r"^(#{2,3}) (.+)$")


@dataclass
class Table:
    """One table of RESULTS.md (its section's heading, its first line), and what stale.py found."""

    heading: str
    line: int
    commit: str = ""
    command: str = ""
    script: str = ""
    status: str = "unstamped"       # fresh, stale, unstamped or unknown-commit
    changed: list[str] = field(default_factory=list)
    rechecked: str = ""             # the commit of a re-check of the same script, if any

    @property
    def judged_from(self) -> str:
        """The commit the table's freshness is judged from: its re-check's, else its stamp's."""
        return self.rechecked or self.commit


def sections(text: str) -> list[Table]:
    """Every markdown table, under the heading (## or ###) it sits in, with the stamp written
    between it and the heading or table before it (a section may hold tables of several runs,
    each after its own stamp; a table without one is unstamped)."""
    out: list[Table] = []
    heading, stamp, recheck, in_table = "", None, None, False
    for number, line in enumerate(text.splitlines(), 1):
        found = HEADING.match(line)
        if found:
            heading, stamp, recheck, in_table = found.group(2).strip(), None, None, False
            continue
        if STAMP.search(line):
            stamp, recheck = STAMP.search(line), None
        recheck = RECHECK.search(line) or recheck
        is_row = line.startswith("|") and line.rstrip().endswith("|")
        if is_row and not in_table and heading:
            table = Table(heading, number)
            if stamp:
                table.commit, table.command, table.script = stamp.group(1), stamp.group(2), stamp.group(3)
                if recheck and recheck.group(3) == table.script:  # a re-check of another script is no re-check
                    table.rechecked = recheck.group(1)
            out.append(table)
        if in_table and not is_row:
            stamp = recheck = None  # a stamp heads the next table only
        in_table = is_row
    return out


# ---------------------------------------------------------------- what a script exercises


def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a module under ``root`` (a package's ``__init__.py``), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


DISCOVERS = ".*"  # what _imports adds to a package that imports everything in its folder
_DISCOVERY = {"iter_modules", "walk_packages"}
_DOTTED = re.compile(r"^fedtune(\.[A-Za-z_]\w*)+$")  # a fedtune module named as a string


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` may import: those named by its import statements (relative imports
    resolved), at any depth of the file; every dotted string constant (a module imported by
    name; callers keep those that are modules); and ``<package>.*`` when the file lists its
    package's folder to import what is there (see the module docstring)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
            found.add(node.value)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in _DISCOVERY:
            found.add(package + DISCOVERS)
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # "from pkg import module"
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)  # a bench module imported by name, too
    return found


def _package_modules(package: str, root: Path) -> list[str]:
    """Every module under a package's folder, at any depth, tests aside (what its discovery may
    import)."""
    folder = root.joinpath(*package.split("."))
    return sorted(".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                  for path in folder.rglob("*.py") if not _is_test(path))


def _is_test(path: Path) -> bool:
    return path.name.startswith("test_") or path.name == "conftest.py"


def exercised(script: Path, root: Path = ROOT) -> list[str]:
    """The files (relative to ``root``) that ``script`` reaches through imports: itself, the bench
    modules beside it that it imports, and fedtune's modules (see the module docstring)."""
    files: set[Path] = {script.resolve()}
    queue: list[tuple[Path, str]] = [(script.resolve(), script.stem)]
    seen_modules: set[str] = set()
    bench = script.resolve().parent
    while queue:
        path, module = queue.pop()
        for name in sorted(_imports(path, module)):
            candidates = []
            if name.split(".")[0] == "fedtune" and name.endswith(DISCOVERS):
                candidates, where = _package_modules(name.removesuffix(DISCOVERS), root), root
            elif name.split(".")[0] == "fedtune":
                # the module and each package above it (importing a.b.c runs a and a.b too)
                parts = name.split(".")
                candidates = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                where = root
            elif (bench / f"{name.split('.')[0]}.py").is_file():
                candidates, where = [name.split(".")[0]], bench
            for candidate in candidates:
                if candidate in seen_modules:
                    continue
                seen_modules.add(candidate)
                file = _module_file(candidate, where)
                if file is not None and not _is_test(file):
                    files.add(file.resolve())
                    queue.append((file, candidate))
    return sorted(str(f.relative_to(root)) for f in files)


# ---------------------------------------------------------------- against git


def _git(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def changed_since(commit: str, files: list[str], root: Path = ROOT) -> list[str] | None:
    """The files among ``files`` that differ between ``commit`` and the working tree (None when
    git does not know the commit)."""
    if _git("cat-file", "-e", f"{commit}^{{commit}}", root=root).returncode != 0:
        return None
    diff = _git("diff", "--name-only", commit, "--", *files, root=root)
    untracked = _git("ls-files", "--others", "--exclude-standard", "--", *files, root=root)
    edited = [f for f in diff.stdout.split() if not _same_code(commit, f, root)]
    return sorted(set(edited) | set(untracked.stdout.split()))


def _code(source: str) -> str | None:
    """A Python module's code without its comments and docstrings (its syntax tree, each
    docstring removed), or None when it does not parse."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree)


def _same_code(commit: str, path: str, root: Path) -> bool:
    """Whether a Python file's edit since ``commit`` touched only comments and docstrings (a
    table measured on the code is still a measurement of it)."""
    if not path.endswith(".py") or not (root / path).is_file():
        return False
    before = _git("show", f"{commit}:{path}", root=root)
    if before.returncode != 0:
        return False
    old, new = _code(before.stdout), _code((root / path).read_text())
    return old is not None and old == new


def check(results: Path, root: Path = ROOT) -> list[Table]:
    """Every table of ``results`` with its status."""
    tables = sections(results.read_text())
    for table in tables:
        if not table.commit:
            continue
        script = root / table.script
        if not script.is_file():
            table.status, table.changed = "stale", [f"{table.script} (no longer exists)"]
            continue
        changed = changed_since(table.judged_from, exercised(script, root), root)
        if changed is None:
            table.status = "unknown-commit"
        else:
            table.status, table.changed = ("stale", changed) if changed else ("fresh", [])
    return tables


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--json", action="store_true", help="print the tables as JSON instead of a list")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        print(f"stale.py: no such file {args.results}", file=sys.stderr)
        return 2
    tables = check(args.results, args.results.resolve().parent.parent)
    if args.json:
        print(json.dumps([asdict(t) for t in tables], indent=2))
    else:
        for t in tables:
            where = f"line {t.line}: {t.heading}"
            again = f", re-checked on {t.rechecked}" if t.rechecked else ""
            if t.status == "fresh":
                print(f"fresh      {where} (commit {t.commit}{again})")
            elif t.status == "stale":
                more = f" and {len(t.changed) - 3} more" if len(t.changed) > 3 else ""
                print(f"STALE      {where} (commit {t.commit}{again}): {', '.join(t.changed[:3])}{more} changed since")
            elif t.status == "unknown-commit":
                print(f"STALE      {where}: commit {t.judged_from} is not in this repository")
            else:
                print(f"UNSTAMPED  {where}: no 'Measured on commit `...`: `python bench/...`' line")
        bad = sum(t.status != "fresh" for t in tables)
        print(f"{len(tables) - bad} of {len(tables)} tables fresh")
    return 1 if any(t.status != "fresh" for t in tables) else 0


if __name__ == "__main__":
    sys.exit(main())
