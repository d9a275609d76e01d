"""Benchmarks: ``python -m vgg_jax.bench {input,eval,train,memory,checkpoint} [--flags]``; one function each.

docs/benchmarks.md
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from absl import flags

from vgg_jax import cli, hardware, storage

# vgg_jax.models.REMAT_POLICIES, named here so that parsing the command line does not import jax.
REMAT_CHOICES = ("none", "convs", "blocks")
_PHOTO_SIZES = ((375, 500), (333, 500), (500, 375))  # (h, w) of typical ImageNet photos, landscape first


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] with a natural-image-like 1/f amplitude spectrum, correlated colour, edges."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(height, width))
    phase = rng.uniform(0, 2 * np.pi, (3, *amplitude.shape))
    fields = np.fft.irfft2(amplitude * np.exp(1j * phase), s=(height, width))  # [3, h, w]
    fields /= fields.std(axis=(1, 2), keepdims=True)
    mixing = np.array([[1.0, 0.3, 0.1], [1.0, -0.1, 0.3], [1.0, -0.3, -0.3]])  # luminance dominates
    image = np.einsum("ij,jhw->hwi", mixing * [40.0, 15.0, 10.0], fields) + rng.uniform(80, 170, 3)
    for _ in range(rng.integers(3, 8)):  # occluding shapes give sharp edges
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        y1, x1 = y0 + rng.integers(20, height // 2), x0 + rng.integers(20, width // 2)
        image[y0:y1, x0:x1] = 0.5 * image[y0:y1, x0:x1] + rng.uniform(0, 128, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_jpegs(cache_dir: str, num_images: int, quality: int = 90, seed: int = 0) -> list[str]:
    """Write (once) ``num_images`` ImageNet-like JPEGs into ``cache_dir``; returns their paths."""
    from vgg_jax.data.demo import encode_jpeg

    cache = storage.path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        path = cache / f"img_{i:05d}_q{quality}.jpg"
        height, width = _PHOTO_SIZES[i % len(_PHOTO_SIZES)]
        image = natural_image(rng, height, width)  # drawn even when cached, so the set is fixed
        if not path.exists():
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(encode_jpeg(image, quality))
            tmp.replace(path)
        paths.append(os.fspath(path))
    return paths


def _time_map(encoded: Sequence[bytes], fn: Callable, threads: int, epochs: int) -> tuple[float, float, int]:
    """Wall and process-CPU seconds for ``fn(bytes, seed)`` over ``epochs`` passes through tf.data."""
    import tensorflow as tf

    n = len(encoded)
    ds = tf.data.Dataset.zip(
        tf.data.Dataset.from_tensor_slices(list(encoded)).repeat(epochs),
        tf.data.Dataset.range(n * epochs),
    )
    ds = ds.map(lambda x, i: fn(x, tf.stack([tf.constant(0, tf.int64), i])), num_parallel_calls=threads)
    ds = ds.prefetch(64)  # the map threads never wait for the consumer
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads  # one core really means one core
    options.threading.max_intra_op_parallelism = 1
    options.autotune.enabled = False
    ds = ds.with_options(options)
    # Consume in C++ and read one value per image, so that no work can be pruned away.
    consume = lambda acc, x: acc + tf.cast(x[0, 0, 0], tf.int64)  # noqa: E731
    wall, cpu = time.perf_counter(), time.process_time()
    ds.reduce(tf.constant(0, tf.int64), consume).numpy()
    return time.perf_counter() - wall, time.process_time() - cpu, n * epochs


def bench_input(args: types.SimpleNamespace) -> None:
    """Decode-only vs the full training transform, images/s per core; prints a markdown table.

    Runs are interleaved (every pipeline once per round) and the fastest round is kept, so load
    from other processes on a shared machine hits all pipelines alike. "Images per CPU-second"
    counts this process's CPU time, the per-core figure least disturbed by such load.
    """
    import tensorflow as tf

    from vgg_jax.data import transforms
    from vgg_jax.data.config import TransformConfig

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    paths = make_jpegs(args.cache_dir, args.num_images)
    encoded = [storage.path(p).read_bytes() for p in paths]
    transform_config = TransformConfig(crop_size=224, scale_min=args.scale_min, scale_max=args.scale_max)
    train = f"train_view (S in [{args.scale_min}, {args.scale_max}], crop 224, flip, PCA)"
    decode = f"decode only (decode_jpeg, dct_method={transforms.DCT_METHOD})"
    pipelines = {
        decode: lambda x, seed: tf.io.decode_jpeg(x, channels=3, dct_method=transforms.DCT_METHOD),
        "decode only (decode_jpeg, dct_method=INTEGER_FAST)": lambda x, seed: tf.io.decode_jpeg(
            x, channels=3, dct_method="INTEGER_FAST"
        ),
        train: lambda x, seed: transforms.train_view(x, seed, transform_config),
    }
    runs = {(name, t): [] for name in pipelines for t in args.threads}
    for name, threads in runs:
        _time_map(encoded[:32], pipelines[name], threads, 1)  # warm-up: tracing, thread start
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, threads in runs:
            runs[name, threads].append(_time_map(encoded, pipelines[name], threads, args.epochs))
    kib = sum(map(len, encoded)) / len(encoded) / 1024
    print(
        f"{len(encoded)} JPEGs ({', '.join(f'{w}x{h}' for h, w in _PHOTO_SIZES)}, quality 90, mean {kib:.0f} KiB) "
        f"in {args.cache_dir}; best of {args.repeats} interleaved runs of {args.epochs} epochs; "
        f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print("| pipeline | map threads | images/s | images/s per thread | images per CPU-second |")
    print("|---|---|---|---|---|")
    rates = {}  # (name, threads) -> (wall img/s per thread, img per CPU-second)
    for (name, threads), results in runs.items():
        count = results[0][2]
        wall, cpu = min(r[0] for r in results), min(r[1] for r in results)
        rates[name, threads] = (count / wall / threads, count / cpu)
        print(f"| {name} | {threads} | {count / wall:.0f} | {count / wall / threads:.0f} | {count / cpu:.0f} |")
    for threads in args.threads:
        (dw, dc), (tw, tc) = rates[decode, threads], rates[train, threads]
        print(
            f"map threads={threads}: train_view / decode-only time per image = {dw / tw:.2f} (wall), "
            f"{dc / tc:.2f} (CPU); {args.target} img/s needs {args.target / tw:.1f} cores (wall rate) or "
            f"{args.target / tc:.1f} (CPU rate)"
        )


def bench_eval(args: types.SimpleNamespace) -> None:
    """Evaluation cost per image: dense (image + flip per scale) vs multi-crop (50 crops per scale).

    Times the jitted posterior functions of ``vgg_jax.evaluate`` on device-resident random inputs
    (the input pipeline is not included): a dense canvas of (Q, ceil32(4/3 Q)) per scale (a
    landscape ImageNet photo) and 50 crops per scale. Best of ``repeats`` timed calls per scale,
    in wall time and in this process's CPU time (all threads; steadier on a shared machine).
    """
    import functools

    import jax
    import jax.numpy as jnp

    from vgg_jax import evaluate, models
    from vgg_jax.data.config import MULTICROP_GRID
    from vgg_jax.data.pipeline import dense_canvases

    model = models.get_model(
        args.model,
        num_classes=args.num_classes,
        width=args.width,
        fc_width=args.fc_width,
        crop_size=args.crop_size,
        dtype=args.dtype,
    )
    variables = models.init_variables(model, jax.random.key(0))
    scales = [int(q) for q in args.scales.split(",")]
    b, c = args.batch, args.crop_size
    key = jax.random.key(1)

    def inputs(method: str, q: int) -> tuple[dict, int, int]:
        """(batch, views per image, MACs per image) at scale q."""
        if method == "dense":
            _, w = dense_canvases(q, [4 / 3])[0]  # a landscape ImageNet photo
            batch = {"image": jax.random.normal(key, (b, q, w, 3)), "height": jnp.full(b, q), "width": jnp.full(b, w)}
            return batch, 2, 2 * models.forward_macs(model, (q, w))
        batch = {"image": jax.random.normal(key, (b, 2 * MULTICROP_GRID**2, c, c, 3))}
        return batch, batch["image"].shape[1], batch["image"].shape[1] * models.forward_macs(model)

    print(
        f"{args.model} width {args.width} fc_width {args.fc_width} crop {c} {args.dtype}, {b} images per call, "
        f"scales {scales}, on {jax.devices()[0].device_kind} x{jax.device_count()}; best of {args.repeats}"
    )
    print(
        "| protocol | views per image | GMACs per image | ms per image | images/s | CPU-ms per image | "
        "time vs dense (wall, CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    dense_ms = dense_cpu = None
    for method in ("dense", "multicrop"):
        step = jax.jit(functools.partial(evaluate.POSTERIORS[method], model.apply))
        seconds, cpu_seconds, views, macs = 0.0, 0.0, 0, 0
        for q in scales:
            batch, n, m = inputs(method, q)
            step(variables, batch).block_until_ready()  # compile
            times = [_timed(lambda: step(variables, batch).block_until_ready()) for _ in range(args.repeats)]
            seconds += min(t[0] for t in times)
            cpu_seconds += min(t[1] for t in times)
            views, macs = views + n, macs + m
        ms, cpu_ms = 1000 * seconds / b, 1000 * cpu_seconds / b
        dense_ms, dense_cpu = dense_ms or ms, dense_cpu or cpu_ms
        print(
            f"| {method} ({len(scales)} scales) | {views} | {macs / 1e9:.2f} | {ms:.1f} | {1000 / ms:.1f} | "
            f"{cpu_ms:.1f} | {ms / dense_ms:.1f}x, {cpu_ms / dense_cpu:.1f}x |"
        )


# -- train, memory: the training step --------------------------------------------------------------

_MARK = "@bench@"  # prefix of the worker's protocol lines on stdout


def _train_model(args: types.SimpleNamespace):
    from vgg_jax import models

    return models.get_model(
        args.model,
        num_classes=args.num_classes,
        width=args.width,
        fc_width=args.fc_width,
        crop_size=args.image_size,
        dtype=args.dtype,
        remat=args.remat,
    )


def _optimizer_config():
    """configs/default.py's SGD (momentum 0.9, L2 5e-4 on kernels) at a constant learning rate."""
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            learning_rate=1e-2,
            momentum=0.9,
            nesterov=False,
            weight_decay=5e-4,
            decay_biases=False,
            schedule="constant",
            decay_factor=0.1,
            step_boundaries=[],
            warmup_steps=0,
            trainable=".*",
        )
    )


