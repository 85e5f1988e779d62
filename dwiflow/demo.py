"""The demo job: build the built-in phantom dataset and run the multi-shell pipeline on it.

Run with ``python3 dev.py demo [OUTPUT_DIR]`` (default ``demo_output/``). It writes a BIDS
phantom dataset with its ground truth (multi-shell; WM with 1-2 fibres, GM and CSF in smooth patches with partial
volumes), runs the BIDS App on it (``dwiflow … participant`` with the ``msmt`` recon spec, then ``group``), and
prints how the recovered fibres and tissue fractions compare with the truth.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from dwiflow.bids_specs.outputs import output_filename
from dwiflow.tasks.stages.phantom import write_phantom_dataset

# the msmt spec's outputs the accuracy is read from: peaks of the normalised WM FOD, normalised tissue fractions
PEAKS = output_filename("peaks", {"sub": "phantom"}, {"fod_model": "mtnormalise"})
TISSUE_FRACTIONS = output_filename("mtnormalise_fractions", {"sub": "phantom"}, {"tissue_model": "msmtcsd"})


def run_demo(out_dir: Path) -> dict[str, Path]:
    """Write the phantom as a BIDS dataset, run the BIDS App on it (participant, group), report accuracy."""
    from dwiflow.cli.bidsapp import main as bidsapp

    t0 = time.perf_counter()
    raw = out_dir / "phantom"
    print(f"[demo] 1/3 phantom BIDS dataset (b=0 + 1000/2000/3000, 20x20x10 tissue in a 26x26x14 image: WM with 1-2 "
          f"fibres, GM and CSF in patches with partial volumes, SNR 30) -> {raw}", flush=True)
    files = write_phantom_dataset(raw, scheme="multi", shape=(20, 20, 10), snr=30.0, seed=42, tissues="three")
    deriv = out_dir / "derivatives" / "dwiflow"
    print(f"[demo] 2/3 dwiflow {raw} {deriv} participant --recon-spec msmt --mask-dir "
          f"{raw / 'derivatives' / 'masks'}  (tensor, dhollander responses, multi-tissue CSD, mtnormalise, peaks, "
          "FOD metrics)", flush=True)
    if bidsapp([str(raw), str(deriv), "participant", "--recon-spec", "msmt",
                "--mask-dir", str(raw / "derivatives" / "masks"), "--work-dir", str(out_dir / "work"),
                "--worker", "cf"]) != 0:
        raise SystemExit("[demo] the participant level failed")
    print(f"[demo] 3/3 dwiflow {raw} {deriv} group", flush=True)
    bidsapp([str(raw), str(deriv), "group"])
    folder = deriv / "sub-phantom" / "dwi"
    _report_accuracy(folder / PEAKS, folder / TISSUE_FRACTIONS, files)
    print(f"[demo] done in {time.perf_counter() - t0:.1f} s. Derivatives: {deriv.resolve()}")
    return {**files, "derivatives": deriv, "peaks": folder / PEAKS, "tissue_fractions": folder / TISSUE_FRACTIONS}


def _report_accuracy(peaks_path: Path, fractions_path: Path, files: dict[str, Path]) -> None:
    """Print the first peak's angle to the true fibre and the fibre count (NuFO) in nearly pure WM, and the median
    absolute error of the normalised tissue fractions, against the phantom's truth."""
    peaks = nib.load(peaks_path).get_fdata()
    vectors = peaks.reshape(peaks.shape[:3] + (-1, 3))
    unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    n_true = nib.load(files["nfibres"]).get_fdata().astype(int)
    truth = nib.load(files["directions"]).get_fdata().reshape(peaks.shape[:3] + (-1, 3))
    tissues = nib.load(files["tissues"]).get_fdata()
    inside = tissues.sum(axis=-1) > 0  # the tissue block (the background holds noise only)
    white = inside & (tissues[..., 0] >= 0.9)
    single = white & (n_true == 1)
    first = np.abs(np.sum(unit[..., 0, :] * truth[..., 0, :], axis=-1))
    angle = np.degrees(np.arccos(np.clip(first, 0, 1)))
    nufo = np.sum(np.isfinite(vectors[..., 0]), axis=-1)
    print(f"[demo] nearly pure WM (WM fraction >= 0.9): {int(white.sum())} voxels; median first-peak error "
          f"{np.nanmedian(angle[single]):.2f} deg in the {int(single.sum())} with one fibre (SNR 30)")
    for k in (1, 2):
        sel = white & (n_true == k)
        if sel.any():
            print(f"[demo]   with {k} fibre(s): {int(sel.sum())}, NuFO equal to the truth in {np.mean(nufo[sel] == k):.0%}")
    recovered = nib.load(fractions_path).get_fdata()
    error = np.median(np.abs(recovered[inside] - tissues[inside]), axis=0)
    print(f"[demo] tissue fractions after mtnormalise, median absolute error over the {int(inside.sum())} tissue "
          f"voxels: WM {error[0]:.3f}, GM {error[1]:.3f}, CSF {error[2]:.3f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_dir = Path(argv[0]) if argv else Path("demo_output")
    run_demo(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
