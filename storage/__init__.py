"""The Zarr study store: its schema (group paths, marker names, chunk plan, variables), xarray
(de)serialisation, region writes, progress markers, atomic writes, voxel <-> volume mapping
and NIfTI export. Imports nothing else of neurotask."""

from neurotask.storage.atomic import write_json_atomic
from neurotask.storage.progress import Progress
from neurotask.storage.schema import (CEILING_VARS, PERMUTATION_VARS, RESULT_VARS, ChunkPlan, Stage, anatomy_group, analysis_group,
                                      chunk_key, features_group, partition_group, responses_group, results_group,
                                      roi_results_group)
from neurotask.storage.store import StoreError, StudyStore
from neurotask.storage.volume import mask_to_ijk, save_nifti, to_volume

__all__ = ["CEILING_VARS", "ChunkPlan", "PERMUTATION_VARS", "Progress", "RESULT_VARS", "Stage", "StoreError",
           "StudyStore", "anatomy_group", "analysis_group", "chunk_key", "features_group", "mask_to_ijk", "partition_group", "responses_group",
           "results_group", "roi_results_group", "save_nifti", "to_volume", "write_json_atomic"]
