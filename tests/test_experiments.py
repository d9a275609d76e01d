"""experiments/: sweeps, the local / SLURM / TPU launchers, status and the paper-style report.

The CPU-scale depth and LRN ablation (A and A-LRN at S=256 with two seeds, B at S=256 and fine-tuned
at jittered S, tiny widths, on the built-in dataset) runs once through ``python -m experiments.launch`` (module
fixture); the report's tables and figures are checked against the runs' own outputs and against
the paper's published errors (Table 3, kept apart from other data). The SLURM and TPU scripts are generated for
the full paper sweep and executed with stand-ins for ``sbatch`` / ``srun`` / ``scontrol`` /
``gcloud`` that record what they were asked to do.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from experiments import compare, launch, plan, plots, report, results, slurm, status, sweeps, tpu  # noqa: E402
from vgg_jax.errors import UserError  # noqa: E402

from tiny_runs import free_port  # noqa: E402

# Tiny but complete runs: the real demo data through the paper's transform at crop 32.
TINY = [
    "--config.model.width=4",
    "--config.model.fc_width=16",
    "--config.data.crop_size=32",
    "--config.data.eval_split=validation[:16]",
    "--config.data.shuffle_buffer=128",
    "--config.global_batch_size=8",
    "--config.eval_batch_size=16",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.learning_rate=0.02",
    "--config.log_every_steps=1",
    "--config.num_train_steps=4",
    "--config.eval_every_steps=4",
    "--config.checkpoint.every_steps=4",
]
ABLATION = [
    "--sweep=paper",
    "--base_config=configs/demo.py",
    "--nets=A,A-LRN,B",
    "--scales=256,256-512",
    "--tables=3",
    "--seeds=2",
    "--only=A-LRN_37-seed0,A-LRN_37-seed1,B_37-73-seed0,A_37-dense-seed0,A_37-dense-seed1",
]
RUNS = {"A_37-seed0", "A_37-seed1", "A-LRN_37-seed0", "A-LRN_37-seed1", "B_37-seed0", "B_37-73-seed0"}
ABLATION_JOBS = RUNS | {"A_37-dense-seed0", "A_37-dense-seed1"}

# Paper Table 3 (S = Q = 256), ImageNet: top-1 / top-5 validation error, %.
PAPER_TABLE3 = {"A": ("29.6", "10.4"), "A-LRN": ("29.7", "10.5"), "B": ("28.7", "9.9")}


def run_launcher(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("ablation")
    run_launcher(*ABLATION, f"--root={root}", *TINY, f"--config.data.data_dir={data_dir}")
    report.write_report(str(root))
    return root


def markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table after the heading that starts with ``heading``."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, rows = table[0], table[2:]
    return [dict(zip(header, row)) for row in rows]


def events(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "launch.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------
# Local mode, end to end


def test_local_mode_runs_dependencies_first(ablation):
    log = events(ablation)
    assert {e["job"] for e in log if e["event"] == "done"} == ABLATION_JOBS
    time_of = {(e["job"], e["event"]): e["time"] for e in log}
    _, jobs = plan.read_manifest(str(ablation))
    for job in jobs:
        for dep in job.after:
            assert time_of[(dep, "done")] <= time_of[(job.name, "start")], (dep, job.name)
    # The chain of the paper (Sect. 3.1): jittered S fine-tuned from the S=256 model at lr / 10, and
    # the scales shrunk by crop / 224 = 32 / 224 (256 -> 37, 512 -> 73, Q = 384 -> 55).
    from vgg_jax import checkpoints

    staged_from = checkpoints.read_meta(ablation / "B_37-seed0")["config"]["staged_init_from"]
    assert staged_from == str(ablation / "A_37-seed0")  # reduced sweeps: B..E start from A (the default)
    config = checkpoints.read_meta(ablation / "B_37-73-seed0")["config"]
    assert config["init_from"] == str(ablation / "B_37-seed0")
    assert config["optimizer"]["learning_rate"] == pytest.approx(0.002)
    assert (config["data"]["scale_min"], config["data"]["scale_max"], config["data"]["eval_scales"]) == (37, 73, [55])
    assert checkpoints.read_meta(ablation / "A-LRN_37-seed1")["config"]["model"]["name"] == "A-LRN"
    # Each seed is its own run: the seed in the name and in the config.
    assert {checkpoints.read_meta(ablation / name)["config"]["seed"] for name in ("A_37-seed0", "A_37-seed1")} == {
        0,
        1,
    }


def test_rerunning_the_launcher_skips_finished_jobs(ablation, data_dir, capsys):
    before = {p: p.stat().st_mtime for p in ablation.glob("*/results.json")}
    proc = run_launcher(*ABLATION, f"--root={ablation}", *TINY, f"--config.data.data_dir={data_dir}")
    assert proc.stdout.count("finished already, skipped") == len(ABLATION_JOBS)
    assert {p: p.stat().st_mtime for p in ablation.glob("*/results.json")} == before
    assert status.main([str(ablation)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "8 jobs (4 configurations, 2 seeds): 8 done, 0 started, 0 to do"
    assert status.main([f"--run={ablation / 'B_37-seed0'}", "--steps=4"]) == 0
    assert status.main([f"--run={ablation / 'B_37-seed0'}", "--steps=5"]) == 1
    assert status.main([f"--eval={ablation / 'evals' / 'A_37-dense-seed1'}", "--protocol=dense"]) == 0
    assert status.main([f"--eval={ablation / 'evals' / 'A_37-dense-seed1'}", "--protocol=multicrop"]) == 1


def _errors(ablation: Path, run: str, dense_if_any: bool = True) -> tuple[float, float]:
    """A run's Table 3 errors from its own files: the dense evaluation's JSON when there is one (and
    ``dense_if_any``), else the centre crop at the end of training, cross-checked against the last
    TensorBoard value."""
    dense = ablation / "evals" / run.replace("_37-", "_37-dense-")
    if dense_if_any and run.startswith("A_") and dense.exists():
        final = json.loads(next(dense.glob("dense_*.json")).read_text())["rows"][-1]
        return final["top1_error"], final["top5_error"]
    summary = json.loads((ablation / run / "results.json").read_text())
    q = 55 if "37-73" in run else 37  # Q = 384 for jittered S, else Q = S; scaled by 32 / 224
    last = results.read_scalars(str(ablation / run))[f"eval/top1_error@{q}"][-1]
    assert last[0] == 4 and last[1] == pytest.approx(summary[f"top1_error@{q}"])
    return summary[f"top1_error@{q}"], summary[f"top5_error@{q}"]


def test_report_names_its_data_gives_every_seed_and_keeps_the_paper_apart(ablation):
    text = (ablation / "report" / "report.md").read_text()
    data = "Data: vgg_jax_demo, trained on `train`, evaluated on `validation[:16]`; 4 training steps; "
    size = "networks at width 4, fc 16, crop 32 (reduced; the paper's: width 64, fc 4096, crop 224)."
    assert data + "1-2 seeds per configuration; " + size in text
    runs = {row["run"]: row for row in markdown_table(text, "## Runs")}
    assert set(runs) == RUNS and all(r["state"] == "done" and r["steps"] == "4" for r in runs.values())
    assert {name: row["seed"] for name, row in runs.items()} == {name: name[-1] for name in RUNS}
    assert runs["B_37-73-seed0"]["train S"] == "[37;73]" and runs["A_37-seed1"]["train S"] == "37"

    # Table 3 by configuration: mean and sample standard deviation of the seeds' own errors; the
    # paper's ImageNet numbers are not in it (these runs are on other data).
    section = text[text.index("## Table 3") :]
    assert data in section.split("\n\n")[1]
    table3 = {(row["ConvNet"], row["train S"]): row for row in markdown_table(text, "## Table 3")}
    assert set(table3) == {("A", "37"), ("A-LRN", "37"), ("B", "37"), ("B", "[37;73]")}
    assert not any("paper" in column for column in next(iter(table3.values())))
    assert table3[("A", "37")]["measured by"] == "dense" and table3[("A-LRN", "37")]["measured by"].startswith("centre")
    assert (table3[("A", "37")]["test Q"], table3[("B", "[37;73]")]["test Q"]) == ("37", "55")
    per_seed = {}
    for (net, s), row in table3.items():
        names = sorted(n for n in RUNS if n.startswith(f"{net}_") and ("37-73" in n) == (s != "37"))
        values = np.array([_errors(ablation, n) for n in names], np.float64)
        per_seed[net, s] = values
        assert row["seeds"] == str(len(names))
        assert row["top-1 per seed"] == ", ".join(f"{v:.2f}" for v in values[:, 0])
        for column, k in (("top-1 (mean ± sd)", 0), ("top-5 (mean ± sd)", 1)):
            expected = f"{values[:, k].mean():.2f}"
            if len(names) > 1:
                expected += f" ± {values[:, k].std(ddof=1):.2f}"
            assert row[column] == expected
    reference = {
        (r["ConvNet"], r["paper S"]): r for r in markdown_table(text, "## Published on ImageNet (reference only)")
    }
    for net, (top1, top5) in PAPER_TABLE3.items():
        assert (reference[(net, "256")]["top-1"], reference[(net, "256")]["top-5"]) == (top1, top5)
    assert "torchvision" not in text  # its ImageNet weights are no reference for other data

    # One line per comparison of the paper: A vs A-LRN with an interval (2 seeds each), depth A -> B
    # and fixed vs jittered S for B without one (1 seed). A has dense evaluations and the others not, so
    # the comparisons use every run's centre crop (one measure on both sides), and say so.
    section = text[text.index("## Comparisons") :]
    assert "Figures and comparisons use the centre crop at the end of training" in section
    lines = [line for line in section.splitlines() if line.startswith("- ")]
    assert [line.split(":")[0] for line in lines] == ["- LRN (S = 37)", "- depth A → B", "- B"]
    assert "11 → 13 layers (S = 37)" in lines[1]
    a_centre = np.array([_errors(ablation, n, dense_if_any=False) for n in ("A_37-seed0", "A_37-seed1")])
    lrn = compare.welch("A", a_centre[:, 0], "A-LRN", per_seed["A-LRN", "37"][:, 0])
    assert f"{lrn.difference:+.2f} points of top-1 error" in lines[0]
    if lrn.p is None:  # 16 images, 4 steps: both seeds of each may give the same error
        assert "(2 vs 2 seeds: every seed gave the same error on both sides" in lines[0]
    else:
        # Two seeds a side: Welch's t interval would be +-12.7 standard errors (df 1), so none is given.
        assert (
            lrn.low is None
            and f"too few seeds for an interval (run --seeds=3 or more), Welch p = {lrn.p:.3f}" in lines[0]
        )
    assert "(2 vs 1 seeds: too few for an interval" in lines[1]
    assert "(1 vs 1 seeds: too few for an interval" in lines[2]


def test_report_figures_are_valid_images_and_captions_name_the_data(ablation):
    out = ablation / "report"
    names = [f"curves_{r}.png" for r in sorted(RUNS)]
    names += ["error_vs_depth.png", "lrn.png", "fixed_vs_jittered.png"]
    text = (out / "report.md").read_text()
    for name in names:
        caption = next(line for line in text.splitlines() if line.endswith(f"]({name})"))
        if name.startswith("curves_"):  # one run: its own S and seed, not the sweep's seed count
            seed, s = name[-5], "[37;73]" if "37-73" in name else "37"
            own = f"S = {s}, seed {seed}, width 4, fc 16, crop 32, vgg_jax_demo validation[:16], 4 steps"
            assert caption.endswith(f"; {own}]({name})") and "seeds" not in caption, caption
        else:
            assert "vgg_jax_demo validation[:16], width 4, fc 16, crop 32, 4 steps, 1-2 seeds each" in caption, caption
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert image.format == "PNG" and pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.std() > 10, f"{name} looks blank"


def _point(net: str, top1, paper=None, scale="256", s_label="S = 37") -> plots.Point:
    return plots.Point(net, scale, report.depth(net), tuple(top1), tuple(v / 3 for v in top1), paper, paper, s_label)


def test_depth_axis_follows_the_papers_table_1_and_keeps_the_paper_off_other_data():
    """Weight layers per configuration (paper Table 1): A 11, B 13, C 16, D 16, E 19."""
    assert {net: report.depth(net) for net in sweeps.NETS} == {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
    points = [_point(net, (80.0, 82.0)) for net in ("E", "C", "A", "D", "B")]
    fig = plots.error_vs_depth(points, "demo")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["A\n(11 layers)", "B\n(13 layers)", "C\n(16 layers)", "D\n(16 layers)", "E\n(19 layers)"]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["S = 37"]  # the run's S, not the paper's
    assert plots.lrn(points) is None and plots.fixed_vs_jittered(points) is None  # nothing to compare

    def plotted(ax) -> set[float]:
        return {round(float(y), 3) for line in ax.get_lines() for y in line.get_ydata()}

    with_paper = [_point("A", (80.0, 82.0), paper=29.6), _point("B", (79.0, 81.0), paper=28.7)]
    apart = plots.error_vs_depth(with_paper, "demo")  # other data: the paper gets its own panel
    assert len(apart.axes) == 3 and "reference only" in apart.axes[2].get_title()
    assert 29.6 not in plotted(apart.axes[0]) and 29.6 in plotted(apart.axes[2])
    together = plots.error_vs_depth(with_paper, "imagenet2012", paper_on_same_axes=True)
    assert len(together.axes) == 2 and 29.6 in plotted(together.axes[0])
    plots.png(apart)


def test_comparisons_name_each_step_and_never_mix_measures():
    """Consecutive configurations at one scale; C -> D is named by its kernels (both have 16 layers); a pair
    measured two ways (dense vs centre crop) is not compared, and common_measure falls back to the centre crop."""

    def row(net, how, top1):
        point = plots.Point(net, "256", report.depth(net), top1, top1, None, None, "S = 37")
        centre = point._replace(top1=tuple(v + 10 for v in top1), top5=tuple(v + 10 for v in top1))
        return report.Table3Row(report.Configuration(net, "256", []), how, "37", point, centre)

    rows = [row(n, report.CENTRE, (50.0 + i, 51.0 + i, 52.5 + i)) for i, n in enumerate("ABCD")]
    found = report.comparisons(rows)
    assert [what for what, *_ in found] == [
        "depth A → B: 11 → 13 layers (S = 37)",
        "depth B → C: 13 → 16 layers (S = 37)",
        "C → D: 1x1 → 3x3 convolutions in blocks 3-5 (S = 37)",
    ]
    assert all(top1.difference == pytest.approx(1.0) for _, top1, _ in found)
    mixed = [row("A", "dense", (40.0, 41.0)), row("B", report.CENTRE, (60.0, 61.0))]
    ((what, why, none),) = report.comparisons(mixed)
    assert none is None and why == f"not compared: A measured by dense, B by {report.CENTRE}"
    common, note = report.common_measure(mixed)
    assert note and {r.measured_by for r in common} == {report.CENTRE}
    assert [r.point.top1 for r in common] == [(50.0, 51.0), (70.0, 71.0)]  # every row's centre crop
    assert report.common_measure(rows) == (rows, "")


def test_welch_interval_matches_the_textbook_formula():
    """Welch's t for equal variances and n = 3 per group has 4 degrees of freedom; t(0.975, 4) = 2.776445
    (any t table), and the two-sided p has a closed form for even degrees of freedom."""
    a, b = (50.0, 52.0, 54.0), (60.0, 62.0, 64.0)
    se = np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3)
    t = 10.0 / se
    x = t / np.sqrt(t * t + 4)
    p = 2 * (1 - (0.5 + x / 2 * (1 + 0.5 * (1 - x * x))))  # Student t CDF, 4 degrees of freedom
    c = compare.welch("A", a, "B", b)
    assert c.difference == pytest.approx(10.0)
    assert (c.low, c.high) == pytest.approx((10 - 2.776445 * se, 10 + 2.776445 * se), abs=1e-5)
    assert c.p == pytest.approx(p, rel=1e-6) and c.distinguishable
    # Unequal variances: Welch-Satterthwaite degrees of freedom (4/3 + 1/3)^2 / ((4/3)^2/2 + (1/3)^2/2) = 50/17,
    # not Student's pooled 4.
    from scipy.stats import t as student_t

    c = compare.welch("A", a, "B", (60.0, 61.0, 62.0))
    half = student_t.ppf(0.975, 50 / 17) * np.sqrt(4 / 3 + 1 / 3)
    assert (c.low, c.high) == pytest.approx((9.0 - half, 9.0 + half), abs=1e-9)
    same = compare.welch("A", (50.0, 53.0, 51.0), "A-LRN", (51.0, 50.0, 53.5))
    assert same.low < 0 < same.high and not same.distinguishable
    assert "NOT distinguishable from seed noise" in same.sentence()
    assert compare.welch("A", (50.0,), "B", (51.0, 52.0)).p is None
    tied = compare.welch("A", (50.0, 50.0, 50.0), "B", (55.0, 55.0))  # coarse errors tie across seeds
    assert tied.p is None and tied.distinguishable is None and "seed noise is unmeasured" in tied.sentence()


def test_two_seeds_give_no_interval_and_intervals_stay_within_what_an_error_can_be():
    """With 2 seeds a side, Welch's t interval spans up to +-12.7 standard errors (t(0.975, 1) = 12.706): from 95.0
    and 65.0 vs 90.0 and 40.0 it would run from -171 to +141 points of error (scipy). None is given then; a
    3-seed interval past +-100 (a difference of two errors in percent cannot be) is cut there and says so."""
    two = compare.welch("A", (95.0, 65.0), "B", (90.0, 40.0))
    assert two.low is None and two.high is None and two.p is not None and not two.distinguishable
    assert "too few seeds for an interval (run --seeds=3 or more), Welch p = " in two.sentence()
    wide = compare.welch("A", (15.0, 42.0, 56.0), "B", (90.0, 16.0, 90.0))  # docs/reproduction.md's B - A
    assert (wide.low, wide.high) == (pytest.approx(-61.39, abs=0.01), 100.0) and wide.cut  # t's high: +116.7
    assert "(cut at ±100, the range a difference of errors can span)" in wide.sentence()
    narrow = compare.welch("A", (50.0, 52.0, 54.0), "B", (60.0, 62.0, 64.0))
    assert not narrow.cut and "cut at" not in narrow.sentence()


def test_figures_state_their_whiskers_span_the_whole_error_range_and_do_not_join_configurations():
    points = [_point(net, (95.0, 65.0), s_label="S = 110") for net in ("A", "B", "D")]
    fig = plots.error_vs_depth(points, "vgg_jax_demo validation, width 8, fc 128, crop 96, 600 steps, 2 seeds each")
    title = fig._suptitle.get_text()
    assert "width 8, fc 128, crop 96, 600 steps, 2 seeds" in title
    assert "mean of 2 seeds; whiskers: ±1 standard deviation over seeds; dots: each seed" in title
    for ax in fig.axes:
        assert ax.get_ylim() == (0.0, 100.0)  # not zoomed onto the seeds' spread
        joined = [line for line in ax.get_lines() if line.get_linestyle() != "None" and len(line.get_xdata()) > 1]
        assert not joined, "configurations joined by a line"
    bars = plots.lrn([_point("A", (50.0, 60.0)), _point("A-LRN", (55.0, 52.0))], "demo")
    assert "whiskers: ±1 standard deviation" in bars._suptitle.get_text() and bars.axes[0].get_ylim() == (0.0, 100.0)
    single = plots.lrn([_point("A", (50.0,)), _point("A-LRN", (55.0,))], "demo")
    assert "one seed per configuration: its error, no whiskers" in single._suptitle.get_text()


def test_reduced_runs_are_named_by_the_scale_they_train_at():
    """configs/demo.py (crop 96): the paper's S = 256 is S = 110 there, its [256, 512] is [110, 219]."""
    sweep = sweeps.reduced("configs/demo.py", ["A", "B"], ["256", "256-512"], staged=True, tables=["3"])
    runs = {r.name: r for r in sweep.runs}
    assert set(runs) == {"A_110", "A_110-219", "B_110", "B_110-219"}
    assert runs["B_110"].staged_init_from == "A_110" and runs["B_110-219"].init_from == "B_110"
    assert (runs["A_110"].scale, runs["A_110-219"].scale) == ("256", "256-512")  # the paper's table row
    assert "--config.data.scale_min=110" in runs["A_110"].overrides
    assert [e.name for e in sweep.evals] == [f"{n}-dense" for n in runs]
    assert {r.name for r in sweeps.paper(["A"], ["256"]).runs} == {"A_256"}  # full size: the paper's own names


