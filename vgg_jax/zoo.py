"""``python -m vgg_jax.zoo``: the model table of the README (parameters and GMACs, computed)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vgg_jax import cli, models


def zoo_table(names: Iterable[str] = models.MODELS) -> str:
    """Markdown table of the registry: paper name, weight layers, parameters and GMACs at 224."""
    letters = {v: k for k, v in models.PAPER_NAMES.items()}
    rows = [
        "| name | paper | weight layers | parameters | GMACs at 224 | training GFLOP/image |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        model = models.get_model(name)
        shapes = models.variable_shapes(model)
        params = models.count_params(shapes["params"])
        plain = name.removesuffix("_bn")
        paper = letters[plain] + (" + BN" if model.batch_norm else "")
        layers = sum(len(block) for block in model.stages) + 3
        macs = models.forward_macs(model)
        # Training costs about 3 forward passes (forward, input and weight gradients), 2 FLOP per MAC.
        rows.append(f"| {name} | {paper} | {layers} | {params:,} | {macs / 1e9:.3f} | {6 * macs / 1e9:.1f} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> str:
    values, rest = cli.parse(argv, lambda values, argv: None, "python -m vgg_jax.zoo", __doc__)
    if rest:
        cli.fail(f"unexpected arguments {rest}.")
    table = zoo_table()
    print(table)
    return table


if __name__ == "__main__":
    cli.run(main)
