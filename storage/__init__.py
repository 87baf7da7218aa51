"""The Zarr study store: layout, xarray (de)serialisation, region writes, progress markers,
voxel <-> volume mapping and NIfTI export. Imports nothing else of neurotask."""

from neurotask.storage.progress import Progress
from neurotask.storage.store import CEILING_VARS, PERMUTATION_VARS, RESULT_VARS, StoreError, StudyStore
from neurotask.storage.volume import mask_to_ijk, save_nifti, to_volume

__all__ = ["CEILING_VARS", "PERMUTATION_VARS", "Progress", "RESULT_VARS", "StoreError", "StudyStore", "mask_to_ijk", "save_nifti", "to_volume"]
