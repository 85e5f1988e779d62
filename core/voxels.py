"""Gathering masked voxels into (n_voxels, n_volumes) batches and scattering results back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from dwiflow.core.errors import DwiflowInputError


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

    @classmethod
    def from_volume(cls, data: np.ndarray, mask: np.ndarray | None, n_volumes: int | None = None) -> "VoxelBatch":
        """Validate ``data``/``mask`` shapes and index the masked voxels.

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
        return cls(data, mask, np.nonzero(mask))

    @property
    def n_voxels(self) -> int:
        return int(self.index[0].size) if self.index else 1

    def signal(self, sl: slice | None = None) -> np.ndarray:
        """Float64 signals of the masked voxels (optionally a slice of them)."""
        idx = self.index if sl is None else tuple(i[sl] for i in self.index)
        return np.asarray(self.data[idx], dtype=float)


def iter_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in steps of ``chunk_size``."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def scatter(values: np.ndarray, batch: VoxelBatch, fill: float = 0) -> np.ndarray:
    """Place per-voxel ``values`` (n_voxels, …) back into a volume shaped like the mask."""
    out = np.full(batch.mask.shape + values.shape[1:], fill, dtype=values.dtype)
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

    def volume(self, values: np.ndarray, fill=np.nan) -> np.ndarray:
        """Per-voxel ``values`` (n_voxels, …) placed back into the image grid."""
        return scatter(values, self.batch, fill)
