"""The code blocks of the README and the docs run, so that they cannot rot.

Python blocks are executed in order, one namespace per page, in a scratch directory where the paths the docs use
exist at tiny scale: ``workdirs/demo`` is the session's tiny trained run (a VGG-11, as the demo's),
``ckpt/vgg16_tv`` a random vgg16 saved as a torchvision conversion at width 4, fc 16, crop 32, ``photos/`` and
``more/`` hold images; ``images`` (a list of uint8 images of several sizes) and ``images_rgb_0_255`` (uint8
[2, 48, 64, 3]) are defined. Networks a page builds at full size are built at width 4 / fc 16 instead (``SMALL``:
the same output shapes in a fraction of the time). A line ``name = ...  # (1, 1000)`` is checked:
``name.shape == (1, 1000)``.

Shell blocks: every ``python -m MODULE ...`` command is parsed by that module's own flags, and a launcher command
is planned (every run's config resolved with its overrides), so a renamed flag, a misspelt config field or a
config file that no longer loads fails here; the commands of ``RUN`` are executed on the scratch files. The other
commands are only parsed: they need ImageNet, a TPU or GPU pod, published weights, or hours.

``NOT_RUN``: the Python blocks that are not executed, each with its reason.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiny_runs import save_random_converted

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")), "experiments/README.md"]

NOT_RUN = {  # (page, the block's first line) -> why it is not executed
    (
        "docs/backbone.md",
        'net = caffe.Net("VGG_ILSVRC_16_layers_deploy.prototxt", "VGG_ILSVRC_16_layers.caffemodel", caffe.TEST)',
    ): ("needs pycaffe and the Caffe release's .caffemodel"),
    ("docs/backbone.md", 'model, variables = convert.convert_file("vgg16-397923af.pth", "torchvision", "vgg16")'): (
        "needs torchvision's and Keras' published weights (nothing is downloaded here)"
    ),
}
SMALL = {'models.get_model("vgg16")': 'models.get_model("vgg16", width=4, fc_width=16)'}
RUN = {"vgg_jax.predict"}  # shell commands executed in-process on the scratch files
SHAPE_COMMENT = re.compile(r"^(\w+) = .*#\s*(\([\d, ]+\))")


def blocks(page: str) -> list[tuple[str, int, str]]:
    """(language, line number, code) of each fenced block of a page."""
    text = (REPO / page).read_text()
    found = []
    for m in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
        code = "\n".join(line[len(m.group(1)) :] for line in m.group(3).splitlines())
        found.append((m.group(2), text[: m.start()].count("\n") + 2, code))
    return found


def commands(code: str) -> list[list[str]]:
    """The ``python -m ...`` commands of a shell block (continuation lines joined, ``&&`` chains split, comments
    dropped); templates (``<placeholders>``, a ``...`` for omitted arguments) are left out."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if words[:2] == ["python", "-m"] and not any("<" in w or w == "..." for w in words):
                out.append(words[2:])
    return out


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, run):
    """The paths the docs name, at tiny scale."""
    root = tmp_path_factory.mktemp("docs")
    (root / "workdirs").mkdir()
    (root / "workdirs" / "demo").symlink_to(run)
    save_random_converted(root / "ckpt" / "vgg16_tv", "vgg16", width=4, fc_width=16, crop_size=32)
    rng = np.random.default_rng(0)
    for folder, name, size in (
        ("photos", "a.jpg", (50, 70)),
        ("photos/sub", "b.png", (64, 48)),
        ("more", "c.jpg", (40, 60)),
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / folder / name)
    return root


def namespace() -> dict:
    rng = np.random.default_rng(1)
    return {
        "images": [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((48, 64), (70, 40), (36, 36))],
        "images_rgb_0_255": rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8),
    }


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run(page, scratch, monkeypatch):
    monkeypatch.chdir(scratch)
    scope = namespace()
    for language, line, code in blocks(page):
        if language != "python":
            continue
        first = code.strip().splitlines()[0]
        if (page, first) in NOT_RUN:
            continue
        for full, small in SMALL.items():
            code = code.replace(full, small)
        exec(compile(code, f"{page}:{line}", "exec"), scope)  # noqa: S102  (the project's own docs)
        for text in code.splitlines():
            shape = SHAPE_COMMENT.match(text)
            if shape:
                assert tuple(scope[shape.group(1)].shape) == eval(shape.group(2)), f"{page}:{line}: {text}"  # noqa: S307


def test_not_run_blocks_still_exist():
    """A reason may not outlive its block."""
    firsts = {
        (page, code.strip().splitlines()[0]) for page in PAGES for language, _, code in blocks(page) if code.strip()
    }
    assert set(NOT_RUN) <= firsts


def _parse(module: str, args: list[str]) -> None:
    """``args`` through the module's own flags (a bad one exits 2 with a one-line error)."""
    from vgg_jax import cli

    if module == "experiments.launch":
        from experiments import launch, plan

        options, overrides = launch.parse_args(args)
        plan.plan(launch.build_sweep(options, overrides), "/nonexistent/root")  # every config resolved
        return
    if module == "vgg_jax.bench":
        from vgg_jax import bench

        define = bench.COMMANDS[args[0]][0]
        cli.parse(args[1:], define, module)
        return
    if module == "tests.mutation.run":
        return  # the mutation testing harness (docs/testing.md), not a command of the package
    define = __import__(module, fromlist=["define_flags"]).define_flags
    cli.parse(args, define, module)


def test_shell_commands_parse_and_the_quick_ones_run(scratch, monkeypatch, capsys):
    parsed = 0
    for page in PAGES:
        for language, line, code in blocks(page):
            if language != "bash":
                continue
            for words in commands(code):
                module, args = words[0], words[1:]
                monkeypatch.chdir(REPO)  # config files are named relative to the repository
                try:
                    _parse(module, args)
                except SystemExit as e:
                    pytest.fail(f"{page}:{line}: python -m {shlex.join(words)} does not parse: exit {e.code}")
                parsed += 1
                if module in RUN:
                    monkeypatch.chdir(scratch)
                    __import__(module, fromlist=["main"]).main(args)
    assert parsed >= 35  # the runner found the commands
    preds = (scratch / "preds.csv").read_text().splitlines()  # docs/evaluation.md's predict example ran
    assert preds[0].startswith("file,class1,name1,probability1") and len(preds) == 4
    capsys.readouterr()
