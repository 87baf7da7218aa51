"""neurotask: Neural Taskonomy at cluster scale.

One import name for the whole project. The top-level folders of the checkout are installed
under it (``pyproject.toml``'s ``package-dir``): ``cluster/`` as ``neurotask.cluster``,
``pipeline/`` as ``neurotask.pipeline``, ``storage/`` as ``neurotask.storage``. Dask pickles
task functions by module path, so a worker started in a folder holding a ``pipeline.py`` or a
``storage/`` of its own (Dask's spill directory is one) still imports our code.

The Python API, ``neurotask.open_study`` (``neurotask.api``), reads a study's labelled
results as xarray; see docs/python_api.md.
"""

__version__ = "0.1.0"

__all__ = ["open_study", "Study", "StudyNotFoundError", "ResultNotFoundError", "__version__"]


def __getattr__(name: str):
    # The API on first use (PEP 562): `import neurotask` alone, as every worker does to unpickle
    # our task functions, stays free of xarray and Dask.
    if name in ("open_study", "Study", "StudyNotFoundError", "ResultNotFoundError", "StudyPaths"):
        from neurotask import api

        return getattr(api, name)
    raise AttributeError(f"module 'neurotask' has no attribute {name!r}")
