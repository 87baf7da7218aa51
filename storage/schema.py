"""The study store's schema: where each group lives, what progress markers are called, how a
dimension is cut into chunks, and what every stored variable is (dims, dtype, fill value,
``units``, ``long_name``).

Layout of ``<workdir>/``::

    store.zarr/
      features/<space>        features   (image, feature)  float32
      responses/<subject>     responses  (image, voxel)    float32, chunked (all images, chunk_size)
                              repeat_responses (showing, repeated_image, voxel), if images repeat
      results/<subject>       RESULT_VARS (+ PERMUTATION_VARS) (task, voxel), CEILING_VARS (voxel)
                              chunked (1 task, chunk_size): one fit unit writes exactly one chunk
      roi_results/<subject>   the same variables for ROI-only models (imported, Figure 1)
      anatomy/<subject>       underlay (i, j, k) float32: the report's anatomical underlay in the
                              functional grid (data.anatomy resampled, or the mean of the raw betas)
      analysis/<name>         written by the analysis stage
    progress/<stage>/.../<unit>.json   the markers of :class:`Stage` (``storage.progress``); those
                              of fit, ceiling and finalize list the checksums of the chunks they
                              vouch for (``storage.checksums``)

Stages build group paths and marker names only through this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import xarray as xr

PROGRESS_DIR = "progress"  # beside store.zarr in a study's workdir


# --------------------------------------------------------------------------- group paths


def features_group(space: str) -> str:
    return f"features/{space}"


def responses_group(subject: str) -> str:
    return f"responses/{subject}"


def results_group(subject: str) -> str:
    return f"results/{subject}"


def roi_results_group(subject: str) -> str:
    """ROI-only models of a subject (the authors' published Figure 1 results), if imported."""
    return f"roi_results/{subject}"


def anatomy_group(subject: str) -> str:
    """A subject's anatomical underlay in its functional grid (written at ingest)."""
    return f"anatomy/{subject}"


def partition_group(analysis: str, subject: str) -> str:
    """A subject's variance partition of one configured analysis (unions of feature-space groups)."""
    return f"partition/{analysis}/{subject}"


def analysis_group(name: str) -> str:
    return f"analysis/{name}"


# --------------------------------------------------------------------------- progress markers


class Stage(StrEnum):
    """The first part of every progress marker's name: ``progress/<stage>/...``."""

    SIMULATE = "simulate"  # simulate/settings, simulate/images, simulate/weights, simulate/<subject>
    INGEST = "ingest"  # ingest/<subject>
    FEATURIZE = "featurize"  # featurize/<space>/<batch>: one batch of images written
    FEATURIZED = "featurized"  # featurized/<space>: every batch written
    FIT = "fit"  # fit/<subject>/<task>/<chunk>: one voxel chunk's results written
    CEILING = "ceiling"  # ceiling/<subject>: the noise ceiling written
    FINALIZE = "finalize"  # finalize/<subject>/<task>: the pair's q-values and significance written
    IMPORT = "import"  # import/<subject>: published results imported
    PARTITION = "partition"  # partition/<analysis>/<subject>/<block>: one voxel block's unions fitted
    PARTITION_FINAL = "partition_final"  # partition_final/<analysis>/<subject>: unique-variance q-values


def chunk_key(index: int) -> str:
    """A chunk's (or batch's) marker name: zero-padded so markers sort in chunk order."""
    return f"{index:05d}"


# --------------------------------------------------------------------------- chunk plan


@dataclass(frozen=True)
class ChunkPlan:
    """``length`` positions of one dimension (voxels of responses and results, images of
    features) in chunks of ``chunk_size``; the last chunk may be shorter."""

    length: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.length < 0:
            raise ValueError(f"chunks of {self.chunk_size} over {self.length} positions")

    @property
    def n_chunks(self) -> int:
        return -(-self.length // self.chunk_size)

    def bounds(self, k: int) -> tuple[int, int]:
        """(start, stop) of chunk k."""
        if not 0 <= k < self.n_chunks:
            raise IndexError(f"chunk {k} of {self.n_chunks}")
        start = k * self.chunk_size
        return start, min(start + self.chunk_size, self.length)

    def chunk(self, k: int) -> slice:
        return slice(*self.bounds(k))

    def size(self, k: int) -> int:
        start, stop = self.bounds(k)
        return stop - start

    def __iter__(self) -> Iterator[slice]:
        return (self.chunk(k) for k in range(self.n_chunks))

    def keys(self) -> set[str]:
        """Every chunk's marker name."""
        return {chunk_key(k) for k in range(self.n_chunks)}


# --------------------------------------------------------------------------- variables


@dataclass(frozen=True)
class Variable:
    """A stored variable: its dims, dtype, the value it holds until written, and its attrs."""

    dims: tuple[str, ...]
    dtype: type
    fill: Any
    units: str
    long_name: str

    @property
    def attrs(self) -> dict[str, str]:
        return {"units": self.units, "long_name": self.long_name}

    def filled(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.full(shape, self.fill, dtype=self.dtype)


_TV = ("task", "voxel")
# Per (task, voxel). Permutation variables exist when the fit ran the permutation test.
RESULT_VARIABLES: dict[str, Variable] = {
    "r": Variable(_TV, np.float32, np.nan, "1", "Pearson correlation of test-set predictions"),
    "r2": Variable(_TV, np.float32, np.nan, "1", "coefficient of determination of test-set predictions"),
    "alpha": Variable(_TV, np.float64, np.nan, "1", "ridge penalty chosen by cross-validation"),
    "pvalue": Variable(_TV, np.float64, np.nan, "1", "parametric p-value of the test-set correlation"),
    "qvalue": Variable(_TV, np.float64, np.nan, "1",
                       "Benjamini-Hochberg q-value of pvalue across the subject's voxels"),
    "significant": Variable(_TV, bool, False, "1", "qvalue below the fit's FDR level"),
}
PERMUTATION_VARIABLES: dict[str, Variable] = {
    "pvalue_perm": Variable(_TV, np.float64, np.nan, "1", "permutation-test p-value of the test-set correlation"),
    "qvalue_perm": Variable(_TV, np.float64, np.nan, "1",
                            "Benjamini-Hochberg q-value of pvalue_perm across the subject's voxels"),
    "significant_perm": Variable(_TV, bool, False, "1", "qvalue_perm below the fit's FDR level"),
}
# Per voxel, the same for every task: the noise ceiling from repeated images.
CEILING_VARIABLES: dict[str, Variable] = {
    "ncsnr": Variable(("voxel",), np.float64, np.nan, "1", "noise-ceiling signal-to-noise ratio"),
    "noise_ceiling_r": Variable(("voxel",), np.float64, np.nan, "1", "noise ceiling of the test-set correlation"),
    "noise_ceiling_r2": Variable(("voxel",), np.float64, np.nan, "1",
                                 "noise ceiling of the test-set coefficient of determination"),
}
RESULT_VARS = tuple(RESULT_VARIABLES)
PERMUTATION_VARS = tuple(PERMUTATION_VARIABLES)
CEILING_VARS = tuple(CEILING_VARIABLES)

# Per (set | region | group [, space], voxel) of partition/<analysis>/<subject>.
_SV, _RV, _GV, _SSV = ("set", "voxel"), ("region", "voxel"), ("group", "voxel"), ("set", "space", "voxel")
PARTITION_VARIABLES: dict[str, Variable] = {
    "r2": Variable(_SV, np.float32, np.nan, "1", "test-set coefficient of determination of the union's ridge fit"),
    "r": Variable(_SV, np.float32, np.nan, "1", "test-set Pearson correlation of the union's ridge fit"),
    "alpha": Variable(_SV, np.float32, np.nan, "1", "ridge penalty of the union chosen by cross-validation"),
    "region_r2": Variable(_RV, np.float32, np.nan, "1",
                          "test-set R² explained by exactly these groups (inclusion-exclusion, raw estimate)"),
    "unique_r2": Variable(_GV, np.float32, np.nan, "1", "test-set R² unique to the group (raw estimate)"),
    "unique_pvalue": Variable(_GV, np.float64, np.nan, "1",
                              "sign-flip p-value that the group's unique variance is above zero"),
    "unique_qvalue": Variable(_GV, np.float32, np.nan, "1",
                              "Benjamini-Hochberg q-value of unique_pvalue across the subject's voxels"),
    "unique_significant": Variable(_GV, bool, False, "1", "unique_qvalue below the partition's FDR level"),
    "banded_r2": Variable(_SV, np.float32, np.nan, "1", "test-set R² of the union's banded ridge fit"),
    "banded_split_r2": Variable(_SSV, np.float32, np.nan, "1",
                                "the feature space's part of the banded fit's test-set R² (they sum to banded_r2 less the intercept's share)"),
    "banded_alpha": Variable(_SSV, np.float32, np.nan, "1",
                             "the feature space's ridge penalty in the banded fit (inf: the space is left out)"),
}
PARTITION_VARS = tuple(PARTITION_VARIABLES)
# written by each block unit; the q-values and significance by the analysis's finalize
PARTITION_BLOCK_VARS = tuple(v for v in PARTITION_VARS if v not in ("unique_qvalue", "unique_significant"))

FEATURES = Variable(("image", "feature"), np.float32, np.nan, "1", "features of each image in this feature space")
RESPONSES = Variable(("image", "voxel"), np.float32, np.nan, "1",
                     "response to each image (GLM beta; z-scored within each session if so ingested)")
REPEAT_RESPONSES = Variable(("showing", "repeated_image", "voxel"), np.float32, np.nan, "1",
                            "single-trial responses of the images shown more than once (NaN: fewer showings)")

UNDERLAY = Variable(("i", "j", "k"), np.float32, np.nan, "1",
                    "anatomical underlay in the functional grid (NaN: not measured)")

# Coordinates: long_name always, units for numbers.
COORDINATES: dict[str, dict[str, str]] = {
    "image": {"long_name": "stimulus image file name"},
    "voxel": {"units": "1", "long_name": "voxel index"},
    "voxel_i": {"units": "1", "long_name": "voxel's first array index in the subject's volume"},
    "voxel_j": {"units": "1", "long_name": "voxel's second array index in the subject's volume"},
    "voxel_k": {"units": "1", "long_name": "voxel's third array index in the subject's volume"},
    "roi": {"long_name": "region of interest of the voxel ('' outside every ROI)"},
    "task": {"long_name": "feature space (Taskonomy task-bank name)"},
    "task_label": {"long_name": "display label of the feature space"},
    "session": {"units": "1", "long_name": "session of the image's first showing"},
    "n_showings": {"units": "1", "long_name": "showings averaged into the image's response"},
    "repeated_image": {"long_name": "stimulus image shown more than once"},
    "shared": {"long_name": "in the common test set: shown to every subject, all showings (NSD's shared images)"},
    "ncsnr": {"units": "1", "long_name": "the dataset's own noise-ceiling SNR of the voxel (NSD's ncsnr)"},
}


def strings(values: Sequence[str]) -> np.ndarray:
    """Object arrays of str become Zarr v3 variable-length UTF-8 strings (a specified type)."""
    return np.array(list(values), dtype=object)


def coordinate(name: str, dims: tuple[str, ...] | str, values: np.ndarray) -> xr.Variable:
    return xr.Variable(dims, values, attrs=COORDINATES[name])


def voxel_coords(voxel_ijk: np.ndarray, roi: Sequence[str]) -> dict[str, xr.Variable]:
    """voxel (index), voxel_i/j/k (int32 array indices) and roi (label) of v voxels.
    voxel_ijk (v, 3) int; roi (v,) str."""
    ijk = np.asarray(voxel_ijk)
    out = {"voxel": coordinate("voxel", "voxel", np.arange(len(roi), dtype=np.int64))}
    for axis, name in enumerate(("voxel_i", "voxel_j", "voxel_k")):
        out[name] = coordinate(name, "voxel", ijk[:, axis].astype(np.int32))
    out["roi"] = coordinate("roi", "voxel", strings(roi))
    return out


def results_template(tasks: Sequence[str], task_labels: Sequence[str], voxels: Mapping[str, xr.Variable], *,
                     permutation: bool, ceiling: bool, attrs: Mapping[str, Any]) -> xr.Dataset:
    """``results/<subject>`` (or ``roi_results/<subject>``) with every variable at its fill
    value: RESULT_VARS, with ``permutation`` PERMUTATION_VARS, with ``ceiling`` CEILING_VARS.

    ``voxels``: the coordinates of :func:`voxel_coords`; ``task_labels``: the display label of
    each task (the task-label coordinate)."""
    if len(task_labels) != len(tasks):
        raise ValueError(f"{len(task_labels)} task labels for {len(tasks)} tasks")
    sizes = {"task": len(tasks), "voxel": voxels["voxel"].size}
    variables = dict(RESULT_VARIABLES, **(PERMUTATION_VARIABLES if permutation else {}),
                     **(CEILING_VARIABLES if ceiling else {}))
    data = {name: xr.Variable(var.dims, var.filled(tuple(sizes[d] for d in var.dims)), attrs=var.attrs)
            for name, var in variables.items()}
    coords = {"task": coordinate("task", "task", strings(tasks)),
              "task_label": coordinate("task_label", "task", strings(task_labels)), **voxels}
    return xr.Dataset(data, coords=coords, attrs=dict(attrs))


def partition_template(sets: Sequence[str], groups: Sequence[str], spaces: Sequence[str],
                       voxels: Mapping[str, xr.Variable], *, attrs: Mapping[str, Any]) -> xr.Dataset:
    """``partition/<analysis>/<subject>`` with every variable at its fill value. ``sets``: the
    unions in :func:`neurotask.pipeline.stats.partition.subsets` order, named as its ``set_name``;
    the Venn regions carry the same names (dim ``region``)."""
    sizes = {"set": len(sets), "region": len(sets), "group": len(groups), "space": len(spaces),
             "voxel": voxels["voxel"].size}
    data = {name: xr.Variable(var.dims, var.filled(tuple(sizes[d] for d in var.dims)), attrs=var.attrs)
            for name, var in PARTITION_VARIABLES.items()}
    coords = {"set": xr.Variable("set", strings(sets), attrs={"long_name": "union of feature-space groups"}),
              "region": xr.Variable("region", strings(sets),
                                    attrs={"long_name": "Venn region: the variance of exactly these groups"}),
              "group": xr.Variable("group", strings(groups), attrs={"long_name": "group of feature spaces"}),
              "space": xr.Variable("space", strings(spaces), attrs={"long_name": "feature space"}), **voxels}
    return xr.Dataset(data, coords=coords, attrs=dict(attrs))


def with_values(template: xr.Dataset, values: Mapping[str, np.ndarray]) -> xr.Dataset:
    """``template`` with some variables replaced by ``values`` (cast to the template's dtype;
    dims and attrs kept)."""
    out = template.copy()
    for name, array in values.items():
        out[name] = template[name].copy(data=np.asarray(array).astype(template[name].dtype))
    return out
