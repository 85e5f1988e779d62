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
