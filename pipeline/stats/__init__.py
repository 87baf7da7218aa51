"""Statistics of fitted encoding models: test scores and permutation tests, noise ceiling,
task similarity, task trees, the comparison with Taskonomy. Pure array code (no I/O, no Dask)."""
