"""User errors end every entry point with one line and exit status 2, before anything is trained; --verbose
shows the traceback; program errors keep theirs (vgg_jax/cli.py)."""

from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest
from test_main import REPO

from vgg_jax import cli, main
from vgg_jax.errors import ConfigError

from tiny_runs import TINY

CONFIG_ERRORS = [
    ("--config.eval_protocol=tencrop", "Unknown or repeated evaluation method(s) in protocol 'tencrop'"),
    ("--config.data.eval_scales=(20,)", "--config.data.eval_scales=(20,): test scales [20] are below crop_size=32"),
    ("--config.optimizer.learning_rate=-0.1", "--config.optimizer.learning_rate=-0.1: must be >= 0"),
    ("--config.num_train_steps=-5", "--config.num_train_steps=-5: must be positive"),
    ("--config.model.dropout_rate=1.5", "--config.model.dropout_rate=1.5: must be in [0, 1)"),
    ("--config.model.dtype=bf16", "--config.model.dtype='bf16': must be one of float32, bfloat16"),
    ("--config.model.name=vgg12", "--config.model.name='vgg12': Unknown model 'vgg12'"),
    ("--config.optimizer.schedule=linear", "--config.optimizer.schedule='linear': must be one of plateau"),
    ("--config.data.crop_size=33", "--config.data.crop_size=33: must be a multiple of 32"),
    ("--config.checkpoint.keep=0", "--config.checkpoint.keep=0: must be >= 1"),
    ("--config.mesh.grad_reduce_dtype=bf16", "--config.mesh.grad_reduce_dtype='bf16': must be one of compute, float32"),
    (
        "--config.model.name=vgg11_bn --config.mesh.grad_reduce_dtype=float32",
        "--config.mesh.grad_reduce_dtype='float32': computes each device's gradient apart, where vgg11_bn's batch "
        "normalisation would use per-device statistics",
    ),
    # Issue 27, item 8.
    ("--config.optimizer.learning_rate=inf", "--config.optimizer.learning_rate=inf: must be finite"),
    ("--config.model.init_std=nan", "--config.model.init_std=nan: must be finite"),
    ("--config.mesh.model=3", "--config.mesh.model=3: must divide model.fc_width=16"),
    ("--config.mesh.model=16", "--config.mesh.model=16 does not divide the 1 devices: use one of 1."),
    ("--config.data.eval_split=validation[:0]", "--config.data.eval_split='validation[:0]' holds no examples"),
    ("--config.rollback.spike_factor=0.5", "--config.rollback.spike_factor=0.5: must be > 1"),
]


@pytest.mark.parametrize("override, message", CONFIG_ERRORS)
def test_bad_config_values_stop_before_anything_is_written(override, message, tmp_path, data_dir):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        main.main([f"--workdir={workdir}", *TINY, f"--config.data.data_dir={data_dir}", *override.split()])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not workdir.exists()


def _other(value, kind):
    """A value of the field's type other than ``value``."""
    if value is None:
        return {int: 3, float: 0.5, str: "elsewhere"}[kind]
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return tuple(_other(v, type(v)) for v in value)


def _fields(config, prefix=""):
    import ml_collections

    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value, config.get_ref(key).get_type()


def test_every_config_field_is_settable_from_the_command_line(tmp_path):
    """Issue 27, item 5: each field of configs/default.py (training) and of the evaluation's --data and
    --distributed is set from the command line to another value of its type (tuples as '(a, b)')."""
    from configs import default
    from vgg_jax import evaluate

    commands = [
        (main.define_flags, [f"--workdir={tmp_path}", "--config=configs/default.py"], "config", default.get_config()),
        (evaluate.define_flags, [], "data", evaluate.default_data_config()),
        (evaluate.define_flags, [], "distributed", evaluate.sharding.default_distributed_config()),
    ]
    checked = 0
    for define, base, flag, config in commands:
        for field, value, kind in _fields(config):
            new = _other(value, kind)
            text = repr(new) if isinstance(new, tuple) else str(new)
            values, _ = cli.parse([*base, f"--{flag}.{field}={text}"], define, "prog")
            got = getattr(values, flag)
            for part in field.split("."):
                got = got[part]
            assert got == new, (field, got, new)
            checked += 1
    assert checked > 80


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "VGG_JAX_VERBOSE")} | (env_extra or {})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    return line


