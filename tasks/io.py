"""Reading DWI runs and writing outputs atomically with JSON sidecars."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.gradients import DEFAULT_B0_THRESHOLD, GradientTable, gradient_table


@dataclass
class DwiRun:
    """A loaded diffusion run: data, affine, gradient table and where it came from."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    gtab: GradientTable
    path: Path


def existing_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DwiflowInputError(f"{what} file not found: {p}")
    if not p.is_file():
        raise DwiflowInputError(f"{what} is not a file: {p}")
    return p


def load_image(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Load a NIfTI image, turning nibabel's errors into one-line input errors."""
    p = existing_file(path, what)
    try:
        img = nib.load(str(p))
        img.header  # noqa: B018 - force header parsing
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise DwiflowInputError(f"cannot read {what} {p}: {exc}") from None
    return img


def read_bvals(path: str | os.PathLike) -> np.ndarray:
    """b-values from a BIDS/FSL ``.bval`` text file (whitespace separated)."""
    p = existing_file(path, "bval")
    try:
        values = np.loadtxt(p, dtype=float, ndmin=1)
    except Exception as exc:
        raise DwiflowInputError(f"cannot read b-values from {p}: {exc}") from None
    if values.ndim != 1:
        if 1 in values.shape:
            values = values.ravel()
        else:
            raise DwiflowInputError(f"{p}: b-values must be one row, got shape {values.shape}")
    return values


def read_bvecs(path: str | os.PathLike) -> np.ndarray:
    """Raw b-vector array from a BIDS/FSL ``.bvec`` text file (3 rows expected)."""
    p = existing_file(path, "bvec")
    try:
        values = np.loadtxt(p, dtype=float, ndmin=2)
    except Exception as exc:
        raise DwiflowInputError(f"cannot read b-vectors from {p}: {exc}") from None
    return values


def load_gradients(
    bval: str | os.PathLike,
    bvec: str | os.PathLike,
    *,
    affine: np.ndarray | None,
    n_volumes: int | None,
    image_name: str = "image",
    b0_threshold: float = DEFAULT_B0_THRESHOLD,
) -> GradientTable:
    """Read and validate a bval/bvec pair; errors name the files."""
    bvals = read_bvals(bval)
    raw = read_bvecs(bvec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gtab = gradient_table(
            bvals,
            raw,
            affine=affine,
            n_volumes=n_volumes,
            b0_threshold=b0_threshold,
            bval_name=str(bval),
            bvec_name=str(bvec),
            image_name=image_name,
        )
    for w in caught:
        warnings.warn(str(w.message), stacklevel=2)
    return gtab


def load_dwi(
    dwi: str | os.PathLike,
    bval: str | os.PathLike,
    bvec: str | os.PathLike,
    b0_threshold: float = DEFAULT_B0_THRESHOLD,
) -> DwiRun:
    """Load a 4D DWI with its gradients, converted to world coordinates.

    Raises
    ------
    DwiflowInputError
        Missing or unreadable files, an image that is not 4D, counts that disagree.
    """
    img = load_image(dwi, "DWI")
    if len(img.shape) != 4:
        raise DwiflowInputError(
            f"DWI {dwi} must be 4D (x, y, z, volumes), but it is {len(img.shape)}D with shape {img.shape}"
        )
    gtab = load_gradients(
        bval, bvec, affine=img.affine, n_volumes=img.shape[3], image_name=f"DWI {dwi}", b0_threshold=b0_threshold
    )
    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.floating):
        data = data.astype(np.float32)
    return DwiRun(data=data, affine=img.affine, header=img.header, gtab=gtab, path=Path(dwi))


def load_mask(path: str | os.PathLike, spatial_shape: tuple[int, ...], affine: np.ndarray | None = None) -> np.ndarray:
    """Load a 3D mask and check it matches the DWI grid and is not empty."""
    img = load_image(path, "mask")
    shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
    if tuple(shape) != tuple(spatial_shape):
        raise DwiflowInputError(f"mask {path} has shape {tuple(img.shape)} but the DWI's spatial shape is {tuple(spatial_shape)}")
    if affine is not None and not np.allclose(img.affine, affine, atol=1e-3):
        raise DwiflowInputError(f"mask {path} is not on the DWI's voxel grid (affines differ)")
    data = np.asanyarray(img.dataobj).reshape(shape)
    mask = np.nan_to_num(data) > 0
    if not mask.any():
        raise DwiflowInputError(f"mask {path} is empty (no non-zero voxel)")
    return mask


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _tmp_name(final: Path) -> Path:
    # keep NIfTI suffixes last: nibabel picks the format (and compression) from the name
    ext = ".nii.gz" if final.name.endswith(".nii.gz") else ".nii" if final.name.endswith(".nii") else ""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + ext, dir=final.parent)
    os.close(fd)
    return Path(name)


class OutputSet:
    """Outputs written to temporary files and renamed into place only when all succeeded.

    Use :func:`atomic_outputs`; an exception inside the block removes every
    temporary file, so an interrupted or failed stage leaves no partial outputs.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def _reserve(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_name(final)
        self._pending.append((tmp, final))
        return tmp

    def nifti(
        self,
        path: str | os.PathLike,
        array: np.ndarray,
        affine: np.ndarray,
        sidecar: dict[str, Any] | None = None,
        dtype: Any = np.float32,
    ) -> Path:
        """Queue a NIfTI image (and its ``.json`` sidecar when given)."""
        path = Path(path)
        tmp = self._reserve(path)
        img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(tmp))
        if sidecar is not None:
            self.json(sidecar_path(path), sidecar)
        return path

    def json(self, path: str | os.PathLike, content: dict[str, Any]) -> Path:
        tmp = self._reserve(path)
        tmp.write_text(json.dumps(content, indent=2, default=_json_default) + "\n")
        return Path(path)

    def text(self, path: str | os.PathLike, content: str) -> Path:
        tmp = self._reserve(path)
        tmp.write_text(content)
        return Path(path)

    def commit(self) -> None:
        for tmp, final in self._pending:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600 files
            os.replace(tmp, final)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            Path(tmp).unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def atomic_outputs() -> Iterator[OutputSet]:
    """Context manager yielding an :class:`OutputSet`; commits on success, discards on error."""
    outputs = OutputSet()
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    outputs.commit()


def sidecar_path(path: str | os.PathLike) -> Path:
    """``x.nii.gz`` → ``x.json``."""
    p = Path(path)
    name = p.name
    for ext in (".nii.gz", ".nii", ".txt", ".tsv"):
        if name.endswith(ext):
            return p.with_name(name[: -len(ext)] + ".json")
    return p.with_name(name + ".json")


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON sidecar of an image or text file (``x.nii.gz`` → ``x.json``), or None when there is none."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        return json.loads(side.read_text())
    except ValueError as exc:
        raise DwiflowInputError(f"cannot read sidecar {side}: {exc}") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")
