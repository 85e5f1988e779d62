"""Reading DWI runs and writing outputs atomically with JSON sidecars."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO, IOBase
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np
from isal import igzip, igzip_lib, isal_zlib

from dwiflow.bids_specs.inputs import broken_link
from dwiflow.bids_specs.outputs import complete_sidecar
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
        link = broken_link(p)
        raise DwiflowInputError(f"{what} file {p} is {link}" if link else f"{what} file not found: {p}")
    if not p.is_file():
        raise DwiflowInputError(f"{what} is not a file: {p}")
    return p


MRTRIX_IMAGE_SUFFIXES = (".mif", ".mif.gz", ".mih")  # MRtrix3's own image formats, which dwiflow does not read or write
MAX_TEXT_BYTES = 4 * 1024 * 1024  # a .bval/.bvec/response/directions file larger than this is not one


def excerpt(text: str, limit: int = 16) -> str:
    """At most ``limit`` printable characters of ``text`` (errors quote input files this little)."""
    clean = "".join(c if c.isprintable() else "?" for c in str(text)[:limit])
    return clean + ("…" if len(str(text)) > limit else "")


def _short(exc: BaseException) -> str:
    """An exception's message on one line, without quoting more than a short excerpt of any file content."""
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _nifti_from_bytes(data: bytes, what: str, p: Path) -> nib.Nifti1Image:
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except Exception:  # not this format
            continue
    raise DwiflowInputError(f"cannot read {what} {p}: not a NIfTI-1 or NIfTI-2 image")


def _check_complete(header: nib.Nifti1Header, size: int, what: str, p: Path) -> None:
    """The image holds every byte its header promises (a truncated file is an error, not zeros)."""
    needed = (int(header.get_data_offset())
              + int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize)
    if size < needed:
        raise DwiflowInputError(f"{what} {p} is truncated: its header describes {needed} bytes, the file holds {size}")


def _complete_nifti_from_bytes(data: bytes, what: str, p: Path) -> nib.Nifti1Image:
    """The NIfTI image in a file's decompressed bytes, which must hold every byte its header describes."""
    img = _nifti_from_bytes(data, what, p)
    _check_complete(img.header, len(data), what, p)
    return img


GZIP_ERRORS = (igzip.BadGzipFile, isal_zlib.error, EOFError)


def _gzip_error(exc: Exception, what: str, p: Path) -> DwiflowInputError:
    """The one-line error for a gzip stream that cannot be read whole."""
    if "Not a gzipped file" in str(exc):
        return DwiflowInputError(f"cannot read {what} {p}: not a gzip-compressed file, although its name ends in .gz")
    reason = "truncated" if isinstance(exc, EOFError) else "corrupt"
    detail = "CRC check failed" if "CRC check failed" in str(exc) else _short(exc)
    return DwiflowInputError(f"{what} {p} is {reason}: its gzip stream cannot be read whole ({detail})")


def load_image(path: str | os.PathLike, what: str = "image") -> nib.Nifti1Image:
    """Load a NIfTI image whole and checked, turning every way it can be unreadable into a one-line input error.

    A ``.gz`` file is decompressed completely, so a bad CRC or a truncated stream is an error (gzip readers
    that stop at the data's end never look at the CRC); an uncompressed file must hold every byte its header
    describes.
    """
    p = existing_file(path, what)
    try:
        if p.name.endswith(".gz"):
            try:
                data = igzip.decompress(p.read_bytes())
            except GZIP_ERRORS as exc:
                raise _gzip_error(exc, what, p) from None
            img = _complete_nifti_from_bytes(data, what, p)
        else:
            img = nib.load(str(p))
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise DwiflowInputError(f"cannot read {what} {p}: not a NIfTI image")
            _check_complete(img.header, p.stat().st_size, what, p)
    except DwiflowInputError:
        raise
    except Exception as exc:  # nibabel raises many types for unreadable files
        if p.name.lower().endswith(MRTRIX_IMAGE_SUFFIXES):
            raise DwiflowInputError(f"cannot read {what} {p}: dwiflow reads NIfTI; convert an MRtrix3 image with "
                                    f"mrconvert {p.name} out.nii.gz (-export_grad_fsl out.bvec out.bval for a DWI's "
                                    "gradients)") from None
        raise DwiflowInputError(f"cannot read {what} {p}: {_short(exc)}") from None
    return img


