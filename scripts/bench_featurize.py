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


class Stub(torch.nn.Module):
    """Stands in for an encoder at negligible cost: (B, C, 256, 256) -> (B, 8, 16, 16)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x[:, :1], (16, 16)).expand(-1, 8, -1, -1)


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

    # Interleaved per batch (order rotated) so that drifting load on a shared machine hits all
    # variants alike; wall and process CPU time are both summed per repeat.
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu_s: dict[str, list[float]] = {k: [] for k in runs}
    results: dict[str, dict[str, list[np.ndarray]]] = {k: {} for k in runs}
    order = list(runs)
    for r in range(args.repeats):
        totals = {k: [0.0, 0.0] for k in runs}
        for b, batch in enumerate(batches):
            shift = (r * len(batches) + b) % len(order)
            for name in order[shift:] + order[:shift]:
                fn, models = runs[name]
                w0, c0 = time.perf_counter(), time.process_time()
                got = fn([batch], models)
                totals[name][0] += time.perf_counter() - w0
                totals[name][1] += time.process_time() - c0
                if r == 0:
                    for t, f in got.items():
                        results[name].setdefault(t, []).append(f)
        for k, (w, c) in totals.items():
            wall[k].append(w)
            cpu_s[k].append(c)
    feats = {k: {t: np.concatenate(v) for t, v in res.items()} for k, res in results.items()}

    # The same two loops with a stub instead of the encoders: the fixed cost per image that
    # the pipeline adds around the models (decode, crop/resize, task inputs, layout).
    stubs = {t: Stub(e.in_channels) for t, e in encoders.items()}
    stub_runs = {"ours": (run_ours, extractors(stubs, False)), "plain": (run_plain, stubs)}
    stub_wall: dict[str, list[float]] = {k: [] for k in stub_runs}
    for r in range(max(3, args.repeats)):
        for name in (["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]):
            fn, models = stub_runs[name]
            w0 = time.perf_counter()
            fn(batches, models)
            stub_wall[name].append(time.perf_counter() - w0)

    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_s.items()}
    stub = {k: statistics.median(v) for k, v in stub_wall.items()}
    diff = max(float(np.abs(feats["ours"][t] - feats["plain"][t]).max()) for t in tasks)
    n_img = args.images
    report = {
        "device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "images": n_img, "batch_size": args.batch_size, "encoders": len(tasks), "repeats": args.repeats,
        "source_size": [height, width],
        "wall_s": med, "cpu_s": med_cpu, "wall_s_each_repeat": wall, "cpu_s_each_repeat": cpu_s,
        "images_per_s": {k: n_img / v for k, v in med.items()},
        "encoder_passes_per_s": {k: n_img * len(tasks) / v for k, v in med.items()},
        "overhead_ours_vs_plain_wall": med["ours"] / med["plain"] - 1,
        "overhead_ours_vs_plain_cpu": med_cpu["ours"] / med_cpu["plain"] - 1,
        "pipeline_ms_per_image_without_models": {k: 1000 * v / n_img for k, v in stub.items()},
        "max_abs_feature_diff_ours_vs_plain": diff,
    }
    if "ours_channels_last" in med:
        report["speedup_channels_last_vs_plain_wall"] = med["plain"] / med["ours_channels_last"]
        report["speedup_channels_last_vs_plain_cpu"] = med_cpu["plain"] / med_cpu["ours_channels_last"]
        report["max_abs_feature_diff_channels_last"] = max(
            float(np.abs(feats["ours_channels_last"][t] - feats["plain"][t]).max()) for t in tasks)
    print(f"{n_img} images ({height}x{width} JPEG) x {len(tasks)} encoders, batch {args.batch_size}, "
          f"{report['threads']} torch threads, {args.repeats} repeat(s), torch {torch.__version__} on CPU")
    for k, v in med.items():
        print(f"  {k:20s} wall {v:8.2f} s  cpu {med_cpu[k]:8.2f} s   {n_img / v:7.3f} images/s   "
              f"{n_img * len(tasks) / v:6.2f} encoder passes/s")
    print(f"  overhead ours vs plain: wall {100 * report['overhead_ours_vs_plain_wall']:+.1f}%, "
          f"cpu {100 * report['overhead_ours_vs_plain_cpu']:+.1f}% (target <= +10%)")
    print("  pipeline cost without the models: " + ", ".join(
        f"{k} {v:.1f} ms/image" for k, v in report["pipeline_ms_per_image_without_models"].items()))
    if "speedup_channels_last_vs_plain_wall" in report:
        print(f"  channels_last vs plain: x{report['speedup_channels_last_vs_plain_wall']:.2f} wall, "
              f"x{report['speedup_channels_last_vs_plain_cpu']:.2f} cpu")
    print(f"  largest feature difference ours vs plain: {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
