"""``vgg_jax.main`` whose second evaluation raises (for the evaluation-error test)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ imports `configs.default`

from vgg_jax import cli, evaluate, main  # noqa: E402

_evaluate = evaluate.evaluate
calls = []


def failing_evaluate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise RuntimeError("evaluation failed on purpose")
    return _evaluate(*args, **kwargs)


evaluate.evaluate = failing_evaluate

if __name__ == "__main__":
    cli.run(main.main)
