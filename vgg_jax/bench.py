"""Benchmarks: ``python -m vgg_jax.bench <command> ...``; one function per subcommand.

``input``: per-core images/s of the training transform (``transforms.train_view``) through
``tf.data``, against a decode-only pass over the same ImageNet-like JPEGs (about 500x375,
quality 90, 1/f-noise content with edges), with 1 and 2 map threads.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

_SIZES = ((375, 500), (333, 500), (500, 375))  # (h, w) of typical ImageNet photos, landscape first


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
    from PIL import Image

    os.makedirs(cache_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        path = os.path.join(cache_dir, f"img_{i:05d}_q{quality}.jpg")
        height, width = _SIZES[i % len(_SIZES)]
        image = natural_image(rng, height, width)  # drawn even when cached, so the set is fixed
        if not os.path.exists(path):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "JPEG", quality=quality)
            with open(path + ".tmp", "wb") as f:
                f.write(buf.getvalue())
            os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def _time_map(
    encoded: Sequence[bytes], fn: Callable, threads: int, epochs: int
) -> tuple[float, float, int]:
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


def bench_input(args: argparse.Namespace) -> None:
    """Decode-only vs the full training transform, images/s per core; prints a markdown table.

    Runs are interleaved (every pipeline once per round) and the fastest round is kept, so load
    from other processes on a shared machine hits all pipelines alike. "Images per CPU-second"
    counts this process's CPU time, the per-core figure least disturbed by such load.
    """
    import tensorflow as tf

    from vgg_jax.data import transforms

    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    paths = make_jpegs(args.cache_dir, args.num_images)
    encoded = [open(p, "rb").read() for p in paths]
    cfg = transforms.TransformConfig(crop_size=224, scale_min=args.scale_min, scale_max=args.scale_max)
    train = f"train_view (S in [{args.scale_min}, {args.scale_max}], crop 224, flip, PCA)"
    decode = f"decode only (decode_jpeg, dct_method={transforms.DCT_METHOD})"
    pipelines = {
        decode: lambda x, seed: tf.io.decode_jpeg(x, channels=3, dct_method=transforms.DCT_METHOD),
        "decode only (decode_jpeg, dct_method=INTEGER_FAST)": lambda x, seed: tf.io.decode_jpeg(
            x, channels=3, dct_method="INTEGER_FAST"
        ),
        train: lambda x, seed: transforms.train_view(x, seed, cfg),
    }
    runs = {(name, t): [] for name in pipelines for t in args.threads}
    for name, threads in runs:
        _time_map(encoded[:32], pipelines[name], threads, 1)  # warm-up: tracing, thread start
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, threads in runs:
            runs[name, threads].append(_time_map(encoded, pipelines[name], threads, args.epochs))
    kib = sum(map(len, encoded)) / len(encoded) / 1024
    print(f"{len(encoded)} JPEGs ({', '.join(f'{w}x{h}' for h, w in _SIZES)}, quality 90, mean {kib:.0f} KiB) "
          f"in {args.cache_dir}; best of {args.repeats} interleaved runs of {args.epochs} epochs; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
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
        print(f"map threads={threads}: train_view / decode-only time per image = {dw / tw:.2f} (wall), "
              f"{dc / tc:.2f} (CPU); {args.target} img/s needs {args.target / tw:.1f} cores (wall rate) or "
              f"{args.target / tc:.1f} (CPU rate)")


def bench_eval(args: argparse.Namespace) -> None:
    """Evaluation cost per image: dense (image + flip per scale) vs multi-crop (50 crops per scale).

    Times the jitted posterior functions of ``vgg_jax.evaluate`` on device-resident random inputs
    (the input pipeline is not included): a dense canvas of (Q, ceil32(4/3 Q)) per scale (a
    landscape ImageNet photo) and 50 crops per scale. Best of ``repeats`` timed calls per scale,
    in wall time and in this process's CPU time (all threads; steadier on a shared machine).
    """
    import functools
    import math

    import jax
    import jax.numpy as jnp

    from vgg_jax import evaluate, models
    from vgg_jax.data.pipeline import MULTICROP_GRID

    model = models.get_model(args.model, num_classes=args.num_classes, width=args.width, fc_width=args.fc_width,
                             crop_size=args.crop_size, dtype=args.dtype)
    variables = models.init_variables(model, jax.random.key(0))
    scales = [int(q) for q in args.scales.split(",")]
    b, c = args.batch, args.crop_size
    key = jax.random.key(1)

    def inputs(method: str, q: int) -> tuple[dict, int, int]:
        """(batch, views per image, MACs per image) at scale q."""
        if method == "dense":
            w = math.ceil(4 * q / 3 / 32) * 32
            batch = {"image": jax.random.normal(key, (b, q, w, 3)), "height": jnp.full(b, q), "width": jnp.full(b, w)}
            return batch, 2, 2 * models.forward_macs(model, (q, w))
        batch = {"image": jax.random.normal(key, (b, 2 * MULTICROP_GRID**2, c, c, 3))}
        return batch, batch["image"].shape[1], batch["image"].shape[1] * models.forward_macs(model)

    print(f"{args.model} width {args.width} fc_width {args.fc_width} crop {c} {args.dtype}, {b} images per call, "
          f"scales {scales}, on {jax.devices()[0].device_kind} x{jax.device_count()}; best of {args.repeats}")
    print("| protocol | views per image | GMACs per image | ms per image | images/s | CPU-ms per image | "
          "time vs dense (wall, CPU) |")
    print("|---|---|---|---|---|---|---|")
    dense_ms = dense_cpu = None
    for method in ("dense", "multicrop"):
        step = jax.jit(functools.partial(evaluate.POSTERIORS[method], model.apply))
        seconds, cpu_seconds, views, macs = 0.0, 0.0, 0, 0
        for q in scales:
            batch, n, m = inputs(method, q)
            step(variables, batch).block_until_ready()  # compile
            times = []
            for _ in range(args.repeats):
                start, cpu = time.perf_counter(), time.process_time()
                step(variables, batch).block_until_ready()
                times.append((time.perf_counter() - start, time.process_time() - cpu))
            seconds += min(t[0] for t in times)
            cpu_seconds += min(t[1] for t in times)
            views, macs = views + n, macs + m
        ms, cpu_ms = 1000 * seconds / b, 1000 * cpu_seconds / b
        dense_ms, dense_cpu = dense_ms or ms, dense_cpu or cpu_ms
        print(f"| {method} ({len(scales)} scales) | {views} | {macs / 1e9:.2f} | {ms:.1f} | {1000 / ms:.1f} | "
              f"{cpu_ms:.1f} | {ms / dense_ms:.1f}x, {cpu_ms / dense_cpu:.1f}x |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vgg_jax.bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("input", help="tf.data training-transform images/s per core vs decode-only")
    p.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "vgg_jax_bench_jpegs"),
                   help="where the generated JPEGs are kept between runs")
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="num_parallel_calls values")
    p.add_argument("--epochs", type=int, default=2, help="passes over the images per timed run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest is reported")
    p.add_argument("--scale_min", type=int, default=256)
    p.add_argument("--scale_max", type=int, default=512)
    p.add_argument("--target", type=int, default=5000, help="img/s to feed (one H100 on VGG-16)")
    p.set_defaults(run=bench_input)
    p = commands.add_parser("eval", help="evaluation cost per image: dense (3 scales) vs multi-crop (150 crops)")
    p.add_argument("--model", default="vgg16")
    p.add_argument("--width", type=int, default=64, help="channels of block 1 (64: the paper's size)")
    p.add_argument("--fc_width", type=int, default=4096)
    p.add_argument("--crop_size", type=int, default=224)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--dtype", default="float32", help="computation dtype: float32 or bfloat16")
    p.add_argument("--scales", default="256,384,512", help="test scales Q")
    p.add_argument("--batch", type=int, default=16, help="images per call")
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=bench_eval)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
