"""Array backends for the ridge engine: numpy, or torch on a CPU or CUDA device.

After himalaya's backends: the engine is written once against the small set of operations
below, and :func:`get_backend` picks the implementation. Arrays cross the engine's boundary as
numpy arrays; a backend converts them in (``asarray``) and out (``to_numpy``). On the CPU,
torch shares memory with numpy, so conversion costs nothing; on CUDA it is one copy each way.

Only operations whose numpy and torch spellings differ are methods here; the rest (``@``,
``*``, ``-``, indexing, ``.T`` of 2-D arrays, ``.reshape``) are common to both array types.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg

BACKENDS = ("numpy", "torch")


class NumpyBackend:
    """numpy arrays on the CPU (BLAS: whatever numpy links, OpenBLAS here)."""

    name = "numpy"
    device = "cpu"
    float32 = np.float32
    float64 = np.float64

    def asarray(self, x: Any, dtype=None) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def index(self, x: np.ndarray) -> np.ndarray:
        """Integer index array usable to index this backend's arrays."""
        return np.asarray(x, dtype=np.int64)

    def astype(self, x: np.ndarray, dtype) -> np.ndarray:
        return x.astype(dtype, copy=False)

    def empty(self, shape, dtype) -> np.ndarray:
        """Uninitialised: for buffers every element of which is written before it is read."""
        return np.empty(shape, dtype=dtype)

    def sqrt(self, x):
        return np.sqrt(x)

    def eigh(self, a):
        """Eigenvalues (ascending) and eigenvectors of a symmetric matrix; ``a`` is overwritten.
        LAPACK's divide-and-conquer driver: several times faster than scipy's default here."""
        return scipy.linalg.eigh(a, driver="evd", overwrite_a=True, check_finite=False)

    def eigvalsh(self, a):
        return scipy.linalg.eigvalsh(a, check_finite=False)

    def svd(self, a):
        """Thin SVD ``a = U diag(S) Vh``, singular values descending (LAPACK's gesdd)."""
        return scipy.linalg.svd(a, full_matrices=False, check_finite=False)

    def clip_min(self, x, low: float):
        return np.maximum(x, low)

    def flip(self, x, axis: int):
        return np.flip(x, axis=axis)

    def sum(self, x, axis: int, dtype=None):
        return x.sum(axis=axis, dtype=dtype)

    def mean(self, x, axis: int):
        return x.mean(axis=axis)

    def concatenate(self, xs, axis: int = 0):
        return np.concatenate(xs, axis=axis)

    def swap_last(self, x):
        """Swap the last two axes (a batched transpose)."""
        return np.swapaxes(x, -1, -2)

    def matmul_into(self, a, b, out) -> None:
        """out[...] = a @ b, written in place. ``out`` may be a strided 2-D view (unit stride
        along its rows): BLAS writes it directly, with no temporary and no copy."""
        np.matmul(a, b, out=out)

    def synchronize(self) -> None:
        """Wait for queued work (for timing); numpy runs synchronously."""


class TorchBackend:
    """torch tensors on ``device`` ("cpu", "cuda", "cuda:1", ...)."""

    name = "torch"

    def __init__(self, device: str = "cpu"):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"ridge backend 'torch' on device {device!r}: torch {torch.__version__} "
                "sees no CUDA device (is this the CPU-only wheel?); use device='cpu'"
            )
        self.float32 = torch.float32
        self.float64 = torch.float64

    def _dtype(self, dtype):
        if dtype is None or isinstance(dtype, self._torch.dtype):
            return dtype
        return {np.dtype(np.float32): self.float32, np.dtype(np.float64): self.float64}[np.dtype(dtype)]

    def asarray(self, x: Any, dtype=None):
        torch = self._torch
        if isinstance(x, torch.Tensor):
            return x.to(device=self.device, dtype=self._dtype(dtype))
        x = np.asarray(x)
        if not x.flags.writeable:
            # Shared read-only memory (a decomposition deserialised by Dask): wrap it without a
            # copy; the engine never writes into its inputs, so torch's warning does not apply.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(x)
            return t.to(device=self.device, dtype=self._dtype(dtype))
        return torch.as_tensor(x, device=self.device, dtype=self._dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        if isinstance(x, self._torch.Tensor):
            return x.detach().cpu().numpy()
        return np.asarray(x)

    def index(self, x):
        return self._torch.as_tensor(np.asarray(x, dtype=np.int64), device=self.device)

    def astype(self, x, dtype):
        return x.to(self._dtype(dtype))

    def empty(self, shape, dtype):
        return self._torch.empty(shape, dtype=self._dtype(dtype), device=self.device)

    def sqrt(self, x):
        return self._torch.sqrt(x)

    def eigh(self, a):
        return self._torch.linalg.eigh(a)  # cuSOLVER's syevd on CUDA

    def eigvalsh(self, a):
        return self._torch.linalg.eigvalsh(a)

    def svd(self, a):
        return self._torch.linalg.svd(a, full_matrices=False)

    def flip(self, x, axis: int):
        return self._torch.flip(x, dims=(axis,))

    def clip_min(self, x, low: float):
        return self._torch.clamp(x, min=low)

    def sum(self, x, axis: int, dtype=None):
        return self._torch.sum(x, dim=axis, dtype=self._dtype(dtype))

    def mean(self, x, axis: int):
        return self._torch.mean(x, dim=axis)

    def concatenate(self, xs, axis: int = 0):
        return self._torch.cat(list(xs), dim=axis)

    def swap_last(self, x):
        return x.transpose(-1, -2)

    def matmul_into(self, a, b, out) -> None:
        # torch's out= would reallocate a strided view: one product, then one copy.
        out.copy_(a @ b)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)


Backend = NumpyBackend | TorchBackend


def get_backend(name: str = "numpy", device: str | None = None) -> Backend:
    """The backend called ``name`` on ``device``.

    Parameters
    ----------
    name : {"numpy", "torch"}
    device : str, optional
        torch only ("cpu", "cuda", "cuda:1", ...); default: "cuda" where torch sees a GPU, else
        "cpu".

    Returns
    -------
    NumpyBackend or TorchBackend

    Raises
    ------
    ValueError
        For an unknown name, a device given to numpy, or CUDA requested where torch has none.
    """
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"ridge backend 'numpy' runs on the CPU only, got device={device!r}")
        return NumpyBackend()
    if name == "torch":
        if device is None:  # CUDA where torch has it, else the CPU
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return TorchBackend(device)
    raise ValueError(f"ridge backend must be one of {BACKENDS}, got {name!r}")
