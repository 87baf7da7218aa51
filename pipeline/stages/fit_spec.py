"""The fit's specification: every parameter of ``fit:`` that a fit task needs, in one frozen,
picklable value built once on the driver and handed to every worker task (the decomposition
tasks and the voxel-chunk tasks alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from neurotask.pipeline.config import FitSection


@dataclass(frozen=True)
class FitSpec:
    # split by image identity: a seeded test set, then CV folds of the training part
    test_fraction: float
    cv: Literal["kfold", "single_split"]
    n_folds: int
    validation_fraction: float  # cv "single_split" only
    seed: int
    # the alpha grid: "paper" (n_alphas values from the number of features) or given values
    alphas: Literal["paper"] | tuple[float, ...]
    n_alphas: int
    # the engine
    dtype: Literal["float32", "float64"]
    zscore_features: bool
    search: Literal["certified", "exhaustive"]
    backend: Literal["numpy", "torch"]
    device: str | None
    # statistics
    n_permutations: int  # 0: no permutation test
    permutation_seed: int
    fdr: float
    # orchestration (driver side)
    retries: int

    @classmethod
    def from_section(cls, fit: FitSection) -> FitSpec:
        """The specification of the configuration's ``fit:`` section."""
        alphas = fit.alphas if fit.alphas == "paper" else tuple(float(a) for a in fit.alphas)
        return cls(test_fraction=fit.test_fraction, cv=fit.cv, n_folds=fit.n_folds,
                   validation_fraction=fit.validation_fraction, seed=fit.seed, alphas=alphas,
                   n_alphas=fit.n_alphas, dtype=fit.dtype, zscore_features=fit.zscore_features,
                   search=fit.search, backend=fit.backend, device=fit.device,
                   n_permutations=fit.n_permutations, permutation_seed=fit.permutation_seed, fdr=fit.fdr,
                   retries=fit.retries)

    @property
    def permutation(self) -> bool:
        return self.n_permutations > 0

    def fingerprint(self) -> dict[str, Any]:
        """The parameters that determine a fit's results; stored with them so that a rerun with
        different ones is refused rather than mixed into the same store. (Its keys and values
        are those stored by every earlier version: existing stores must still match.)"""
        keys = ("test_fraction", "cv", "n_folds", "validation_fraction", "alphas", "n_alphas", "seed", "dtype",
                "zscore_features", "n_permutations", "permutation_seed")
        out = {k: getattr(self, k) for k in keys}
        if self.alphas != "paper":
            out["alphas"] = list(self.alphas)  # as the attribute reads back from the store
        if self.cv != "single_split":
            out.pop("validation_fraction")
        return out
