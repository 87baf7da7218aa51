"""The study store: one Zarr (v3) hierarchy per study, read and written through xarray.

Layout::

    features/<task>       features   (image, feature)  float32
    responses/<subject>   responses  (image, voxel)    float32, chunked (all images, chunk_size)
                          coords: image (name), voxel (index), voxel_i/j/k, roi; attrs: geometry
    results/<subject>     r, r2, alpha, pvalue, qvalue, significant   (task, voxel)
                          chunked (1 task, chunk_size): one fit unit writes exactly one chunk
    analysis/...          written by the analysis stage

Every write after creation is a region write of whole chunks, so concurrent workers never touch
the same Zarr chunk. Whether a chunk is *finished* is recorded separately (``storage.progress``),
after its data are written.
"""

from __future__ import annotations

import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Iterable

import dask.array as da
import numpy as np
import xarray as xr
import zarr

# Per (task, voxel). Permutation variables exist when the fit ran the permutation test.
RESULT_VARS = ("r", "r2", "alpha", "pvalue", "qvalue", "significant")
PERMUTATION_VARS = ("pvalue_perm", "qvalue_perm", "significant_perm")
# Per voxel, the same for every task: the noise ceiling from repeated images.
CEILING_VARS = ("ncsnr", "noise_ceiling_r", "noise_ceiling_r2")
_FLOAT64 = {"alpha", "pvalue", "qvalue", "pvalue_perm", "qvalue_perm", "ncsnr", "noise_ceiling_r", "noise_ceiling_r2"}
VOXEL_COORDS = ("voxel_i", "voxel_j", "voxel_k", "roi")

# xarray warns that zarr v3 consolidated metadata is not part of the spec; we never use it.
warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")


class StoreError(Exception):
    """The store lacks something a stage needs, or holds data incompatible with the request."""


def _strings(values: Iterable[str]) -> np.ndarray:
    # Object arrays of str become Zarr v3 variable-length UTF-8 strings (a specified type).
    return np.array(list(values), dtype=object)