def _pin_threads(threads: int | None) -> int:
    """Restricts this process to its first ``threads`` CPUs (XLA sizes its pool by the affinity)."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads:
        if threads > len(cpus):
            raise ValueError(f"--threads={threads} but only {len(cpus)} CPUs are available to this process.")
        os.sched_setaffinity(0, cpus[:threads])
    return threads or len(cpus)


def _peak_memory() -> tuple[int, str]:
    """The process's peak memory: the device allocator's peak where it reports one, else peak RSS."""
    import resource

    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def measured_matmul_tflops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
    """Best TFLOP/s of an n x n x n matrix product under jit: the measured peak of a CPU."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready())[0] for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _abstract_train(args: types.SimpleNamespace, batch: int):
    """(jitted train step, abstract state, abstract batch, model, optimizer) for ``batch`` images per device."""
    import jax
    import jax.numpy as jnp

    from vgg_jax import optim, sharding
    from vgg_jax.train_step import abstract_train_state, jit_train_step

    model = _train_model(args)
    mesh = sharding.make_mesh()
    tx = optim.make_optimizer(_optimizer_config(), 1)
    state, shardings = abstract_train_state(model, tx, mesh)
    n, size, data = batch * jax.device_count(), args.image_size, sharding.batch_sharding(mesh)
    images = jax.ShapeDtypeStruct((n, size, size, 3), jnp.float32, sharding=data)
    batch_spec = {"image": images, "label": jax.ShapeDtypeStruct((n,), jnp.int32, sharding=data)}
    step = jit_train_step(shardings, data, args.accum_steps)
    return step, state, batch_spec, model, tx