def test_every_entry_point_reports_user_errors_in_one_line(tmp_path):
    line = one_line_error(run_cli("-m", "vgg_jax.main", f"--workdir={tmp_path}", *TINY, "--config.model.dtype=bf16"))
    assert "--config.model.dtype='bf16'" in line
    line = one_line_error(
        run_cli("-m", "vgg_jax.main", f"--workdir={tmp_path}", *TINY, "--config.data.dataset=imagenet2013")
    )
    assert "unknown dataset 'imagenet2013' (did you mean 'imagenet2012'" in line
    line = one_line_error(
        run_cli("-m", "vgg_jax.convert", "--layout=torchvision", str(tmp_path / "no.pth"), str(tmp_path / "c"))
    )
    assert "No such weights file" in line
    line = one_line_error(run_cli("-m", "vgg_jax.data.stats", "--data.dataset=folder", f"--out={tmp_path / 's.json'}"))
    assert "dataset='folder' needs --config.data.folder" in line
    line = one_line_error(run_cli("-m", "experiments.launch", "--sweep=paper", "--nets=A,F", "--dry_run"))
    assert "Unknown or no nets ['F']" in line
    line = one_line_error(run_cli("-m", "vgg_jax.evaluate", "--checkpoint=x", "--protcol=dense"))
    assert "protcol" in line
    # --verbose (or VGG_JAX_VERBOSE=1) shows where a user error came from.
    proc = run_cli(
        "-m", "vgg_jax.convert", "--layout=torchvision", str(tmp_path / "no.pth"), str(tmp_path / "c"), "--verbose"
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "No such weights file" in proc.stderr


def test_program_errors_keep_their_traceback():
    proc = run_cli("-c", "from vgg_jax import cli; cli.run(lambda argv: 1 / 0)")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_a_later_override_of_a_field_replaces_an_earlier_one(tmp_path):
    """ml-collections appends a tuple field given twice; a sweep's run-specific override must win instead."""
    values, _ = cli.parse(
        [f"--workdir={tmp_path}", *TINY, "--config.data.eval_scales=(40, 48)"], main.define_flags, "main"
    )
    assert values.config.data.eval_scales == (40, 48) and "--config.data.eval_scales=(36,)" in TINY


def test_quiet_console_drops_known_start_up_noise_and_keeps_the_rest(capfd):
    """The CLIs' filters: TensorFlow's C++ banner written straight to file descriptor 2, and the
    known-harmless log lines (orbax's missing-metadata notice, JAX's probe for absent TPU / GPU plugins)."""
    import logging as std_logging

    with cli.stderr_without(cli.TENSORFLOW_BANNER):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 something that matters\n")
    assert capfd.readouterr().err == "E0000 something that matters\n"

    quiet = cli.Quiet()

    def record(name: str, message: str, *args) -> std_logging.LogRecord:
        return std_logging.LogRecord(name, std_logging.WARNING, "f.py", 1, message, args, None)

    assert not quiet.filter(record("absl", "Metadata file does not exist: %s", "/w/checkpoints/4/_CHECKPOINT_METADATA"))
    assert not quiet.filter(record("jax._src.xla_bridge", "Unable to initialize backend 'tpu': ABORTED"))
    assert quiet.filter(record("absl", "Metadata file is corrupt: %s", "/w"))
    assert quiet.filter(record("vgg_jax.train", "Step 4: 45% of the time waited for input batches"))


def test_an_entry_point_on_a_machine_without_a_tpu_or_gpu_prints_no_plugin_error():
    """With libtpu installed (the test requirements, the [tpu] extra) and no TPU, JAX probes libtpu at the
    first device query, and libtpu prints a false INVALID_ARGUMENT error unless told a slice: cli.quiet tells it."""
    import importlib.util

    assert importlib.util.find_spec("libtpu") is not None, "requirements-test.txt installs libtpu"
    assert not cli.has_tpu()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")
    }
    code = "import jax\nfrom vgg_jax import cli\ncli.run(lambda argv: print(jax.devices()[0].platform))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "cpu", proc.stderr
    assert "TPU" not in proc.stderr and "INVALID_ARGUMENT" not in proc.stderr, proc.stderr
    # Nor JAX's CUDA plugin (installed to compile for GPUs), whose start-up fails where there is no GPU.
    assert importlib.util.find_spec("jax_plugins.xla_cuda12") is not None and not cli.has_nvidia_driver()
    assert "plugin configuration error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_printed_lines_reach_a_redirected_output_as_they_are_printed():
    """stdout to a pipe or file is block-buffered by Python: a long command's header appeared only at its exit.
    cli.run line-buffers it: the child's first line arrives while the child is still waiting for its input."""
    code = "import sys\nfrom vgg_jax import cli\ncli.run(lambda argv: (print('header'), sys.stdin.readline()))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        # Held back, the line would come only at exit, and the child exits only once it is answered: wait for it
        # (select: a hang guard far above the seconds the child needs to start, not a speed requirement).
        ready, _, _ = select.select([proc.stdout], [], [], 300)
        assert ready, "no line while the program runs: its output is buffered"
        assert proc.stdout.readline() == "header\n"
        assert proc.poll() is None
    finally:
        proc.communicate("go\n", timeout=300)


