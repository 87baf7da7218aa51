"""The ridge engine: voxelwise ridge regression with a per-voxel alpha chosen by cross-validation.

Pure array code (no I/O, no Dask), after himalaya's solvers: every function documents its
arrays' shapes, voxels (targets) are processed in batches to bound memory, and one switch
(:mod:`~neurotask.pipeline.ridge.backend`) runs the same code on numpy or on torch (CPU or CUDA).

The protocol is the paper's: a seeded held-out test set; on the training part, each voxel's
alpha is chosen on a log grid by K-fold cross-validation scoring mean squared error (the mean
over folds of each fold's MSE, as scikit-learn's ``cross_val_score``); then a refit on the whole
training part with each voxel's alpha predicts the test set. Every model has an intercept.
Ties go to the smallest alpha.

Notation: ``n`` samples (images), ``p`` features, ``v`` voxels, ``k`` retained eigen-directions
of a fold's training features, ``a`` alphas, ``r_g``/``R`` ranks of the certified search's
expansion.

Modules, in the order the work flows:
- ``splits``: the alpha grid, the test set and the CV folds (row indices);
- ``decomposition``: each fold's features in their eigenbasis, once per (feature space, split);
- ``fold_terms``: a voxel batch's responses in those bases, the alpha-independent terms of the
  validation errors, the refit's predictions;
- ``exhaustive``: every alpha evaluated; ``certified``: the same alphas from a bounded low-rank
  expansion of the filter factors (``expansion``), exact checks of the near-ties;
- ``solve``: :func:`ridge_cv`, one chunk of voxels through all of it;
- ``banded``: :func:`banded_ridge_cv`, one regularisation per feature space (ridge_cv per candidate);
- ``observer``: what the engine reports to a benchmark's meter; ``backend``: numpy or torch;
- ``design``: a (subject, task)'s design matrix (rows aligned, standardised).

Callers use this package's names: ``from neurotask.pipeline import ridge``, then
``ridge.prepare``, ``ridge.ridge_cv``, ...
"""

from neurotask.pipeline.ridge.backend import BACKENDS, Backend, get_backend
from neurotask.pipeline.ridge.banded import BandedResult, banded_ridge_cv, simplex_candidates, split_r2
from neurotask.pipeline.ridge.decomposition import DTYPES, Basis, Decomposition, prepare
from neurotask.pipeline.ridge.exhaustive import cv_errors
from neurotask.pipeline.ridge.observer import NULL_OBSERVER, NullObserver, Observer
from neurotask.pipeline.ridge.solve import SEARCHES, RidgeCVResult, ridge_cv
from neurotask.pipeline.ridge.splits import Fold, Splits, make_splits, n_training, name_keys, paper_alphas, splits_by_name

__all__ = [
    "BACKENDS", "Backend", "get_backend",
    "BandedResult", "banded_ridge_cv", "simplex_candidates", "split_r2",
    "DTYPES", "Basis", "Decomposition", "prepare",
    "cv_errors",
    "NULL_OBSERVER", "NullObserver", "Observer",
    "SEARCHES", "RidgeCVResult", "ridge_cv",
    "Fold", "Splits", "make_splits", "n_training", "name_keys", "paper_alphas", "splits_by_name",
]
