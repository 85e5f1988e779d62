"""Brain masks from the b=0 volumes (median filtering + Otsu threshold).

Follows the median-Otsu idea of DIPY's ``median_otsu`` (Garyfallidis et al. 2014):
the mean b=0 image is median-filtered several times, thresholded with Otsu's method,
then cleaned: the largest connected component is kept and holes are filled.

References
----------
Otsu N. A threshold selection method from gray-level histograms. IEEE Trans Syst Man
Cybern 9 (1979) 62-66.
Garyfallidis E. et al. Dipy, a library for the analysis of diffusion MRI data.
Front Neuroinform 8 (2014) 8.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import GradientTable


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a set of values: maximises the between-class variance (histogram of ``bins``)."""
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        raise DwiflowInputError("cannot threshold an image whose values are all equal (e.g. all-zero b=0)")
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight_low = np.cumsum(hist)
    weight_high = np.cumsum(hist[::-1])[::-1]
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = (np.cumsum((hist * centres)[::-1]) / np.maximum(np.cumsum(hist[::-1]), 1))[::-1]
    between = weight_low[:-1] * weight_high[1:] * (mean_low[:-1] - mean_high[1:]) ** 2
    # the split falls between bin i and bin i+1: return bin i's upper edge so that
    # ``values > threshold`` reproduces the two classes exactly
    return float(edges[1:-1][np.argmax(between)])


def mean_b0(data: np.ndarray, gtab: GradientTable) -> np.ndarray:
    """Mean of the b=0 volumes; raises when there is none or they hold no signal."""
    b0 = gtab.b0s_mask
    if not b0.any():
        raise DwiflowInputError(
            f"no b=0 volume (b <= {gtab.b0_threshold:g} s/mm²) to build a mask from; give a mask instead"
        )
    image = np.asarray(data[..., b0], dtype=float).mean(axis=-1)
    if not np.isfinite(image).any() or np.nanmax(np.abs(image)) == 0:
        raise DwiflowInputError("the b=0 volumes are all zero or non-finite; cannot build a mask")
    return image


def median_otsu_mask(
    data: np.ndarray,
    gtab: GradientTable,
    median_radius: int = 4,
    numpass: int = 4,
    largest_component: bool = True,
    fill_holes: bool = True,
) -> np.ndarray:
    """Brain mask of a 4D DWI from its mean b=0 image.

    Parameters
    ----------
    data : ndarray (x, y, z, n)
    gtab : GradientTable
    median_radius : int
        Radius of the cubic median filter (its width is 2r+1 voxels, but at most a third of
        the image along each axis).
    numpass : int
        Number of median-filter passes.
    largest_component, fill_holes : bool
        Clean-up steps after thresholding.

    Returns
    -------
    ndarray (x, y, z) of bool
    """
    data = np.asarray(data)
    if data.ndim != 4:
        raise DwiflowInputError(f"a DWI must be 4D (x, y, z, volumes), got {data.ndim}D")
    if median_radius < 0 or numpass < 0:
        raise DwiflowInputError("median_radius and numpass must be >= 0")
    image = np.nan_to_num(mean_b0(data, gtab), nan=0.0)
    if image.min() == image.max():  # constant positive b=0 (e.g. a noiseless phantom): all tissue
        return np.ones(image.shape, dtype=bool)
    # window 2r+1, but at most a third of the axis (odd), so thin volumes are not eaten away
    size = tuple(min(2 * median_radius + 1, max(1, (s // 3) | 1)) for s in image.shape)
    for _ in range(numpass):
        image = ndimage.median_filter(image, size=size, mode="nearest")
    mask = image > otsu_threshold(image)
    if largest_component and mask.any():
        labels, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            mask = labels == (np.argmax(sizes) + 1)
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask
