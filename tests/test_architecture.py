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
    "vgg_jax.classifier": 3,
    "vgg_jax.convert": 3,
    "vgg_jax.rollback": 3,
    "vgg_jax.evaluate": 4,
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
