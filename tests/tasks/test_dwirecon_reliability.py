"""dwirecon never destroys an input, never half-writes, and refuses bad input in one line (issue: reliability)."""

from __future__ import annotations

import errno
import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dwiflow.cli.dwirecon import main
from dwiflow.core.gradients import world_to_fsl_bvecs
from dwiflow.core.sims import acquisition_scheme, make_phantom
from tests.conftest import write_gradients, write_nifti

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture()
def case(tmp_path):
    g = acquisition_scheme("multi")
    ph = make_phantom(g, (5, 5, 3), snr=30, seed=2)
    dwi = write_nifti(tmp_path / "dwi.nii.gz", ph.data.astype(np.float32), AFFINE)
    bval, bvec = write_gradients(tmp_path / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    return {"dir": tmp_path, "dwi": dwi, "bval": bval, "bvec": bvec, "g": g, "ph": ph}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(argv, capsys, folder: Path, message: str) -> None:
    """Exit 2, one line naming the problem, and not one file created or changed (no temporaries either)."""
    before = _files(folder)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert _files(folder) == before


def test_outputs_that_would_destroy_inputs_or_each_other_are_refused(case, capsys):
    d = case["dir"]
    base = ["tensor", case["dwi"], case["bval"], case["bvec"]]
    _refused(base + ["--fa", case["dwi"]], capsys, d, f"output fa {case['dwi']} would overwrite the input dwi")
    _refused(base + ["--fa", d / "dwi.nii"], capsys, d, "would overwrite the sidecar of the input dwi")  # dwi.json
    _refused(base + ["--fa", d / "x.nii.gz", "--md", d / "x.nii.gz"], capsys, d,
             "outputs fa and md would both be written to")
    (d / "folder.nii.gz").mkdir()
    _refused(base + ["--fa", d / "folder.nii.gz"], capsys, d, "is a directory")
    _refused(base + ["--fa", d / "fa.img"], capsys, d, "a NIfTI file name must end in .nii.gz or .nii")
    _refused(base + ["--fa", d / "fa.mif"], capsys, d, "must end in .nii.gz or .nii (dwiflow writes NIfTI; mrconvert "
             "turns it into .mif)")
    (d / "dwi.mif").write_bytes(b"mrtrix image\ndim: 5,5,3,10\nEND\n")
    _refused(["tensor", d / "dwi.mif", case["bval"], case["bvec"], "--fa", d / "fa.nii.gz"], capsys, d,
             f"cannot read DWI {d / 'dwi.mif'}: dwiflow reads NIfTI; convert an MRtrix3 image with mrconvert dwi.mif "
             "out.nii.gz (-export_grad_fsl out.bvec out.bval for a DWI's gradients)")
    # the response's sidecar (r.txt.json) is the voxel image's (r.txt.nii.gz)
    _refused(["response", "fa", case["dwi"], case["bval"], case["bvec"], d / "r.txt", "--voxels", d / "r.txt.nii.gz"],
             capsys, d, "outputs response and voxels would both be written to")
    _refused(["mask", case["dwi"], case["bval"], case["bvec"], case["bval"]], capsys, d,
             "a NIfTI file name must end in .nii.gz or .nii")


def test_corrupt_and_truncated_gzip_are_errors(case, capsys):
    raw = Path(case["dwi"]).read_bytes()
    crc = bytearray(raw)
    crc[-8] ^= 0xFF  # the gzip trailer's CRC: the data inflate, but not to what was written
    bad = case["dir"] / "crc.nii.gz"
    bad.write_bytes(bytes(crc))
    argv = ["tensor", bad, case["bval"], case["bvec"], "--fa", case["dir"] / "fa.nii.gz"]
    _refused(argv, capsys, case["dir"], f"DWI {bad} is corrupt: its gzip stream cannot be read whole (CRC check failed)")
    bad.write_bytes(raw[: len(raw) // 2])
    _refused(argv, capsys, case["dir"], f"DWI {bad} is truncated")
    # a NIfTI whose data stop early: truncated, not silently zero-filled
    short = case["dir"] / "short.nii.gz"
    short.write_bytes(gzip.compress(gzip.decompress(raw)[:-400]))
    _refused(argv[:1] + [short] + argv[2:], capsys, case["dir"], "is truncated: its header describes")


def test_a_compressed_dwi_is_read_as_nibabel_reads_it_without_a_second_copy(tmp_path, caplog, monkeypatch):
    """load_dwi on .nii.gz files holds exactly nibabel's values (unscaled float32, scaled integers, big-endian
    floats, NIfTI-2 compressed or not, a gzip file of two members), read-only, and prints nothing (a NIfTI-2 header
    tried as a NIfTI-1 one made nibabel log two lines to stderr). Unscaled float32 is read without a second copy:
    inflated in one call, the peak allocation is the image and the compressed file (not the two to three times the
    image of decompressing to growing buffers, then an array from them); streamed (files above the one-call limit),
    it stays below 1.5 times the image."""
    import tracemalloc

    from dwiflow.tasks import io
    from dwiflow.tasks.io import _last_dwi, load_dwi

    g = acquisition_scheme("multi")
    data = make_phantom(g, (32, 32, 16), snr=30, seed=4).data
    bval, bvec = write_gradients(tmp_path / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    scaled = nib.Nifti1Image(np.round(data).astype(np.int16), AFFINE)
    scaled.header.set_slope_inter(0.5, 3.0)
    plain = nib.Nifti1Image(data.astype(np.float32), AFFINE)
    limit = io.ONE_CALL_LIMIT
    for name, img in (("plain", plain), ("streamed", plain), ("two_members", plain), ("scaled", scaled),
                      ("big_endian", nib.Nifti1Image(data.astype(">f4"), AFFINE)),
                      ("nifti2", nib.Nifti2Image(data.astype(np.float32), AFFINE)),
                      ("nifti2.nii", nib.Nifti2Image(data.astype(np.float64), AFFINE))):
        path = tmp_path / (name if name.endswith(".nii") else f"{name}.nii.gz")
        nib.save(img, path)
        if name == "two_members":  # as bgzip and concatenated gzip files are: the one-call path declines it
            whole = gzip.decompress(path.read_bytes())
            path.write_bytes(gzip.compress(whole[:1000]) + gzip.compress(whole[1000:]))
        _last_dwi.clear()
        monkeypatch.setattr(io, "ONE_CALL_LIMIT", 0 if name == "streamed" else limit)
        tracemalloc.start()
        try:
            run = load_dwi(path, bval, bvec)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        expected = np.asanyarray(nib.load(path).dataobj)
        if not np.issubdtype(expected.dtype, np.floating):
            expected = expected.astype(np.float32)
        assert run.data.dtype == expected.dtype.newbyteorder("=") and np.array_equal(run.data, expected), name
        assert not run.data.flags.writeable, name
        if name in ("plain", "nifti2", "two_members"):
            assert peak < run.data.nbytes + path.stat().st_size + (1 << 20), (name, peak, run.data.nbytes)
        if name == "streamed":
            assert peak < 1.5 * run.data.nbytes, (name, peak, run.data.nbytes)
    # a scaled image is inflated once: nibabel's values come from the bytes the one call inflated
    _last_dwi.clear()
    monkeypatch.setattr(io, "load_image", lambda *args, **kwargs: pytest.fail("decompressed a second time"))
    assert np.array_equal(load_dwi(tmp_path / "scaled.nii.gz", bval, bvec).data, nib.load(tmp_path / "scaled.nii.gz")
                          .get_fdata(dtype=np.float32))
    _last_dwi.clear()
    assert [record.getMessage() for record in caplog.records if record.name.startswith("nibabel")] == []


def test_a_compressed_output_is_written_a_slab_at_a_time_with_the_same_bytes_every_time(tmp_path):
    """save_nifti on a .nii.gz name: a gzip file (no time stamp, no name) that decompresses to nibabel's bytes of the
    image, the same bytes from two writes; compressed as it is written, so its peak allocation stays under a quarter
    of the image (an uncompressed and a compressed copy of the file, as before, took 3.5 times the image)."""
    import tracemalloc

    from dwiflow.tasks.io import save_nifti

    image = nib.Nifti1Image(np.random.default_rng(3).normal(size=(40, 40, 30, 45)).astype(np.float32), AFFINE)
    paths = [tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"]
    tracemalloc.start()
    save_nifti(image, paths[0])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    save_nifti(image, paths[1])
    written = paths[0].read_bytes()
    assert written == paths[1].read_bytes()
    assert written[:2] == b"\x1f\x8b" and written[3] == 0 and written[4:8] == bytes(4)  # no name, mtime 0
    assert gzip.decompress(written) == image.to_bytes()
    assert np.array_equal(nib.load(paths[0]).get_fdata(dtype=np.float32), image.get_fdata(dtype=np.float32))
    assert peak < 0.25 * image.dataobj.nbytes, (peak, image.dataobj.nbytes)


def test_a_compressed_output_stores_its_noisy_segments_and_compresses_the_rest(tmp_path):
    """Noise-like float32 values (an FOD inside the brain) barely shrink at zlib level 1, so their segments are stored:
    the file is within 1 % of their raw size plus what the background and labels compress to. The background and
    a label map compress at level 1 as before. Any split of the same bytes into writes gives the same file, which
    Python's gzip and ISA-L (dwiflow's reader) decompress to the same bytes."""
    import io
    import zlib

    from isal import igzip

    from dwiflow.tasks.io import SEGMENT_BYTES, _SegmentedGzipWriter

    rng = np.random.default_rng(4)
    noise = rng.normal(size=3 * SEGMENT_BYTES // 4).astype(np.float32).tobytes()  # three segments
    background = bytes(2 * SEGMENT_BYTES)
    labels = rng.integers(0, 4, size=SEGMENT_BYTES + 12345, dtype=np.uint8).tobytes()
    data = noise + background + labels
    files = []
    for sizes in ([len(data)], [7, SEGMENT_BYTES - 3, 2 * SEGMENT_BYTES + 11, 5], [99_991] * 80):
        buffer = io.BytesIO()
        writer = _SegmentedGzipWriter(buffer)
        position = 0
        for size in sizes:
            writer.write(data[position:position + size])
            position += size
        writer.write(data[position:])
        writer.finish()
        files.append(buffer.getvalue())
    assert files[1] == files[0] and files[2] == files[0]
    assert gzip.decompress(files[0]) == data and igzip.decompress(files[0]) == data
    compressed_rest = len(zlib.compress(background, 1)) + len(zlib.compress(labels, 1))
    assert len(noise) < len(files[0]) < 1.01 * len(noise) + 1.05 * compressed_rest, (len(files[0]), compressed_rest)
    assert len(zlib.compress(noise, 1)) < 0.95 * len(noise)  # level 1 would have saved some, at a far higher cost


def test_all_outputs_or_none_on_a_full_disk(case, capsys, monkeypatch):
    """ENOSPC while writing the second map: nothing is published and no temporary file is left."""
    import dwiflow.tasks.io as io

    original, calls = io.save_nifti, []

    def save(img, name):
        calls.append(name)
        if len(calls) == 2:
            with open(name, "wb") as handle:
                handle.write(b"\0" * 16)  # a partly written file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", name)
        return original(img, name)

    monkeypatch.setattr(io, "save_nifti", save)
    d = case["dir"]
    before = _files(d)
    code = main([str(a) for a in ["tensor", case["dwi"], case["bval"], case["bvec"], "--fa", d / "fa.nii.gz",
                                  "--md", d / "md.nii.gz"]])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and len(calls) == 2
    assert _files(d) == before


def test_a_failed_rename_undoes_the_outputs_already_published(tmp_path, monkeypatch):
    """The commit of an output set is all or nothing even when a rename fails half-way: replaced files come back."""
    import dwiflow.tasks.io as io

    (tmp_path / "a.txt").write_text("old a")
    original, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if str(dst).endswith("b.txt"):
            raise OSError(errno.EIO, "I/O error", str(dst))
        return original(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(OSError):
        with io.atomic_outputs() as out:
            out.text(tmp_path / "a.txt", "new a")
            out.text(tmp_path / "b.txt", "new b")
    monkeypatch.setattr(io.os, "replace", original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"] and (tmp_path / "a.txt").read_text() == "old a"


def test_bvalues_in_ms_per_square_micrometre_are_refused_with_a_hint(case, capsys):
    np.savetxt(case["bval"], np.atleast_2d(case["g"].bvals / 1000.0), fmt="%g")
    _refused(["tensor", case["dwi"], case["bval"], case["bvec"], "--md", case["dir"] / "md.nii.gz"], capsys,
             case["dir"], "the largest b-value is 3: these look like ms/µm² (b=1 means 1000 s/mm²)")


def test_signal_above_b0_is_a_status_not_an_ok_fa_of_one(case, tmp_path):
    data = np.asarray(nib.load(case["dwi"]).dataobj).copy()
    g = case["g"]
    data[1, 1, 1, ~g.b0s_mask] = data[1, 1, 1, g.b0s_mask].mean() * 1.5  # diffusion cannot raise the signal
    dwi = write_nifti(tmp_path / "above.nii.gz", data, AFFINE)
    argv = ["tensor", dwi, case["bval"], case["bvec"], "--fa", tmp_path / "fa.nii.gz", "--status", tmp_path / "st.nii.gz"]
    assert main([str(a) for a in argv]) == 0
    status = np.asarray(nib.load(tmp_path / "st.nii.gz").dataobj)
    fa = nib.load(tmp_path / "fa.nii.gz").get_fdata()
    assert status[1, 1, 1] == 7 and np.isnan(fa[1, 1, 1]) and (status == 0).sum() == status.size - 1
    levels = __import__("json").loads((tmp_path / "st.json").read_text())["Levels"]
    assert levels["7"].startswith("diffusion-weighted signal above the b=0 signal")


def test_errors_quote_little_of_a_file(case, capsys, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:supersecretpassword:/root:/bin/bash\nmore lines\n")
    link = tmp_path / "link.bval"
    link.symlink_to(secret)
    code = main(["tensor", str(case["dwi"]), str(link), str(case["bvec"]), "--fa", str(tmp_path / "fa.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "supersecret" not in err and "root:x:0:0:super" in err and len(err.splitlines()) == 1


def test_small_refusals(case, capsys, tmp_path):
    d = case["dir"]
    empty = d / "empty.bval"
    empty.write_text("\n")
    _refused(["shells", empty], capsys, d, f"bval file {empty} is empty")
    comma = d / "comma.bval"
    comma.write_text("0,1000,2000\n")
    _refused(["shells", comma], capsys, d, "separates values with commas")
    sh_count = write_nifti(d / "dwi45.nii.gz", np.ones((4, 4, 2, 45), np.float32), AFFINE)
    write_gradients(d / "dwi45", np.zeros(45), np.ones((3, 45)))
    _refused(["peaks", sh_count, d / "p.nii.gz"], capsys, d, "has dwi45.bval beside it: it is a DWI, not an SH image")
    fod = write_nifti(d / "fod.nii.gz", np.ones((4, 4, 2, 45), np.float32), AFFINE)
    _refused(["peaks", fod, d / "p.nii.gz", "--npeaks", "100000"], capsys, d, "--npeaks: must be <= 10, got 100000")
    _refused(["peaks", fod, d / "p.nii.gz", "--threshold", "nan"], capsys, d, "--threshold: must be a finite number")
    _refused(["fod-metrics", fod, fod, d / "m", "--model", "../../x"], capsys, d,
             "--model: a BIDS label is letters and digits only")
    assert not (d / "m").exists() and not (d.parent.parent / "x").exists()
    binary = d / "resp.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    _refused(["csd", case["dwi"], case["bval"], case["bvec"], binary, d / "f.nii.gz"], capsys, d,
             f"response file {binary} is not a text file")
    (d / "ok.txt").write_text("100 -20 5\n")
    _refused(["csd", case["dwi"], case["bval"], case["bvec"], d / "ok.txt", d / "f.nii.gz", "--niter", "0"], capsys, d,
             "--niter: must be >= 1, got 0")
    # a DataLad dataset whose content was not fetched: its files are links into .git/annex (it said "not found")
    annexed = d / "annexed.nii.gz"
    annexed.symlink_to("../.git/annex/objects/Xy/Zw/SHA256E-s9--0a.nii.gz/SHA256E-s9--0a.nii.gz")
    _refused(["tensor", annexed, case["bval"], case["bvec"], "--fa", d / "fa.nii.gz"], capsys, d,
             f"DWI file {annexed} is a symbolic link to a missing file (its content is not in this git-annex/DataLad "
             "dataset: datalad get it)")


def _dwis_kept() -> int:
    from dwiflow.tasks.io import _last_dwi

    return len(_last_dwi)


def test_the_dwi_is_held_once_and_freed_when_no_stage_left_reads_it(tmp_path, monkeypatch):
    """The DWI a process keeps for its next stage: the cf worker's processes inherit the one the BIDS App's
    pre-flight read and the App's process frees its own (it would otherwise be held twice in memory, ~300 MB on a
    2 mm brain); a stage that reads no DWI (peaks, FOD metrics, mtnormalise, the figures) frees it first."""
    from dwiflow.tasks.io import _last_dwi, load_dwi
    from dwiflow.tasks.pydra_tasks import _run_stage
    from dwiflow.workflows.workers import LocalProcessWorker

    g = acquisition_scheme("single")
    phantom = make_phantom(g, (6, 6, 3), snr=30, seed=2)
    dwi = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(phantom.data.astype(np.float32), AFFINE), dwi)
    bval, bvec = write_gradients(tmp_path / "dwi", g.bvals, world_to_fsl_bvecs(g.bvecs, AFFINE).T)
    _last_dwi.clear()
    load_dwi(dwi, bval, bvec)
    assert _dwis_kept() == 1
    worker = LocalProcessWorker(n_procs=1).start_handing_over_the_dwi()
    try:
        assert _dwis_kept() == 0 and worker.pool.submit(_dwis_kept).result() == 1
    finally:
        worker.close()
    load_dwi(dwi, bval, bvec)
    fod = tmp_path / "fod.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(6, 6, 3, 45)).astype(np.float32), AFFINE), fod)
    (tmp_path / "peaks").mkdir()
    monkeypatch.chdir(tmp_path / "peaks")  # a stage writes into its task's working directory
    _run_stage("peaks", None, {}, {"fod_model": "csd"}, "test", fod=str(fod), mask=None)
    assert (tmp_path / "peaks" / "peaks.nii.gz").is_file() and _dwis_kept() == 0