def _xla_memory(compiled) -> dict[str, int]:
    """Per-device bytes of XLA's buffer assignment; ``peak`` = arguments + outputs - aliased + temporaries."""
    m = compiled.memory_analysis()
    sizes = {
        "arguments": m.argument_size_in_bytes,
        "outputs": m.output_size_in_bytes,
        "aliased": m.alias_size_in_bytes,
        "temporaries": m.temp_size_in_bytes,
    }
    sizes["peak"] = sizes["arguments"] + sizes["outputs"] - sizes["aliased"] + sizes["temporaries"]
    return sizes


class JaxTrainStep:
    """vgg_jax's train step (``jit_train_step``, data-parallel over every device) on a fixed batch.

    The batch is random images and labels made on the device: the input pipeline is not timed.
    """

    def __init__(self, args: types.SimpleNamespace, batch: int):
        import jax

        from vgg_jax.train_step import create_train_state

        step, state_spec, batch_spec, self.model, tx = _abstract_train(args, batch)
        self.images = batch_spec["image"].shape[0]
        shardings = jax.tree_util.tree_map(lambda s: s.sharding, state_spec)
        data = batch_spec["image"].sharding
        self.state = jax.jit(lambda rng: create_train_state(self.model, tx, rng), out_shardings=shardings)(
            jax.random.PRNGKey(0)
        )
        make_batch = jax.jit(
            lambda key: {
                "image": jax.random.normal(key, batch_spec["image"].shape),
                "label": jax.random.randint(key, batch_spec["label"].shape, 0, self.model.num_classes),
            },
            out_shardings=data,
        )
        self.batch = make_batch(jax.random.PRNGKey(1))
        start = time.perf_counter()
        self.compiled = step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.xla_memory = _xla_memory(self.compiled)
        self.device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"

    def step(self) -> None:
        import jax

        self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(self.state)

    def loss(self) -> float:
        return float(self.metrics.compute()["loss"])


