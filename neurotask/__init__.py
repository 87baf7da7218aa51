"""neurotask: Neural Taskonomy at cluster scale.

One import name for the whole project. The top-level folders of the checkout are installed
under it (``pyproject.toml``'s ``package-dir``): ``cluster/`` as ``neurotask.cluster``,
``pipeline/`` as ``neurotask.pipeline``, ``storage/`` as ``neurotask.storage``. Dask pickles
task functions by module path, so a worker started in a folder holding a ``pipeline.py`` or a
``storage/`` of its own (Dask's spill directory is one) still imports our code.
"""

__version__ = "0.1.0"
