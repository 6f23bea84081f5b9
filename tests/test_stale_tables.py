"""bench/stale.py: a RESULTS.md table is stale when a module its script reaches through imports
(lazy ones included) changed since the commit it was measured on; an unstamped table is never
taken as fresh."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import stale  # noqa: E402


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path) -> str:
    (root / "fedtune" / "inner").mkdir(parents=True)
    (root / "bench").mkdir()
    (root / "fedtune" / "__init__.py").write_text("")
    (root / "fedtune" / "inner" / "__init__.py").write_text("")
    (root / "fedtune" / "inner" / "used.py").write_text("from . import helper\nVALUE = 1\n")
    (root / "fedtune" / "inner" / "helper.py").write_text("X = 2\n")
    (root / "fedtune" / "unrelated.py").write_text("Y = 3\n")
    (root / "bench" / "table.py").write_text("def main():\n    from fedtune.inner.used import VALUE  # a lazy import counts\n    return VALUE\n")
    (root / "bench" / "test_table.py").write_text("")
    git(root, "init", "-q")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    commit = git(root, "rev-parse", "--short", "HEAD")
    (root / "bench" / "RESULTS.md").write_text(
        "# Results\n\n## Stamped\n\n"
        f"Measured on commit `{commit}`: `python bench/table.py --seeds 5`\n\n| row | x |\n|---|---|\n| a | 1 |\n\n"
        "An older table in the same section, without a stamp of its own:\n\n| row | x |\n|---|---|\n| old | 0 |\n\n"
        "## Prose only\n\nno table here\n\n"
        "## Unstamped\n\nMeasured 2026-11-25.\n\n| row | x |\n|---|---|\n| b | 2 |\n")
    return commit


def test_a_table_is_stale_exactly_when_a_module_its_script_reaches_changed(tmp_path):
    commit = make_repo(tmp_path)
    results = tmp_path / "bench" / "RESULTS.md"
    assert stale.exercised(tmp_path / "bench" / "table.py", tmp_path) == [
        "bench/table.py", "fedtune/__init__.py", "fedtune/inner/__init__.py", "fedtune/inner/helper.py", "fedtune/inner/used.py"]
    found = stale.check(results, tmp_path)
    assert [t.heading for t in found] == ["Stamped", "Stamped", "Unstamped"]  # a section without a table is no table
    assert found[1].status == "unstamped"  # a stamp heads the next table only
    tables = {t.heading: t for t in found[::2]}
    assert tables["Stamped"].status == "fresh" and tables["Stamped"].commit == commit
    assert tables["Stamped"].command == "python bench/table.py --seeds 5"
    assert tables["Unstamped"].status == "unstamped"
    (tmp_path / "fedtune" / "unrelated.py").write_text("Y = 4\n")  # not reached by the script
    assert stale.check(results, tmp_path)[0].status == "fresh"
    # comments and docstrings are not code: a table measured on the code still describes it
    (tmp_path / "fedtune" / "inner" / "helper.py").write_text('"""What X is."""\n\n# a comment\nX = 2  # two\n')
    assert stale.check(results, tmp_path)[0].status == "fresh"
    (tmp_path / "fedtune" / "inner" / "helper.py").write_text("X = 5\n")  # reached through used.py, uncommitted
    found = stale.check(results, tmp_path)[0]
    assert found.status == "stale" and found.changed == ["fedtune/inner/helper.py"]


def test_the_exit_status_says_whether_every_table_is_fresh(tmp_path, capsys):
    make_repo(tmp_path)
    results = tmp_path / "bench" / "RESULTS.md"
    assert stale.main(["--results", str(results)]) == 1  # the unstamped table
    assert "UNSTAMPED  line" in capsys.readouterr().out
    text = results.read_text()
    fresh = text[: text.index("An older table")] + text[text.index("## Prose only"): text.index("## Unstamped")]
    results.write_text(fresh)
    assert stale.main(["--results", str(results)]) == 0
    commit = stale.sections(fresh)[0].commit
    results.write_text(fresh.replace(f"`{commit}`", "`abcdef0`"))
    assert stale.main(["--results", str(results)]) == 1  # a commit git does not know is not fresh
    assert "is not in this repository" in capsys.readouterr().out


def test_a_recheck_on_a_later_commit_judges_the_table_from_there(tmp_path):
    commit = make_repo(tmp_path)
    results = tmp_path / "bench" / "RESULTS.md"
    (tmp_path / "fedtune" / "inner" / "helper.py").write_text("X = 5\n")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "second")
    later = git(tmp_path, "rev-parse", "--short", "HEAD")
    assert stale.check(results, tmp_path)[0].status == "stale"
    text = results.read_text()
    stamp = f"Measured on commit `{commit}`: `python bench/table.py --seeds 5`\n"
    results.write_text(text.replace(stamp, stamp + f"\nRe-checked on commit `{later}`: `python bench/table.py --seed-list 0` (the same to the last digit)\n"))
    found = stale.check(results, tmp_path)
    assert found[0].status == "fresh" and found[0].rechecked == later and found[0].commit == commit
    assert found[1].status == "unstamped"  # the re-check, like the stamp, heads the next table only
    results.write_text(text.replace(stamp, stamp + f"\nRe-checked on commit `{later}`: `python bench/other.py --seed-list 0`\n"))
    assert stale.check(results, tmp_path)[0].status == "stale"  # a re-check of another script is none
    (tmp_path / "fedtune" / "inner" / "helper.py").write_text("X = 6\n")  # changed after the re-check
    results.write_text(text.replace(stamp, stamp + f"Re-checked on commit `{later}`: `python bench/table.py --seed-list 0`\n"))
    assert stale.check(results, tmp_path)[0].status == "stale"


def test_modules_imported_by_name_or_by_discovery_are_reached(tmp_path):
    """fedtune registers codecs and methods by importing whatever their package folder holds, and
    exports names lazily from a table of module names: a table whose script reaches such a package
    goes stale when any module in it changes, though no import statement names that module."""
    (tmp_path / "fedtune" / "plugins" / "deep").mkdir(parents=True)
    (tmp_path / "fedtune" / "lazy").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "fedtune" / "__init__.py").write_text(
        'EXPORTS = {"thing": "fedtune.lazy.thing"}\nSTATE_KEY = "fedtune.not_a_module"\n')
    (tmp_path / "fedtune" / "lazy" / "__init__.py").write_text("")
    (tmp_path / "fedtune" / "lazy" / "thing.py").write_text("THING = 1\n")
    (tmp_path / "fedtune" / "plugins" / "__init__.py").write_text(
        "import importlib\nimport pkgutil\n\nfor m in pkgutil.iter_modules(__path__):\n"
        "    importlib.import_module(f'{__name__}.{m.name}')\n")
    (tmp_path / "fedtune" / "plugins" / "codec.py").write_text("C = 1\n")
    (tmp_path / "fedtune" / "plugins" / "deep" / "__init__.py").write_text("")
    (tmp_path / "fedtune" / "plugins" / "deep" / "more.py").write_text("D = 1\n")
    (tmp_path / "fedtune" / "plugins" / "test_codec.py").write_text("")
    (tmp_path / "fedtune" / "other.py").write_text("O = 1\n")
    (tmp_path / "bench" / "table.py").write_text("import fedtune\nimport fedtune.plugins\n")
    assert stale.exercised(tmp_path / "bench" / "table.py", tmp_path) == [
        "bench/table.py", "fedtune/__init__.py", "fedtune/lazy/__init__.py", "fedtune/lazy/thing.py",
        "fedtune/plugins/__init__.py", "fedtune/plugins/codec.py", "fedtune/plugins/deep/__init__.py",
        "fedtune/plugins/deep/more.py"]  # the test module and fedtune/other.py are not reached
    # a script that does not reach the discovering package does not count what it holds
    (tmp_path / "bench" / "table.py").write_text("from fedtune.lazy import thing\n")
    assert "fedtune/plugins/codec.py" not in stale.exercised(tmp_path / "bench" / "table.py", tmp_path)
