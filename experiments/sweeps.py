"""Sweep definitions: training runs with their dependencies, and evaluations of the trained runs.

experiments/README.md#the-papers-sweep
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from vgg_jax import cli

REPO = Path(__file__).resolve().parents[1]
NETS = ("A", "A-LRN", "B", "C", "D", "E")
SCALES = ("256", "384", "256-512")  # the paper's training scales, in the order of its chain
TABLES = ("3", "4", "5", "ensemble")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run; its workdir is ``<root>/<name>``.

    ``init_from`` / ``staged_init_from`` name other runs of the sweep whose trained models start this
    one (``--config.init_from`` / ``--config.staged_init_from``). ``net`` and ``scale`` place the run
    in the paper's tables (configuration letter, training scale label); empty for other sweeps.
    """

    name: str
    config: str  # config spec as for vgg_jax.main, relative to the repository: 'configs/paper.py:A,256,gpu'
    overrides: tuple[str, ...] = ()  # '--config.key=value' flags
    init_from: str = ""
    staged_init_from: str = ""
    net: str = ""
    scale: str = ""
    seed: int | None = None  # set by Sweep.with_seeds: the run's --config.seed (and a name suffix)

    @property
    def after(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d for d in (self.init_from, self.staged_init_from) if d))


@dataclasses.dataclass(frozen=True)
class Eval:
    """An evaluation (``python -m vgg_jax.evaluate``) of one trained run, or an ensemble of several.

    ``scales``: '' for the run's own ``data.eval_scales`` (single scale), 'paper' for the paper's
    multi-scale set ({S-32, S, S+32} or {S_min, mid, S_max}), or explicit '256,384,512'.
    ``table`` names the paper table the result belongs to ('3', '4', '5', 'ensemble'; '' for none).
    """

    name: str
    runs: tuple[str, ...]
    protocol: str = "dense"
    scales: str = ""
    table: str = ""

    @property
    def after(self) -> tuple[str, ...]:
        return self.runs