def read_text(path: str | os.PathLike, what: str) -> str:
    """A small text file's content; a binary or huge file is a one-line input error."""
    p = existing_file(path, what)
    if p.stat().st_size > MAX_TEXT_BYTES:
        raise DwiflowInputError(f"{what} file {p} is {p.stat().st_size} bytes: too large to be a {what} file")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DwiflowInputError(f"{what} file {p} is not a text file") from None


def read_numbers(path: str | os.PathLike, what: str) -> np.ndarray:
    """Rows of whitespace-separated numbers (BIDS/FSL .bval/.bvec); errors quote a short excerpt at most."""
    p = Path(path)
    rows = []
    for number, line in enumerate(read_text(p, what).splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if "," in line:
            raise DwiflowInputError(f"{what} file {p}: line {number} separates values with commas; BIDS/FSL {what} "
                                    "files separate them with spaces")
        try:
            rows.append([float(token) for token in line.split()])
        except ValueError:
            bad = next(t for t in line.split() if not _is_number(t))
            raise DwiflowInputError(f"{what} file {p}: line {number} holds {excerpt(bad)!r}, which is not a number") from None
    if not rows:
        raise DwiflowInputError(f"{what} file {p} is empty")
    if len({len(r) for r in rows}) != 1:
        raise DwiflowInputError(f"{what} file {p}: its lines hold different numbers of values "
                                f"({', '.join(str(len(r)) for r in rows)})")
    values = np.array(rows, dtype=float)
    if not np.all(np.isfinite(values)):
        raise DwiflowInputError(f"{what} file {p} holds a non-finite value (nan or inf)")
    return values


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def read_bvals(path: str | os.PathLike) -> np.ndarray:
    """b-values from a BIDS/FSL ``.bval`` text file (whitespace separated, one row)."""
    values = read_numbers(path, "bval")
    if values.ndim != 1 and 1 not in values.shape:
        raise DwiflowInputError(f"bval file {path}: b-values must be one row, got {values.shape[0]} rows of "
                                f"{values.shape[1]}")
    return values.ravel()


def read_bvecs(path: str | os.PathLike) -> np.ndarray:
    """Raw b-vector array from a BIDS/FSL ``.bvec`` text file (3 rows expected)."""
    return read_numbers(path, "bvec")


def load_gradients(
    bval: str | os.PathLike,
    bvec: str | os.PathLike,
    *,
    affine: np.ndarray,
    n_volumes: int | None,
    image_name: str = "image",
    b0_threshold: float = DEFAULT_B0_THRESHOLD,
) -> GradientTable:
    """Read and validate a bval/bvec pair (FSL/BIDS vectors, turned into world coordinates with the DWI's
    ``affine``); errors name the files."""
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


# The last DWI read by this process, keyed by the file's identity: a process that runs several stages of one run
# (the debug worker; a cf worker's pool process, which also inherits the pre-flight's read when forked after it,
# its pages shared) decompresses the DWI once instead of once per stage.
_last_dwi: dict[tuple[int, ...], tuple[np.ndarray, nib.Nifti1Header]] = {}


def forget_dwi() -> None:
    """Free the DWI this process keeps for the next stage that reads it: when the stages left read none (those
    after the deconvolution), or once the worker processes forked from the BIDS App's pre-flight hold it."""
    _last_dwi.clear()


def _read_into(stream, view: memoryview, chunk: int = 1 << 20) -> int:
    """Fill ``view`` from ``stream``, ``chunk`` bytes at a time (a gzip reader decompresses a request into a new
    buffer of its size first); the number of bytes read (fewer only at the stream's end)."""
    done = 0
    while done < len(view):
        count = stream.readinto(view[done:done + chunk])
        if not count:
            break
        done += count
    return done


def _nifti_header_class(first_bytes: bytes) -> type[nib.Nifti1Header] | None:
    """The NIfTI header class a file's first four bytes (``sizeof_hdr``: 348 or 540, either byte order) name, or
    None. Chosen before parsing: nibabel logs to stderr when a NIfTI-2 header is tried as a NIfTI-1 one."""
    for order in "<>":
        size = int(np.frombuffer(first_bytes, dtype=f"{order}i4")[0]) if len(first_bytes) == 4 else 0
        if size in (348, 540):
            return nib.Nifti1Header if size == 348 else nib.Nifti2Header
    return None


# compressed files up to this size are inflated in one call (see _inflate_in_one_call); larger ones are streamed
ONE_CALL_LIMIT = 256 << 20


def _inflate_in_one_call(p: Path) -> bytes | None:
    """The decompressed bytes of a single-member gzip file no larger than ``ONE_CALL_LIMIT``, inflated by one ISA-L
    call into a buffer of the size the trailer states, or None (a larger file, several members, trailing bytes, a
    stream that does not end where its trailer says, a bad CRC: the streaming path reads it or reports why not).

    One call releases the interpreter lock once, for the whole stream. A stream read by pieces takes the lock back
    after each piece, and while numba's set-up runs on its thread (``prepare_compiler_in_background``) each piece
    waits for it: a 61 MB DWI took 0.28–0.41 s to read beside the set-up, 0.19 s alone. The cost is memory: the
    compressed file is held until the image is whole (for a DWI of float noise, ~1.9 times the image at the peak).
    """
    try:
        if p.stat().st_size > ONE_CALL_LIMIT:
            return None
        compressed = p.read_bytes()
        if len(compressed) < 18:  # smaller than a gzip header and trailer
            return None
        expected = int.from_bytes(compressed[-4:], "little")  # ISIZE: the length modulo 2**32
        decompressor = igzip_lib.IgzipDecompressor(flag=igzip_lib.DECOMP_GZIP)
        data = decompressor.decompress(compressed, expected)
    except (*GZIP_ERRORS, OSError, ValueError):
        return None
    if not decompressor.eof or decompressor.unused_data or len(data) != expected:
        return None
    return data


def _unscaled_header(head: bytes) -> nib.Nifti1Header | None:
    """The NIfTI header at the start of ``head`` if the image's values are stored unscaled in this machine's byte
    order, else None (nibabel's path: scaling, another byte order, not a NIfTI header)."""
    header_class = _nifti_header_class(bytes(head[:4]))
    if header_class is None:  # not a NIfTI header: nibabel's path says so
        return None
    try:
        header = header_class.from_fileobj(BytesIO(bytes(head)), check=True)
    except Exception:
        return None
    slope, inter = header.get_slope_inter()
    dtype = np.dtype(header.get_data_dtype())
    if slope not in (None, 1.0) or inter not in (None, 0.0) or not dtype.isnative or dtype.hasobject:
        return None
    return header


def _read_gz_image(p: Path, what: str) -> tuple[np.ndarray, nib.Nifti1Header] | None:
    """A ``.nii.gz`` image's values (read-only where they are stored unscaled in this machine's byte order) and
    header. The stream is read to its end, so a bad CRC or a truncated stream is an error as in
    :func:`load_image`. None when a streamed image needs nibabel's path (scaling, another byte order, not a NIfTI
    header).

    A file up to ``ONE_CALL_LIMIT`` is inflated in one call; unscaled values are a view of the decompressed bytes,
    others are nibabel's from them. A larger file (or one that call declines) is decompressed straight into its
    array: the image is held once, not also as decompressed bytes and their growing buffers (reading a DWI whole
    otherwise peaks at two to three times its size)."""
    whole = _inflate_in_one_call(p)
    if whole is not None:
        header = _unscaled_header(whole[:540])  # a NIfTI-2 header; a NIfTI-1 header and what follows
        if header is None:  # scaled, another byte order: nibabel's values, from the bytes already inflated
            img = _complete_nifti_from_bytes(whole, what, p)
            return np.asanyarray(img.dataobj), img.header
        _check_complete(header, len(whole), what, p)
        shape = header.get_data_shape()
        count = int(np.prod(shape, dtype=np.int64))
        values = np.frombuffer(whole, dtype=header.get_data_dtype(), count=count,
                               offset=int(header.get_data_offset()))
        return values.reshape(shape, order="F"), header
    try:
        with igzip.open(p, "rb") as stream:
            head = bytearray(540)  # a NIfTI-2 header; a NIfTI-1 header (348 bytes) and the start of what follows
            head = head[:_read_into(stream, memoryview(head))]
            header = _unscaled_header(head)
            if header is None:
                return None
            shape = header.get_data_shape()
            offset = int(header.get_data_offset())
            values = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=header.get_data_dtype())
            target = memoryview(values).cast("B")
            filled = max(0, min(len(head) - offset, len(target)))
            target[:filled] = head[offset:offset + filled]
            skip = max(0, offset - len(head))  # extensions beyond the first 540 bytes
            skipped = _read_into(stream, memoryview(bytearray(skip))) if skip else 0
            filled += _read_into(stream, target[filled:]) if skipped == skip else 0
            _check_complete(header, offset + filled, what, p)
            while stream.read(1 << 20):  # the rest, to the trailer's CRC and length
                pass
    except GZIP_ERRORS as exc:
        raise _gzip_error(exc, what, p) from None
    except OSError as exc:
        raise DwiflowInputError(f"cannot read {what} {p}: {_short(exc)}") from None
    values.flags.writeable = False
    return values.reshape(shape, order="F"), header


