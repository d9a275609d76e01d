"""experiments/: sweeps, the local / SLURM / TPU launchers, status and the paper-style report.

The CPU-scale depth and LRN ablation (A, A-LRN, B at S=256 and B fine-tuned at jittered S, tiny
widths, on the built-in dataset) runs once through ``python -m experiments.launch`` (module
fixture); the report's tables and figures are checked against the runs' own outputs and against
the paper's published errors (Table 3). The SLURM and TPU scripts are generated for
the full paper sweep and executed with stand-ins for ``sbatch`` / ``srun`` / ``scontrol`` /
``gcloud`` that record what they were asked to do.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

from experiments import launch, plan, plots, report, results, slurm, status, sweeps, tpu  # noqa: E402

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
    "--only=A-LRN_256,B_256-512,A_256-dense",
]
ABLATION_JOBS = {"A_256", "A-LRN_256", "B_256", "B_256-512", "A_256-dense"}

# Paper Table 3 (S = Q = 256): top-1 / top-5 validation error, %.
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

    config = checkpoints.read_meta(ablation / "B_256-512")["config"]
    assert config["init_from"] == str(ablation / "B_256")
    assert config["optimizer"]["learning_rate"] == pytest.approx(0.002)
    assert (config["data"]["scale_min"], config["data"]["scale_max"], config["data"]["eval_scales"]) == (37, 73, [55])
    assert checkpoints.read_meta(ablation / "A-LRN_256")["config"]["model"]["name"] == "A-LRN"


def test_rerunning_the_launcher_skips_finished_jobs(ablation, data_dir):
    before = {p: p.stat().st_mtime for p in ablation.glob("*/results.json")}
    proc = run_launcher(*ABLATION, f"--root={ablation}", *TINY, f"--config.data.data_dir={data_dir}")
    assert proc.stdout.count("finished already, skipped") == len(ABLATION_JOBS)
    assert {p: p.stat().st_mtime for p in ablation.glob("*/results.json")} == before
    assert status.main([str(ablation)]) == 0
    assert status.main([f"--run={ablation / 'B_256'}", "--steps=4"]) == 0
    assert status.main([f"--run={ablation / 'B_256'}", "--steps=5"]) == 1
    assert status.main([f"--eval={ablation / 'evals' / 'A_256-dense'}", "--protocol=dense"]) == 0
    assert status.main([f"--eval={ablation / 'evals' / 'A_256-dense'}", "--protocol=multicrop"]) == 1


def test_report_tables_hold_every_run_and_the_paper_numbers(ablation):
    text = (ablation / "report" / "report.md").read_text()
    runs = {row["run"]: row for row in markdown_table(text, "## Runs")}
    assert set(runs) == ABLATION_JOBS - {"A_256-dense"} and all(r["state"] == "done" for r in runs.values())
    table3 = {row["run"]: row for row in markdown_table(text, "## Table 3")}
    assert set(table3) == set(runs)
    for name, row in table3.items():
        net = name.split("_")[0]
        assert row["ConvNet"] == net
        if name.endswith("_256"):
            assert (row["top-1 (paper)"], row["top-5 (paper)"], row["paper Q"]) == (*PAPER_TABLE3[net], "256")
        else:  # the paper trained no B at jittered S
            assert row["top-1 (paper)"] == "–"
    # Ours: A_256 from its dense evaluation, the others from the centre crop at the end of training,
    # each equal to what the run wrote (and, independently, to its last TensorBoard value).
    dense = json.loads(next((ablation / "evals" / "A_256-dense").glob("dense_*.json")).read_text())
    assert table3["A_256"]["measured by"] == "dense" and table3["A_256"]["test Q"] == "37"
    assert float(table3["A_256"]["top-1 (ours)"]) == pytest.approx(dense["results"]["top1_error"], abs=0.006)
    for name in ("A-LRN_256", "B_256", "B_256-512"):
        q = table3[name]["test Q"]
        summary = json.loads((ablation / name / "results.json").read_text())
        last = results.read_scalars(str(ablation / name))[f"eval/top1_error@{q}"][-1]
        assert last[0] == 4 and last[1] == pytest.approx(summary[f"top1_error@{q}"])
        assert float(table3[name]["top-1 (ours)"]) == pytest.approx(summary[f"top1_error@{q}"], abs=0.006)
        assert float(table3[name]["top-5 (ours)"]) == pytest.approx(summary[f"top5_error@{q}"], abs=0.006)
    torchvision = {row["run"]: row for row in markdown_table(text, "## Centre crop vs torchvision")}
    assert (
        torchvision["A_256"]["top-1 (torchvision)"] == "30.98"
    )  # 100 - 69.020 (torchvision's published vgg11 top-1 accuracy)


def test_report_figures_are_valid_images(ablation):
    out = ablation / "report"
    names = [f"curves_{r}.png" for r in ("A_256", "A-LRN_256", "B_256", "B_256-512")]
    names += ["error_vs_depth.png", "lrn.png", "fixed_vs_jittered.png"]
    text = (out / "report.md").read_text()
    for name in names:
        assert f"]({name})" in text
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            pixels = np.asarray(image.convert("L"), dtype=np.float32)
        assert image.format == "PNG" and pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels.std() > 10, f"{name} looks blank"


def test_depth_axis_follows_the_papers_table_1():
    """Weight layers per configuration (paper Table 1): A 11, B 13, C 16, D 16, E 19."""
    assert {net: report.depth(net) for net in sweeps.NETS} == {"A": 11, "A-LRN": 11, "B": 13, "C": 16, "D": 16, "E": 19}
    points = [plots.Point(net, "256", report.depth(net), 30.0, 10.0, None, None) for net in ("E", "C", "A", "D", "B")]
    fig = plots.error_vs_depth(points)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["A\n(11 layers)", "B\n(13 layers)", "C\n(16 layers)", "D\n(16 layers)", "E\n(19 layers)"]
    assert plots.lrn(points) is None and plots.fixed_vs_jittered(points) is None  # nothing to compare
    plots.png(fig)


def test_report_without_a_manifest_discovers_the_workdirs(ablation):
    """Workdirs trained by hand (no sweep.json): runs and evaluations are found from their files."""
    found = results.discover(str(ablation))
    assert {r.name for r in found.runs} == ABLATION_JOBS - {"A_256-dense"}
    by_name = {r.name: r for r in found.runs}
    assert (by_name["B_256-512"].facts["net"], by_name["B_256-512"].facts["scale"]) == ("B", "37-73")
    assert [(e.name, e.facts["table"]) for e in found.evals] == [("A_256-dense", "3")]


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


def test_slurm_submit_chains_jobs_with_afterok(tmp_path, monkeypatch):
    """The launcher's CLI writes the scripts and submits them; each job waits for the ids of its dependencies."""
    bin_dir = fake_tools(tmp_path / "bin")
    log = tmp_path / "sbatch.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(log))
    root = tmp_path / "runs"
    launch.main(
        [
            "--sweep=paper",
            "--nets=A,D,E",
            "--staged",
            "--mode=slurm",
            f"--root={root}",
            "--nodes=2",
            "--partition=gpu",
            "--sbatch=--qos=high",
            "--submit",
            "--config.data.manual_dir=/data/imagenet",
        ]
    )
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
        f"--output={root}/slurm/logs/%x-%j.out",
    ):
        assert f"#SBATCH {option}\n" in script


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


