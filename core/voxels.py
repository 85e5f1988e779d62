"""Gathering masked voxels into (n_voxels, n_volumes) batches and scattering results back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from dwiflow.core.errors import DwiflowInputError

if TYPE_CHECKING:
    import numpy.typing as npt


@dataclass
class VoxelBatch:
    """The masked voxels of a volume as one 2D array.

    Attributes
    ----------
    data : ndarray (…, n_volumes)
        The original array (not copied).
    mask : ndarray (…) of bool
    index : tuple of ndarray
        ``np.nonzero(mask)``.
    """

    data: np.ndarray
    mask: np.ndarray
    index: tuple
    _flat_index: np.ndarray | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # where each voxel's signal starts in a Fortran-ordered image's (volumes, voxels) view (None otherwise)
        fortran = self.index and self._volumes_by_row(self.data) is not None
        self._flat_index = np.ravel_multi_index(self.index, self.mask.shape, order="F") if fortran else None

    @classmethod
    def from_volume(cls, data: np.ndarray, mask: np.ndarray | None, n_volumes: int | None = None,
                    memory_order: bool = False) -> "VoxelBatch":
        """Validate ``data``/``mask`` shapes and index the masked voxels.

        ``memory_order``: voxels in the order the data lie in memory (x fastest for the Fortran-ordered arrays
        NIfTI images give), so that consecutive voxels' signals are read as contiguous runs; otherwise (and for
        C-ordered data) ``np.nonzero(mask)``'s order. Results go back by index; only the last bits of a batched BLAS
        product can depend on which voxels share a chunk.

        Raises
        ------
        DwiflowInputError
            When the last axis does not match ``n_volumes``, the mask's shape
            differs from the spatial shape, or the mask is empty.
        """
        data = np.asarray(data)
        if data.ndim < 1:
            raise DwiflowInputError("data must have a last axis of volumes")
        if n_volumes is not None and data.shape[-1] != n_volumes:
            raise DwiflowInputError(
                f"data has {data.shape[-1]} volumes on its last axis but the gradient table has {n_volumes}"
            )
        spatial = data.shape[:-1]
        if mask is None:
            mask = np.ones(spatial, dtype=bool)
        else:
            mask = np.asarray(mask)
            if mask.shape != spatial:
                raise DwiflowInputError(f"mask has shape {mask.shape} but the data's spatial shape is {spatial}")
            mask = mask.astype(bool)
        if not mask.any():
            raise DwiflowInputError("mask is empty: no voxel to fit")
        if memory_order and mask.ndim > 1 and cls._volumes_by_row(data) is not None:
            return cls(data, mask, tuple(reversed(np.nonzero(mask.T))))
        return cls(data, mask, np.nonzero(mask))

    @staticmethod
    def _volumes_by_row(data: np.ndarray) -> np.ndarray | None:
        """A Fortran-ordered (…, volumes) array as a (volumes, voxels) C-ordered view, or None for other layouts."""
        if data.ndim < 2 or data.flags.c_contiguous or not data.flags.f_contiguous:
            return None
        return data.reshape(-1, data.shape[-1], order="F").T

    @property
    def n_voxels(self) -> int:
        return int(self.index[0].size) if self.index else 1

    def signal(self, sl: slice | np.ndarray | None = None) -> np.ndarray:
        """Float64 signals (voxels, volumes; C-ordered) of the masked voxels, or of the rows ``sl`` selects."""
        if self._flat_index is None:
            idx = self.index if sl is None else tuple(i[sl] for i in self.index)
            return np.asarray(self.data[idx], dtype=float)
        # a Fortran-ordered image: gather each volume's row (twice as fast as indexing the 4D array, and
        # streaming when the voxels are in memory order)
        columns = self._flat_index if sl is None else self._flat_index[sl]
        return np.ascontiguousarray(np.take(self._volumes_by_row(self.data), columns, axis=1).T, dtype=float)

    def signal_by_volume(self, sl: slice | np.ndarray | None = None) -> np.ndarray:
        """Signals as (volumes, voxels), C-ordered, in the image's own type, of the masked voxels or of those ``sl``
        selects: from a Fortran-ordered image, each volume's values are gathered without a transposition."""
        if self._flat_index is None:
            idx = self.index if sl is None else tuple(i[sl] for i in self.index)
            return np.ascontiguousarray(self.data[idx].T)
        columns = self._flat_index if sl is None else self._flat_index[sl]
        return np.take(self._volumes_by_row(self.data), columns, axis=1)


def cache_sized_chunk(n_volumes: int, values: int = 131072) -> int:
    """Voxels per chunk of a voxel loop of array operations: ``values`` float64 signal values (1 MB), as a power of
    two — the chunk's arrays stay in a core's cache. Measured with the tensor fit (2-core machine): on 65 volumes,
    2048 voxels took 1.17 s and 1024 took 1.27 s on 553k voxels at one thread (1.02 and 1.35 s at two); on 141
    volumes 1024 was best (0.44 s on 109k voxels, 0.67 s with 2048)."""
    return int(2 ** round(float(np.log2(max(values / max(int(n_volumes), 1), 64.0)))))


def iter_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in steps of ``chunk_size``."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def run_chunks(work: Callable[[slice], None], n: int, chunk_size: int, n_threads: int | None = 1) -> None:
    """Call ``work(chunk)`` for every chunk of ``range(n)``, on ``n_threads`` threads (numpy's array operations
    release the GIL). ``work`` writes its chunk's results itself, so they do not depend on the thread count."""
    chunks = list(iter_chunks(n, chunk_size))
    threads = max(1, min(int(n_threads or 1), len(chunks)))
    if threads == 1:
        for chunk in chunks:
            work(chunk)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(work, chunks):  # re-raises a chunk's exception
            pass


def scatter(values: np.ndarray, batch: VoxelBatch, fill: float = 0, dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """Place per-voxel ``values`` (n_voxels, …) back into a volume shaped like the mask, of ``dtype`` (default:
    the values'; e.g. float32 for a file, without a float64 volume first)."""
    out = np.full(batch.mask.shape + values.shape[1:], fill, dtype=values.dtype if dtype is None else dtype)
    out[batch.index] = values
    return out


class VoxelFit:
    """Base of the fits that compute on the masked voxels as rows and expose volumes.

    Every fit in dwiflow follows one convention: its public arrays are shaped like the input
    volume (``data.shape[:-1]`` plus any trailing axes), with ``mask`` (the voxels fitted) and
    ``status`` (:class:`~dwiflow.core.status.FitStatus` codes, 0 outside the mask). Estimates
    outside the mask hold the fill value (NaN, or 0 for SH coefficients); estimates of voxels
    whose status is not OK are NaN. Subclasses keep their per-voxel rows (``status_rows`` and
    their own) and place them into the image grid with :meth:`volume`.
    """

    batch: VoxelBatch
    status_rows: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """The voxels that were fitted (bool, the input's spatial shape)."""
        return self.batch.mask

    @property
    def status(self) -> np.ndarray:
        """Per-voxel status (uint8, the input's spatial shape; 0 outside the mask)."""
        return scatter(self.status_rows, self.batch, fill=np.uint8(0))

    def volume(self, values: np.ndarray, fill=np.nan, dtype: npt.DTypeLike | None = None) -> np.ndarray:
        """Per-voxel ``values`` (n_voxels, …) placed back into the image grid (as ``dtype``: default the values')."""
        return scatter(values, self.batch, fill, dtype)
