"""The study store: one Zarr (v3) hierarchy per study, read and written through xarray.

Its layout, variables and chunking are those of :mod:`storage.schema`. Every write after
creation is a region write of whole chunks, so concurrent workers never touch the same Zarr
chunk. Whether a chunk is *finished* is recorded separately (``storage.progress``, in the
study's progress directory beside the store), after its data are written.

Metadata are consolidated at the root after every write that changes them (only drivers make
those: creating, appending, replacing or removing a group), so ``xr.open_zarr(path,
group=...)`` reads one file; region writes of data (workers) leave them as they are.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from neurotask.storage import schema
from neurotask.storage.atomic import write_atomic
from neurotask.storage.checksums import Damage, check_records, read_array_metadata, seal_region
from neurotask.storage.progress import Progress
from neurotask.storage.schema import (CEILING_VARS, FEATURES, PROGRESS_DIR, REPEAT_RESPONSES, RESPONSES, UNDERLAY,
                                      ChunkPlan, anatomy_group, coordinate, features_group, partition_group, responses_group,
                                      results_group, strings,
                                      voxel_coords)


# Fit parameters added to the fingerprint later, with the value every result stored before
# them was computed with: such stores still match a config asking for that value.
LEGACY_FIT_PARAMS: dict[str, Any] = {"backend": "numpy", "test_set": "position"}


class StoreError(Exception):
    """The store lacks something a stage needs, or holds data incompatible with the request."""


def _shown(value: object) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def describe_differences(stored: dict, wanted: dict) -> str:
    """Only the keys whose values differ between ``stored`` parameters and the ``wanted`` ones
    (the config), in the stored order then the config's new keys, e.g.
    ``"n_folds: stored 5, config 7; seed: stored 0, config 1"``; a key missing on one side
    shows as ``absent``. Empty when nothing differs. For refusals that should not make the
    user diff two long dicts by eye."""
    absent = object()
    keys = list(stored) + [k for k in wanted if k not in stored]
    parts = []
    for key in keys:
        a, b = stored.get(key, absent), wanted.get(key, absent)
        if a is not absent and b is not absent and a == b:
            continue
        parts.append(f"{key}: stored {'absent' if a is absent else _shown(a)}, "
                     f"config {'absent' if b is absent else _shown(b)}")
    return "; ".join(parts)


def _results_encoding(template: xr.Dataset, names: Sequence[str], chunk: int) -> dict[str, dict]:
    """Results chunking: one task x ``chunk`` voxels ((task, voxel) variables) or ``chunk``
    voxels (per-voxel ones), the region a fit unit writes."""
    return {name: {"chunks": (1, chunk) if template[name].ndim == 2 else (chunk,)} for name in names}


class StudyStore:
    """A study's Zarr store at ``path`` (a directory ending in ``.zarr``) and the study's
    progress directory beside it (``<workdir>/progress``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._store_id: str | None = None  # read once: a store's id never changes

    # ------------------------------------------------------------------ basics

    def exists(self) -> bool:
        return (self.path / "zarr.json").is_file()

    def create(self) -> None:
        """Create the root group if missing, with a random id that progress markers refer to."""
        if self.exists():
            return
        root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        root.attrs["store_id"] = uuid.uuid4().hex
        root.attrs["layout"] = "neurotask-1"
        self.consolidate()

    @property
    def store_id(self) -> str:
        if self._store_id is None:
            if not self.exists():
                raise StoreError(f"no study store at {self.path}")
            self._store_id = str(zarr.open_group(str(self.path), mode="r").attrs["store_id"])
        return self._store_id

    @property
    def progress_dir(self) -> Path:
        return self.path.parent / PROGRESS_DIR

    def progress(self) -> Progress:
        """The progress markers of this store (raises StoreError if there is no store)."""
        return Progress(self.progress_dir, self.store_id)

    def has(self, group: str) -> bool:
        return (self.path / group / "zarr.json").is_file()

    def members(self, parent: str) -> list[str]:
        d = self.path / parent
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if (p / "zarr.json").is_file())

    def _open(self, group: str) -> xr.Dataset:
        if not self.has(group):
            raise StoreError(f"{self.path}: '{group}' is not in the store")
        # chunks=None: lazily indexed NumPy-backed arrays, no Dask. Reads then happen in the
        # calling process (a worker reads its own chunk), never as tasks on an active cluster.
        try:
            return xr.open_zarr(str(self.path), group=group, consolidated=True, zarr_format=3, chunks=None)
        except (ValueError, KeyError):  # a store written before its metadata were consolidated
            return xr.open_zarr(str(self.path), group=group, consolidated=False, zarr_format=3, chunks=None)

    def _write(self, ds: xr.Dataset, group: str, **kwargs: Any) -> Any:
        """Write ``ds`` to ``group``; a write that changes metadata (anything but a region
        write) is followed by the root's consolidation."""
        out = ds.to_zarr(str(self.path), group=group, consolidated=False, zarr_format=3, **kwargs)
        if "region" not in kwargs:
            self.consolidate()
        return out

    def consolidate(self) -> None:
        """Rewrite the root's consolidated metadata (after groups were added, moved or removed)."""
        with warnings.catch_warnings():
            # zarr: consolidated metadata are not yet part of the v3 spec (zarr-python and
            # xarray read them; other readers ignore them and read each group's own metadata).
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            zarr.consolidate_metadata(str(self.path), zarr_format=3)

    def remove(self, group: str) -> None:
        """Delete a group (explicit user request only, e.g. --overwrite)."""
        target = self.path / group
        if target.is_dir():
            shutil.rmtree(target)
            self.consolidate()

    # ------------------------------------------------------------------ features

    def write_features(self, task: str, features: np.ndarray, images: list[str], attrs: dict | None = None) -> None:
        """features (n_images, n_features) for the named images; replaces ``features/<task>``."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape[0] != len(images):
            raise StoreError(f"{features_group(task)}: {features.shape[0]} rows for {len(images)} images")
        ds = xr.Dataset(
            {"features": xr.Variable(FEATURES.dims, features, attrs=FEATURES.attrs)},
            coords={"image": coordinate("image", "image", strings(images))},
            attrs=dict(attrs or {}, task=task),
        )
        self._write(ds, features_group(task), mode="w")

    def init_features(self, task: str, images: list[str], n_features: int, batch_size: int,
                      attrs: dict | None = None) -> None:
        """Create ``features/<task>`` (image, feature) with its image names, data unwritten,
        chunked by ``batch_size`` images so each featurize batch writes exactly one chunk."""
        template = da.zeros((len(images), n_features), chunks=(batch_size, n_features), dtype=np.float32)
        ds = xr.Dataset({"features": xr.Variable(FEATURES.dims, template, attrs=FEATURES.attrs)},
                        coords={"image": coordinate("image", "image", strings(images))},
                        attrs=dict(attrs or {}, task=task, batch_size=batch_size))
        self._write(ds, features_group(task), mode="w", compute=False)

    def write_feature_rows(self, task: str, rows: slice, values: np.ndarray) -> None:
        """values (len(rows), n_features) into ``features/<task>``; rows must align with chunks.

        Written through zarr directly into the array ``init_features`` created: xarray's region
        write re-reads the group's metadata on every call (~15 ms, against ~4 ms), which on a GPU
        was a third of featurizing time (21 writes per batch).
        """
        group = features_group(task)
        values = np.asarray(values, dtype=np.float32)
        try:
            arr = zarr.open_array(str(self.path), path=f"{group}/features", mode="r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
            raise StoreError(f"{self.path}: {group} was not initialised (init_features)") from None
        start, stop, step = rows.indices(arr.shape[0])
        chunk = arr.chunks[0]
        if step != 1 or start % chunk or (stop % chunk and stop != arr.shape[0]):
            raise StoreError(f"{group}: rows {start}:{stop} do not align with chunks of {chunk} images")
        if values.shape != (stop - start, arr.shape[1]):
            raise StoreError(f"{group}: values of shape {values.shape} for rows {start}:{stop} "
                             f"of {arr.shape[1]} features")
        arr[start:stop] = values

    def feature_attrs(self, task: str) -> dict:
        return dict(self._open(features_group(task)).attrs) if self.has(features_group(task)) else {}

    def feature_tasks(self) -> list[str]:
        return self.members("features")

    def feature_count(self, task: str) -> int:
        """Number of features of a task (metadata only)."""
        if not self.has(features_group(task)):
            raise StoreError(f"{self.path}: no features for task '{task}'")
        return int(self._open(features_group(task)).sizes["feature"])

    def read_features(self, task: str) -> xr.DataArray:
        """-> DataArray (image, feature), loaded into memory."""
        group = features_group(task)
        if not self.has(group):
            raise StoreError(
                f"{self.path}: no features for task '{task}' ({group}); "
                f"present: {', '.join(self.feature_tasks()) or 'none'}. Run `neurotask featurize` or `simulate`."
            )
        return self._open(group)["features"].load()

    # ------------------------------------------------------------------ responses

    def init_responses(
        self,
        subject: str,
        images: list[str],
        voxel_ijk: np.ndarray,
        roi: list[str],
        chunk_size: int,
        attrs: dict[str, Any],
        image_coords: dict[str, np.ndarray] | None = None,
        repeated_images: list[str] | None = None,
        n_showings: int = 0,
        units: str = RESPONSES.units,
        voxel_extra: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Create ``responses/<subject>`` (image, voxel) with its coordinates, data unwritten.

        voxel_ijk (v, 3) int: array indices of each voxel in the subject's volume.
        image_coords: name -> (n_images,) values, names among ``schema.COORDINATES``.
        With ``repeated_images``, also ``repeat_responses`` (showing, repeated_image, voxel):
        the single trials of images shown more than once, NaN where an image had fewer showings.
        ``units``: of the response values (dimensionless when z-scored).
        voxel_extra: name -> (v,) values, more voxel coordinates (names among ``schema.COORDINATES``).
        """
        n, v = len(images), len(roi)
        voxel_ijk = np.asarray(voxel_ijk)
        if voxel_ijk.shape != (v, 3):
            raise StoreError(f"{responses_group(subject)}: voxel_ijk has shape {voxel_ijk.shape}, expected ({v}, 3)")
        template = da.zeros((n, v), chunks=(n, chunk_size), dtype=np.float32)
        coords: dict[str, Any] = {"image": coordinate("image", "image", strings(images)),
                                  **voxel_coords(voxel_ijk, roi)}
        for name, values in (image_coords or {}).items():
            coords[name] = coordinate(name, "image", np.asarray(values))
        for name, values in (voxel_extra or {}).items():
            coords[name] = coordinate(name, "voxel", np.asarray(values))
        data = {"responses": xr.Variable(RESPONSES.dims, template, attrs=dict(RESPONSES.attrs, units=units))}
        if repeated_images:
            coords["repeated_image"] = coordinate("repeated_image", "repeated_image", strings(repeated_images))
            r = len(repeated_images)
            repeats = da.zeros((n_showings, r, v), chunks=(n_showings, r, chunk_size), dtype=np.float32)
            data["repeat_responses"] = xr.Variable(REPEAT_RESPONSES.dims, repeats,
                                                   attrs=dict(REPEAT_RESPONSES.attrs, units=units))
        ds = xr.Dataset(data, coords=coords, attrs=dict(attrs, subject=subject, chunk_size=chunk_size))
        self._write(ds, responses_group(subject), mode="w", compute=False)

    def write_responses(self, subject: str, voxels: slice, values: np.ndarray, repeats: np.ndarray | None = None) -> None:
        """values (n_images, len(voxels)) and, if the store has them, repeats
        (showing, repeated_image, len(voxels)) into the region; voxels must align with chunks."""
        data = {"responses": (("image", "voxel"), np.asarray(values, dtype=np.float32))}
        region = {"image": slice(None), "voxel": voxels}
        if repeats is not None:
            data["repeat_responses"] = (("showing", "repeated_image", "voxel"), np.asarray(repeats, dtype=np.float32))
            region.update(showing=slice(None), repeated_image=slice(None))
        self._write(xr.Dataset(data), responses_group(subject), region=region)

    def responses(self, subject: str) -> xr.Dataset:
        """Lazily read dataset of a subject's responses and voxel coordinates."""
        if not self.has(responses_group(subject)):
            raise StoreError(f"{self.path}: no responses for subject '{subject}'; run `neurotask ingest` first")
        return self._open(responses_group(subject))

    def voxel_chunks(self, subject: str) -> ChunkPlan:
        """How the subject's voxels are chunked in responses and results (one fit unit each)."""
        resp = self.responses(subject)
        return ChunkPlan(resp.sizes["voxel"], int(resp.attrs["chunk_size"]))

    def read_response_chunk(self, subject: str, voxels: slice) -> np.ndarray:
        """-> (n_images, len(voxels)) float32: exactly one stored chunk when aligned."""
        return self.responses(subject)["responses"][:, voxels].values

    def subjects(self) -> list[str]:
        return self.members("responses")

    # ------------------------------------------------------------------ results

    def ensure_results(self, subject: str, tasks: Sequence[str], fit_params: dict[str, Any], *,
                       task_labels: Sequence[str], permutation: bool = False) -> list[str]:
        """Create ``results/<subject>`` or add missing tasks to it; return the stored task order.

        ``task_labels``: the display label of each of ``tasks``. With ``permutation``, the
        permutation-test variables are part of the results.

        Refuses (StoreError) when the stored results were fitted with other parameters.
        """
        group = results_group(subject)
        resp = self.responses(subject)
        chunk = int(resp.attrs["chunk_size"])
        v = resp.sizes["voxel"]
        if len(task_labels) != len(tasks):
            raise StoreError(f"{group}: {len(task_labels)} task labels for {len(tasks)} tasks")
        labels = dict(zip(tasks, task_labels))
        if self.has(group):
            existing = self._open(group)
            stored = existing.attrs.get("fit", {})
            # Keys an older version did not store took the value named in LEGACY_FIT_PARAMS.
            stored = {**{k: v for k, v in LEGACY_FIT_PARAMS.items() if k in fit_params}, **stored}
            if stored != fit_params:
                hint = (" (results of the first versions split by position: fit.test_set 'position' resumes them)"
                        if stored.get("test_set") == "position" != fit_params.get("test_set") else "")
                raise StoreError(
                    f"{self.path}: {group} were fitted with other parameters ("
                    f"{describe_differences(stored, fit_params)}){hint}. Use a new study.workdir, or "
                    "`neurotask fit --overwrite` to discard them."
                )
            if existing.sizes["voxel"] != v:
                raise StoreError(f"{self.path}: {group} has {existing.sizes['voxel']} voxels, responses {v}")
            have = [str(t) for t in existing["task"].values]
            new = [t for t in tasks if t not in have]
            if new:
                template = self._results_template(new, [labels[t] for t in new], resp, fit_params, permutation)
                template = template.drop_vars(CEILING_VARS)
                if "task_label" not in existing.coords:  # results written before labels were stored
                    template = template.drop_vars("task_label")
                self._write(template, group, append_dim="task")
            return have + new
        template = self._results_template(list(tasks), [labels[t] for t in tasks], resp, fit_params, permutation)
        encoding = _results_encoding(template, list(template.data_vars), chunk)
        self._write(template, group, mode="w", encoding=encoding)
        return list(tasks)

    @staticmethod
    def _results_template(tasks: list[str], task_labels: list[str], resp: xr.Dataset, fit_params: dict[str, Any],
                          permutation: bool) -> xr.Dataset:
        ijk = np.stack([resp[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
        voxels = voxel_coords(ijk, [str(x) for x in resp["roi"].values])
        attrs = {k: resp.attrs[k] for k in ("subject", "volume_shape", "affine", "chunk_size") if k in resp.attrs}
        return schema.results_template(tasks, task_labels, voxels, permutation=permutation, ceiling=True,
                                       attrs=dict(attrs, fit=fit_params))

    def write_result_chunk(self, subject: str, task_index: int, voxels: slice, values: dict[str, np.ndarray]) -> None:
        """values: name -> (len(voxels),) for some (task, voxel) variables, written as one region."""
        ds = xr.Dataset({name: (("task", "voxel"), np.asarray(a)[None, :]) for name, a in values.items()})
        self._write(ds, results_group(subject), region={"task": slice(task_index, task_index + 1), "voxel": voxels})

    def write_voxel_results(self, subject: str, voxels: slice, values: dict[str, np.ndarray]) -> None:
        """values: name -> (len(voxels),) for per-voxel variables (CEILING_VARS)."""
        ds = xr.Dataset({name: (("voxel",), np.asarray(a)) for name, a in values.items()})
        self._write(ds, results_group(subject), region={"voxel": voxels})

    def read_result(self, subject: str, name: str, task_index: int) -> np.ndarray:
        """One variable of one task's results, (v,), without loading the rest."""
        return self._open(results_group(subject))[name][task_index].values

    def results(self, subject: str) -> xr.Dataset:
        """A subject's results (task, voxel), loaded."""
        if not self.has(results_group(subject)):
            raise StoreError(f"{self.path}: no results for subject '{subject}'; run `neurotask fit` first")
        return self._open(results_group(subject)).load()

    # ------------------------------------------------------------------ anatomy

    def write_anatomy(self, subject: str, underlay: np.ndarray, affine: np.ndarray, source: str) -> None:
        """``anatomy/<subject>``: the report's underlay (i, j, k) in the functional grid, its
        affine (4, 4) and what it is (``source``, shown in the figure captions)."""
        underlay = np.asarray(underlay, dtype=np.float32)
        affine = np.asarray(affine, dtype=np.float64)
        if underlay.ndim != 3 or affine.shape != (4, 4):
            raise StoreError(f"{anatomy_group(subject)}: an underlay (i, j, k) and a (4, 4) affine are needed, "
                             f"got {underlay.shape} and {affine.shape}")
        ds = xr.Dataset({"underlay": xr.Variable(UNDERLAY.dims, underlay, attrs=UNDERLAY.attrs)},
                        attrs={"subject": subject, "affine": affine.tolist(), "source": source,
                               "volume_shape": list(underlay.shape)})
        self._write(ds, anatomy_group(subject), mode="w")

    def anatomy(self, subject: str) -> xr.Dataset | None:
        """A subject's stored underlay (loaded), or None when none was stored (imported results)."""
        if not self.has(anatomy_group(subject)):
            return None
        return self._open(anatomy_group(subject)).load()

    def seal_anatomy(self, subject: str) -> list[dict[str, Any]]:
        """fsync the underlay's chunks; their checksum records, for the subject's ingest marker."""
        return seal_region(self.path, anatomy_group(subject), ["underlay"], (slice(None),) * 3)

    def check_anatomy(self, subject: str, unit: str, records: Sequence[dict[str, Any]]) -> list[Damage]:
        """The chunks of ``anatomy/<subject>`` among ``records`` that are damaged."""
        return check_records(self.path, anatomy_group(subject), unit, records)

    # ------------------------------------------------------------------ partition

    def ensure_partition(self, analysis: str, subject: str, *, sets: Sequence[str], groups: Sequence[str],
                         spaces: Sequence[str], params: dict[str, Any], block_size: int) -> None:
        """Create ``partition/<analysis>/<subject>`` (chunked by ``block_size`` voxels, the region
        a partition unit writes) or check the stored one against ``params`` (the groups, the
        fit's and the partition's settings): StoreError if they differ."""
        group = partition_group(analysis, subject)
        if self.has(group):
            stored = json.loads(self._open(group).attrs.get("params", "{}"))
            if stored != params:
                raise StoreError(f"{self.path}: {group} was computed with other settings ("
                                 f"{describe_differences(stored, params)}). Use `neurotask partition --overwrite` "
                                 "to discard it, or another analysis name.")
            return
        resp = self.responses(subject)
        ijk = np.stack([resp[c].values for c in ("voxel_i", "voxel_j", "voxel_k")], axis=1)
        voxels = voxel_coords(ijk, [str(x) for x in resp["roi"].values])
        attrs = {k: resp.attrs[k] for k in ("subject", "volume_shape", "affine") if k in resp.attrs}
        attrs.update(analysis=analysis, groups=json.dumps(params["groups"]), params=json.dumps(params))
        template = schema.partition_template(sets, groups, spaces, voxels, attrs=attrs)
        encoding = {name: {"chunks": template[name].shape[:-1] + (block_size,)} for name in template.data_vars}
        self._write(template, group, mode="w", encoding=encoding)

    def write_partition(self, analysis: str, subject: str, voxels: slice, values: dict[str, np.ndarray]) -> None:
        """values: name -> array whose last axis is ``voxels`` (a partition variable's dims)."""
        dims = {name: schema.PARTITION_VARIABLES[name].dims for name in values}
        ds = xr.Dataset({name: (dims[name], np.asarray(a)) for name, a in values.items()})
        self._write(ds, partition_group(analysis, subject), region={"voxel": voxels})

    def seal_partition(self, analysis: str, subject: str, variables: Sequence[str], voxels: slice) -> list[dict[str, Any]]:
        """fsync and checksum the chunks of ``variables`` over ``voxels``, for the marker next."""
        return seal_region(self.path, partition_group(analysis, subject), variables, (slice(None), slice(None), voxels))

    def check_partition(self, analysis: str, subject: str, unit: str, records: Sequence[dict[str, Any]]) -> list[Damage]:
        return check_records(self.path, partition_group(analysis, subject), unit, records)

    def partition(self, analysis: str, subject: str) -> xr.Dataset:
        """A subject's variance partition of ``analysis``, loaded."""
        group = partition_group(analysis, subject)
        if not self.has(group):
            raise StoreError(f"{self.path}: no partition '{analysis}' for subject '{subject}'; "
                             "run `neurotask partition` first")
        return self._open(group).load()

    # ------------------------------------------------------------------ analysis

    def write_dataset(self, group: str, ds: xr.Dataset) -> None:
        """Replace ``group`` with a small, fully computed dataset (analysis outputs, imports)."""
        self._write(ds, group, mode="w")

    def read_dataset(self, group: str) -> xr.Dataset:
        return self._open(group).load()

    # ------------------------------------------------------------------ integrity

    def seal_results(self, subject: str, variables: Sequence[str], region: Sequence[slice]) -> list[dict[str, Any]]:
        """fsync the chunks of ``variables`` of ``results/<subject>`` that ``region`` (task, voxel
        slices; per-voxel variables use the voxel slice) covers; their checksum records, for the
        marker written next (``storage.checksums``)."""
        return seal_region(self.path, results_group(subject), variables, region)

    def seal_responses(self, subject: str) -> list[dict[str, Any]]:
        """fsync every chunk of ``responses/<subject>`` (responses and, if stored, the repeated
        trials); their checksum records, for the subject's ingest marker."""
        names = [n for n in ("responses", "repeat_responses") if n in self.responses(subject).data_vars]
        return seal_region(self.path, responses_group(subject), names, (slice(None),) * 3)

    def check_responses(self, subject: str, unit: str, records: Sequence[dict[str, Any]]) -> list[Damage]:
        """The chunks of ``responses/<subject>`` among ``records`` (its ingest marker's) that are damaged."""
        return check_records(self.path, responses_group(subject), unit, records)

    def check_results(self, subject: str, unit: str, records: Sequence[dict[str, Any]]) -> list[Damage]:
        """The chunks of ``results/<subject>`` among ``records`` (a marker's) that are damaged."""
        return check_records(self.path, results_group(subject), unit, records)

    def result_tasks(self, subject: str) -> list[str]:
        """The stored task order of ``results/<subject>`` (metadata and the task coordinate only)."""
        return [str(t) for t in self._open(results_group(subject))["task"].values]

    def broken_results_metadata(self, subject: str, permutation: bool) -> list[str]:
        """The variables of ``results/<subject>`` (with ``permutation``, its permutation-test
        variables too) whose array metadata are missing or do not parse."""
        broken = []
        for name in [*schema.RESULT_VARS, *(schema.PERMUTATION_VARS if permutation else ()), *CEILING_VARS]:
            try:
                read_array_metadata(self.path, f"{results_group(subject)}/{name}")
            except (OSError, ValueError):
                broken.append(name)
        return broken

    def repair_results_metadata(self, subject: str, permutation: bool) -> list[str]:
        """Rewrite the missing or unreadable array metadata (``zarr.json``) of the variables of
        ``results/<subject>``; returns the variables repaired.

        From the root's consolidated copy while it still holds the array, else from the results
        template of the stored tasks, labels and fit parameters (deterministic): either equals
        the metadata the chunks were written with, so the surviving chunks become readable
        again (and are then checked against their markers)."""
        group = results_group(subject)
        broken = self.broken_results_metadata(subject, permutation)
        if not broken:
            return []
        # Group metadata and coordinates are intact (else the group itself would be unreadable).
        existing = zarr.open_group(str(self.path), path=group, mode="r", zarr_format=3)
        tasks = [str(t) for t in existing["task"][:]]
        labels = [str(t) for t in existing["task_label"][:]] if "task_label" in existing else tasks
        attrs = dict(existing.attrs)
        template = self._results_template(tasks, labels, self.responses(subject), attrs["fit"], permutation)
        chunk = int(self.responses(subject).attrs["chunk_size"])
        encoding = _results_encoding(template, broken, chunk)
        with tempfile.TemporaryDirectory(dir=self.path.parent, prefix=".repair-") as tmp:
            template[broken].to_zarr(tmp, group=group, mode="w", zarr_format=3, consolidated=False,
                                     encoding=encoding, compute=False)
            for name in broken:
                made = json.loads((Path(tmp) / group / name / "zarr.json").read_text())
                # The consolidated copy is what the chunks were written with; the template only
                # stands in once a later consolidation has dropped the array.
                meta = self._consolidated_array_metadata(f"{group}/{name}") or made
                target = self.path / group / name / "zarr.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, json.dumps(meta, indent=2).encode())
        self.consolidate()
        return broken

    def _consolidated_array_metadata(self, array: str) -> dict[str, Any] | None:
        """The array's metadata as the root's consolidated metadata hold them, if they do."""
        try:
            meta = json.loads((self.path / "zarr.json").read_text())["consolidated_metadata"]["metadata"][array]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return meta if isinstance(meta, dict) and meta.get("node_type") == "array" else None
