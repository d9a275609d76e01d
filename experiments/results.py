"""Reads what a sweep produced: each run's summary and TensorBoard scalars, each evaluation's JSON.

experiments/README.md#reports
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

from experiments import status
from experiments.plan import EVALS_DIR, MANIFEST
from experiments.status import Scalars, read_scalars


@dataclasses.dataclass
class RunResult:
    name: str
    path: str
    facts: dict[str, Any]  # net, scale, model, width, fc_width, crop_size, scale_min, scale_max, eval_scales, ...
    summary: dict[str, Any] | None  # results.json
    scalars: Scalars  # TensorBoard tag -> [(step, value)]

    def centre_crop(self) -> tuple[int, float, float] | None:
        """(Q, top-1, top-5 error %) of the in-training evaluation at the first test scale."""
        if not self.summary:
            return None
        q = self.facts["eval_scales"][0]
        if f"top1_error@{q}" not in self.summary:
            return None
        return q, self.summary[f"top1_error@{q}"], self.summary[f"top5_error@{q}"]

    def images_per_second(self) -> float | None:
        """Training throughput at the last report (clu's steps_per_sec x global batch)."""
        rates = self.scalars.get("steps_per_sec")
        return rates[-1][1] * self.facts["global_batch_size"] if rates else None


@dataclasses.dataclass
class EvalResult:
    name: str
    path: str
    facts: dict[str, Any]  # runs, protocol, scales, table
    record: dict[str, Any] | None  # the JSON of vgg_jax.evaluate

    def errors(self) -> tuple[float, float, int] | None:
        """(top-1, top-5 error %, images) of the final combination (all scales, methods, models)."""
        if not self.record:
            return None
        final = self.record["rows"][-1]  # all scales, methods and models combined
        return final["top1_error"], final["top5_error"], int(final["images"])

    def test_scales(self) -> list[int]:
        return list(self.record["rows"][-1]["scales"]) if self.record else []


@dataclasses.dataclass
class Results:
    name: str
    runs: list[RunResult]
    evals: list[EvalResult]

    def run(self, name: str) -> RunResult | None:
        return next((r for r in self.runs if r.name == name), None)


def _json(path: epath.Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_run(name: str, path: str, facts: dict[str, Any]) -> RunResult:
    return RunResult(name, path, facts, _json(epath.Path(path) / "results.json"), read_scalars(path))


def read_eval(name: str, path: str, facts: dict[str, Any]) -> EvalResult:
    found = status.eval_result(path, facts["protocol"])
    return EvalResult(name, path, facts, _json(found) if found else None)


def _run_facts(workdir: epath.Path) -> dict[str, Any]:
    """A run's facts from its checkpoint's config (runs not launched by experiments.launch)."""
    from vgg_jax import checkpoints, models  # noqa: PLC0415  (imports JAX)

    config = checkpoints.read_meta(workdir)["config"]
    data = config["data"]
    lo, hi = int(data["scale_min"]), int(data["scale_max"])
    letters = {v: k for k, v in models.PAPER_NAMES.items()}
    return dict(
        net=letters.get(models.canonical_name(config["model"]["name"]), ""),
        scale=str(lo) if lo == hi else f"{lo}-{hi}",
        model=config["model"]["name"],
        width=int(config["model"].get("width", 64)),
        fc_width=int(config["model"].get("fc_width", 4096)),
        crop_size=int(data.get("crop_size", 224)),
        scale_min=lo,
        scale_max=hi,
        eval_scales=[int(q) for q in data["eval_scales"]],
        global_batch_size=int(config["global_batch_size"]),
        num_train_steps=int(config["num_train_steps"]),
        dataset=data["dataset"],
        train_split=data["train_split"],
        eval_split=data["eval_split"],
        seed=int(config["seed"]),
    )


def _eval_facts(record: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's facts from its JSON; its table follows the paper's (see sweeps.paper_evals)."""
    runs = [epath.Path(c).name for c in record["checkpoints"]]
    protocol, scales = record["protocol"], record["rows"][-1]["scales"]
    if len(runs) > 1:
        table = "ensemble"
    elif protocol != "dense":
        table = "5"
    else:
        table = "4" if len(scales) > 1 else "3"
    return dict(runs=runs, protocol=protocol, scales=",".join(map(str, scales)), table=table)


def discover(root: str) -> Results:
    base = epath.Path(root)
    runs = [read_run(p.name, str(p), _run_facts(p)) for p in sorted(base.iterdir()) if (p / "checkpoints").is_dir()]
    evals = []
    for p in sorted((base / EVALS_DIR).iterdir()) if (base / EVALS_DIR).exists() else []:
        for result in sorted(p.glob("*.json")):
            record = json.loads(result.read_text())
            evals.append(EvalResult(p.name, str(p), _eval_facts(record), record))
    return Results(base.name, runs, evals)


def collect(root: str) -> Results:
    """Everything under a sweep root, in the launcher's job order."""
    manifest = epath.Path(root) / MANIFEST
    if not manifest.exists():
        return discover(root)
    record = json.loads(manifest.read_text())
    runs = [read_run(j["name"], j["path"], j["facts"]) for j in record["jobs"] if j["kind"] == "train"]
    evals = [read_eval(j["name"], j["path"], j["facts"]) for j in record["jobs"] if j["kind"] == "eval"]
    return Results(record["sweep"]["name"], runs, evals)