def test_libraries_info_lines_are_dropped_ours_and_every_warning_kept():
    """Unless --verbose: orbax's (and any installed library's) INFO lines go, this project's and clu's progress
    lines stay, warnings and errors of everyone stay."""
    import logging as std_logging

    import clu
    import orbax.checkpoint

    import experiments

    def record(path: str, level: int, message: str = "x") -> std_logging.LogRecord:
        return std_logging.LogRecord("absl", level, path, 1, message, None, None)

    orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpointer.py")
    clu_file = os.path.join(os.path.dirname(clu.__file__), "platform", "local.py")
    ours = [os.path.join(os.path.dirname(cli.__file__), "train.py"), os.path.join(experiments.__path__[0], "launch.py")]
    quiet, verbose = cli.Quiet(libraries=True), cli.Quiet(libraries=False)
    assert not quiet.filter(record(orbax_file, std_logging.INFO, "Restoring checkpoint from /w/6/state."))
    assert verbose.filter(record(orbax_file, std_logging.INFO, "Restoring checkpoint from /w/6/state."))
    assert quiet.filter(record(orbax_file, std_logging.WARNING))
    assert quiet.filter(record(clu_file, std_logging.INFO, "Setting work unit notes: 12 steps/s"))
    assert all(quiet.filter(record(path, std_logging.INFO)) for path in ours)
    assert quiet.filter(record("/home/me/my_script.py", std_logging.INFO))  # a user's own script keeps its lines


def test_entry_points_import_no_tensorflow_before_their_quiet_start():
    """cli.run imports TensorFlow under a filter of its C++ banner; a module that imported it at import time
    (evaluate through clu, data.stats) printed the banner, twice, before that: `evaluate --help` did. The library's
    own first import (vgg_jax.load(...).predict in a script or notebook) is quiet too."""
    modules = [
        "vgg_jax.main",
        "vgg_jax.evaluate",
        "vgg_jax.predict",
        "vgg_jax.convert",
        "vgg_jax.data.stats",
        "vgg_jax.bench",
        "vgg_jax.zoo",
        "experiments.launch",
        "experiments.status",
        "experiments.report",
        "experiments.style_transfer",
    ]
    code = (
        f"import importlib, sys\nfor m in {modules!r}:\n"
        "    importlib.import_module(m)\n    assert 'tensorflow' not in sys.modules, m\n"
        # What vgg_jax.load(...).predict uses on first need: TensorFlow without its banner, no set-up call.
        "from vgg_jax import cli\nassert cli.import_tensorflow().__name__ == 'tensorflow'"
    )
    proc = run_cli("-c", code, env_extra={"JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "oneDNN" not in proc.stderr, proc.stderr[-2000:]


def test_the_training_log_names_its_workdir_compiles_and_saved_checkpoints_without_library_chatter(run):
    """The session's tiny run (2 devices, 6 steps, checkpoint and evaluation at step 6), as its user sees it."""
    log = (run.parent / "main.log").read_text()
    lines = log.splitlines()

    def index(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)

    assert f"workdir {run} (checkpoints, TensorBoard events, results.json)" in log
    assert index("step 1: compiling the train step") < index("train step compiled in")
    assert index(f"saving checkpoint step 6 to {run / 'checkpoints' / '6'}") < index("saved checkpoint step 6")
    assert index("Evaluating model with center at Q=36") < index("compiled the center step at Q=36")
    for noise in ("oneDNN", "absl::InitializeLog", "orbax", "checkpointer.py", "Metadata file", "dataset_info"):
        assert noise not in log, noise
