"""The stages: one module each, talking to each other only through the study store.

Orchestration only (file I/O, the store, Dask); the maths they run lives in ``ridge`` and
``stats``, the file formats they read in ``formats``.
"""