def test_status_tells_a_just_started_run_from_one_not_started(tmp_path):
    job = dict(
        name="run", kind="train", path=str(tmp_path / "run"), facts=dict(num_train_steps=10, global_batch_size=8)
    )
    assert status.describe(job) == "not started"
    (tmp_path / "run").mkdir()  # the first thing a run does
    assert status.describe(job) == "started, no checkpoint yet"
    (tmp_path / "run" / "checkpoints" / "4").mkdir(parents=True)
    assert status.describe(job) == "step 4 of 10"
    assert status.count([job, job], ["started, no checkpoint yet", "not started"]).endswith("1 started, 1 to do")


def test_report_on_imagenet_puts_the_paper_in_the_same_table(tmp_path, monkeypatch):
    """Runs on the paper's data (imagenet2012): paper columns in Table 3, torchvision's table, no separate
    reference section."""

    def run(name: str, net: str, seed: int, top1: float) -> results.RunResult:
        facts = dict(
            net=net,
            scale="256",
            model={"A": "vgg11", "A-LRN": "A-LRN"}[net],
            width=64,
            fc_width=4096,
            crop_size=224,
            scale_min=256,
            scale_max=256,
            eval_scales=[256],
            global_batch_size=256,
            num_train_steps=370_000,
            dataset="imagenet2012",
            train_split="train",
            eval_split="validation",
            seed=seed,
        )
        summary = {"step": 370_000, "train_seconds": 3600.0, "top1_error@256": top1, "top5_error@256": top1 / 3}
        return results.RunResult(name, str(tmp_path / name), facts, summary, {})

    runs = [run(f"A_256-seed{k}", "A", k, 30.0 + k) for k in range(3)]
    runs += [run(f"A-LRN_256-seed{k}", "A-LRN", k, 30.5 + k) for k in range(3)]
    monkeypatch.setattr(report, "collect", lambda root: results.Results("imagenet", runs, []))
    text = report.write_report(str(tmp_path), str(tmp_path / "out")).read_text()
    data = "Data: imagenet2012, trained on `train`, evaluated on `validation`; 370000 training steps; 3 seeds per "
    assert data + "configuration; networks at width 64, fc 4096, crop 224." in text  # the paper's size: no "reduced"
    table3 = {row["ConvNet"]: row for row in markdown_table(text, "## Table 3")}
    assert (table3["A"]["top-1 (paper)"], table3["A-LRN"]["top-1 (paper)"]) == ("29.6", "29.7")
    assert table3["A"]["top-1 (mean ± sd)"] == "31.00 ± 1.00"
    assert "reference only" not in text
    torchvision = {row["run"]: row for row in markdown_table(text, "## Centre crop vs torchvision")}
    assert torchvision["A_256-seed0"]["top-1 (torchvision)"] == "30.98"  # 100 - 69.020, torchvision's vgg11
    assert "- LRN (S = 256): A-LRN (S = 256) - A (S = 256): +0.50 points of top-1 error" in text
    assert "NOT distinguishable from seed noise" in text