class TorchTrainStep:
    """The same network and SGD step in PyTorch (channels-last float32): the CPU reference."""

    def __init__(self, args: types.SimpleNamespace, batch: int):
        import torch

        model = self.model = _train_model(args)
        torch.manual_seed(0)
        nn, layers, channels = torch.nn, [], 3
        for block, kernel_sizes in enumerate(model.stages, start=1):
            features = model.block_features(block)
            for k in kernel_sizes:
                layers += [nn.Conv2d(channels, features, k, padding=k // 2), nn.ReLU(inplace=True)]
                channels = features
            layers.append(nn.MaxPool2d(2, 2))
        layers.append(nn.Flatten())
        for fan_in in (channels * model.fc6_window**2, model.fc_width):
            layers += [nn.Linear(fan_in, model.fc_width), nn.ReLU(inplace=True), nn.Dropout(model.dropout_rate)]
        layers.append(nn.Linear(model.fc_width, model.num_classes))
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        kernels = [p for p in self.net.parameters() if p.ndim > 1]
        biases = [p for p in self.net.parameters() if p.ndim == 1]
        self.opt = torch.optim.SGD(
            [{"params": kernels, "weight_decay": 5e-4}, {"params": biases, "weight_decay": 0.0}], lr=1e-2, momentum=0.9
        )
        self.images = batch
        self.x = torch.randn(batch, 3, args.image_size, args.image_size).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, model.num_classes, (batch,))
        self.compile_s = _timed(self.step)[0]  # the first step: allocations, oneDNN primitive creation
        self.xla_memory, self.device = None, "PyTorch " + torch.__version__

    def step(self) -> None:
        import torch

        self.opt.zero_grad(set_to_none=True)
        self._loss = torch.nn.functional.cross_entropy(self.net(self.x), self.y)
        self._loss.backward()
        self.opt.step()

    def loss(self) -> float:
        return float(self._loss.detach())


def _summarise_trace(trace_dir: str, hlo_text: str, steps: int, top: int = 15) -> None:
    """Prints the ops that took the most time in a ``jax.profiler`` trace, per step, with their HLO.

    Device planes (GPU/TPU) where there are any, else XLA:CPU's worker threads.
    """
    import re
    from collections import Counter

    import jax

    traces = [d / n for d, _, names in storage.path(trace_dir).walk() for n in names if n.endswith(".xplane.pb")]
    if not traces:
        print(f"no trace found under {trace_dir}")
        return
    newest = max(traces, key=lambda p: p.stat().mtime)
    profile = jax.profiler.ProfileData.from_serialized_xspace(newest.read_bytes())
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    if planes:  # GPU/TPU: the per-op line of each device
        lines = [line for p in planes for line in p.lines if line.name == "XLA Ops"]
    else:  # XLA:CPU: the thunks on its worker threads, without the executor's own spans
        lines = [
            line
            for p in profile.planes
            if p.name.startswith("/host:CPU")
            for line in p.lines
            if "XLAEigen" in line.name
        ]
    totals: Counter = Counter()
    for line in lines:
        for event in line.events:
            if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                totals[event.name] += event.duration_ns
    if not totals:
        print(f"no op events found in {newest}")
        return
    defs = {}
    for hlo_line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(", hlo_line)
        if m:
            target = re.search(r'custom_call_target="([^"]+)"|kind=(k\w+)', hlo_line)
            what = m.group(3) + (f" {target.group(1) or target.group(2)}" if target else "")
            defs.setdefault(m.group(1), f"{what} -> {m.group(2)}")
    busy = sum(totals.values())
    print(
        f"profile {newest}: {busy / 1e6 / steps:.1f} ms of op time per step "
        f"({'device' if planes else 'XLA:CPU threads, summed'}); top {top}:"
    )
    print("| op | ms/step | share | HLO |\n|---|---|---|---|")
    for name, ns in totals.most_common(top):
        print(f"| {name} | {ns / 1e6 / steps:.2f} | {ns / busy:.1%} | {defs.get(name, '')[:110]} |")


def _profile(runner: JaxTrainStep, trace_dir: str, steps: int) -> None:
    import jax

    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        runner.step()
    jax.profiler.stop_trace()
    _summarise_trace(trace_dir, runner.compiled.as_text(), steps)


def _peak_tflops(args: types.SimpleNamespace) -> tuple[float | None, str]:
    """MFU's denominator: --peak_tflops, else the bf16 datasheet figure, else a measured CPU matmul."""
    import jax

    if args.peak_tflops:
        return args.peak_tflops, "stated"
    kind = jax.devices()[0].device_kind
    if jax.default_backend() == "cpu":
        return measured_matmul_tflops(args.dtype) * jax.device_count(), f"measured {args.dtype} matmul"
    peak = hardware.peak_tflops(kind)
    if peak and args.dtype == "bfloat16":
        return peak * jax.device_count(), "bf16 datasheet"
    return None, f"unknown for {kind}: pass --peak_tflops"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def bench_train(args: types.SimpleNamespace) -> None:
    """Train-step time, images/s, MFU and peak memory; ``--compare_torch`` runs PyTorch beside it.

    MFU counts the model's FLOPs (``3 x 2 x forward_macs`` per image; remat's recomputation is not
    counted). Timed steps block on the new state; the median is reported.
    """
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    threads = _pin_threads(args.threads)
    if args.worker:
        return _serve(args, threads)
    if args.compare_torch or args.compare_xla_flags is not None:
        return _compare(args, threads)
    import jax

    from vgg_jax import models

    peak, peak_source = _peak_tflops(args)
    print(
        f"{args.model} {args.image_size}px {args.dtype} remat={args.remat} accum={args.accum_steps} on "
        f"{jax.devices()[0].device_kind} x{jax.device_count()} ({threads} host threads), jax {jax.__version__}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; median of {args.steps} steps after {args.warmup}; "
        f"peak {f'{peak:.3g} TFLOP/s' if peak else '?'} ({peak_source}); load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| batch | step ms (median) | min-max ms | img/s | TFLOP/s | MFU | peak memory | XLA estimate "
        "| compile s | loss |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    runner = None
    for batch in sorted(args.batch):
        runner = None  # free the previous state first
        runner = JaxTrainStep(args, batch)
        for _ in range(args.warmup):
            runner.step()
        times = [_timed(runner.step)[0] for _ in range(args.steps)]
        median = float(np.median(times))
        tflops = runner.images * models.train_flops_per_image(runner.model) / median / 1e12
        mem, source = _peak_memory()
        mfu = f"{tflops / peak:.1%}" if peak else "-"
        print(
            f"| {runner.images} | {median * 1e3:.1f} | {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} | "
            f"{runner.images / median:.1f} | {tflops:.2f} | {mfu} | {_gb(mem)} ({source}) | "
            f"{_gb(runner.xla_memory['peak'])} | {runner.compile_s:.1f} | {runner.loss():.3f} |",
            flush=True,
        )
    if args.profile_dir and runner is not None:
        _profile(runner, args.profile_dir, args.profile_steps)


def _serve(args: types.SimpleNamespace, threads: int) -> None:
    """Worker side of --compare_torch: build, then one timed step per 'step' line on stdin."""
    import json

    from vgg_jax import models

    if args.worker == "torch":
        import torch

        torch.set_num_threads(threads)
        runner = TorchTrainStep(args, args.batch[0])
    else:
        runner = JaxTrainStep(args, args.batch[0])
    flops = runner.images * models.train_flops_per_image(runner.model)
    peak = _peak_tflops(args) if args.worker == "jax" else (None, "")
    print(
        _MARK,
        json.dumps(
            {
                "compile_s": runner.compile_s,
                "device": runner.device,
                "flops": flops,
                "peak": peak,
                "xla_memory": runner.xla_memory,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        if line.strip() != "step":
            break
        print(_MARK, *_timed(runner.step), flush=True)
    print(_MARK, json.dumps({"peak_memory": _peak_memory()[0], "loss": runner.loss()}), flush=True)


def _compare(args: types.SimpleNamespace, threads: int) -> None:
    """Runs the JAX step (and variants) and the PyTorch step in worker processes, interleaved."""
    import json
    import subprocess

    if len(args.batch) != 1:
        raise ValueError("Side-by-side comparisons time one batch size: pass a single --batch.")
    model = _train_model(args)
    if args.compare_torch and (
        model.lrn or model.batch_norm or args.dtype != "float32" or args.remat != "none" or args.accum_steps != 1
    ):
        raise ValueError(
            "The PyTorch reference is the plain float32 network (no LRN, batch norm, remat or "
            "accumulation): drop --compare_torch or those options."
        )
    argv = [
        "train",
        f"--model={args.model}",
        f"--batch={args.batch[0]}",
        f"--dtype={args.dtype}",
        f"--image_size={args.image_size}",
        f"--width={args.width}",
        f"--fc_width={args.fc_width}",
        f"--num_classes={args.num_classes}",
        f"--remat={args.remat}",
        f"--accum_steps={args.accum_steps}",
        f"--threads={threads}",
    ] + ([f"--peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])
    xla_flags = os.environ.get("XLA_FLAGS", "")
    variants = {"vgg_jax": ("jax", xla_flags)}
    if args.compare_xla_flags is not None:
        variants[f"vgg_jax, XLA_FLAGS={args.compare_xla_flags!r}"] = ("jax", args.compare_xla_flags)
    if args.compare_torch:
        variants["PyTorch"] = ("torch", xla_flags)

    def ask(proc: subprocess.Popen, command: str | None = None) -> str:
        if command:
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        for line in proc.stdout:
            if line.startswith(_MARK):
                return line[len(_MARK) :].strip()
        raise RuntimeError(f"benchmark worker exited with code {proc.wait()}; its error is above.")

    workers, info = {}, {}
    for name, (framework, worker_xla_flags) in variants.items():  # one at a time: compiles do not overlap
        env = dict(os.environ, XLA_FLAGS=worker_xla_flags)
        workers[name] = subprocess.Popen(
            [sys.executable, "-m", "vgg_jax.bench", *argv, f"--worker={framework}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        info[name] = json.loads(ask(workers[name]))
    times = {name: [] for name in workers}
    load = os.getloadavg()[0]
    for round_ in range(args.warmup + args.steps):  # A B C A B C ...: every framework sees the same load
        for name, proc in workers.items():
            wall, cpu = map(float, ask(proc, "step").split())
            if round_ >= args.warmup:
                times[name].append((wall, cpu))
    for name, proc in workers.items():
        info[name] |= json.loads(ask(proc, "quit"))
        proc.wait()
    peak, source = info["vgg_jax"]["peak"]
    print(
        f"{args.model} {args.image_size}px {args.dtype}, batch {args.batch[0]}, {threads} threads each, on "
        f"{info['vgg_jax']['device']}; {args.steps} interleaved rounds after {args.warmup}; load "
        f"{load:.1f} before, {os.getloadavg()[0]:.1f} after; MFU vs {peak or 0:.3f} TFLOP/s ({source})"
    )
    print(
        "| step | step ms (median) | min-max ms | CPU ms per step (median) | img/s | MFU | peak RSS | first step s "
        "| loss |\n|---|---|---|---|---|---|---|---|---|"
    )
    medians = {name: np.median(results, axis=0) for name, results in times.items()}  # (wall, cpu)
    for name, results in times.items():
        (wall, cpu), i, walls = medians[name], info[name], [r[0] for r in results]
        mfu = f"{i['flops'] / wall / 1e12 / peak:.1%}" if peak else "-"
        print(
            f"| {name} | {wall * 1e3:.0f} | {min(walls) * 1e3:.0f}-{max(walls) * 1e3:.0f} | {cpu * 1e3:.0f} | "
            f"{args.batch[0] / wall:.2f} | {mfu} | {_gb(i['peak_memory'])} | {i['compile_s']:.1f} | "
            f"{i['loss']:.3f} |"
        )
    if args.compare_torch:
        reference = times["PyTorch"]
        for name in [n for n in times if n != "PyTorch"]:
            per_round = np.median([a[0] / b[0] for a, b in zip(times[name], reference)])
            wall, cpu = medians[name] / medians["PyTorch"]
            print(
                f"{name} / PyTorch step time: {wall:.2f} (ratio of medians), {per_round:.2f} (median of "
                f"per-round ratios), {cpu:.2f} (CPU time)"
            )


def count_convolutions(hlo_text: str) -> int:
    """Convolutions in an optimised HLO module: XLA's own (CPU) and cuDNN custom calls (GPU)."""
    import re

    return len(re.findall(r"= \S+ convolution\(|custom_call_target=\"__cudnn\$conv", hlo_text))


def bench_memory(args: types.SimpleNamespace) -> None:
    """XLA's memory plan of the train step per remat policy and batch (compiled, never run), and the
    largest batch per device that fits ``--budget_gb``, from the per-image slope of the two largest.
    The convolution count of the compiled step shows whether the compiler kept remat's recomputation."""
    import jax

    print(
        f"{args.model} {args.image_size}px {args.dtype}, per device on {jax.devices()[0].device_kind}; "
        f"XLA buffer assignment (compile only); budget {args.budget_gb} GB"
    )
    print(
        "| remat | batch | arguments | temporaries | peak | temporaries per image | convolutions | compile s |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    fits = []
    for remat in args.remat:
        rows = []
        for batch in sorted(args.batch):
            step, state, batch_spec, _, _ = _abstract_train(
                types.SimpleNamespace(**{**vars(args), "remat": remat}), batch
            )
            start = time.perf_counter()
            compiled = step.lower(state, batch_spec).compile()
            mem = _xla_memory(compiled)
            rows.append((batch, mem))
            print(
                f"| {remat} | {batch} | {_gb(mem['arguments'])} | {_gb(mem['temporaries'])} | {_gb(mem['peak'])} | "
                f"{mem['temporaries'] / batch / 1e6:.1f} MB | {count_convolutions(compiled.as_text())} | "
                f"{time.perf_counter() - start:.1f} |",
                flush=True,
            )
        if len(rows) >= 2:
            (b0, m0), (b1, m1) = rows[-2], rows[-1]
            slope = (m1["peak"] - m0["peak"]) / (b1 - b0)
            fixed = m1["peak"] - slope * b1
            fits.append(
                f"remat={remat}: {slope / 1e6:.1f} MB per image + {_gb(fixed)} fixed -> "
                f"batch {int((args.budget_gb * 1e9 - fixed) // slope)} per device in {args.budget_gb} GB"
            )
    print("\n".join(fits))


def bench_checkpoint(args: types.SimpleNamespace) -> None:
    """Save and restore time of a full-size train state through the run's ``Checkpointer`` (SHA-256 digest of
    every file written at save, verified before restore) against the same orbax manager without digests.
    Runs are interleaved; the median of ``repeats`` is reported."""
    import jax
    import orbax.checkpoint as ocp

    from vgg_jax import checkpoints, models, optim, sharding
    from vgg_jax.train_step import abstract_train_state, create_train_state

    model = models.get_model(args.model)
    tx = optim.make_optimizer(_optimizer_config(), 1)
    abstract, shardings = abstract_train_state(model, tx, sharding.make_mesh())
    state = jax.jit(lambda r: create_train_state(model, tx, r), out_shardings=shardings)(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    size = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    root = storage.path(args.dir or tempfile.gettempdir()) / f"vgg_jax_bench_ckpt_{uuid.uuid4().hex[:8]}"
    data_state, meta = {"epoch": 0, "position": 0}, {"step": 1}

    def plain_manager(directory: str) -> ocp.CheckpointManager:
        handlers = {
            checkpoints.STATE: ocp.StandardCheckpointHandler(),
            checkpoints.DATA: checkpoints.IteratorStateHandler(),
            checkpoints.META: ocp.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(directory, item_handlers=handlers)

    def run(variant: str, i: int) -> tuple[float, float]:
        directory = root / f"{variant}-{i}"
        if variant == "digests":
            ckpt = checkpoints.Checkpointer(directory, keep=1, keep_best=0)
            save = lambda: ckpt.save(1, state, data_state, meta)  # noqa: E731
            manager = ckpt.manager

            def restore():
                assert not checkpoints.verify_step(directory / "1")
                return ckpt.restore(1, abstract)[0]
        else:
            manager = plain_manager(directory)
            items = {
                checkpoints.STATE: ocp.args.StandardSave(state),
                checkpoints.META: ocp.args.JsonSave(meta),
                checkpoints.DATA: checkpoints.IteratorStateSave(data_state),
            }
            save = lambda: manager.save(1, args=ocp.args.Composite(**items))  # noqa: E731

            def restore():
                args_ = {
                    checkpoints.STATE: ocp.args.StandardRestore(abstract),
                    checkpoints.META: ocp.args.JsonRestore(),
                }
                return manager.restore(1, args=ocp.args.Composite(**args_))[checkpoints.STATE]

        saved = _timed(lambda: (save(), manager.wait_until_finished()))[0]
        restored = _timed(lambda: jax.block_until_ready(restore()))[0]
        (ckpt if variant == "digests" else manager).close()
        directory.rmtree()
        return saved, restored

    times = {"plain orbax": [], "digests": []}
    try:
        for i in range(args.repeats):
            for variant in times:
                times[variant].append(run(variant, i))
    finally:
        if root.exists():
            root.rmtree()
    print(
        f"{args.model} train state (params + momentum): {size / 1e9:.2f} GB, float32, in "
        f"{args.dir or tempfile.gettempdir()}; median of {args.repeats} interleaved runs; load {os.getloadavg()[0]:.1f}"
    )
    print("| checkpointer | save until finished (s) | restore (s) | save GB/s | restore GB/s |\n|---|---|---|---|---|")
    for variant, results in times.items():
        save, restore = np.median(results, axis=0)
        print(f"| {variant} | {save:.2f} | {restore:.2f} | {size / 1e9 / save:.2f} | {size / 1e9 / restore:.2f} |")
    (ps, pr), (ds, dr) = (np.median(times[v], axis=0) for v in times)
    print(f"digests / plain: save {ds / ps:.2f}x, restore (with verification) {dr / pr:.2f}x")


def _define_train_flags(values: flags.FlagValues, batch: str) -> None:
    flags.DEFINE_string("model", "vgg16", "vgg11 ... vgg19_bn, or the paper's letters.", flag_values=values)
    flags.DEFINE_list("batch", batch, "Images per device, comma-separated (several: one row each).", flag_values=values)
    flags.DEFINE_string("dtype", "float32", "Computation dtype: float32 or bfloat16.", flag_values=values)
    flags.DEFINE_integer("image_size", 224, "Training crop side (the model's crop size).", flag_values=values)
    flags.DEFINE_integer("width", 64, "Channels of block 1 (64: the paper's size).", flag_values=values)
    flags.DEFINE_integer("fc_width", 4096, "Channels of fc6 and fc7.", flag_values=values)
    flags.DEFINE_integer("num_classes", 1000, "Classes of fc8.", flag_values=values)
    flags.DEFINE_integer("accum_steps", 1, "Gradient-accumulation micro-batches per step.", flag_values=values)


def _define_input(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string(
        "cache_dir",
        os.fspath(storage.path(tempfile.gettempdir()) / "vgg_jax_bench_jpegs"),
        "Where the generated JPEGs are kept between runs.",
        flag_values=values,
    )
    flags.DEFINE_integer("num_images", 300, "JPEGs to time.", flag_values=values)
    flags.DEFINE_list("threads", ["1", "2"], "num_parallel_calls values, comma-separated.", flag_values=values)
    flags.DEFINE_integer("epochs", 2, "Passes over the images per timed run.", flag_values=values)
    flags.DEFINE_integer("repeats", 3, "Timed runs; the fastest is reported.", flag_values=values)
    flags.DEFINE_integer("scale_min", 256, "Training scale S, lower end.", flag_values=values)
    flags.DEFINE_integer("scale_max", 512, "Training scale S, upper end.", flag_values=values)
    flags.DEFINE_integer("target", 5000, "img/s to feed (one H100 on VGG-16).", flag_values=values)


def _define_eval(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("model", "vgg16", "vgg11 ... vgg19_bn, or the paper's letters.", flag_values=values)
    flags.DEFINE_integer("width", 64, "Channels of block 1 (64: the paper's size).", flag_values=values)
    flags.DEFINE_integer("fc_width", 4096, "Channels of fc6 and fc7.", flag_values=values)
    flags.DEFINE_integer("crop_size", 224, "The model's crop size.", flag_values=values)
    flags.DEFINE_integer("num_classes", 1000, "Classes of fc8.", flag_values=values)
    flags.DEFINE_string("dtype", "float32", "Computation dtype: float32 or bfloat16.", flag_values=values)
    flags.DEFINE_string("scales", "256,384,512", "Test scales Q.", flag_values=values)
    flags.DEFINE_integer("batch", 16, "Images per call.", flag_values=values)
    flags.DEFINE_integer("repeats", 3, "Timed calls; the fastest is reported.", flag_values=values)


def _define_train(values: flags.FlagValues, argv: list[str]) -> None:
    _define_train_flags(values, "8")
    flags.DEFINE_enum("remat", "none", REMAT_CHOICES, "The model's remat policy.", flag_values=values)
    flags.DEFINE_integer("steps", 10, "Timed steps (rounds with --compare_torch).", flag_values=values)
    flags.DEFINE_integer("warmup", 2, "Untimed steps first.", flag_values=values)
    flags.DEFINE_float(
        "peak_tflops",
        None,
        "MFU's denominator, all devices (default: bf16 datasheet on GPU, a measured matmul on CPU).",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "threads", None, "CPU threads of each framework (default: every available CPU).", flag_values=values
    )
    flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS.", flag_values=values)
    flags.DEFINE_bool(
        "compare_torch", False, "Also time PyTorch's step, interleaved; print ratios.", flag_values=values
    )
    flags.DEFINE_string(
        "compare_xla_flags", None, "Also time vgg_jax's step under these XLA_FLAGS, interleaved.", flag_values=values
    )
    flags.DEFINE_string(
        "profile_dir",
        None,
        "Trace --profile_steps more steps of the last batch here; print the top ops.",
        flag_values=values,
    )
    flags.DEFINE_integer("profile_steps", 3, "Steps traced.", flag_values=values)
    flags.DEFINE_enum("worker", None, ["jax", "torch"], "Internal: a --compare_torch worker.", flag_values=values)


def _define_memory(values: flags.FlagValues, argv: list[str]) -> None:
    _define_train_flags(values, "64,128,256")
    flags.DEFINE_list("remat", list(REMAT_CHOICES), "Remat policies, comma-separated.", flag_values=values)
    flags.register_validator(
        "remat",
        lambda v: set(v) <= set(REMAT_CHOICES),
        f"each remat policy must be one of {REMAT_CHOICES}",
        flag_values=values,
    )
    flags.DEFINE_float("budget_gb", 80.0, "Device memory to fit (80: one H100).", flag_values=values)


def _define_checkpoint(values: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("model", "vgg16", "The network whose train state is saved.", flag_values=values)
    flags.DEFINE_integer("repeats", 3, "Interleaved runs per checkpointer; the median is reported.", flag_values=values)
    flags.DEFINE_string("dir", None, "Where to write (default: the temporary directory).", flag_values=values)


COMMANDS = {
    "input": (_define_input, bench_input, "tf.data training-transform images/s per core vs decode-only"),
    "eval": (_define_eval, bench_eval, "evaluation cost per image: dense (3 scales) vs multi-crop (150 crops)"),
    "train": (_define_train, bench_train, "train-step time, img/s, MFU, peak memory; --compare_torch: vs PyTorch"),
    "memory": (_define_memory, bench_memory, "XLA's memory plan of the train step per remat policy and batch size"),
    "checkpoint": (_define_checkpoint, bench_checkpoint, "save/restore time with and without checksums"),
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        listed = "; ".join(f"{name}: {what}" for name, (_, _, what) in COMMANDS.items())
        cli.fail(f"usage: python -m vgg_jax.bench COMMAND [--flags]; COMMAND is one of {listed}.")
    define, run, what = COMMANDS[argv[0]]
    values, rest = cli.parse(argv[1:], define, f"python -m vgg_jax.bench {argv[0]}", what)
    if rest:
        cli.fail(f"unexpected arguments {rest}.")
    args = types.SimpleNamespace(**values.flag_values_dict())
    for name in ("batch", "threads"):
        if isinstance(getattr(args, name, None), list):
            setattr(args, name, [int(v) for v in getattr(args, name)])
    run(args)


if __name__ == "__main__":
    cli.run(main, tensorflow=True)