def _file_identity(path: Path) -> tuple[int, ...]:
    """Device, inode, size, modification and change times: any write to the file (or its replacement) changes it;
    the change time cannot be set back."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load_dwi(
    dwi: str | os.PathLike,
    bval: str | os.PathLike,
    bvec: str | os.PathLike,
    b0_threshold: float = DEFAULT_B0_THRESHOLD,
) -> DwiRun:
    """Load a 4D DWI with its gradients, converted to world coordinates.

    The data array is read-only: a process keeps the last DWI it read (one) and hands the same array to the next
    caller while the file is unchanged (same inode, size, modification and change times).

    Raises
    ------
    DwiflowInputError
        Missing or unreadable files, an image that is not 4D, counts that disagree.
    """
    path = existing_file(dwi, "DWI")
    identity = _file_identity(path)
    if identity in _last_dwi:
        data, header = _last_dwi[identity]
    else:
        _last_dwi.clear()  # the earlier array is freed before the next one is read
        streamed = _read_gz_image(path, "DWI") if path.name.endswith(".gz") else None
        if streamed is None:
            img = load_image(path, "DWI")
            data, header = np.asanyarray(img.dataobj), img.header
        else:
            data, header = streamed
        if data.ndim != 4:
            raise DwiflowInputError(
                f"DWI {dwi} must be 4D (x, y, z, volumes), but it is {data.ndim}D with shape {data.shape}"
            )
        if not np.issubdtype(data.dtype, np.floating):
            data = data.astype(np.float32)
        data.flags.writeable = False
        _last_dwi[identity] = (data, header)
    affine = header.get_best_affine()
    gtab = load_gradients(
        bval, bvec, affine=affine, n_volumes=data.shape[3], image_name=f"DWI {dwi}", b0_threshold=b0_threshold
    )
    return DwiRun(data=data, affine=affine, header=header.copy(), gtab=gtab, path=Path(dwi))


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


# zlib level 1, nibabel's own: ISA-L's compressor (as fast as zlib's is slow) gave, once in hundreds of runs, another
# compressed stream for the same image in another process (the kill matrix caught it), and dwiflow promises
# byte-identical outputs from run to run; ISA-L still reads every .nii.gz (decompression has one answer)
GZIP_LEVEL = 1
# A .nii.gz is compressed a segment at a time. Floating-point maps of noisy data (FODs, tensors, tissue maps inside
# the brain) barely shrink (an FOD by ~7 %) while zlib spends most of a command's writing time on them: a segment
# whose probe (PROBE_PIECES evenly spaced pieces, PROBE_BYTES in all) does not shrink below STORE_ABOVE_RATIO at
# GZIP_LEVEL is stored as it is (deflate's stored blocks), the others (background, masks, labels) are compressed.
# The choice depends on the bytes alone: the same image always gives the same file.
SEGMENT_BYTES = 1 << 20
PROBE_BYTES = 1 << 15
PROBE_PIECES = 4
STORE_ABOVE_RATIO = 0.9
FEED_BYTES = 1 << 16


class _SegmentedGzipWriter(IOBase):
    """A write-only gzip stream (RFC 1952; no time stamp, no name) whose deflate data is one independently
    compressed or stored run of blocks per segment of SEGMENT_BYTES, ended by a full flush (byte-aligned, not final)
    and, at :meth:`finish`, an empty final block, the CRC-32 and the length. Forward seeks write zeros, as
    :class:`gzip.GzipFile` does."""

    def __init__(self, raw) -> None:
        super().__init__()
        self._raw = raw
        self._pending = bytearray()
        self._crc = 0
        self._size = 0
        # magic, deflate, no flags, mtime 0, no extra flags, OS unknown (as GzipFile with mtime=0 and no name)
        raw.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._crc = zlib.crc32(view, self._crc)
        self._size += len(view)
        position = 0
        if self._pending:  # complete the segment begun by earlier writes
            position = min(SEGMENT_BYTES - len(self._pending), len(view))
            self._pending += view[:position]
            if len(self._pending) == SEGMENT_BYTES:
                _write_segment(self._raw, memoryview(self._pending))
                self._pending = bytearray()
        while len(view) - position >= SEGMENT_BYTES:  # whole segments straight from the caller's buffer
            _write_segment(self._raw, view[position:position + SEGMENT_BYTES])
            position += SEGMENT_BYTES
        self._pending += view[position:]
        return len(view)

    def tell(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            target = offset
        elif whence == os.SEEK_CUR:
            target = self._size + offset
        else:  # from the end: not supported
            target = -1
        if target < self._size:
            raise OSError("a compressed output can only be written forwards")
        self.write(bytes(target - self._size))
        return self._size

    def writable(self) -> bool:
        return True

    def finish(self) -> None:
        """Write the last segment, the final block and the trailer."""
        if self._pending:
            _write_segment(self._raw, memoryview(self._pending))
            self._pending = bytearray()
        final = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS)
        self._raw.write(final.flush(zlib.Z_FINISH))
        trailer = (self._crc & 0xFFFFFFFF).to_bytes(4, "little") + (self._size & 0xFFFFFFFF).to_bytes(4, "little")
        self._raw.write(trailer)


def _write_segment(raw, segment: memoryview) -> None:
    """One segment as deflate blocks ending on a byte boundary (Z_FULL_FLUSH: no reference to earlier segments):
    stored when its probe does not compress below STORE_ABOVE_RATIO, compressed at GZIP_LEVEL otherwise."""
    level = GZIP_LEVEL
    if len(segment) >= PROBE_BYTES:
        piece = PROBE_BYTES // PROBE_PIECES
        starts = np.linspace(0, len(segment) - piece, PROBE_PIECES).astype(int)
        probe = zlib.compress(b"".join(segment[start:start + piece] for start in starts), GZIP_LEVEL)
        level = 0 if len(probe) > STORE_ABOVE_RATIO * PROBE_BYTES else GZIP_LEVEL
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    for start in range(0, len(segment), FEED_BYTES):  # fed in pieces: no compressed copy of the segment is held
        raw.write(compressor.compress(segment[start:start + FEED_BYTES]))
    raw.write(compressor.flush(zlib.Z_FULL_FLUSH))


def save_nifti(img: nib.Nifti1Image | nib.Nifti2Image, path: str | os.PathLike) -> None:
    """Write a NIfTI image; a ``.gz`` name is written as a gzip stream whose segments are compressed with zlib (level
    1) or, when they would barely shrink (noisy floating-point maps), stored (see SEGMENT_BYTES); no time stamp or
    name in the header, so the same image always gives the same bytes. Any gzip reader reads it. The image is
    written as nibabel writes it, a slab at a time: no uncompressed or compressed copy of the whole file is held in
    memory."""
    path = Path(path)
    if path.name.endswith(".gz"):
        with open(path, "wb") as raw:
            stream = _SegmentedGzipWriter(raw)
            img.to_stream(stream)
            stream.finish()
    else:
        nib.save(img, str(path))


def remove_path(path: Path) -> None:
    """Remove a file, a symbolic link or a folder with everything in it; nothing when there is none."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def copy_path(source: Path, target: Path) -> None:
    """Copy a file, or a folder whole (a fixel directory), to ``target``, replacing whatever is there (e.g. a copy an
    interrupted attempt left)."""
    remove_path(target)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)


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


