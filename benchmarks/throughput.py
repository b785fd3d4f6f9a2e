"""Images per second of EfficientNet-Lite0 next to the ceiling this CPU's matmul speed implies.

    .venv/bin/python benchmarks/throughput.py [--image-size 224] [--batch-size 32] [--images 128]
        [--folder ../shared/datasets/hymenoptera] [--predict-only]
    .venv/bin/python benchmarks/throughput.py --engines --image-size 288 --images 400 \
        --folder ../shared/datasets/flowers5

First ``graft predict``'s path (the frozen part through TFLite/XNNPACK) against Keras' own
``predict``, on pixels and end to end on files.

For float32 and mixed_bfloat16 (Keras policies) it measures, in one run: inference through the
whole model, a frozen-phase training step (head only) and a full fine-tuning step (everything but
BatchNormalization unfrozen). The ceiling is the machine's measured matmul GFLOP/s divided by the
model's FLOPs per image (counted from its convolution and dense shapes; a training step counted
as 3x the forward pass). A measurement script, not a test: the numbers decide defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def matmul_gflops(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    import tensorflow as tf

    a = tf.random.uniform((n, n), dtype=tf.float32)
    a = tf.cast(a, dtype)
    tf.linalg.matmul(a, a).numpy()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        c = tf.linalg.matmul(a, a)
    c.numpy()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def forward_gflops(model) -> float:
    """Convolution and dense FLOPs of one image through ``model`` (nested models included)."""
    from keras import layers

    from graftkit.backbones import layers_within

    total = 0
    for layer in layers_within(model, leaves_only=True):
        if isinstance(layer, layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * c
        elif isinstance(layer, layers.Conv2D):
            _, h, w, cout = layer.output.shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * layer.input.shape[-1] * cout
        elif isinstance(layer, layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return total / 1e9


def measure(policy: str, size: int, batch: int, n: int) -> dict:
    import keras
    import numpy as np

    from graftkit.backbones import load_base
    from graftkit.graft import build_classifier, freeze, unfreeze

    keras.mixed_precision.set_global_policy(policy)
    base, info = load_base("efficientnet_lite0", size)
    model = build_classifier(base, 2)
    x = np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")
    y = np.arange(n) % 2

    def rate(step) -> float:
        step(x[: batch * 2])  # trace and warm up
        t = time.perf_counter()
        step(x)
        return n / (time.perf_counter() - t)

    out = {"inference": rate(lambda d: model.predict(d, batch_size=batch, verbose=0))}
    for name, setup in (("frozen phase", lambda: freeze(base)),
                        ("fine-tune", lambda: unfreeze(base, "all",
                                                       block_pattern=info.block_pattern))):
        setup()
        model.compile(optimizer=keras.optimizers.Adam(1e-5),
                      loss="sparse_categorical_crossentropy")
        out[name] = rate(lambda d: model.fit(d, y[: len(d)], batch_size=batch, epochs=1,
                                             verbose=0))
    out["gflops"] = forward_gflops(model)
    keras.mixed_precision.set_global_policy("float32")
    return out


def predict_rates(size: int, folder: str | None, n: int) -> dict:
    """``graft predict``'s path (TFLite engine for the frozen part) against Keras' predict.

    On raw pixels, and end to end on image files (decoding included) when ``folder`` is given.
    The engine's one-off conversion is done before the clock starts (it is cached on disk).
    """
    import numpy as np

    from graftkit.backbones import load_base
    from graftkit.classifier import Classifier
    from graftkit.frozen import engine
    from graftkit.frozen.cut import part_key
    from graftkit.frozen.engine import FrozenPart
    from graftkit.graft import build_classifier
    from graftkit.outputs.evaluation import probabilities

    # The engine's rate, not the choice: graft converts only for large jobs or reuses fit's.
    os.environ[engine.ENGINE_ENV] = "tflite"
    base, _ = load_base("efficientnet_lite0", size)
    model = build_classifier(base, 2)
    x = np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype("float32")
    engine = FrozenPart(base, part_key(base, size, "output"))
    engine(x[:4])
    out = {}
    t = time.perf_counter()
    engine(x)
    out["engine, pixels"] = n / (time.perf_counter() - t)
    model.predict(x[:64], verbose=0)
    t = time.perf_counter()
    model.predict(x, batch_size=32, verbose=0)
    out["keras predict, pixels"] = n / (time.perf_counter() - t)
    if folder:
        from pathlib import Path

        from graftkit.defaults import IMAGE_EXTENSIONS

        paths = sorted(str(p) for p in Path(folder).rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS)
        clf = Classifier(model, ["a", "b"], {"backbone": "efficientnet_lite0",
                                             "options": {"unfreeze": 2, "fine_tune_epochs": 5}})
        clf.predict_proba(paths[:8])
        t = time.perf_counter()
        clf.predict_proba(paths)
        out["graft predict, files"] = len(paths) / (time.perf_counter() - t)
        probabilities(model, paths[:8])
        t = time.perf_counter()
        probabilities(model, paths)
        out["keras predict, files"] = len(paths) / (time.perf_counter() - t)
    return out


PREDICT_ROUNDS = 5


def engine_rates(size: int, folder: str, n: int) -> tuple[list[dict], float]:
    """Each engine side by side on the default fit's frozen part (Lite0 below its top 2 blocks).

    Per engine: pure inference on random pixels, the frozen pass of ``graft fit`` on the
    folder's files (decoding on all cores, as fit runs it), plain and with fit's 5 views
    (augmentation included: the log's outputs per second), and whole-model ``predict_proba`` on
    the files (the engines in turns, the median of ``PREDICT_ROUNDS``). Conversion is done
    before the clocks start (it is cached). int8 is calibrated as ``graft fit
    --engine-precision int8`` calibrates it, on the folder's training images.
    Returns the rows and the frozen part's forward GFLOPs per image.
    """
    import hashlib
    import tempfile
    from pathlib import Path

    import numpy as np

    from graftkit.backbones import load_base
    from graftkit.classifier import Classifier
    from graftkit.data.folder import scan
    from graftkit.defaults import AUGMENT
    from graftkit.frozen import runtimes
    from graftkit.frozen.cut import part_key, split_base
    from graftkit.frozen.engine import ENGINE_ENV, PRECISION_ENV, FrozenPart
    from graftkit.frozen.extract import extract
    from graftkit.frozen.precision import Calibration
    from graftkit.graft import build_classifier

    base, info = load_base("efficientnet_lite0", size)
    bottom = split_base(base, info.block_pattern, 2).frozen_model()
    model = build_classifier(base, 5)
    data = scan(Path(folder))
    paths, digests = data.val.paths[:n], data.digests(data.val)[:n]
    x = np.random.default_rng(0).uniform(0, 255, (64, size, size, 3)).astype("float32")
    engines = [("keras", "f32"), ("tflite", "f32"), ("tflite", "int8")]
    items = [(p, str(y)) for p, y in zip(data.train.paths, data.train.labels)]
    calibration = Calibration.from_files(items, dict(zip(data.train.paths,
                                                         data.digests(data.train))), size, 0)
    scratch = Path(tempfile.mkdtemp())
    if runtimes.openvino_available():
        engines.append(("openvino", "f32"))
        if runtimes.openvino_int8_available():
            engines.append(("openvino", "int8"))
        if runtimes.openvino_bf16():
            engines.append(("openvino", "bf16"))
    rows = []
    for name, precision in engines:
        os.environ[ENGINE_ENV] = name
        os.environ[PRECISION_ENV] = "f32" if precision == "int8" else precision
        int8 = precision == "int8"
        part = FrozenPart(bottom, part_key(bottom, size, "bench"),
                          precision=precision if int8 else None,
                          calibration=calibration if int8 else None)
        part(x[:8])  # convert (once, cached), load, parity check (int8: its acceptance)
        row = {"engine": part.label, "fallbacks": part.reasons}
        if int8 and part.int8_engine():
            (scratch / part.int8_engine_name).write_bytes(part.int8_engine())
        t = time.perf_counter()
        part(x)
        row["pixels"] = len(x) / (time.perf_counter() - t)
        t = time.perf_counter()
        ex = extract(part, paths, digests, size)
        row["frozen pass, files"] = len(paths) / (time.perf_counter() - t)
        row["rows"] = [np.asarray(ex.output(k)[0]) for k in range(2)]  # float16, as cached
        t = time.perf_counter()
        extract(part, paths, digests, size, views=5, augment=AUGMENT)
        row["frozen pass, 5 views"] = 5 * len(paths) / (time.perf_counter() - t)
        clf = Classifier(model, [str(i) for i in range(5)],
                         {"backbone": "efficientnet_lite0",
                          "options": {"unfreeze": 2, "fine_tune_epochs": 5},
                          "frozen_outputs": {
                              "precision": "int8" if int8 else "f32", "engine": name,
                              "int8": {"engine_sha256": hashlib.sha256(
                                  part.int8_engine() or b"").hexdigest()}}},
                         scratch)
        clf.predict_proba(paths[:8])  # picks its engine under this engine's settings
        predicted_by = clf._split.frozen if clf._split else None  # must be the same engine
        row["fallbacks"] += [f"predict ran {predicted_by.label if predicted_by else 'keras'}"
                             ] if not predicted_by or predicted_by.label != row["engine"] else []
        row["classifier"] = clf
        rows.append(row)
    os.environ.pop(ENGINE_ENV)
    os.environ.pop(PRECISION_ENV)
    # predict in turns, the median of PREDICT_ROUNDS: a virtual machine's speed drifts by 10-20%
    # within minutes, more than the gap between two engines
    rates: dict[int, list[float]] = {}
    for _ in range(PREDICT_ROUNDS):
        for i, row in enumerate(rows):
            t = time.perf_counter()
            row["classifier"].predict_proba(paths)
            rates.setdefault(i, []).append(len(paths) / (time.perf_counter() - t))
    for i, row in enumerate(rows):
        row["predict, files"] = float(np.median(rates[i]))
        del row["classifier"]
    return rows, forward_gflops(bottom)


def print_engines(args) -> None:
    import numpy as np

    rows, gflops = engine_rates(args.image_size, args.folder, args.images)
    ceilings = {"f32": matmul_gflops("float32"), "bf16": matmul_gflops("bfloat16")}
    print(f"\nengines on the default fit's frozen part (Lite0 below its top 2 blocks) at "
          f"{args.image_size} px, {gflops:.2f} GFLOPs per image; {args.images} files of "
          f"{args.folder}; matmul ceilings: float32 {ceilings['f32']:.0f}, bfloat16 "
          f"{ceilings['bf16']:.0f} GFLOP/s")
    from graftkit.frozen.precision import cosines, cpu_flags, dot_product_flags

    simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")) or f == "asimddp")
    print(f"CPU flags: {' '.join(simd) or 'unknown'}; 8-bit dot products: "
          f"{', '.join(dot_product_flags()) or 'none'}")
    print(f"{'engine':16}{'pixels':>9}{'frozen pass':>13}{'5 views':>9}{'predict':>9}"
          f"{'x tflite':>10}{'of f32 ceiling':>16}{'of bf16 ceiling':>17}{'rows != tflite':>16}"
          f"{'cosine':>9}")
    tflite = next(r for r in rows if r["engine"] == "tflite")
    for r in rows:
        apart = "/".join(f"{np.mean(a != b):.2%}" for a, b in zip(r["rows"], tflite["rows"]))
        cos = min(cosines([a.astype(np.float32) for a in r["rows"]],
                          [b.astype(np.float32) for b in tflite["rows"]]))
        print(f"{r['engine']:16}{r['pixels']:>9.1f}{r['frozen pass, files']:>13.1f}"
              f"{r['frozen pass, 5 views']:>9.1f}{r['predict, files']:>9.1f}"
              f"{r['frozen pass, 5 views'] / tflite['frozen pass, 5 views']:>9.2f}x"
              f"{r['pixels'] * gflops / ceilings['f32']:>16.1%}"
              f"{r['pixels'] * gflops / ceilings['bf16']:>17.1%}{apart:>16}{cos:>9.4f}"
              + (f"  (fell back: {'; '.join(r['fallbacks'])})" if r["fallbacks"] else ""))
    print("images/s (5 views: outputs/s, augmentation included, as fit's log counts them); "
          "'x tflite' compares the 5-view frozen pass; 'rows != tflite': the share of float16 "
          "values (as the cache keeps them) that differ from TFLite's, cut activations / pooled "
          "features; 'cosine': the lower of the two outputs' mean cosine similarity to TFLite's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--folder", help="image files for the end-to-end predict rates "
                                         "(e.g. ../shared/datasets/hymenoptera)")
    parser.add_argument("--predict-only", action="store_true", help="only the predict rates")
    parser.add_argument("--engines", action="store_true",
                        help="only the engines side by side (Keras, TFLite, OpenVINO float32 "
                             "and bfloat16 where the CPU has it) on --folder's files")
    args = parser.parse_args()
    if args.engines:
        if not args.folder:
            parser.error("--engines needs --folder")
        print_engines(args)
        return 0
    pr = predict_rates(args.image_size, args.folder, args.images * 2)
    print(f"\ninference at {args.image_size} px, float32 (images/s):")
    for name, value in pr.items():
        print(f"  {name:24}{value:8.1f}")
    print(f"  engine / keras predict: {pr['engine, pixels'] / pr['keras predict, pixels']:.2f}x"
          + (f" on pixels, {pr['graft predict, files'] / pr['keras predict, files']:.2f}x on files"
             if args.folder else ""))
    if args.predict_only:
        return 0
    rows = {}
    for policy, dtype in (("float32", "float32"), ("mixed_bfloat16", "bfloat16")):
        rows[policy] = measure(policy, args.image_size, args.batch_size, args.images)
        rows[policy]["matmul"] = matmul_gflops(dtype)
    gflops = rows["float32"]["gflops"]
    print(f"\nEfficientNet-Lite0 at {args.image_size} px, batch {args.batch_size}: "
          f"{gflops:.2f} GFLOPs per image forward")
    print(f"{'policy':16}{'matmul GFLOP/s':>16}{'step':>14}{'images/s':>10}{'ceiling':>10}"
          f"{'of ceiling':>12}")
    for policy, r in rows.items():
        for step, factor in (("inference", 1), ("frozen phase", 1), ("fine-tune", 3)):
            ceiling = r["matmul"] / (gflops * factor)
            print(f"{policy:16}{r['matmul']:>16.0f}{step:>14}{r[step]:>10.1f}{ceiling:>10.0f}"
                  f"{r[step] / ceiling:>12.1%}")
    for step in ("inference", "frozen phase", "fine-tune"):
        ratio = rows["mixed_bfloat16"][step] / rows["float32"][step]
        print(f"mixed_bfloat16 / float32, {step}: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
