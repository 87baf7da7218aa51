"""The study's stimulus image files: which they are, where their files are, and synthetic stand-ins.

BOLD5000's one file per image (NSD's images are rows of one HDF5 brick instead:
``pipeline.features.image_source``; ``pipeline.stages.featurize.study_images`` picks by
data.format).

- Which: every image named in the configured subjects' stimulus lists (``rep_`` prefixes
  dropped), once, in order of first appearance (subject by subject, as configured).
- Where: under ``features.images_dir`` (relative to data.root, else the workdir), in
  BOLD5000's layout ``Presented_Stimuli/{COCO,ImageNet,Scene}/<name>``; each name is looked up
  in all three sub-folders and the directory itself, so the folder an image sits in does not
  matter. A name matches exactly, or else case-insensitively when that is unambiguous.
- Synthetic: ``write_synthetic_images`` writes small JPEGs named exactly like a study's images,
  in the sub-folder BOLD5000 keeps that name style in (COCO_train2014_*.jpg in COCO,
  n########_N.JPEG in ImageNet, the rest in Scene), with a few greyscale images and one CMYK
  image among them, so the conversions the task bank made are exercised. For the demo and CI.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from neurotask.pipeline.formats import bold5000
from neurotask.pipeline.config import Config, FeaturesSection
from neurotask.pipeline.errors import DataError

SUBFOLDERS = ("COCO", "ImageNet", "Scene")
_IMAGENET = re.compile(r"^n\d{8}_\d+\.JPEG$")


def images_dir(cfg: Config) -> Path:
    """Where the study's image files are (``features.images_dir``; relative paths are under
    data.root, like the data files, or else under the workdir)."""
    section = cfg.features or FeaturesSection()
    p = Path(section.images_dir).expanduser()
    if p.is_absolute():
        return p
    return (cfg.resolve(cfg.data.root) if cfg.data.root else cfg.workdir) / p


def study_images(cfg: Config) -> list[str]:
    """Every image of the configured subjects' stimulus lists, once, in order of first showing
    (BOLD5000's lists; featurize's ``study_images`` reads NSD's design instead)."""
    seen: dict[str, None] = {}
    for subject in cfg.study.subjects:
        stim = bold5000.read_stim_list(cfg.data_path(cfg.data.stim_list, subject, key="stim_list"))
        seen.update(dict.fromkeys(str(x) for x in stim.images))
    return list(seen)


def subfolder_for(name: str) -> str:
    """BOLD5000's sub-folder for an image name: COCO, ImageNet or Scene."""
    if name.startswith("COCO_"):
        return "COCO"
    if _IMAGENET.match(name):
        return "ImageNet"
    return "Scene"


def find_images(root: str | Path, names: list[str]) -> tuple[dict[str, Path], str | None]:
    """({name: file} for the names found in ``root`` or its COCO/ImageNet/Scene sub-folders,
    a message listing every missing or ambiguous name, or None when all were found)."""
    root = Path(root)
    if not root.is_dir():
        return {}, (f"image directory {root} does not exist (features.images_dir); it should hold "
                    f"{'/, '.join(SUBFOLDERS)}/ with the study's {len(names)} images")
    exact: dict[str, list[Path]] = {}
    folded: dict[str, list[Path]] = {}
    for folder in (root, *(root / s for s in SUBFOLDERS)):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.is_file():
                exact.setdefault(entry.name, []).append(entry)
                folded.setdefault(entry.name.lower(), []).append(entry)
    found: dict[str, Path] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    for name in names:
        candidates = exact.get(name) or folded.get(name.lower(), [])
        if len(candidates) == 1:
            found[name] = candidates[0]
        elif candidates:
            ambiguous.append(f"{name} ({', '.join(str(c.relative_to(root)) for c in candidates)})")
        else:
            missing.append(name)
    problems = []
    if missing:
        shown = missing if len(missing) <= 50 else missing[:50] + [f"... and {len(missing) - 50} more"]
        problems.append(f"{len(missing)} of the study's {len(names)} images are not in {root} "
                        f"(nor its {', '.join(SUBFOLDERS)} sub-folders):\n  " + "\n  ".join(shown))
    if ambiguous:
        problems.append(f"{len(ambiguous)} image name(s) match several files in {root}:\n  "
                        + "\n  ".join(ambiguous))
    return found, "\n".join(problems) or None


def locate_images(root: str | Path, names: list[str]) -> dict[str, Path]:
    """{name: file} for every name; raises DataError listing every missing or ambiguous name."""
    found, problem = find_images(root, names)
    if problem:
        raise DataError(problem)
    return found


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth colour gradient with a few random ellipses and rectangles, RGB."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    c0, c1, c2 = rng.uniform(0, 255, (3, 3))
    base = c0 + np.multiply.outer(x, c1 - c0) + np.multiply.outer(y, c2 - c0)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x0), int(y0), int(x1) + 1, int(y1) + 1), fill=colour)
    return img


def write_synthetic_images(root: str | Path, names: list[str], seed: int = 0,
                           sides: tuple[int, int] = (256, 400)) -> dict[str, Path]:
    """Write one JPEG per name into ``root/<COCO|ImageNet|Scene>/<name>``; sides drawn in
    ``sides``. Every 10th image is greyscale (mode L) and the second one CMYK. -> {name: path}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = {}
    for i, name in enumerate(names):
        h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        img = synthetic_image(rng, h, w)
        if i == 1:
            img = img.convert("CMYK")
        elif i % 10 == 9:
            img = img.convert("L")
        path = root / subfolder_for(name) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="JPEG", quality=90)
        out[name] = path
    return out


__all__ = ["SUBFOLDERS", "find_images", "images_dir", "locate_images", "study_images", "subfolder_for", "synthetic_image",
           "write_synthetic_images"]