def test_tpu_commands_run_every_worker_in_order(tmp_path):
    bin_dir = fake_tools(tmp_path / "bin")
    sweep = sweeps.paper(
        ["A"], ["256", "384"], platform="tpu", tables=("3",), overrides=["--config.data.data_dir=gs://bucket/tfds"]
    )
    jobs = plan.plan(sweep, "gs://bucket/runs", distributed=True)
    opts = tpu.TpuOptions("pod", "us-central2-b", project="proj", setup="source ~/venv/bin/activate")
    script, commands = tpu.write(jobs, opts, tmp_path / "tpu")
    args = shlex.split(commands[1])
    assert args[:9] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone=us-central2-b",
        "--project=proj",
        "--worker=all",
    ]
    remote = shell_words(args[9].removeprefix("--command="))
    assert remote[:6] == ["cd", "vgg_jax", "&&", "source", "~/venv/bin/activate", "&&"]
    assert remote[6:12] == [
        "{",
        "python3",
        "-m",
        "experiments.status",
        "--run=gs://bucket/runs/A_384",
        "--steps=370000",
    ]
    assert remote[12:] == [
        "||",
        "python3",
        "-m",
        "vgg_jax.main",
        "--config=configs/paper.py:A,384,tpu",
        "--workdir=gs://bucket/runs/A_384",
        "--config.data.data_dir=gs://bucket/tfds",
        "--config.init_from=gs://bucket/runs/A_256",
        "--config.distributed.enabled=True",
        ";",
        "}",
    ]
    eval_remote = shell_words(shlex.split(commands[2])[9].removeprefix("--command="))
    assert eval_remote[13:] == [
        "python3",
        "-m",
        "vgg_jax.evaluate",
        "--checkpoint=gs://bucket/runs/A_256",
        "--protocol=dense",
        "--out=gs://bucket/runs/evals/A_256-dense",
        "--distributed.enabled=True",
        ";",
        "}",
    ]
    log = tmp_path / "gcloud.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log))
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert [j.name for j in jobs] == ["A_256", "A_384", "A_256-dense", "A_384-dense"]
    assert log.read_text().splitlines() == [" ".join(shlex.split(c)) for c in commands]  # all of them, in order
