"""The README stays true: its model table is the one the project computes; CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

from vgg_jax.zoo import zoo_table

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_model_table_is_the_computed_one():
    assert zoo_table() in README


def test_readme_starts_with_the_two_setup_commands_and_ci_runs_the_test_one():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(block) == 2
    main_job, tests = block
    assert "python -m vgg_jax.main --config=configs/demo.py" in main_job and tests.endswith("pytest -q")
    assert README.index("```bash") < README.index("## ")
    ci = (REPO / ".ci" / "run").read_text()
    assert "grep -m1 -E '^python3 -m venv .*pytest' README.md" in ci


def test_the_demo_timings_say_what_load_they_are_for():
    """A time on a shared 2-core machine means little without its load: 4-5 minutes 'under load' was 9.3 minutes
    at load 10-13 for a new user."""
    paragraph = " ".join(next(p for p in README.split("\n\n") if p.startswith("The first command")).split())
    times = re.findall(r"([\d.]+(?:-[\d.]+)?) minutes? ([^,;(]*)", paragraph)
    assert len(times) >= 3, times
    assert all("idle" in where or re.match(r"at load [\d.]+(-[\d.]+)?\b", where) for _, where in times), times