# SH bases: dwiflow's names (as core.sh and the --sh-basis option) and BEP016's (SphericalHarmonicBasis)
SH_BASIS_LABELS = {"mrtrix3": "mrtrix3", "descoteaux07": "descoteaux"}


def sh_basis_of(content: dict[str, Any] | None, path: str | os.PathLike | None = None) -> str:
    """The SH basis a sidecar declares (``mrtrix3`` when it says none: MRtrix3's and dwiflow's own)."""
    label = ((content or {}).get("OrientationEncoding") or {}).get("SphericalHarmonicBasis", "mrtrix3")
    for name, bep016 in SH_BASIS_LABELS.items():
        if label in (name, bep016):
            return name
    where = f"{sidecar_path(path)}: " if path is not None else ""
    raise DwiflowInputError(f"{where}SphericalHarmonicBasis {label!r} is not one dwiflow reads "
                            f"({', '.join(SH_BASIS_LABELS.values())})")


def in_mrtrix3_basis(coefficients: np.ndarray, content: dict[str, Any] | None,
                     path: str | os.PathLike | None = None) -> np.ndarray:
    """SH coefficients (last axis) turned into the MRtrix3 basis every estimator uses, from the basis their
    sidecar declares."""
    from dwiflow.core.sh import convert_sh_basis

    basis = sh_basis_of(content, path)
    return coefficients if basis == "mrtrix3" else convert_sh_basis(coefficients, basis, "mrtrix3")


