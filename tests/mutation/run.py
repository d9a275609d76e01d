"""Mutation testing: apply each named one-line bug of ``mutants.py`` to a scratch copy and run its tests.

``python -m tests.mutation.run [--only=NAME,...] [--timeout=900]`` prints KILLED or SURVIVED per mutant and a
markdown table; docs/testing.md
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from tests.mutation.mutants import MUTANTS, Mutant
from vgg_jax import cli

REPO = Path(__file__).resolve().parents[2]


def define_flags(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_list("only", [], "Mutant names to run (default: all).", flag_values=values)
    flags.DEFINE_integer(
        "timeout", 900, "Seconds per mutant's test run (a timeout counts as killed).", flag_values=values
    )
    flags.DEFINE_string("out", None, "Also write the markdown table here.", flag_values=values)


def scratch_copy() -> Path:
    """The tracked files of the checkout (with uncommitted changes) in a temporary directory."""
    root = Path(tempfile.mkdtemp(prefix="vgg_jax_mutation_"))
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    return root


def run_one(mutant: Mutant, root: Path, timeout: int) -> tuple[str, float, str]:
    """(KILLED | SURVIVED, seconds, the first failing test or '') with ``mutant`` applied in ``root``."""
    path = root / mutant.file
    original = path.read_text()
    found = original.count(mutant.find)
    if found != mutant.count:
        raise ValueError(f"{mutant.name}: {mutant.find!r} occurs {found} times in {mutant.file}, not {mutant.count}.")
    path.write_text(original.replace(mutant.find, mutant.replace))
    env = dict(os.environ, PYTHONPATH=str(root))  # the copy's vgg_jax, here and in the tests' subprocesses
    env.pop("XLA_FLAGS", None)
    started = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *mutant.tests],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode == 5:
            raise ValueError(f"{mutant.name}: its tests {mutant.tests} select no test.")
        failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
        verdict = "SURVIVED" if proc.returncode == 0 else "KILLED"
        if proc.returncode not in (0, 1):  # collection or internal errors: say so
            failed = failed or [
                proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"rc {proc.returncode}"
            ]
    except subprocess.TimeoutExpired:
        verdict, failed = "KILLED", [f"timeout after {timeout} s"]
    finally:
        path.write_text(original)
    return verdict, time.time() - started, failed[0] if failed else ""


def main(argv: Sequence[str] | None = None) -> int:
    values, rest = cli.parse(argv, define_flags, "python -m tests.mutation.run", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}.")
    chosen = [m for m in MUTANTS if not values.only or m.name in values.only]
    unknown = set(values.only) - {m.name for m in MUTANTS}
    if unknown:
        cli.fail(f"unknown mutants {sorted(unknown)}; see tests/mutation/mutants.py.")
    root = scratch_copy()
    rows = ["| mutant | file | tests | result | caught by | seconds |", "|---|---|---|---|---|---|"]
    survived = []
    try:
        for mutant in chosen:
            verdict, seconds, caught = run_one(mutant, root, values.timeout)
            print(f"{verdict:8} {mutant.name} ({seconds:.0f} s) {caught}", flush=True)
            rows.append(
                f"| {mutant.name} | {mutant.file} | {' '.join(mutant.tests)} | {verdict} | {caught} | {seconds:.0f} |"
            )
            if verdict == "SURVIVED":
                survived.append(mutant.name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = "\n".join(rows)
    print(table)
    print(
        f"{len(chosen) - len(survived)} of {len(chosen)} killed"
        + (f"; survived: {', '.join(survived)}" if survived else "")
    )
    if values.out:
        Path(values.out).write_text(table + "\n")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
