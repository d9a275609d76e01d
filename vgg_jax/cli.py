"""One command-line style for every entry point: absl flags, ml-collections overrides, one-line user errors.

docs/training.md#command-line
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging as std_logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import flags, logging

from vgg_jax.errors import UserError

# Exceptions that mean bad input: ours, and the OS's for a missing or unreadable file.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError, IsADirectoryError)
_HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")

DefineFlags = Callable[[flags.FlagValues, list[str]], None]


def fail(message: str) -> NoReturn:
    """Prints ``error: <message>`` as one line on stderr and exits with status 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(2)


def _unknown_field(error: BaseException, argv: Sequence[str]) -> str | None:
    """'--config.model.widht: no such config field; did you mean --config.model.width?'."""
    text = str(error).replace("\\n", "\n").replace("\\'", "'")
    found = re.search(r"'([^'\n]+)'", text)
    if not found:
        return None
    key = found.group(1)
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        parts = name.split(".")
        if key in parts[1:]:
            path = ".".join(parts[: parts.index(key, 1)])
            fix = re.search(r'Did you mean "([^"]+)"', text)
            hint = (
                f"did you mean --{path}.{fix.group(1)}?"
                if fix
                else f"run with --helpfull to see the fields of --{path}."
            )
            return f"--{name}: no such config field; {hint}"
    return None


def last_override_wins(argv: Sequence[str]) -> list[str]:
    """Drops all but the last ``--section.field=...`` of each field: ml-collections would otherwise append the
    values of a tuple field given twice (``eval_scales=(36,)`` then ``=(20,)`` is ``(36, 20)``), where a later
    override (e.g. a sweep run's, after the common ones) is meant to replace an earlier one."""
    last = {}
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and "." in name and "=" in arg:
            last[name] = i
    return [a for i, a in enumerate(argv) if not (a.startswith("--") and last.get(a.split("=", 1)[0], i) != i)]


def parse(
    argv: Sequence[str] | None, define: DefineFlags, prog: str, doc: str = ""
) -> tuple[flags.FlagValues, list[str]]:
    """Parses ``argv`` (without the program name; default ``sys.argv[1:]``) with the flags ``define``
    puts on a fresh ``FlagValues``; returns them and the positional arguments.

    Help (``--help``, ``--helpfull``) prints and exits 0; a bad flag value or a misspelt config field
    prints one line and exits 2. Each call has its own flags, so commands can run in one process.
    """
    args = last_override_wins(sys.argv[1:] if argv is None else argv)
    full = [prog, *args]
    values = flags.FlagValues()
    flags.DEFINE_bool(
        "verbose",
        False,
        "Show the libraries' log lines and start-up messages, and the traceback of user errors (or set "
        "VGG_JAX_VERBOSE=1).",
        flag_values=values,
    )
    define(values, full)
    if any(a in _HELP for a in args):
        print(f"{doc.strip()}\n\nflags:\n{values.get_help()}" if doc else values.get_help())
        sys.exit(0)
    try:
        rest = values(full)
    except flags.Error as e:
        fail(f"{e}. Run with --helpfull to see the flags.")
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks
        message = _unknown_field(e, full)
        if message is None:
            raise
        fail(message)
    return values, rest[1:]


def verbose(argv: Sequence[str]) -> bool:
    return bool(os.environ.get("VGG_JAX_VERBOSE")) or "--verbose" in argv or "--verbose=true" in argv


# Known-harmless log lines that drown a run's progress: (logger name or '' for any, text in the message).
QUIET = (
    ("", "Unable to initialize backend"),  # JAX probing for a TPU / GPU plugin the machine has no chip for
    ("", "Metadata file does not exist"),  # orbax: item checkpoints carry no _CHECKPOINT_METADATA file
    ("", "has no dataset_info.json"),  # TFDS, about the folder it is about to prepare a dataset in
)

# Code whose INFO lines are progress a user reads: this project, and clu (metric lines, steps/s and ETA).
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
OURS = (_PACKAGE, os.path.join(os.path.dirname(_PACKAGE), "experiments"))
PROGRESS_LIBRARIES = ("clu",)


