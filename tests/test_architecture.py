"""The modules stay layers (docs/architecture.md): no import cycles, imports only from lower layers,
and loading a config imports no TensorFlow."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# docs/architecture.md: a module may import modules of lower layers only.
LAYERS = {
    "vgg_jax.errors": 0,
    "vgg_jax.hardware": 0,
    "vgg_jax.preprocessing": 0,
    "vgg_jax.cli": 1,
    "vgg_jax.storage": 1,
    "vgg_jax.models": 1,
    "vgg_jax.sharding": 1,
    "vgg_jax.optim": 1,
    "vgg_jax.data": 2,
    "vgg_jax.data.config": 1,
    "vgg_jax.data.demo": 1,
    "vgg_jax.train_step": 2,
    "vgg_jax.checkpoints": 2,
    "vgg_jax.config_checks": 2,
    "vgg_jax.losses": 2,
    "vgg_jax.data.sources": 2,
    "vgg_jax.data.transforms": 2,
    "vgg_jax.data.pipeline": 3,
    "vgg_jax.data.stats": 3,
    "vgg_jax.diagnostics": 3,
    "vgg_jax.classifier": 3,
    "vgg_jax.convert": 3,
    "vgg_jax.rollback": 3,
    "vgg_jax.evaluate": 4,
    "vgg_jax.predict": 4,
    "vgg_jax.zoo": 4,
    "vgg_jax.train": 5,
    "vgg_jax.bench": 5,
    "vgg_jax.main": 6,
    "vgg_jax.preflight": 5,
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def package_imports() -> dict[str, set[str]]:
    """Every vgg_jax module's imports of other vgg_jax modules, at module level or inside functions."""
    modules = {module_name(p): p for p in (REPO / "vgg_jax").rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges[name] |= {t for t in targets if t in modules and t != name}
    return edges


def test_every_module_has_a_layer():
    assert set(package_imports()) - {"vgg_jax"} == set(LAYERS)


def test_no_import_cycles():
    edges = package_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_modules_import_only_lower_layers():
    bad = [
        f"{m} (layer {LAYERS[m]}) imports {t} (layer {LAYERS[t]})"
        for m, targets in package_imports().items()
        if m in LAYERS
        for t in targets
        if t in LAYERS and LAYERS[t] >= LAYERS[m]
    ]
    assert not bad, bad


def test_loading_configs_imports_no_tensorflow_and_no_checkpoints():
    code = (
        "import sys\n"
        "import configs.default, configs.demo, configs.paper, configs.transfer\n"
        "configs.default.get_config(); configs.demo.get_config(); configs.paper.get_config('D,256,tpu')\n"
        "configs.transfer.get_config('vgg16,torchvision')\n"
        "import vgg_jax\n"
        "heavy = ['tensorflow', 'tensorflow_datasets', 'vgg_jax.checkpoints', 'orbax.checkpoint']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout


# docs/architecture.md#storage: a user's path may be gs://, so every file at a user-given location is touched
# through etils.epath (vgg_jax.storage.path) or tf.io.gfile. os, open, shutil, glob, pathlib and PIL/numpy/h5py/
# torch/tarfile readers given the string see "gs://b/x" as a local folder "gs:" (or fail). Readers may take a
# file object (io.BytesIO of the bytes read through epath). These calls touch local files only, by nature:
LOCAL_BY_NATURE = {
    ("experiments/launch.py", "Path(args.scripts_dir"): "the tpu/slurm scripts that this machine's shell runs",
    ("experiments/tpu.py", "tarfile.open(partial"): "the code bundle beside those scripts",
    ("experiments/sweeps.py", "Path(path)"): "experiment configs: Python files that ml_collections imports",
    ("vgg_jax/cli.py", "os.path."): "this machine's files: the NVIDIA driver, the modules log records come from",
}
_OS_FILE_CALLS = {"makedirs", "mkdir", "listdir", "scandir", "walk", "remove", "unlink", "rename", "replace", "rmdir"}
_OS_FILE_CALLS |= {"stat", "chmod", "removedirs", "truncate", "symlink", "link", "utime", "chown"}
_READERS = {"Image.open", "np.load", "np.save", "np.savez", "h5py.File", "torch.load", "torch.save"}
_READERS |= {"load_file", "save_file"}


def raw_file_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) of every call in ``source`` that touches a path as a local one (see LOCAL_BY_NATURE)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name, call = ast.unparse(node.func), ast.unparse(node)
        first = node.args[0] if node.args else None
        file_object = isinstance(first, ast.Call) and ast.unparse(first.func).split(".")[-1] in ("BytesIO", "_file")
        if (
            name == "open"
            or name.startswith("os.path.")
            or (name.startswith("os.") and name[3:] in _OS_FILE_CALLS)
            or (name.startswith("shutil.") and name != "shutil.which")
            or name.split(".")[0] in ("glob", "fcntl")
            or (name in ("Path", "pathlib.Path", "PurePath") and call != "Path(__file__)")
            or (name in _READERS and not file_object)
            or (name == "tarfile.open" and not any(k.arg == "fileobj" for k in node.keywords))
        ):
            found.append((node.lineno, call))
    return found


def test_user_paths_are_touched_only_through_epath():
    bad = []
    for path in sorted([*(REPO / "vgg_jax").rglob("*.py"), *(REPO / "experiments").glob("*.py")]):
        rel = str(path.relative_to(REPO))
        for line, call in raw_file_calls(path.read_text()):
            if not any(rel == f and call.startswith(c) for f, c in LOCAL_BY_NATURE):
                bad.append(f"{rel}:{line}: {call[:100]}")
    assert not bad, "use vgg_jax.storage.path (etils.epath) for user paths: " + "; ".join(bad)


def test_the_check_catches_each_kind_of_raw_call():
    raw = [
        "open(out, 'w')",
        "os.path.abspath(p)",
        "os.makedirs(d)",
        "shutil.copytree(a, b)",
        "Path(out).mkdir()",
        "Image.open(path)",
        "np.load(path)",
        "tarfile.open(path)",
        "glob.glob(p)",
    ]
    fine = ["storage.path(p).read_bytes()", "Image.open(io.BytesIO(b))", "np.load(_file(p))", "Path(__file__)"]
    fine += ["tarfile.open(fileobj=f)", "shutil.which('gcloud')", "os.environ.get('X')", "os.fspath(p)"]
    assert sorted(line for line, _ in raw_file_calls("\n".join(raw))) == list(range(1, len(raw) + 1))
    assert raw_file_calls("\n".join(fine)) == []
