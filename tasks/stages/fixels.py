"""Command ``fixels``: an FOD segmented into fixels (FMLS, as MRtrix3's ``fod2fixel``), written as an MRtrix3 fixel
directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import atomic_outputs, in_mrtrix3_basis, load_mask, read_sidecar
from dwiflow.tasks.options import StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import fod_model_of, load_sh_image, provenance


def fixel_file_names() -> dict[str, str]:
    """The files of a fixel directory, by role (``bids_specs/outputs.yaml``, key ``fixels``)."""
    from dwiflow.bids_specs.outputs import output_spec

    return dict(output_spec("fixels")["files"])


@dataclass(frozen=True)
class FixelsOptions(StageOptions):
    afd: bool = option(False, help="also write each fixel's apparent fibre density (the FOD lobe's integral)")
    peak_amp: bool = option(False, help="also write each fixel's peak amplitude")
    disp: bool = option(False, help="also write each fixel's dispersion (integral / peak amplitude)")
    fmls_integral: float = option(0.0, minimum=0.0, help="drop lobes whose integral is below this (fod2fixel's "
                                                           "-fmls_integral)")
    fmls_peak_value: float = option(0.1, minimum=0.0, help="drop lobes whose peak amplitude is below this "
                                                             "(-fmls_peak_value)")
    fmls_no_thresholds: bool = option(False, help="keep every positive lobe (-fmls_no_thresholds)")
    fmls_lobe_merge_ratio: float = option(1.0, minimum=0.0, maximum=1.0,
                                          help="merge two lobes where the FOD between them exceeds this fraction of "
                                               "the smaller peak (1: never; -fmls_lobe_merge_ratio)")
    maxnum: int = option(0, minimum=0, help="at most this many fixels per voxel, largest first (0: no limit)")
    dirpeak: bool = option(False, help="fixel direction = the lobe's largest peak instead of its mean direction")


def check_fixel_directory(path: Path) -> None:
    """Refuse, before anything runs, a folder holding files other than a fixel directory's own (as fod2fixel does
    without -force): stale data files would not match the new fixels."""
    if not path.exists():
        return
    if not path.is_dir():
        raise DwiflowInputError(f"output fixel directory {path} is a file, not a folder")
    ours = set(fixel_file_names().values())
    others = sorted(p.name for p in path.iterdir() if p.name not in ours)
    if others:
        raise DwiflowInputError(f"output fixel directory {path} already holds other files ({', '.join(others[:3])}"
                                f"{' …' if len(others) > 3 else ''}): give a new or empty folder")


def run_fixels(files, outputs, options: FixelsOptions, context):
    """Segment every voxel's FOD (FMLS) and write index, directions and the requested per-fixel data, NIfTI, and
    the per-voxel fixel count and sum of AFD when asked (all or nothing)."""
    from dwiflow.bids_specs.outputs import sidecar
    from dwiflow.core.fixels import segment_fods

    fod = files["fod"]
    directory = Path(outputs["fixels"])
    check_fixel_directory(directory)
    sh, affine, lmax = load_sh_image(fod)
    upstream = read_sidecar(fod) or {}
    sh = in_mrtrix3_basis(sh, upstream, fod)
    mask = None if files.get("mask") is None else load_mask(files["mask"], sh.shape[:3], affine)
    if mask is not None and not mask.any():
        raise DwiflowInputError(f"mask {files['mask']} is empty")
    no_thresholds = options.fmls_no_thresholds
    fixels = segment_fods(sh, mask,
                          integral_threshold=0.0 if no_thresholds else options.fmls_integral,
                          peak_value_threshold=0.0 if no_thresholds else options.fmls_peak_value,
                          lobe_merge_ratio=options.fmls_lobe_merge_ratio, max_fixels=options.maxnum,
                          direction_from_peak=options.dirpeak)
    names = fixel_file_names()
    index = np.stack([fixels.counts, fixels.offsets], axis=-1).astype(np.uint32)
    # per-fixel files: the fixel axis first, with a transform that does not reverse it (MRtrix3 reorders an axis
    # whose transform points backwards, which would scramble the fixels)
    per_fixel = np.eye(4)
    data = {"afd": fixels.afd, "peak_amp": fixels.peak_amplitude, "disp": fixels.dispersion}
    wanted = [k for k in ("afd", "peak_amp", "disp") if getattr(options, k)]
    parameters = {"IntegralThreshold": 0.0 if no_thresholds else options.fmls_integral,
                  "PeakValueThreshold": 0.0 if no_thresholds else options.fmls_peak_value,
                  "LobeMergeRatio": options.fmls_lobe_merge_ratio, "MaxFixelsPerVoxel": options.maxnum,
                  "Directions": 1281, "SphericalHarmonicDegree": lmax}
    voxel_maps = {"count": lambda: fixels.counts, "afd_total": lambda: fixels.per_voxel_sum(fixels.afd)}
    written = {}
    with atomic_outputs() as out:
        written["fixels"] = directory
        for name in ("count", "afd_total"):
            if name in outputs:
                key = STAGES[0].output_key(name)
                written[name] = out.nifti(outputs[name], voxel_maps[name](), affine,
                                          sidecar(key, parameters, **fod_model_of(fod),
                                                  **provenance(fod, files.get("mask"))),
                                          dtype=np.uint8 if name == "count" else np.float32)
        out.nifti(directory / names["index"], index, affine, dtype=np.uint32)
        out.nifti(directory / names["directions"], fixels.directions[:, :, None], per_fixel)
        for key in wanted:
            out.nifti(directory / names[key], data[key][:, None, None], per_fixel)
        out.json(directory / names["sidecar"], {
            "Description": "MRtrix3 fixel directory: FMLS segmentation of the FOD (Smith et al. 2013) as MRtrix3 "
                           "3.0's fod2fixel. index: per voxel the number of fixels and the first one's row; "
                           "directions: unit vectors (world frame); afd: the lobe's integral (Raffelt et al. 2012); "
                           "peak_amp: its largest amplitude; disp: afd / peak_amp.",
            **fod_model_of(fod),
            **provenance(fod, files.get("mask")),
            # index.nii.gz's two volumes: the voxel's fixel count and its first fixel's row
            "OrientationEncoding": {"Type": "scalar"},
            "NumberOfFixels": fixels.total,
            "FixelDirection": "largest peak" if options.dirpeak else "amplitude-weighted mean of the lobe",
            "Files": {k: names[k] for k in ("index", "directions", *wanted)},
            "Parameters": parameters,
        })
    return written


STAGES = (
    Stage(name="fixels", order=2030, title="Fixels", summary="FOD lobes as fixels (FMLS, as fod2fixel)",
          description="Segments each voxel's FOD into lobes (FMLS, Smith et al. 2013, as MRtrix3 3.0's fod2fixel: "
                      "the same 1281 directions, thresholds and Newton peak refinement) and writes an MRtrix3 fixel "
                      "directory (index, directions and the requested per-fixel data, NIfTI) that fixel2voxel, "
                      "fixelcrop and mrview read; with --count and --afd-total also per-voxel maps of the number "
                      "of fixels and the sum of their AFD (fixel2voxel's count and sum). In a recon spec it segments "
                      "the FOD the peaks read and writes all three.",
          methods=lambda o: ("FODs were segmented into fixels with the FMLS algorithm as in MRtrix3's fod2fixel, "
                             "and apparent fibre density was computed per fixel"),
          references=("smith2013", "raffelt2012"),
          options=FixelsOptions, run=run_fixels, threads=True, compiled=True,
          inputs=(Input("fod", "FOD", "FOD (SH image, MRtrix3 or descoteaux07 basis per its sidecar)"),
                  Input("mask", "MASK", "voxels to segment", required=False, flag=True)),
          outputs=(Output("fixels", "the fixel directory", cli="positional", metavar="OUT_DIR", folder=True),
                   Output("count", "per-voxel number of fixels (uint8)", cli="flag"),
                   Output("afd_total", "per-voxel sum of the fixels' AFD", cli="flag")),
          scipy_blas=False),
)