def _library_dirs() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(installed-library directories, directories whose INFO lines are kept), with a trailing separator."""
    import importlib.util  # noqa: PLC0415
    import site  # noqa: PLC0415
    import sysconfig  # noqa: PLC0415

    paths = sysconfig.get_paths()
    libraries = {paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()}
    kept = list(OURS)
    for name in PROGRESS_LIBRARIES:
        spec = importlib.util.find_spec(name)
        kept += list(spec.submodule_search_locations or []) if spec else []
    return tuple(os.path.join(p, "") for p in libraries), tuple(os.path.join(p, "") for p in kept)


# JAX's CUDA plugin installed where no NVIDIA driver is loaded (the [cuda] extra for compiling without a GPU, the
# test requirements): its start-up fails by design. With a driver, the same failure is news and is kept.
NO_GPU_QUIET = (("jax._src.xla_bridge", "Jax plugin configuration error: Exception when calling jax_plugins.xla_cuda"),)


def has_nvidia_driver() -> bool:
    return os.path.exists("/proc/driver/nvidia/version")


class Quiet(std_logging.Filter):
    """Drops the known-harmless lines of ``QUIET`` and, with ``libraries``, the INFO (and DEBUG) lines of
    installed libraries (orbax's per-save chatter, TFDS, JAX): what is left is this project's progress, clu's
    metric and ETA lines, and every warning and error."""

    def __init__(self, libraries: bool = False) -> None:
        super().__init__()
        self.libraries, self.kept = _library_dirs() if libraries else ((), ())
        self.noise = QUIET + (() if has_nvidia_driver() else NO_GPU_QUIET)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.WARNING and self.libraries:
            path = os.path.abspath(record.pathname)
            if path.startswith(self.libraries) and not path.startswith(self.kept):
                return False
        message = record.getMessage() if record.args else str(record.msg)
        return not any(text in message and (not name or record.name.startswith(name)) for name, text in self.noise)


# Lines TensorFlow's C++ start-up writes straight to stderr, before any log level applies.
TENSORFLOW_BANNER = (
    "All log messages before absl::InitializeLog()",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine",
)
# What JAX's CUDA plugin logs from C++, three times, while jax is imported on a machine without an NVIDIA driver
# (the `cuda` extra, installed there for deviceless GPU compiles: vgg_jax.preflight); the plugin then steps aside.
CUDA_STUB_NOISE = ("All log messages before absl::InitializeLog()", "Could not find cuda drivers on your machine")


@contextlib.contextmanager
def stderr_without(noise: Sequence[str]):
    """Drops the lines containing any of ``noise`` from what is written to file descriptor 2 (where C++
    libraries write) while the block runs; everything else is passed on when it ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(n in line for n in noise)))
            sys.stderr.flush()


def import_jax() -> None:
    """``import jax`` without ``CUDA_STUB_NOISE`` where JAX's CUDA plugin is installed but no NVIDIA driver is
    (a no-op once jax is imported, and elsewhere)."""
    if "jax" in sys.modules or has_nvidia_driver() or importlib.util.find_spec("jax_cuda12_plugin") is None:
        import jax  # noqa: F401, PLC0415

        return
    with stderr_without(CUDA_STUB_NOISE):
        import jax  # noqa: F401, PLC0415


def import_tensorflow() -> Any:
    """``import tensorflow`` without its C++ start-up banner (a no-op once it is imported): for the library's
    own first use of TensorFlow (``vgg_jax.load(...).predict``), so that a notebook needs no set-up."""
    if "tensorflow" not in sys.modules:
        with stderr_without(TENSORFLOW_BANNER):
            import tensorflow  # noqa: F401, PLC0415
    return sys.modules["tensorflow"]


def has_tpu() -> bool:
    """Whether TPU chips are attached: JAX's own PCI check, the one that decides whether it sets libtpu up."""
    from jax._src import hardware_utils  # noqa: PLC0415 (private, but exactly JAX's test; jax is pinned)

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def quiet(tensorflow: bool, libraries: bool = False) -> None:
    """Silences known-harmless start-up noise of an entry point (a CLI or a notebook; never called by the
    library): the log lines in ``QUIET``, absl's "logging before flag parsing" notice, with ``libraries`` the
    INFO lines of installed libraries, and, for commands that use it, TensorFlow's C++ banner (it is imported
    here, under a filter)."""
    flags.FLAGS.mark_as_parsed()  # our flags live on per-command FlagValues; absl's global ones are unused
    logging.get_absl_handler().addFilter(Quiet(libraries))
    std_logging.getLogger("absl").addFilter(Quiet())  # where no absl handler prints (a notebook's kernel)
    if not has_tpu():
        # libtpu installed where there is no TPU (the [tpu] extra, the test requirements): JAX still probes
        # it, and its start-up prints a false INVALID_ARGUMENT error unless it is told a slice and a host.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if tensorflow:
        import_tensorflow()


def stream_output() -> None:
    """Line-buffered stdout: a command's printed lines reach a log file (``> log``, ``nohup``) as they are
    printed, not when a buffer fills or the program exits. absl's log lines go to stderr, flushed per line."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)


def run(main: Callable[[list[str]], Any], tensorflow: bool = False) -> None:
    """The ``__main__`` of an entry point: output streamed line by line, absl logging at INFO showing this
    project's progress (and clu's) without known start-up noise or, unless ``--verbose``, libraries' INFO
    chatter, then ``main(sys.argv[1:])``. A user error ends the program with one line and status 2 (the
    traceback with ``--verbose``); other exceptions keep their traceback. ``tensorflow``: the command uses
    TensorFlow."""
    argv = sys.argv[1:]
    loud = verbose(argv)
    stream_output()
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    quiet(tensorflow, libraries=not loud)
    try:
        main(argv)
    except USER_ERRORS as e:
        if loud:
            raise
        fail(str(e) if not isinstance(e, OSError) or not e.filename else f"{e.strerror}: {e.filename}")
