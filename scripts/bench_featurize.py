#!/usr/bin/env python
"""Images per second of the featurizer vs a plain torch loop doing the same work.

Both start from the same JPEG images, decode each image once, centre-crop and resize it to
256, make each task's input and run the 21 Taskonomy encoders (random weights, identical in
both) on each batch. Two comparisons, each in one run on the same images:

1. batch level (``--mode batch``):
   - ours: ``preprocess.decode_images`` + ``feature_spaces.extract_batch`` (default memory
     format, and with ``channels_last``);
   - plain: PIL decode, a hand-written crop/resize/input loop calling the same encoder modules
     under no_grad (the modules equal the port's ``visualpriors.TaskonomyEncoder``, see
     tests/test_encoders.py).
   The runs are interleaved per batch and repeated; medians are reported.
2. the whole pipeline (``--mode dask``): ``pipeline.stages.featurize.featurize`` on a one-worker
   local Dask cluster (one task at a time, the same torch threads as the plain loop), from
   image files located by name to features in the Zarr store with progress markers, vs the
   plain loop over the same files with the encoders loaded from the same checkpoints (in the
   official format, written at random into a temporary directory). The worker loads its
   encoders in a warm-up run first (reported apart: a once-per-worker cost); each timed run
   featurizes into a fresh store. Wall time and CPU time (driver + worker processes) are
   compared; the stored features are checked against the plain loop's. The pre-flight
   (verifying every checkpoint's sha256, reading the image headers) is a fixed cost per run,
   timed apart.

Reported: images/s of each, the overhead of ours against plain (target <= 10%) and the
largest feature difference. Performance is a ratio measured in one run on one machine, never
an absolute claim.

    .venv/bin/python scripts/bench_featurize.py              # 4 + 8 images x 21 encoders
    .venv/bin/python scripts/bench_featurize.py --mode dask --images 16 --batch-size 8 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


import yaml  # noqa: E402

from neurotask.pipeline.features.encoders import TaskonomyEncoder, random_encoder  # noqa: E402
from neurotask.pipeline.features.spaces import (TaskonomyExtractor, TaskonomyFeatureSpace, exact_float32,  # noqa: E402
                                     extract_batch)
from neurotask.pipeline.features.preprocess import decode_images, noise_seed  # noqa: E402
from neurotask.pipeline.tasks import task_names  # noqa: E402


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


def device_label(dev: torch.device) -> str:
    return f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu"


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
        return (x + 0.1 * noise.to(x.device)).clamp(0, 1) * 2 - 1
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


def run_plain(batches, encoders, device: torch.device = torch.device("cpu")) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {t: [] for t in encoders}
    with torch.no_grad():
        for data, keys in batches:
            x = torch.stack([plain_decode(d) for d in data]).to(device)
            for task, enc in encoders.items():
                maps = enc(plain_input(task, x, keys))
                out[task].append(maps.permute(0, 2, 3, 1).reshape(len(keys), -1).cpu().numpy())
    return {t: np.concatenate(v) for t, v in out.items()}


def run_ours(batches, extractors) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {e.name: [] for e in extractors}
    for data, keys in batches:
        feats = extract_batch(decode_images(data, keys), keys, extractors)
        for name, f in feats.items():
            out[name].append(f)
    return {t: np.concatenate(v) for t, v in out.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("batch", "dask", "both"), default="both")
    p.add_argument("--images", type=int, default=None,
                   help="number of images (default: 4 for batch, 8 for dask)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default="all", help="'all' (the 21) or a comma-separated list")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; medians reported")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--size", default="375x500", help="source image HxW (BOLD5000 COCO images are ~375x500)")
    p.add_argument("--no-channels-last", action="store_true", help="skip the channels_last variant")
    p.add_argument("--device", default="cpu", help="torch device of both sides: cpu, cuda, cuda:1")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = task_names() if args.tasks == "all" else args.tasks.split(",")
    height, width = (int(v) for v in args.size.split("x"))
    report = {}
    if args.mode in ("batch", "both"):
        report["batch"] = bench_batch(args, tasks, height, width, args.images or 4)
    if args.mode in ("dask", "both"):
        report["dask"] = bench_dask(args, tasks, height, width, args.images or 8)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


def bench_batch(args: argparse.Namespace, tasks: list[str], height: int, width: int, n_images: int) -> dict:
    jpegs = synthetic_jpegs(n_images, height, width, seed=0)
    names = [f"img{i:05d}.jpg" for i in range(n_images)]
    batches = [(jpegs[i:i + args.batch_size], names[i:i + args.batch_size])
               for i in range(0, n_images, args.batch_size)]

    dev = torch.device(args.device)
    exact_float32(dev)  # both sides: true float32 on CUDA, as the pipeline runs
    encoders = {t: random_encoder(t, seed=i).to(dev) for i, t in enumerate(tasks)}

    def extractors(models: dict[str, TaskonomyEncoder], channels_last: bool) -> list[TaskonomyExtractor]:
        # in-memory random weights: the benchmark times featurizing, not reading 2 GB of checkpoints
        return [TaskonomyExtractor(TaskonomyFeatureSpace(task=t, weights_dir=Path("<memory>")), m, dev,
                                   channels_last, "<random>") for t, m in models.items()]

    # ours and plain share the modules (contiguous); channels_last needs its own copies (~95 MB each)
    plain = lambda b, m: run_plain(b, m, dev)  # noqa: E731
    runs = {"ours": (run_ours, extractors(encoders, False)), "plain": (plain, encoders)}
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
    stub_runs = {"ours": (run_ours, extractors(stubs, False)), "plain": (plain, stubs)}
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
    n_img = n_images
    report = {
        "device": device_label(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
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
          f"{report['threads']} torch threads, {args.repeats} repeat(s), torch {torch.__version__} on {report['device']}")
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
    return report


# ---------------------------------------------------------------- the whole pipeline on Dask


def _process_cpu() -> float:
    return time.process_time()


def bench_dask(args: argparse.Namespace, tasks: list[str], height: int, width: int, n_images: int) -> dict:
    from distributed import Client, LocalCluster

    from neurotask.pipeline.config import load_config
    from neurotask.pipeline.stages.featurize import featurize, preflight
    from neurotask.pipeline.features.images import subfolder_for, write_synthetic_images
    from neurotask.pipeline.stages.simulate import image_names
    from neurotask.pipeline.features.weights import find_checkpoint, load_taskonomy_encoder, write_random_checkpoints
    from neurotask.storage import StudyStore

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_featurize_") as tmp:
        tmp = Path(tmp)
        names = image_names(max(n_images, 100), np.random.default_rng(0))[:n_images]
        write_synthetic_images(tmp / "images", names, seed=0, sides=(min(height, width), max(height, width)))
        t0 = time.perf_counter()
        write_random_checkpoints(tmp / "weights", tasks, seed=0)
        print(f"(wrote {len(tasks)} random checkpoints in {time.perf_counter() - t0:.1f} s)")

        def study(name: str, images: list[str]):
            (tmp / f"{name}.txt").write_text("\n".join(images) + "\n")
            raw = {"study": {"name": name, "workdir": str(tmp / name), "subjects": ["CSI1"], "tasks": tasks},
                   "data": {"stim_list": str(tmp / f"{name}.txt")},
                   "features": {"weights_dir": str(tmp / "weights"), "tasks": tasks, "images_dir": str(tmp / "images"),
                                "batch_size": args.batch_size, "torch_threads": threads, "device": args.device,
                                "channels_last": False}}  # as the plain loop: the orchestration's cost alone
            (tmp / f"{name}.yaml").write_text(yaml.safe_dump(raw))
            return load_config(tmp / f"{name}.yaml")

        # The plain loop: the same checkpoints, the same files, the same batches.
        dev = torch.device(args.device)
        exact_float32(dev)
        encoders = {t: load_taskonomy_encoder(t, find_checkpoint(tmp / "weights", t)).eval().to(dev) for t in tasks}
        paths = {n: tmp / "images" / subfolder_for(n) / n for n in names}
        batches = [([paths[n].read_bytes() for n in names[i:i + args.batch_size]], names[i:i + args.batch_size])
                   for i in range(0, n_images, args.batch_size)]

        def plain_from_files() -> dict[str, np.ndarray]:
            # reading the files is part of the work: the pipeline reads them too
            return run_plain([([paths[n].read_bytes() for n in keys], keys) for _, keys in batches], encoders, dev)

        run_plain(batches[:1], encoders, dev)  # warm-up (allocator, oneDNN primitives)
        quiet = {"log": lambda m: None}
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
            t0 = time.perf_counter()
            featurize(study("warmup", names[:1]), client, **quiet)  # the worker loads the 21 encoders
            load_s = time.perf_counter() - t0

            wall: dict[str, list[float]] = {"dask": [], "plain": []}
            cpu: dict[str, list[float]] = {"dask": [], "plain": []}
            feats: dict[str, dict[str, np.ndarray]] = {}
            preflight_wall: list[float] = []
            preflight_cpu: list[float] = []
            for r in range(args.repeats):
                for name in (("plain", "dask") if r % 2 == 0 else ("dask", "plain")):
                    if name == "plain":
                        w0, c0 = time.perf_counter(), time.process_time()
                        got = plain_from_files()
                        wall[name].append(time.perf_counter() - w0)
                        cpu[name].append(time.process_time() - c0)
                        feats.setdefault("plain", got)
                    else:
                        cfg = study(f"run{r}", names)
                        w0, c0 = time.perf_counter(), time.process_time()
                        plan = preflight(cfg)  # once per run: sha256 of every checkpoint, image headers
                        preflight_wall.append(time.perf_counter() - w0)
                        preflight_cpu.append(time.process_time() - c0)
                        worker0 = sum(client.run(_process_cpu).values())
                        w0, c0 = time.perf_counter(), time.process_time()
                        featurize(cfg, client, plan=plan, **quiet)
                        wall[name].append(time.perf_counter() - w0)
                        cpu[name].append(time.process_time() - c0 + sum(client.run(_process_cpu).values()) - worker0)
                        if "dask" not in feats:
                            store = StudyStore(cfg.store_path)
                            feats["dask"] = {t: store.read_features(t).values for t in tasks}

    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    diff = max(float(np.abs(feats["dask"][t] - feats["plain"][t]).max()) for t in tasks)
    report = {
        "device": device_label(dev), "torch": torch.__version__, "torch_threads": threads, "cores": os.cpu_count(),
        "images": n_images, "batch_size": args.batch_size, "encoders": len(tasks), "repeats": args.repeats,
        "dask_workers": 1, "worker_encoder_load_s": load_s,
        "wall_s": med, "cpu_s": med_cpu, "wall_s_each_repeat": wall, "cpu_s_each_repeat": cpu,
        "images_per_s": {k: n_images / v for k, v in med.items()},
        "overhead_dask_vs_plain_wall": med["dask"] / med["plain"] - 1,
        "overhead_dask_vs_plain_cpu": med_cpu["dask"] / med_cpu["plain"] - 1,
        "preflight_s": {"wall": statistics.median(preflight_wall), "cpu": statistics.median(preflight_cpu)},
        "max_abs_feature_diff_dask_vs_plain": diff,
    }
    print(f"whole pipeline: {n_images} images ({height}x{width} JPEG files) x {len(tasks)} encoders, batch "
          f"{args.batch_size}, one Dask worker, {threads} torch threads each side, {args.repeats} repeat(s), "
          f"on {report['device']}")
    for k, v in med.items():
        print(f"  {k:20s} wall {v:8.2f} s  cpu {med_cpu[k]:8.2f} s   {n_images / v:7.3f} images/s")
    print(f"  overhead dask pipeline vs plain loop: wall {100 * report['overhead_dask_vs_plain_wall']:+.1f}%, "
          f"cpu {100 * report['overhead_dask_vs_plain_cpu']:+.1f}% (target <= +10%)")
    print(f"  once per run: the pre-flight (sha256 of the {len(tasks)} checkpoints, image headers) took "
          f"{report['preflight_s']['wall']:.1f} s wall, {report['preflight_s']['cpu']:.1f} s cpu (not in the times above)")
    print(f"  once per worker: a warm-up run on 1 image (the worker loads the {len(tasks)} encoders from their "
          f"checkpoints and makes its first passes) took {load_s:.1f} s (not timed above)")
    print(f"  largest feature difference dask vs plain: {diff:.2e}")
    return report


if __name__ == "__main__":
    main()