class OutputSet:
    """Outputs written to temporary files and renamed into place only when all succeeded.

    Use :func:`atomic_outputs`; an exception inside the block removes every
    temporary file, so an interrupted or failed stage leaves no partial outputs. With
    ``sh_basis="descoteaux07"``, every SH image the stage computed (MRtrix3 basis, the sidecar's
    ``OrientationEncoding.Type`` ``sh``) is written in DIPY's descoteaux07 basis and labelled so.
    """

    def __init__(self, sh_basis: str = "mrtrix3") -> None:
        if sh_basis not in SH_BASIS_LABELS:
            raise DwiflowInputError(f"sh_basis must be one of {', '.join(SH_BASIS_LABELS)}, got {sh_basis!r}",
                                    parameters=("sh_basis",))
        self._pending: list[tuple[Path, Path]] = []
        self.sh_basis = sh_basis

    def _in_requested_basis(self, array: np.ndarray, sidecar: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        encoding = sidecar.get("OrientationEncoding") or {}
        if encoding.get("Type") != "sh" or self.sh_basis == "mrtrix3" or sh_basis_of(sidecar) != "mrtrix3":
            return array, sidecar  # not SH, MRtrix3 asked for, or already converted (mtnormalise keeps its input's)
        from dwiflow.core.sh import convert_sh_basis

        if np.ndim(array) == 4:
            array = convert_sh_basis(np.asarray(array), "mrtrix3", self.sh_basis)
        encoding = {**encoding, "SphericalHarmonicBasis": SH_BASIS_LABELS[self.sh_basis]}
        return array, {**sidecar, "OrientationEncoding": encoding}

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
        if sidecar is not None:
            array, sidecar = self._in_requested_basis(array, sidecar)
        tmp = self._reserve(path)
        array = np.asarray(array, dtype=dtype)
        # NIfTI-1 sizes are 16-bit: a longer axis (e.g. a fixel file's fixels) needs NIfTI-2, as MRtrix3 writes it
        image_class = nib.Nifti2Image if max(array.shape, default=0) > 32767 else nib.Nifti1Image
        img = image_class(array, affine)
        img.header.set_xyzt_units("mm", "sec")
        save_nifti(img, tmp)
        if sidecar is not None:
            self.json(sidecar_path(path), complete_sidecar(sidecar, img.ndim))
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
        """Rename every temporary file into place; if a rename fails, the ones already done are undone (a file
        they replaced is restored), so the outputs are published together or not at all."""
        backups: list[tuple[Path, Path | None]] = []
        try:
            for tmp, final in self._pending:
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600 files
                backup = None
                if final.exists():
                    backup = _tmp_name(final)
                    os.replace(final, backup)
                backups.append((final, backup))
                os.replace(tmp, final)
        except BaseException:
            for final, backup in reversed(backups):
                if backup is not None:
                    os.replace(backup, final)
                elif final.exists():
                    final.unlink()
            self.discard()
            raise
        for _, backup in backups:
            if backup is not None:
                backup.unlink(missing_ok=True)
        self._pending.clear()

    def discard(self) -> None:
        for tmp, _ in self._pending:
            Path(tmp).unlink(missing_ok=True)
        self._pending.clear()


@contextmanager
def atomic_outputs(sh_basis: str = "mrtrix3") -> Iterator[OutputSet]:
    """Context manager yielding an :class:`OutputSet` (SH images written in ``sh_basis``); commits on success,
    discards on error."""
    outputs = OutputSet(sh_basis)
    try:
        yield outputs
    except BaseException:
        outputs.discard()
        raise
    outputs.commit()


NIFTI_SUFFIXES = (".nii.gz", ".nii")


def check_output_paths(outputs: dict[str, Path], inputs: dict[str, Path | None], extensions: dict[str, str]) -> None:
    """Refuse, before anything is computed, outputs that would destroy an input or each other.

    ``outputs``: output name → path; ``inputs``: input kind → path; ``extensions``: output name → the
    extension its format needs (``.nii.gz`` also allows ``.nii``). An output (or its JSON sidecar) may not
    be an input or an input's sidecar, two outputs may not share a path, a path may not be a directory, and
    a NIfTI output's name must end in .nii.gz or .nii. Raises :class:`DwiflowInputError`.
    """
    protected: dict[str, str] = {}
    for kind, path in inputs.items():
        if path is None:
            continue
        protected[os.path.realpath(path)] = f"the input {kind} {path}"
        protected.setdefault(os.path.realpath(sidecar_path(path)), f"the sidecar of the input {kind} {path}")
    claimed: dict[str, str] = {}
    for name, path in outputs.items():
        path = Path(path)
        extension = extensions.get(name, "")
        if extension in NIFTI_SUFFIXES and not path.name.endswith(NIFTI_SUFFIXES):
            hint = (" (dwiflow writes NIfTI; mrconvert turns it into .mif)"
                    if path.name.lower().endswith(MRTRIX_IMAGE_SUFFIXES) else "")
            raise DwiflowInputError(f"output {name} {path}: a NIfTI file name must end in .nii.gz or .nii{hint}")
        if path.is_dir():
            raise DwiflowInputError(f"output {name} {path} is a directory")
        if path.parent.exists() and not path.parent.is_dir():
            raise DwiflowInputError(f"output {name} {path}: {path.parent} is not a directory")
        written = [path] + ([sidecar_path(path)] if path.name.endswith(NIFTI_SUFFIXES + (".txt",)) else [])
        for target in written:
            key = os.path.realpath(target)
            if key in protected:
                raise DwiflowInputError(f"output {name} {target} would overwrite {protected[key]}")
            if key in claimed:
                raise DwiflowInputError(f"outputs {claimed[key]} and {name} would both be written to {target}")
            claimed[key] = name
        folder = next((f for f in [path.parent, *path.parent.parents] if f.exists()), None)
        if folder is not None and not os.access(folder, os.W_OK | os.X_OK):
            raise DwiflowInputError(f"output {name} {path}: {folder} is not writable")


# a text file with a BIDS name: its sidecar is the name with .json for the extension, as an image's
BIDS_TEXT_SUFFIXES = ("_response.txt",)


def sidecar_path(path: str | os.PathLike) -> Path:
    """``x.nii.gz`` → ``x.json``; a BIDS-named response ``…_response.txt`` → ``…_response.json``. A text file named
    freely (MRtrix3's ``gm.txt``) gets ``gm.txt.json``: in MRtrix3's recipe the response ``gm.txt`` and the image
    ``gm.mif`` (here ``gm.nii.gz``) share a name, and the image's sidecar is ``gm.json``."""
    p = Path(path)
    name = p.name
    if name.endswith(".txt") and not name.endswith(BIDS_TEXT_SUFFIXES):
        return p.with_name(name + ".json")
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


HOLD_AT_ENV, HOLD_FILE_ENV = "DWIFLOW_HOLD_AT", "DWIFLOW_HOLD_FILE"


def hold_point(name: str) -> None:
    """Fault injection for the interruption tests: when ``DWIFLOW_HOLD_AT`` names this point (a stage, ``figures``
    or ``publish``), write the process id to ``DWIFLOW_HOLD_FILE`` and wait there to be signalled."""
    if os.environ.get(HOLD_AT_ENV) != name:
        return
    import time

    Path(os.environ[HOLD_FILE_ENV]).write_text(str(os.getpid()))
    time.sleep(600)