def test_report_without_a_manifest_discovers_the_workdirs(ablation):
    """Workdirs trained by hand (no sweep.json): runs and evaluations are found from their files."""
    found = results.discover(str(ablation))
    assert {r.name for r in found.runs} == RUNS
    by_name = {r.name: r for r in found.runs}
    facts = by_name["B_37-73-seed0"].facts
    assert (facts["net"], facts["scale"], facts["seed"], facts["eval_split"]) == ("B", "37-73", 0, "validation[:16]")
    assert (facts["width"], facts["fc_width"], facts["crop_size"]) == (4, 16, 32)
    assert by_name["A_37-seed1"].facts["seed"] == 1
    assert sorted((e.name, e.facts["table"]) for e in found.evals) == [
        ("A_37-dense-seed0", "3"),
        ("A_37-dense-seed1", "3"),
    ]


def test_a_failing_job_stops_the_sweep_with_its_log(tmp_path):
    def job(name: str, code: str, after: tuple[str, ...] = ()) -> plan.Job:
        return plan.Job(name, "train", ("-c", code), (), after, str(tmp_path / name), dict(num_train_steps=1))

    ok = job(
        "ok",
        f"import json, os; os.makedirs({str(tmp_path / 'ok')!r}); "
        f"open({str(tmp_path / 'ok' / 'results.json')!r}, 'w').write(json.dumps(dict(step=1)))",
    )
    crash = job("crash", "print('boom: no such dataset'); raise SystemExit(3)", after=("ok",))
    with pytest.raises(SystemExit, match=r"(?s)crash exited with 3.*boom: no such dataset.*rerun the same command"):
        launch.run_local([ok, crash, job("never", "pass")], str(tmp_path), echo=lambda _: None)
    assert [(e["job"], e["event"]) for e in events(tmp_path)] == [
        ("ok", "start"),
        ("ok", "done"),
        ("crash", "start"),
        ("crash", "failed"),
    ]
    with pytest.raises(SystemExit, match="ended before its last step"):  # exit 0 but not at its last step
        launch.run_local([job("stopped", "pass")], str(tmp_path), echo=lambda _: None)