Job = Run | Eval


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Named runs and evaluations; validated on construction (names, dependencies, overrides)."""

    name: str
    runs: tuple[Run, ...]
    evals: tuple[Eval, ...] = ()

    def __post_init__(self) -> None:
        names = [j.name for j in self.jobs_as_defined()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"Sweep {self.name!r}: job names must be unique, {duplicates} repeat.")
        bad = [n for n in names if not n or "/" in n or n.startswith(".") or any(c.isspace() for c in n)]
        if bad:
            raise ValueError(f"Sweep {self.name!r}: job names {bad} are not usable as directory names.")
        runs = {r.name for r in self.runs}
        for job in self.jobs_as_defined():
            unknown = [d for d in job.after if d not in runs]
            if unknown:
                raise ValueError(
                    f"Sweep {self.name!r}: {job.name!r} depends on {unknown}, which are not runs of "
                    f"the sweep (runs: {sorted(runs)})."
                )
        for run in self.runs:
            check_overrides(run.overrides, where=f"run {run.name!r}")
        for ev in self.evals:
            check_protocol(ev.protocol, where=f"evaluation {ev.name!r}")
            if not ev.runs:
                raise ValueError(f"Sweep {self.name!r}: evaluation {ev.name!r} names no run.")
        self.ordered()  # raises on a cycle

    def jobs_as_defined(self) -> list[Job]:
        return [*self.runs, *self.evals]

    def ordered(self) -> list[Job]:
        """Every job after the runs it depends on; otherwise in definition order."""
        pending, placed, order = self.jobs_as_defined(), set(), []
        while pending:
            ready = next((j for j in pending if set(j.after) <= placed), None)
            if ready is None:
                raise ValueError(f"Sweep {self.name!r}: dependency cycle among {[j.name for j in pending]}.")
            order.append(ready)
            placed.add(ready.name)
            pending.remove(ready)
        return order

    def with_seeds(self, n: int) -> Sweep:
        """``n`` repetitions of every run and evaluation, seeds 0..n-1: ``<name>-seed<k>`` with
        ``--config.seed=k``, each starting from (and evaluating) the runs of its own seed. ``n = 1``: as is."""
        if n < 1:
            raise ValueError(f"--seeds must be >= 1, got {n}.")
        if n == 1:
            return self

        def named(name: str, k: int) -> str:
            return f"{name}-seed{k}" if name else ""

        runs = tuple(
            dataclasses.replace(
                r,
                name=named(r.name, k),
                overrides=(*r.overrides, f"--config.seed={k}"),
                init_from=named(r.init_from, k),
                staged_init_from=named(r.staged_init_from, k),
                seed=k,
            )
            for k in range(n)
            for r in self.runs
        )
        evals = tuple(
            dataclasses.replace(e, name=named(e.name, k), runs=tuple(named(r, k) for r in e.runs))
            for k in range(n)
            for e in self.evals
        )
        return Sweep(self.name, runs, evals)

    def select(self, names: Iterable[str]) -> Sweep:
        """The named jobs and every run they depend on (transitively)."""
        by_name = {j.name: j for j in self.jobs_as_defined()}
        wanted = list(names)
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            raise ValueError(f"--only: {unknown} are not jobs of sweep {self.name!r}; its jobs: {list(by_name)}.")
        keep: set[str] = set()
        while wanted:
            name = wanted.pop()
            if name not in keep:
                keep.add(name)
                wanted.extend(by_name[name].after)
        return Sweep(
            self.name, tuple(r for r in self.runs if r.name in keep), tuple(e for e in self.evals if e.name in keep)
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sweep:
        return cls(
            d["name"],
            tuple(Run(**{**r, "overrides": tuple(r.get("overrides", ()))}) for r in d["runs"]),
            tuple(Eval(**{**e, "runs": tuple(e["runs"])}) for e in d.get("evals", ())),
        )


def check_overrides(overrides: Sequence[str], where: str) -> None:
    bad = [o for o in overrides if not (isinstance(o, str) and o.startswith("--config.") and "=" in o)]
    if bad:
        raise ValueError(f"{where}: overrides must look like '--config.key=value', got {bad}.")


def check_protocol(protocol: str, where: str) -> None:
    from vgg_jax.config_checks import parse_protocol

    try:
        parse_protocol(protocol)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def resolve_config(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config ``python -m vgg_jax.main --config=CONFIG OVERRIDES...`` would train with.

    Errors (missing file, misspelt key, bad value) are raised here, before anything is launched.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # configs/*.py import `configs.default`
    path, sep, arg = config.partition(":")
    file = Path(path) if Path(path).is_absolute() else REPO / path
    if not file.is_file():
        raise ValueError(f"Config file {path!r} not found (paths are relative to the repository, {REPO}).")
    argv = cli.last_override_wins(["launch", f"--config={file}{sep}{arg}", *overrides])
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True, sys_argv=argv)
    try:
        values(argv)
        resolved = values.config
        int(resolved.num_train_steps)  # a config file that failed to load raises on first use
    except Exception as e:  # absl, ml_collections and the config file raise many kinds
        detail = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
        raise ValueError(f"Config {config!r} with its overrides does not load: {detail}") from e
    return resolved


# ----------------------------------------------------------------------------------------------
# The paper's sweep


def _check_choice(values: Sequence[str], valid: Sequence[str], what: str) -> None:
    unknown = [v for v in values if v not in valid]
    if unknown or not values:
        raise ValueError(f"Unknown or no {what} {list(unknown)}: choose from {', '.join(valid)}.")


# (net, scale, chained from the previous scale) -> (config spec, the run's own overrides)
RunConfig = Callable[[str, str, bool], tuple[str, tuple[str, ...]]]


def _table3(
    name: str,
    nets: Sequence[str],
    scales: Sequence[str],
    run_config: RunConfig,
    staged: bool,
    tables: Sequence[str],
    overrides: Sequence[str],
    trained_at: Callable[[str], str] = str,
    staged_rest_init: str = "paper",
) -> Sweep:
    """Runs net x scale, each scale initialised from the previous one of the same net (paper Sect. 3.1).

    Runs are named ``<net>_<S>`` with the scale they train at (``trained_at`` of the paper's label: ``A_110``
    for the paper's S = 256 at crop 96); ``Run.scale`` keeps the paper's label, which places them in its tables.
    ``staged``: B..E at the first scale start from that scale's trained A, their other layers initialised
    with ``staged_rest_init`` ('' keeps the run's config's scheme).
    """
    _check_choice(nets, NETS, "nets")
    _check_choice(scales, SCALES, "scales")
    if tables:
        _check_choice(tables, TABLES, "tables")
    scales = [s for s in SCALES if s in scales]  # the chain's order
    if staged and "A" not in nets:
        raise ValueError(
            "Staged initialisation starts B..E from a trained net A: add A to the nets, or pass --nostaged."
        )
    runs = []
    for net in nets:
        previous = ""
        for scale in scales:
            config, extra = run_config(net, scale, bool(previous))
            staged_from = ""
            if staged and net not in ("A", "A-LRN") and not previous:
                staged_from = f"A_{trained_at(scales[0])}"
                if staged_rest_init:  # the paper: the rest N(0, init_std^2)
                    extra = (*extra, f"--config.model.init_scheme={staged_rest_init}")
            run = Run(
                f"{net}_{trained_at(scale)}",
                config,
                (*overrides, *extra),
                init_from=previous,
                staged_init_from=staged_from,
                net=net,
                scale=scale,
            )
            runs.append(run)
            previous = run.name
    return Sweep(name, tuple(runs), paper_evals(runs, tables))


def paper_evals(runs: Sequence[Run], tables: Sequence[str] = TABLES) -> tuple[Eval, ...]:
    """The evaluations of the paper's tables over trained runs.

    3: dense at the single test scale of each run (Q = S, 384 for jittered S); 4: dense over the
    paper's three test scales; 5: multi-crop and dense + multi-crop over three scales, for the
    jittered runs; ensemble: dense + multi-crop of D and E trained with jittered S (the paper's best).
    """
    evals = []
    if "3" in tables:
        evals += [Eval(f"{r.name}-dense", (r.name,), "dense", "", "3") for r in runs]
    if "4" in tables:
        evals += [Eval(f"{r.name}-dense-multiscale", (r.name,), "dense", "paper", "4") for r in runs]
    if "5" in tables:
        for r in (r for r in runs if r.scale == "256-512"):
            evals += [
                Eval(f"{r.name}-{p}-multiscale", (r.name,), p, "paper", "5") for p in ("multicrop", "dense+multicrop")
            ]
    members = [r.name for r in runs if r.scale == "256-512" and r.net in ("D", "E")]
    if "ensemble" in tables and len(members) == 2:
        evals.append(
            Eval(
                "+".join(members) + "-dense+multicrop-multiscale",
                tuple(members),
                "dense+multicrop",
                "paper",
                "ensemble",
            )
        )
    return tuple(evals)


def paper(
    nets: Sequence[str] = NETS,
    scales: Sequence[str] = SCALES,
    *,
    platform: str = "gpu",
    staged: bool = False,
    tables: Sequence[str] = TABLES,
    overrides: Sequence[str] = (),
) -> Sweep:
    """The paper's Table 3 on ImageNet with ``configs/paper.py`` (which sets S, Q and lr 1e-3 for chained runs)."""
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"platform must be cpu, gpu or tpu, got {platform!r}.")
    return _table3(
        "paper",
        nets,
        scales,
        lambda net, scale, _: (f"configs/paper.py:{net},{scale},{platform}", ()),
        staged,
        tables,
        overrides,
    )


def reduced(
    base_config: str = "configs/demo.py",
    nets: Sequence[str] = NETS,
    scales: Sequence[str] = SCALES,
    *,
    staged: bool = True,
    tables: Sequence[str] = TABLES,
    overrides: Sequence[str] = (),
) -> Sweep:
    """The paper's sweep on a smaller base config: S and Q scaled by crop_size / 224, chained runs at lr / 10; runs
    are named by the scale they train at (``A_110``, ``B_110-219`` at crop 96).

    ``staged`` (default): B..E start from the trained A as in the paper (Sect. 3.1), their other layers
    with the base config's init (Glorot in configs/demo.py: the paper's N(0, 0.01^2) stops the signal at
    width 8); ``staged=False``: every net from the base config's init, the post-paper variant.
    docs/training.md#diagnosing-a-stalled-run
    """
    from configs.paper import EVAL_SCALE  # noqa: PLC0415  (imported after resolve_config set sys.path)

    base = resolve_config(base_config, overrides)
    crop, lr = int(base.data.crop_size), float(base.optimizer.learning_rate)

    def size(s: str) -> int:
        return max(crop, round(int(s) * crop / 224))

    def run_config(net: str, scale: str, chained: bool) -> tuple[str, tuple[str, ...]]:
        lo, _, hi = scale.partition("-")
        q = size(str(EVAL_SCALE[scale]))
        extra = [
            f"--config.model.name={net}",
            f"--config.data.scale_min={size(lo)}",
            f"--config.data.scale_max={size(hi or lo)}",
            f"--config.data.eval_scales=({q},)",
        ]
        if chained:
            extra.append(f"--config.optimizer.learning_rate={lr / 10:g}")
        return base_config, tuple(extra)

    def trained_at(scale: str) -> str:
        return "-".join(str(size(s)) for s in scale.split("-"))

    return _table3(
        f"paper-reduced-{epath.Path(base_config.partition(':')[0]).stem}",
        nets,
        scales,
        run_config,
        staged,
        tables,
        overrides,
        trained_at,
        staged_rest_init="",
    )


# ----------------------------------------------------------------------------------------------
# A user's sweep


def from_overrides(
    name: str, config: str, variants: Mapping[str, Sequence[str]], overrides: Sequence[str] = ()
) -> Sweep:
    """One run per variant: ``config`` with ``overrides`` then the variant's own overrides."""
    if not variants:
        raise ValueError(f"Sweep {name!r} has no runs.")
    return Sweep(name, tuple(Run(n, config, (*overrides, *o)) for n, o in variants.items()))


_FILE_KEYS = {"name", "config", "overrides", "runs", "evals"}


def load(path: str | epath.Path, overrides: Sequence[str] = ()) -> Sweep:
    """A sweep from JSON (experiments/README.md): ``{"name", "config", "overrides", "runs", "evals"}``.

    ``runs`` maps run names to override lists, or lists run objects (``name``, ``overrides``, and
    optionally ``config``, ``init_from``, ``staged_init_from``, ``net``, ``scale``); a run without
    ``config`` uses the top-level one. Each run gets the top-level ``overrides``, then its own, then
    ``overrides`` (the launcher's command line).
    """
    try:
        spec = json.loads(epath.Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read the sweep file {path}: {e}") from e
    if not isinstance(spec, dict) or "runs" not in spec:
        raise ValueError(f"{path}: a sweep file is a JSON object with at least 'runs'.")
    unknown = set(spec) - _FILE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(_FILE_KEYS)}.")
    name = spec.get("name", epath.Path(path).stem)
    common = tuple(spec.get("overrides", ()))
    check_overrides(common, where=f"{path} 'overrides'")
    runs = spec["runs"]
    if isinstance(runs, dict):
        runs = [{"name": n, "overrides": o} for n, o in runs.items()]
    fields = {f.name for f in dataclasses.fields(Run)}
    built = []
    for r in runs:
        if not isinstance(r, dict) or set(r) - fields or "name" not in r:
            raise ValueError(f"{path}: each run needs a 'name' and only the keys {sorted(fields)}; got {r!r}.")
        config = r.get("config", spec.get("config"))
        if not config:
            raise ValueError(f"{path}: run {r['name']!r} has no 'config' and the file sets none at the top.")
        built.append(Run(**{**r, "config": config, "overrides": (*common, *r.get("overrides", ()), *overrides)}))
    eval_fields = {f.name for f in dataclasses.fields(Eval)}
    evals = []
    for e in spec.get("evals", ()):
        if not isinstance(e, dict) or set(e) - eval_fields or not {"name", "runs"} <= set(e):
            raise ValueError(
                f"{path}: each evaluation needs 'name' and 'runs' and only the keys {sorted(eval_fields)}; got {e!r}."
            )
        evals.append(Eval(**{**e, "runs": tuple(e["runs"])}))
    return Sweep(name, tuple(built), tuple(evals))
