#!/usr/bin/env python
"""Images per second of the batch featurizer vs a plain torch loop doing the same work.

Both start from the same JPEG bytes, decode each image once, centre-crop and resize it to
256, make each task's input and run the 21 Taskonomy encoders (random weights, identical in
both) on each batch:

- ours: ``preprocess.decode_images`` + ``feature_spaces.extract_batch`` (default memory
  format, and with ``channels_last``);
- plain: PIL decode, a hand-written crop/resize/input loop calling the same encoder modules
  under no_grad (the modules equal the port's ``visualpriors.TaskonomyEncoder``, see
  tests/test_encoders.py).

The runs are interleaved and repeated; the median time of each is reported, with the
overhead of ours against plain (target <= 10%) and the largest feature difference between
them. Performance is a ratio measured in one run on one machine, never an absolute claim.

    PYTHONPATH=$PWD python scripts/bench_featurize.py              # 4 images x 21 encoders
    PYTHONPATH=$PWD python scripts/bench_featurize.py --images 16 --batch-size 8 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.encoders import TaskonomyEncoder, random_encoder  # noqa: E402
from pipeline.feature_spaces import TaskonomyExtractor, TaskonomyFeatureSpace, extract_batch  # noqa: E402
from pipeline.preprocess import decode_images, noise_seed  # noqa: E402
from pipeline.tasks import task_names  # noqa: E402


def synthetic_jpegs(n: int, height: int, width: int, seed: int) -> list[bytes]:
    """Smooth random colour images (JPEG-like content, not white noise), encoded at quality 90."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# ---------------------------------------------------------------- the plain loop


def plain_decode(data: bytes) -> torch.Tensor:
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    h, w = img.shape[:2]
    half = min(h, w) // 2
    crop = img[h // 2 - half:h // 2 + half, w // 2 - half:w // 2 + half]
    x = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(x, size=(256, 256), mode="bilinear", align_corners=False)[0]


def plain_input(task: str, x: torch.Tensor, keys: list[str]) -> torch.Tensor:
    if task == "colorization":
        lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
        y = 0.212671 * lin[:, 0:1] + 0.715160 * lin[:, 1:2] + 0.072169 * lin[:, 2:3]
        f = torch.where(y > 0.008856, y.clamp_min(0.008856) ** (1 / 3), 7.787 * y + 16 / 116)
        return ((116 * f - 16).clamp(0, 100) / 100) * 2 - 1
    if task == "denoise":
        noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(noise_seed(0, k)))
                             for k in keys])
        return (x + 0.1 * noise).clamp(0, 1) * 2 - 1
    x = x * 2 - 1
    if task == "inpainting_whole":
        x = x.clone()
        x[..., 64:192, 64:192] = 0
    return x


def run_plain(batches, encoders) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {t: [] for t in encoders}
    with torch.no_grad():
        for data, keys in batches:
            x = torch.stack([plain_decode(d) for d in data])
            for task, enc in encoders.items():
                maps = enc(plain_input(task, x, keys))
                out[task].append(maps.permute(0, 2, 3, 1).reshape(len(keys), -1).numpy())
    return {t: np.concatenate(v) for t, v in out.items()}


def run_ours(batches, extractors) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {e.name: [] for e in extractors}
    for data, keys in batches:
        feats = extract_batch(decode_images(data, keys), keys, extractors)
        for name, f in feats.items():
            out[name].append(f)
    return {t: np.concatenate(v) for t, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=4, help="number of images (default 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default="all", help="'all' (the 21) or a comma-separated list")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--size", default="375x500", help="source image HxW (BOLD5000 COCO images are ~375x500)")
    p.add_argument("--no-channels-last", action="store_true", help="skip the channels_last variant")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = task_names() if args.tasks == "all" else args.tasks.split(",")
    height, width = (int(v) for v in args.size.split("x"))

    jpegs = synthetic_jpegs(args.images, height, width, seed=0)
    names = [f"img{i:05d}.jpg" for i in range(args.images)]
    batches = [(jpegs[i:i + args.batch_size], names[i:i + args.batch_size])
               for i in range(0, args.images, args.batch_size)]

    encoders = {t: random_encoder(t, seed=i) for i, t in enumerate(tasks)}
    cpu = torch.device("cpu")

    def extractors(models: dict[str, TaskonomyEncoder], channels_last: bool) -> list[TaskonomyExtractor]:
        # in-memory random weights: the benchmark times featurizing, not reading 2 GB of checkpoints
        return [TaskonomyExtractor(TaskonomyFeatureSpace(task=t, weights_dir=Path("<memory>")), m, cpu,
                                   channels_last, "<random>") for t, m in models.items()]

    # ours and plain share the modules (contiguous); channels_last needs its own copies (~95 MB each)
    runs = {"ours": (run_ours, extractors(encoders, False)), "plain": (run_plain, encoders)}
    if not args.no_channels_last:
        copies = {t: copy.deepcopy(e) for t, e in encoders.items()}
        runs["ours_channels_last"] = (run_ours, extractors(copies, True))

    # warm-up: one image through every model of every variant (allocator, oneDNN primitives)
    warm = [(jpegs[:1], names[:1])]
    for fn, models in runs.values():
        fn(warm, models)

    times: dict[str, list[float]] = {k: [] for k in runs}
    results: dict[str, dict[str, np.ndarray]] = {}
    order = list(runs)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            fn, models = runs[name]
            t0 = time.perf_counter()
            results[name] = fn(batches, models)
            times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    diff = max(float(np.abs(results["ours"][t] - results["plain"][t]).max()) for t in tasks)
    report = {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images": args.images, "batch_size": args.batch_size, "encoders": len(tasks), "repeats": args.repeats,
        "source_size": [height, width],
        "seconds": med, "images_per_s": {k: args.images / v for k, v in med.items()},
        "encoder_passes_per_s": {k: args.images * len(tasks) / v for k, v in med.items()},
        "overhead_ours_vs_plain": med["ours"] / med["plain"] - 1,
        "max_abs_feature_diff_ours_vs_plain": diff,
    }
    if "ours_channels_last" in med:
        report["speedup_channels_last_vs_plain"] = med["plain"] / med["ours_channels_last"]
        report["max_abs_feature_diff_channels_last"] = max(
            float(np.abs(results["ours_channels_last"][t] - results["plain"][t]).max()) for t in tasks)
    print(f"{args.images} images x {len(tasks)} encoders, batch {args.batch_size}, "
          f"{report['threads']} threads, {args.repeats} repeat(s), torch {torch.__version__} on CPU")
    for k, v in med.items():
        print(f"  {k:20s} {v:8.2f} s   {args.images / v:7.3f} images/s   "
              f"{args.images * len(tasks) / v:7.2f} encoder passes/s")
    print(f"  overhead ours vs plain: {100 * report['overhead_ours_vs_plain']:+.1f}% (target <= +10%)")
    if "speedup_channels_last_vs_plain" in report:
        print(f"  channels_last speed-up vs plain: x{report['speedup_channels_last_vs_plain']:.2f}")
    print(f"  largest feature difference ours vs plain: {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
