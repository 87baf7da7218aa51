"""neurotask.pipeline: the command line, the configuration and everything between them and the store.

- ``cli``, ``config``, ``errors``, ``console``, ``tasks``: the command, the validated study
  configuration, the user-facing exceptions, terminal progress, the 21 Taskonomy tasks.
- ``stages``: one module per stage (orchestration: I/O and Dask, no maths).
- ``ridge``: the ridge engine (pure arrays).
- ``stats``: test scores, noise ceiling, similarity, task structure (pure arrays).
- ``features``: feature spaces, Taskonomy encoders, preprocessing, weights.
- ``formats``: readers of other people's files (paths in, arrays out).
- ``report``: the report's figures and its HTML page (a jinja2 template in ``templates/``);
  the report stage decides what is drawn and written where.

Arrows run one way: cli -> stages -> (ridge, stats, features, formats, report) -> storage.
"""
