"""The mutation list (tests/mutation/mutants.py) stays applicable as the code changes: each mutant's
text occurs as often as it says in its file, changes it, and names tests that exist. The mutation
run itself is a pre-release tool (docs/testing.md), not part of CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mutation import run
from tests.mutation.mutants import MUTANTS

REPO = Path(__file__).resolve().parents[1]


def test_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_to_the_current_code(mutant):
    text = (REPO / mutant.file).read_text()
    assert text.count(mutant.find) == mutant.count, f"{mutant.find!r} in {mutant.file}: update the mutant"
    assert mutant.find != mutant.replace
    paths = [arg.split("::")[0] for arg in mutant.tests if arg.startswith("tests/")]
    assert paths and all((REPO / p).is_file() for p in paths), mutant.tests


def test_run_reports_a_surviving_mutant(tmp_path, monkeypatch):
    """The runner itself: a mutant whose tests pass anyway is SURVIVED, and the file is restored."""
    target = tmp_path / "vgg_jax" / "m.py"
    target.parent.mkdir()
    target.write_text("X = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_m.py").write_text("def test_nothing_about_x():\n    assert True\n")
    mutant = run.Mutant("x_is_2", "vgg_jax/m.py", "X = 1", "X = 2", ("tests/test_m.py",))
    verdict, _, caught = run.run_one(mutant, tmp_path, timeout=300)
    assert (verdict, caught) == ("SURVIVED", "")
    assert target.read_text() == "X = 1\n"
    (tmp_path / "tests" / "test_m.py").write_text(
        "import sys\nsys.path.insert(0, 'vgg_jax')\nimport m\n\ndef test_x():\n    assert m.X == 1\n"
    )
    verdict, _, caught = run.run_one(mutant, tmp_path, timeout=300)
    assert verdict == "KILLED" and caught.endswith("test_x")
