"""The ridge engine: voxelwise ridge regression with a per-voxel alpha chosen by cross-validation.

Pure array code (no I/O, no Dask), after himalaya's solvers.
"""