# ----------------------------------------------------------------------------------------------
# A user's sweep from overrides


def test_user_sweep_from_a_list_of_overrides(tmp_path):
    """A JSON sweep of override lists becomes the exact commands, in dependency order (the local
    execution of such commands is what the ablation fixture runs)."""
    spec = {
        "name": "lr",
        "config": "configs/demo.py",
        "overrides": ["--config.num_train_steps=300"],
        "runs": [
            {"name": "lr_high", "overrides": ["--config.optimizer.learning_rate=0.05"]},
            {"name": "lr_low", "overrides": ["--config.optimizer.learning_rate=0.005"]},
            {"name": "lr_low_finetune", "init_from": "lr_low", "overrides": ["--config.optimizer.learning_rate=5e-4"]},
        ],
        "evals": [{"name": "lr_low-dense", "runs": ["lr_low"], "protocol": "dense", "scales": "paper"}],
    }
    path = tmp_path / "lr.json"
    path.write_text(json.dumps(spec))
    root = tmp_path / "runs"
    cli = ["--config.model.width=4"]
    sweep = sweeps.load(path, cli)
    assert (
        sweep.runs[:2]
        == sweeps.from_overrides(
            "lr",
            "configs/demo.py",
            {
                "lr_high": ["--config.optimizer.learning_rate=0.05", *cli],
                "lr_low": ["--config.optimizer.learning_rate=0.005", *cli],
            },
            ["--config.num_train_steps=300"],
        ).runs
    )
    main = ["python", "-m", "vgg_jax.main", "--config=configs/demo.py"]
    expected = {
        "lr_high": [
            *main,
            f"--workdir={root}/lr_high",
            "--config.num_train_steps=300",
            "--config.optimizer.learning_rate=0.05",
            *cli,
        ],
        "lr_low": [
            *main,
            f"--workdir={root}/lr_low",
            "--config.num_train_steps=300",
            "--config.optimizer.learning_rate=0.005",
            *cli,
        ],
        "lr_low_finetune": [
            *main,
            f"--workdir={root}/lr_low_finetune",
            "--config.num_train_steps=300",
            "--config.optimizer.learning_rate=5e-4",
            *cli,
            f"--config.init_from={root}/lr_low",
        ],
        "lr_low-dense": [
            "python",
            "-m",
            "vgg_jax.evaluate",
            f"--checkpoint={root}/lr_low",
            "--protocol=dense",
            "--scales=paper",
            f"--out={root}/evals/lr_low-dense",
        ],
    }
    jobs = plan.plan(sweep, str(root))
    assert {j.name: shlex.split(j.command()) for j in jobs} == expected
    assert jobs[[j.name for j in jobs].index("lr_low_finetune")].facts["num_train_steps"] == 300

    proc = run_launcher(f"--sweep={path}", f"--root={root}", "--dry_run", *cli)
    printed = [line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [(n.split("] ")[1], shlex.split(c)) for n, c in printed] == list(expected.items())
    assert not root.exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------------------------
# Sweep definitions


def test_paper_sweep_is_table_3_with_the_papers_chain():
    sweep = sweeps.paper(staged=True)
    runs = {r.name: r for r in sweep.runs}
    assert len(runs) == 18
    for net in sweeps.NETS:
        assert runs[f"{net}_256"].init_from == ""
        assert runs[f"{net}_384"].init_from == f"{net}_256"  # S=384 from S=256 (Sect. 3.1)
        assert runs[f"{net}_256-512"].init_from == f"{net}_384"  # jittered from S=384
        expected = "A_256" if net in ("B", "C", "D", "E") else ""
        assert runs[f"{net}_256"].staged_init_from == expected
    evals = {e.name: e for e in sweep.evals}
    assert len(evals) == 18 + 18 + 2 * 6 + 1
    assert evals["D_256-512+E_256-512-dense+multicrop-multiscale"].runs == ("D_256-512", "E_256-512")
    order = [j.name for j in sweep.ordered()]
    assert all(order.index(d) < order.index(j.name) for j in sweep.jobs_as_defined() for d in j.after)
    jobs = {j.name: j for j in plan.plan(sweep, "/runs")}
    assert jobs["C_384"].facts["num_train_steps"] == 370_000 and jobs["C_256-512"].facts["eval_scales"] == [384]
    assert "--config.staged_init_from=/runs/A_256" in jobs["E_256"].args
    assert "--config.model.init_scheme=paper" in jobs["E_256"].args


def test_reduced_sweep_starts_b_to_e_from_a_by_default_and_from_glorot_with_nostaged():
    """The paper's remedy by default at reduced sizes (docs/training.md#diagnosing-a-stalled-run); --nostaged
    the post-paper variant; the paper sweep on ImageNet keeps Glorot init unless --staged."""

    def runs(*argv: str) -> dict:
        args, overrides = launch.parse_args(["--sweep=paper", "--scales=256", "--tables=", *argv])
        return {r.name: r for r in launch.build_sweep(args, overrides).runs}

    staged = runs("--base_config=configs/demo.py", "--nets=A,A-LRN,B,E")
    assert [staged[n].staged_init_from for n in ("A_110", "A-LRN_110", "B_110", "E_110")] == ["", "", "A_110", "A_110"]
    assert not any("init_scheme" in o for o in staged["E_110"].overrides)  # the other layers: the config's Glorot
    plain = runs("--base_config=configs/demo.py", "--nets=A,B", "--nostaged")
    assert plain["B_110"].staged_init_from == "" and plain["B_110"].after == ()
    assert runs("--nets=A,B")["B_256"].staged_init_from == ""  # ImageNet: Glorot unless --staged
    with pytest.raises(ValueError, match="--nostaged"):
        runs("--base_config=configs/demo.py", "--nets=B")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: sweeps.paper(nets=["F"]), "Unknown or no nets"),
        (lambda: sweeps.paper(nets=["B"], staged=True), "add A to the nets"),
        (lambda: sweeps.Sweep("s", (sweeps.Run("a", "configs/demo.py", init_from="b"),)), "not runs of the sweep"),
        (
            lambda: sweeps.Sweep(
                "s",
                (sweeps.Run("a", "configs/demo.py", init_from="b"), sweeps.Run("b", "configs/demo.py", init_from="a")),
            ),
            "dependency cycle",
        ),
        (lambda: sweeps.Sweep("s", (sweeps.Run("a", "configs/demo.py"),) * 2), "must be unique"),
        (lambda: sweeps.Sweep("s", (sweeps.Run("a", "configs/demo.py", ("model.width=4",)),)), "--config.key=value"),
        (
            lambda: sweeps.Sweep("s", (sweeps.Run("a", "configs/demo.py"),), (sweeps.Eval("e", ("a",), "densest"),)),
            "densest",
        ),
        (lambda: sweeps.resolve_config("configs/demo.py", ["--config.model.widht=4"]), "widht"),
        (lambda: sweeps.resolve_config("configs/nope.py"), "not found"),
        (lambda: sweeps.paper().select(["Z_256"]), "not jobs of sweep"),
    ],
)
def test_bad_sweeps_fail_with_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_bad_sweep_file_names_the_problem(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"runs": {"a": []}, "configs": "configs/demo.py"}))
    with pytest.raises(ValueError, match=r"unknown keys \['configs'\]"):
        sweeps.load(path)
    path.write_text(json.dumps({"runs": {"a": []}}))
    with pytest.raises(ValueError, match="has no 'config'"):
        sweeps.load(path)