class StudyStore:
    """A study's Zarr store at ``path`` (a directory ending in ``.zarr``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

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

    @property
    def store_id(self) -> str:
        if not self.exists():
            raise StoreError(f"no study store at {self.path}")
        return zarr.open_group(str(self.path), mode="r").attrs["store_id"]

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
        return xr.open_zarr(str(self.path), group=group, consolidated=False, zarr_format=3, chunks=None)

    def _write(self, ds: xr.Dataset, group: str, **kwargs: Any) -> Any:
        return ds.to_zarr(str(self.path), group=group, consolidated=False, zarr_format=3, **kwargs)

    def remove(self, group: str) -> None:
        """Delete a group (explicit user request only, e.g. --overwrite)."""
        target = self.path / group
        if target.is_dir():
            shutil.rmtree(target)

    # ------------------------------------------------------------------ features

    def write_features(self, task: str, features: np.ndarray, images: list[str], attrs: dict | None = None) -> None:
        """features (n_images, n_features) for the named images; replaces ``features/<task>``."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape[0] != len(images):
            raise StoreError(f"features/{task}: {features.shape[0]} rows for {len(images)} images")
        ds = xr.Dataset(
            {"features": (("image", "feature"), features)},
            coords={"image": _strings(images)},
            attrs=dict(attrs or {}, task=task),
        )
        self._write(ds, f"features/{task}", mode="w")

    def init_features(self, task: str, images: list[str], n_features: int, batch_size: int,
                      attrs: dict | None = None) -> None:
        """Create ``features/<task>`` (image, feature) with its image names, data unwritten,
        chunked by ``batch_size`` images so each featurize batch writes exactly one chunk."""
        template = da.zeros((len(images), n_features), chunks=(batch_size, n_features), dtype=np.float32)
        ds = xr.Dataset({"features": (("image", "feature"), template)}, coords={"image": _strings(images)},
                        attrs=dict(attrs or {}, task=task, batch_size=batch_size))
        self._write(ds, f"features/{task}", mode="w", compute=False)

    def write_feature_rows(self, task: str, rows: slice, values: np.ndarray) -> None:
        """values (len(rows), n_features) into ``features/<task>``; rows must align with chunks.

        Written through zarr directly into the array ``init_features`` created: xarray's region
        write re-reads the group's metadata on every call (~15 ms, against ~4 ms), which on a GPU
        was a third of featurizing time (21 writes per batch).
        """
        values = np.asarray(values, dtype=np.float32)
        try:
            arr = zarr.open_array(str(self.path), path=f"features/{task}/features", mode="r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
            raise StoreError(f"{self.path}: features/{task} was not initialised (init_features)") from None
        start, stop, step = rows.indices(arr.shape[0])
        chunk = arr.chunks[0]
        if step != 1 or start % chunk or (stop % chunk and stop != arr.shape[0]):
            raise StoreError(f"features/{task}: rows {start}:{stop} do not align with chunks of {chunk} images")
        if values.shape != (stop - start, arr.shape[1]):
            raise StoreError(f"features/{task}: values of shape {values.shape} for rows {start}:{stop} "
                             f"of {arr.shape[1]} features")
        arr[start:stop] = values

    def feature_attrs(self, task: str) -> dict:
        return dict(self._open(f"features/{task}").attrs) if self.has(f"features/{task}") else {}

    def feature_tasks(self) -> list[str]:
        return self.members("features")

    def feature_count(self, task: str) -> int:
        """Number of features of a task (metadata only)."""
        if not self.has(f"features/{task}"):
            raise StoreError(f"{self.path}: no features for task '{task}'")
        return int(self._open(f"features/{task}").sizes["feature"])

    def read_features(self, task: str) -> xr.DataArray:
        """-> DataArray (image, feature), loaded into memory."""
        if not self.has(f"features/{task}"):
            raise StoreError(
                f"{self.path}: no features for task '{task}' (features/{task}); "
                f"present: {', '.join(self.feature_tasks()) or 'none'}. Run `neurotask featurize` or `simulate`."
            )
        return self._open(f"features/{task}")["features"].load()

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
    ) -> None:
        """Create ``responses/<subject>`` (image, voxel) with its coordinates, data unwritten.

        voxel_ijk (v, 3) int: array indices of each voxel in the subject's volume.
        With ``repeated_images``, also ``repeat_responses`` (showing, repeated_image, voxel):
        the single trials of images shown more than once, NaN where an image had fewer showings.
        """
        n, v = len(images), len(roi)
        voxel_ijk = np.asarray(voxel_ijk)
        if voxel_ijk.shape != (v, 3):
            raise StoreError(f"responses/{subject}: voxel_ijk has shape {voxel_ijk.shape}, expected ({v}, 3)")
        template = da.zeros((n, v), chunks=(n, chunk_size), dtype=np.float32)
        coords: dict[str, Any] = {
            "image": _strings(images),
            "voxel": np.arange(v, dtype=np.int64),
            "voxel_i": ("voxel", voxel_ijk[:, 0].astype(np.int32)),
            "voxel_j": ("voxel", voxel_ijk[:, 1].astype(np.int32)),
            "voxel_k": ("voxel", voxel_ijk[:, 2].astype(np.int32)),
            "roi": ("voxel", _strings(roi)),
        }
        for name, values in (image_coords or {}).items():
            coords[name] = ("image", np.asarray(values))
        data = {"responses": (("image", "voxel"), template)}
        if repeated_images:
            coords["repeated_image"] = _strings(repeated_images)
            r = len(repeated_images)
            data["repeat_responses"] = (("showing", "repeated_image", "voxel"),
                                        da.zeros((n_showings, r, v), chunks=(n_showings, r, chunk_size), dtype=np.float32))
        ds = xr.Dataset(data, coords=coords, attrs=dict(attrs, subject=subject, chunk_size=chunk_size))
        self._write(ds, f"responses/{subject}", mode="w", compute=False)

    def write_responses(self, subject: str, voxels: slice, values: np.ndarray, repeats: np.ndarray | None = None) -> None:
        """values (n_images, len(voxels)) and, if the store has them, repeats
        (showing, repeated_image, len(voxels)) into the region; voxels must align with chunks."""
        data = {"responses": (("image", "voxel"), np.asarray(values, dtype=np.float32))}
        region = {"image": slice(None), "voxel": voxels}
        if repeats is not None:
            data["repeat_responses"] = (("showing", "repeated_image", "voxel"), np.asarray(repeats, dtype=np.float32))
            region.update(showing=slice(None), repeated_image=slice(None))
        self._write(xr.Dataset(data), f"responses/{subject}", region=region)

    def responses(self, subject: str) -> xr.Dataset:
        """Lazily read dataset of a subject's responses and voxel coordinates."""
        if not self.has(f"responses/{subject}"):
            raise StoreError(f"{self.path}: no responses for subject '{subject}'; run `neurotask ingest` first")
        return self._open(f"responses/{subject}")

    def read_response_chunk(self, subject: str, voxels: slice) -> np.ndarray:
        """-> (n_images, len(voxels)) float32: exactly one stored chunk when aligned."""
        return self.responses(subject)["responses"][:, voxels].values

    def subjects(self) -> list[str]:
        return self.members("responses")

    # ------------------------------------------------------------------ results

    def ensure_results(self, subject: str, tasks: list[str], fit_params: dict[str, Any],
                       permutation: bool = False) -> list[str]:
        """Create ``results/<subject>`` or add missing tasks to it; return the stored task order.

        With ``permutation``, the permutation-test variables are part of the results.

        Refuses (StoreError) when the stored results were fitted with other parameters.
        """
        group = f"results/{subject}"
        resp = self.responses(subject)
        chunk = int(resp.attrs["chunk_size"])
        v = resp.sizes["voxel"]
        if self.has(group):
            existing = self._open(group)
            stored = existing.attrs.get("fit", {})
            if stored != fit_params:
                raise StoreError(
                    f"{self.path}: results/{subject} were fitted with {stored}, the config asks for "
                    f"{fit_params}. Use a new study.workdir, or `neurotask fit --overwrite` to discard them."
                )
            if existing.sizes["voxel"] != v:
                raise StoreError(f"{self.path}: results/{subject} has {existing.sizes['voxel']} voxels, responses {v}")
            have = [str(t) for t in existing["task"].values]
            new = [t for t in tasks if t not in have]
            if new:
                template = self._results_template(new, resp, fit_params, permutation).drop_vars(CEILING_VARS)
                self._write(template, group, append_dim="task")
            return have + new
        template = self._results_template(tasks, resp, fit_params, permutation)
        encoding = {name: {"chunks": (1, chunk) if template[name].ndim == 2 else (chunk,)} for name in template.data_vars}
        self._write(template, group, mode="w", encoding=encoding)
        return list(tasks)

    @staticmethod
    def _results_template(tasks: list[str], resp: xr.Dataset, fit_params: dict[str, Any],
                          permutation: bool) -> xr.Dataset:
        t, v = len(tasks), resp.sizes["voxel"]
        names = RESULT_VARS + (PERMUTATION_VARS if permutation else ())
        data = {}
        for name in names:
            if name.startswith("significant"):
                data[name] = (("task", "voxel"), np.zeros((t, v), dtype=bool))
            else:
                data[name] = (("task", "voxel"), np.full((t, v), np.nan, np.float64 if name in _FLOAT64 else np.float32))
        for name in CEILING_VARS:
            data[name] = (("voxel",), np.full(v, np.nan))
        coords = {"task": _strings(tasks), "voxel": resp["voxel"].values}
        coords.update({c: ("voxel", resp[c].values) for c in VOXEL_COORDS})
        attrs = {k: resp.attrs[k] for k in ("subject", "volume_shape", "affine", "chunk_size") if k in resp.attrs}
        return xr.Dataset(data, coords=coords, attrs=dict(attrs, fit=fit_params))

    def write_result_chunk(self, subject: str, task_index: int, voxels: slice, values: dict[str, np.ndarray]) -> None:
        """values: name -> (len(voxels),) for some (task, voxel) variables, written as one region."""
        ds = xr.Dataset({name: (("task", "voxel"), np.asarray(a)[None, :]) for name, a in values.items()})
        self._write(ds, f"results/{subject}", region={"task": slice(task_index, task_index + 1), "voxel": voxels})

    def write_voxel_results(self, subject: str, voxels: slice, values: dict[str, np.ndarray]) -> None:
        """values: name -> (len(voxels),) for per-voxel variables (CEILING_VARS)."""
        ds = xr.Dataset({name: (("voxel",), np.asarray(a)) for name, a in values.items()})
        self._write(ds, f"results/{subject}", region={"voxel": voxels})

    def read_result(self, subject: str, name: str, task_index: int) -> np.ndarray:
        """One variable of one task's results, (v,), without loading the rest."""
        return self._open(f"results/{subject}")[name][task_index].values

    def results(self, subject: str) -> xr.Dataset:
        """A subject's results (task, voxel), loaded."""
        if not self.has(f"results/{subject}"):
            raise StoreError(f"{self.path}: no results for subject '{subject}'; run `neurotask fit` first")
        return self._open(f"results/{subject}").load()

    # ------------------------------------------------------------------ analysis

    def write_dataset(self, group: str, ds: xr.Dataset) -> None:
        """Replace ``group`` with a small, fully computed dataset (analysis outputs)."""
        self._write(ds, group, mode="w")

    def read_dataset(self, group: str) -> xr.Dataset:
        return self._open(group).load()