# ----------------------------------------------------------------------------------------------
# SLURM


def fake_tools(directory: Path) -> Path:
    """Stand-ins for sbatch / srun / scontrol / gcloud that append their argv (and env) to $FAKE_LOG."""
    directory.mkdir()
    scripts = {
        # sbatch --parsable prints 'id;cluster'; ids count up from 100.
        "sbatch": 'n=$(( $(cat "$FAKE_LOG" 2>/dev/null | wc -l) + 100 )); '
        'echo "$n $*" >> "$FAKE_LOG"; echo "$n;cluster"',
        # srun: records its argv and JAX_LOCAL_DEVICE_IDS; with FAKE_STEP, "trains" to that step.
        "srun": 'echo "srun [${JAX_LOCAL_DEVICE_IDS:-}] $*" >> "$FAKE_LOG"; for a in "$@"; do case $a in '
        "--workdir=*) wd=${a#--workdir=};; esac; done; "
        'if [ -n "${FAKE_STEP:-}" ]; then mkdir -p "$wd"; echo "{\\"step\\": $FAKE_STEP}" > "$wd/results.json"; fi',
        "scontrol": 'echo "scontrol $*" >> "$FAKE_LOG"',
        "gcloud": 'echo "gcloud $*" >> "$FAKE_LOG"',
    }
    for name, body in scripts.items():
        (directory / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (directory / name).chmod(0o755)
    return directory


def test_slurm_submit_chains_jobs_with_afterok(tmp_path, monkeypatch, capsys):
    """The launcher's CLI writes the scripts and submits them; each job waits for the ids of its dependencies."""
    bin_dir = fake_tools(tmp_path / "bin")
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    root = tmp_path / "runs"
    args = [
        "--sweep=paper",
        "--nets=A,D,E",
        "--staged",
        "--mode=slurm",
        f"--root={root}",
        "--nodes=2",
        "--partition=gpu",
        "--sbatch=--qos=high",
        "--submit",
        "--skip_preflight",  # full-size nets: the preflight is tested below on tiny ones
        "--config.data.manual_dir=/data/imagenet",
    ]
    launch.main([*args, "--dry_run"])  # prints the scripts; writes and submits nothing, even with --submit
    assert not root.exists() and not log.exists()
    assert "#SBATCH --qos=high" in capsys.readouterr().out
    launch.main(args)
    _, jobs = plan.read_manifest(str(root))
    submitted = [line.split(" ") for line in log.read_text().splitlines()]
    id_of = {Path(args[-1]).stem: ident for ident, *args in submitted}
    assert list(id_of) == [j.name for j in jobs]  # every job once, in dependency order
    for _, *args in submitted:
        job = next(j for j in jobs if j.name == Path(args[-1]).stem)
        if job.after:
            assert args[:3] == [
                "--parsable",
                "--dependency=afterok:" + ":".join(id_of[d] for d in job.after),
                "--kill-on-invalid-dep=yes",
            ]
        else:
            assert args == ["--parsable", f"{job.name}.sbatch"]
    assert jobs[[j.name for j in jobs].index("D_384")].after == ("D_256",)
    assert jobs[[j.name for j in jobs].index("D_256")].after == ("A_256",)  # staged from A
    script = (root / "slurm" / "D_384.sbatch").read_text()
    for option in (
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--qos=high",
        "--requeue",
        "--signal=TERM@300",
        f"--output={root}/slurm/logs/D_384-%j.out",
    ):
        assert f"#SBATCH {option}\n" in script


# The tiny demo run of TINY in bfloat16, and one whose fc7 (131072^2 float32 parameters, 64 GiB) fits no GPU.
PREFLIGHT_TINY = ["--config=configs/demo.py", *TINY, "--config.model.dtype=bfloat16"]
HUGE = "--config.model.fc_width=131072"


def test_slurm_launch_compiles_each_job_for_the_gpus_first_and_refuses_one_that_does_not_fit(
    tmp_path, monkeypatch, capsys
):
    """Nothing is written or submitted for a job that does not fit; one that fits is submitted after its figures."""
    bin_dir = fake_tools(tmp_path / "bin")
    log, root = tmp_path / "sbatch.log", tmp_path / "runs"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    args = ["--mode=slurm", "--gpu=h100-80gb", "--gpus_per_node=8", f"--root={root}", "--submit", *PREFLIGHT_TINY]
    with pytest.raises(UserError) as refused:
        launch.main(["--name=huge", *args, HUGE])
    message = str(refused.value)
    assert message.startswith("job huge does not fit on h100-80gbx8: its train step needs "), message
    assert message.endswith(
        " GiB per GPU of 58.33 GiB usable; rematerialise (--config.model.remat=blocks), take a smaller per-GPU batch "
        "(--config.global_batch_size, or --config.grad_accum_steps=N to keep it), or more GPUs; --skip_preflight "
        "launches it anyway."
    ), message
    assert not root.exists() and not log.exists()
    capsys.readouterr()
    launch.main(["--name=tiny", *args])
    out = capsys.readouterr().out
    assert "preflight: tiny on h100-80gbx8\nh100-80gbx8: 8 GPUs (1x1x8, NVIDIA H100 80GB HBM3)" in out
    train = next(line for line in out.splitlines() if line.startswith("train: "))
    assert " of 58.33 GiB (" in train and "all-reduce" in train and train.endswith(": fits")
    assert out.index("preflight: 1 job shape(s) fit on h100-80gbx8") < out.index("Wrote 1 sbatch scripts")
    assert log.read_text().split()[1:] == ["--parsable", "tiny.sbatch"]
    with pytest.raises(SystemExit):  # the GPU type is needed, unless the preflight is skipped
        launch.main(["--name=tiny", *[a for a in args if not a.startswith("--gpu=")]])
    assert "--mode=slurm compiles each job for its hardware before it spends a slot: give --gpu=" in (
        capsys.readouterr().err
    )


def test_launchers_compile_the_paper_sweep_as_one_shape_per_network():
    """D_256, D_384 and D_256-512 train the same program (the in-training evaluation is the centre crop)."""
    jobs = [j for j in plan.plan(sweeps.paper(staged=True), "/runs", distributed=True) if j.kind == "train"]
    shapes = {launch.job_shape(sweeps.resolve_config(j.facts["config"], j.facts["overrides"])) for j in jobs}
    assert len(jobs) == 18 and len(shapes) == 6
    dense = sweeps.resolve_config("configs/paper.py:D,384,gpu", ["--config.eval_protocol=dense"])
    assert launch.job_shape(dense) != launch.job_shape(sweeps.resolve_config("configs/paper.py:D,256,gpu", []))


def test_tpu_launch_refuses_a_job_that_does_not_fit_the_slice(tmp_path, monkeypatch):
    bin_dir = fake_tools(tmp_path / "bin")
    log, scripts = tmp_path / "gcloud.log", tmp_path / "tpu"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    args = ["--name=huge", "--mode=tpu", "--tpu=pod", "--zone=z", "--accelerator_type=v5litepod-4", "--submit"]
    with pytest.raises(UserError, match="job huge does not fit on v5litepod-4: its train step needs Ran out of memory"):
        launch.main([*args, f"--root={tmp_path / 'runs'}", f"--scripts_dir={scripts}", *PREFLIGHT_TINY, HUGE])
    assert not scripts.exists() and not (tmp_path / "runs").exists() and not log.exists()


def test_slurm_job_script_runs_srun_and_requeues_until_done(tmp_path):
    bin_dir = fake_tools(tmp_path / "bin")
    root = str(tmp_path / "runs")
    job = next(
        j
        for j in plan.plan(sweeps.paper(["D"], ["256", "384"], tables=()), root, distributed=True)
        if j.name == "D_384"
    )
    for per, tasks, visible in (("gpu", 8, ""), ("node", 1, "0,1,2,3,4,5,6,7")):
        opts = slurm.SlurmOptions(str(REPO), nodes=2, per=per, python=sys.executable)
        text = slurm.job_script(job, opts, "paper", "/logs")
        assert f"#SBATCH --ntasks-per-node={tasks}\n" in text
        srun = next(line for line in text.splitlines() if line.startswith("srun "))
        assert shlex.split(srun) == [
            "srun",
            "--kill-on-bad-exit=1",
            "--gpu-bind=none",
            sys.executable,
            "-m",
            "vgg_jax.main",
            "--config=configs/paper.py:D,384,gpu",
            f"--workdir={root}/D_384",
            f"--config.init_from={root}/D_256",
            "--config.distributed.enabled=True",
        ]
        script = tmp_path / f"{per}.sbatch"
        script.write_text(text)
        log = tmp_path / f"{per}.log"
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log), SLURM_JOB_ID="42")

        def run(**extra: str) -> list[str]:
            log.write_text("")
            subprocess.run(["bash", str(script)], env=env | extra, check=True, capture_output=True)
            return log.read_text().splitlines()

        # Stopped before the end (time limit / preemption): srun ran, then the job requeues itself.
        calls = run()
        assert calls[0] == f"srun [{visible}] " + " ".join(shlex.split(srun)[1:])
        assert calls[1:] == ["scontrol requeue 42"]
        assert run(FAKE_STEP="370000") == [calls[0]]  # finished: no requeue
        assert run() == []  # already finished: srun is not called again
        os.remove(f"{root}/D_384/results.json")


def test_slurm_allocations_give_input_cores_and_memory_and_evaluations_a_small_allocation(tmp_path):
    jobs = plan.plan(sweeps.paper(["D"], ["256"], tables=("3",)), str(tmp_path), distributed=True)
    train, evaluation = (next(j for j in jobs if j.kind == kind) for kind in ("train", "eval"))
    for per, cpus in (("gpu", 12), ("node", 96)):
        text = slurm.job_script(train, slurm.SlurmOptions(str(REPO), nodes=2, per=per), "paper", "/logs")
        for line in (
            f"--cpus-per-task={cpus}",
            "--mem-per-gpu=48G",
            "--nodes=2",
            "--gpus-per-node=8",
            "--time=3-00:00:00",
            "--output=/logs/D_256-%j.out",
        ):
            assert f"#SBATCH {line}\n" in text, (per, line)
    text = slurm.job_script(evaluation, slurm.SlurmOptions(str(REPO), nodes=2), "paper", "/logs")
    for line in (
        "--nodes=1",
        "--gpus-per-node=1",
        "--ntasks-per-node=1",
        "--cpus-per-task=12",
        "--time=04:00:00",
        "--output=/logs/D_256-dense-%j.out",
    ):
        assert f"#SBATCH {line}\n" in text, line
    # A memory option of the user's replaces ours (sbatch refuses --mem with --mem-per-gpu).
    text = slurm.job_script(train, slurm.SlurmOptions(str(REPO), extra=("--mem=500G",)), "paper", "/logs")
    assert "#SBATCH --mem=500G\n" in text and "--mem-per-gpu" not in text


def test_jax_distributed_initialises_from_the_slurm_environment():
    """What srun gives each task is enough for ``jax.distributed.initialize()`` with no arguments."""
    code = (
        "import jax; jax.distributed.initialize(); "
        "print(jax.process_index(), jax.process_count(), flush=True); jax.distributed.shutdown()"
    )
    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env |= dict(
            SLURM_JOB_ID="7",
            SLURM_STEP_NODELIST="localhost",
            SLURM_NTASKS="2",
            SLURM_PROCID=str(rank),
            SLURM_LOCALID=str(rank),
            SLURM_STEP_NUM_NODES="1",
            JAX_COORDINATOR_PORT=str(port),
            JAX_PLATFORMS="cpu",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [o[0].split() for o in outputs] == [["0", "2"], ["1", "2"]], [o[1][-2000:] for o in outputs]


# ----------------------------------------------------------------------------------------------
# Cloud TPU pods


def shell_words(line: str) -> list[str]:
    """Words and operators (&&, ||, ;) of a shell line, as bash splits them."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# A one-worker TPU VM on this machine: records each call; scp copies into $FAKE_HOME; ssh runs --command there
# (a state query fails once when $FAKE_DROP exists: a dropped connection).
echo "gcloud $*" >> "$FAKE_LOG"
case " $* " in
  *" queued-resources describe "*) echo ACTIVE; exit 0;;
  *" queued-resources create "*) exit 0;;
  *" tpu-vm scp "*) cp "$5" "$FAKE_HOME/${6#*:~/}"; exit 0;;
esac
for a in "$@"; do case $a in --command=*) command=${a#--command=};; esac; done
if [ -e "$FAKE_DROP" ] && [[ $command == *" state"* ]]; then rm "$FAKE_DROP"; exit 255; fi
cd "$FAKE_HOME" && HOME="$FAKE_HOME" exec bash -c "$command"
"""


def test_tpu_launch_ships_the_code_runs_detached_survives_a_dropped_connection_and_reruns(tmp_path, data_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    home, log, root, scripts = tmp_path / "worker", tmp_path / "gcloud.log", tmp_path / "runs", tmp_path / "tpu"
    home.mkdir()
    args = [
        "--config=configs/demo.py",
        "--name=tiny",
        "--mode=tpu",
        "--tpu=pod",
        "--zone=us-central2-b",
        "--project=proj",
        "--internal_ip",
        "--create=spot",
        "--accelerator_type=v5litepod-8",
        f"--root={root}",
        f"--scripts_dir={scripts}",
        f"--python={sys.executable}",
        "--install=true",
        "--poll_seconds=1",
        "--skip_preflight",  # the TPU preflight's refusal is tested above
        *TINY,
        f"--config.data.data_dir={data_dir}",
        # The workers' jax.distributed: one process of an explicit cluster here (a pod auto-detects).
        f"--config.distributed.coordinator_address=127.0.0.1:{free_port()}",
        "--config.distributed.num_processes=1",
        "--config.distributed.process_id=0",
    ]
    dry = run_launcher(*args, "--dry_run")
    assert not scripts.exists()  # a dry run writes nothing
    printed = [line for line in dry.stdout.splitlines() if line.startswith(("gcloud", "until", "wait_for"))]
    assert printed[0].startswith("gcloud compute tpus queued-resources create pod --zone=us-central2-b")
    assert "--accelerator-type=v5litepod-8 --runtime-version=v2-alpha-tpuv5-lite --spot" in printed[0]
    assert shlex.split(printed[2])[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and "--internal-ip" in printed[2]
    run_launcher(*args)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= dict(
        PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), FAKE_HOME=str(home), FAKE_DROP=str(tmp_path / "drop")
    )
    (tmp_path / "drop").write_text("")
    proc = subprocess.run(["bash", str(scripts / "run_all.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "All jobs finished." in proc.stdout
    calls = log.read_text().splitlines()
    assert [c.split()[4] for c in calls[:3]] == ["create", "describe", "scp"]  # slice, then the code, then jobs
    assert any("--worker=all" in c and "jobs/tiny.sh start" in c for c in calls)
    assert sum("jobs/tiny.sh state" in c for c in calls) >= 2  # polled; the first query was dropped
    assert json.loads((root / "tiny" / "results.json").read_text())["step"] == 4
    assert list((root / "tiny" / "logs").glob("*.log"))  # one log per worker, under the run's workdir
    assert (home / "vgg_jax" / "configs" / "demo.py").is_file()  # the shipped code ran
    # Rerunning (e.g. after the connection dropped for good) neither restarts nor duplicates the job.
    results = (root / "tiny" / "results.json").stat().st_mtime
    proc = subprocess.run(["bash", str(scripts / "run_all.sh")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and (root / "tiny" / "results.json").stat().st_mtime == results
    job = home / "vgg_jax" / "jobs" / "tiny.sh"
    assert (
        subprocess.run(
            ["bash", str(job), "start"], env=env | {"HOME": str(home)}, capture_output=True, text=True
        ).stdout.strip()
        == "done"
    )


def worker_job(home: Path, job: str, action: str) -> str:
    """``bash ~/jobs/<job>.sh ACTION`` as a TPU worker whose home is ``home`` runs it: the script's one-line answer."""
    env = dict(os.environ, HOME=str(home))
    script = str(home / "jobs" / f"{job}.sh")
    return subprocess.run(["bash", script, action], env=env, capture_output=True, text=True, timeout=120).stdout.strip()


def test_a_running_tpu_job_is_not_started_twice(tmp_path):
    job = plan.Job(
        "slow",
        "train",
        ("-c", "import time; time.sleep(30)"),
        ("-c", "raise SystemExit(1)"),
        (),
        str(tmp_path / "run"),
        {},
    )
    script = tmp_path / "slow.sh"
    script.write_text(tpu.job_script(job, tpu.TpuOptions("pod", "zone", python=sys.executable)))
    (tmp_path / "jobs").mkdir()
    shutil.copy(script, tmp_path / "jobs" / "slow.sh")

    def call(action: str) -> str:
        return worker_job(tmp_path, "slow", action)

    assert call("state") == "not started"
    assert call("start") == "started"
    assert call("start") == "running" and call("state") == "running"
    pid = int((tmp_path / "vgg_jax_jobs" / "slow" / "pid").read_text())
    os.kill(pid, signal.SIGKILL)  # the job died (e.g. the VM was preempted): a start runs it again
    while call("state") == "running":
        pass
    assert call("start") == "started"
    os.kill(int((tmp_path / "vgg_jax_jobs" / "slow" / "pid").read_text()), signal.SIGKILL)


def test_a_detached_tpu_job_is_stopped_with_sigterm_and_says_so(tmp_path):
    """`jobs/<job>.sh stop` sends the job itself (the detached shell's child) SIGTERM, which a training run answers
    by checkpointing; it waits for the job to end and the state then reads `stopped`, until `start` resumes it."""
    handler = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n    pathlib.Path(sys.argv[1]).write_text('checkpointed'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\nprint('running', flush=True)\ntime.sleep(120)"
    )
    marker = tmp_path / "marker"
    job = plan.Job(
        "run", "train", ("-c", handler, str(marker)), ("-c", "raise SystemExit(1)"), (), str(tmp_path / "w"), {}
    )
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "run.sh").write_text(tpu.job_script(job, tpu.TpuOptions("pod", "zone", python=sys.executable)))

    def call(action: str) -> str:
        return worker_job(tmp_path, "run", action)

    assert call("stop") == "not running"
    assert call("start") == "started"
    log = tmp_path / "w" / "logs" / f"{os.uname().nodename}.log"
    while "running" not in (log.read_text() if log.exists() else ""):  # the handler is installed
        time.sleep(0.2)
    assert call("stop") == "stopped (exit code 0)"
    assert marker.read_text() == "checkpointed"  # the job got SIGTERM, not only its shell
    assert call("state") == "stopped (start resumes it)"
    assert call("start") == "started" and call("state") == "running"
    call("stop")


def test_tpu_dry_run_shows_what_every_worker_runs_where_it_logs_and_how_to_stop_it(tmp_path, capsys):
    args = ["--config=configs/paper.py:D,256,tpu", "--mode=tpu", "--tpu=pod", "--zone=z", "--root=gs://b/runs"]
    launch.main([*args, "--dry_run", "--skip_preflight"])
    out = capsys.readouterr().out
    workdir = "gs://b/runs/paper-D-256-tpu"
    lines = out.splitlines()
    i = lines.index("# paper-D-256-tpu: every worker runs, detached (setsid nohup) in ~/vgg_jax:")
    command = shlex.split(lines[i + 1].lstrip("# "))
    assert command[:3] == ["python3", "-m", "vgg_jax.main"] and f"--workdir={workdir}" in command
    assert "--config.distributed.enabled=True" in command
    assert lines[i + 2] == (
        f"#   log ~/vgg_jax_jobs/paper-D-256-tpu/<host>.log (copied to {workdir}/logs/<host>.log every minute); "
        "pid ~/vgg_jax_jobs/paper-D-256-tpu/pid"
    )
    stop = lines[i + 3].removeprefix("#   stop: ")
    assert shlex.split(stop)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in stop
    assert "bash jobs/paper-D-256-tpu.sh stop" in stop
    # The scripts folder: <sweep name>-tpu, the mode not repeated for a single run of a tpu config.
    assert f"would go to {Path('paper-D-256-tpu').resolve()}" in out
    assert launch.default_scripts_dir("paper", "gs://b/r", "tpu") == "paper-tpu"
    launch.main([*args, "--dry_run", "--stop"])
    assert capsys.readouterr().out.strip() == stop


def test_stopping_the_local_launcher_stops_its_job_which_checkpoints(tmp_path, data_dir):
    """SIGTERM to `experiments.launch` is passed on to the running `vgg_jax.main`, which saves a checkpoint at its
    step and exits; the launcher records the stop and exits 143. Before, the launcher died and its job trained on."""
    root = tmp_path / "runs"
    overrides = [*TINY, "--config.num_train_steps=100000", "--config.eval_every_steps=100000"]
    overrides += ["--config.checkpoint.every_steps=100000", f"--config.data.data_dir={data_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "experiments.launch", "--config=configs/demo.py", "--name=long", f"--root={root}"]
        + overrides,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = root / "logs" / "long.log"
    while "train step compiled" not in (log.read_text() if log.exists() else ""):  # training, SIGTERM handled
        assert launcher.poll() is None, launcher.stdout.read()
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    start = next(e for e in events(root) if e["event"] == "start")
    try:
        os.kill(start["pid"], 0)
        orphaned = True
        os.kill(start["pid"], signal.SIGKILL)  # a failing test leaves no training behind
    except ProcessLookupError:
        orphaned = False
    assert not orphaned, "the job outlived its launcher"
    assert launcher.returncode == 128 + signal.SIGTERM, out
    assert "long: stopped by SIGTERM" in out and "rerun the same command to resume" in out
    stopped = next(e for e in events(root) if e["event"] == "stopped")
    assert stopped["signal"] == "SIGTERM" and stopped["exit_code"] == 0
    summary = json.loads((root / "long" / "results.json").read_text())
    assert 0 < summary["step"] < 100000
    assert (root / "long" / "checkpoints" / str(summary["step"])).is_dir()  # saved at the step it stopped
    assert "SIGTERM received: saving a checkpoint" in log.read_text()


def test_read_scalars_keeps_what_precedes_a_half_written_record(tmp_path):
    """A running job's event file may end in a partial record: status and report read the rest."""
    import tensorflow as tf

    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for step in range(1, 4):
            tf.summary.scalar("train/loss", 1.0 / step, step=step)
    writer.close()
    (event_file,) = tmp_path.glob("events.out.tfevents.*")
    assert status.read_scalars(str(tmp_path))["train/loss"] == [(s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]
    event_file.write_bytes(event_file.read_bytes()[:-7])  # the last record cut short
    assert status.read_scalars(str(tmp_path))["train/loss"] == [(1, 1.0), (2, 0.5)]


def test_tpu_bundle_ships_the_code_and_not_earlier_scripts_or_bundles():
    """The default scripts directory lies in the checkout (e.g. paper-tpu/): a rerun must not ship the old
    run_all.sh and bundle, nor a partial copy of the bundle being written."""
    scripts = REPO / "test-bundle-tpu"
    scripts.mkdir()
    try:
        (scripts / "run_all.sh").write_text("old\n")
        (scripts / tpu.BUNDLE).write_bytes(b"old bundle")
        job = plan.Job("tiny", "train", ("-c", "pass"), ("-c", "pass"), (), "/tmp/tiny", {})
        path = tpu.bundle([job], tpu.TpuOptions("pod", "zone"), scripts / tpu.BUNDLE)
        with tarfile.open(path) as tar:
            names = set(tar.getnames())
        assert {"vgg_jax/models.py", "configs/demo.py", "requirements.txt", "jobs/tiny.sh"} <= names
        assert not any(n.startswith("test-bundle-tpu/") for n in names)
        assert not list(scripts.glob("*.partial"))
    finally:
        shutil.rmtree(scripts)


def test_the_local_launcher_echoes_a_running_jobs_progress(tmp_path):
    """While a job runs, its newest progress line (clu's work-unit notes) is echoed; the log is read as bytes
    through epath (it may hold anything the job printed)."""
    from etils import epath

    from experiments import launch

    log = epath.Path(tmp_path / "job.log")
    line = b"I Setting work unit notes: 1.0 steps/s, 50.0% (2/4), ETA: 0m \xff\n"  # not UTF-8 at its end
    code = f"import sys, time; sys.stdout.buffer.write({line!r}); sys.stdout.flush(); time.sleep(2)"
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=f)
        echoed = []
        assert launch._wait_reporting(proc, log, echoed.append, "[1/1] job", every=0.2) == 0
    assert echoed and echoed[0].startswith("[1/1] job: 1.0 steps/s, 50.0% (2/4)")


def test_leave_chance_counts_runs_per_configuration_and_appends_each_once(tmp_path, capsys):
    """benchmarks/leave_chance.py on a sweep root as experiments.launch leaves it (sweep.json, each run's
    results.json, logs/RUN.log): which runs left chance (top-1 error >= 10 points below 90%), which are in the band."""
    from benchmarks import leave_chance

    runs = {
        "A-seed0": (40.0, 5.0, "", 0),
        "A-seed1": (85.0, 45.0, "W... stalled at chance: ...", 1),
        "B-seed0": (55.0, 12.0, "", 0),
    }
    sweep = {"runs": [{"name": n, "net": n[0], "seed": int(n[-1])} for n in runs] + [{"name": "B-seed1", "net": "B"}]}
    (tmp_path / "logs").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"sweep": sweep}))
    for name, (top1, top5, log, rollbacks) in runs.items():
        (tmp_path / name).mkdir()
        result = {"step": 600, "model": "vgg11", "top1_error@168": top1, "top5_error@168": top5, "train_seconds": 9}
        if rollbacks:  # results.json names rollbacks only when there were some
            result["rollbacks"] = rollbacks
        (tmp_path / name / "results.json").write_text(json.dumps(result))
        (tmp_path / "logs" / f"{name}.log").write_text(log)
    out = tmp_path / "m.jsonl"
    for _ in range(2):  # the second pass finds every run in --out already
        leave_chance.main([str(tmp_path), "--band=20,60,0,10", f"--out={out}"])
    table = capsys.readouterr()
    assert "| A | 2 | 1 | 1 | 40.0-85.0 | 1 | 1 |" in table.out and "| B | 1 | 1 | 0 | 55.0-55.0 | 0 | 0 |" in table.out
    assert "outside the target: A-seed1, B-seed0" in table.err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["run"], r["left_chance"], r["in_band"], r["stall_warning"], r["rollbacks"]) for r in records] == [
        ("A-seed0", True, True, False, 0),
        ("A-seed1", False, False, True, 1),
        ("B-seed0", True, False, False, 0),
    ]
    with pytest.raises(SystemExit) as e:
        leave_chance.main([str(tmp_path), "--band=20,60"])
    assert e.value.code == 2
