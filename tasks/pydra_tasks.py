"""Pydra 1.0 tasks: one thin task per stage, wrapping :mod:`dwiflow.tasks.stages`.

Each task writes its outputs into its own working directory (Pydra's cache directory for
the task) and returns them as files, so only file paths cross task boundaries. Every task
takes ``code_version`` (package version + hash of the ``core/`` sources, see
:func:`code_version`) so that editing an estimator changes the task hash and invalidates
cached results.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from fileformats.generic import Directory, File
from pydra.compose import python

from dwiflow._version import __version__
from dwiflow.tasks import stages


@lru_cache(maxsize=4)
def code_version(source_root: Path | None = None) -> str:
    """``<version>+<sha256 of the core/ sources and the stage code>`` (first 12 hex digits).

    ``source_root`` is the repository (or installed) root holding ``core/`` and ``tasks/``.
    """
    root = Path(source_root) if source_root else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    sources = sorted((root / "core").glob("*.py")) + [root / "tasks" / "stages.py", root / "tasks" / "io.py"]
    for path in sources:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"


def _optional(path: File | None) -> str | None:
    return None if path is None else str(path)


@python.define(outputs=["mask"])
def BrainMask(dwi: File, bval: File, bvec: File, code_version: str = "") -> File:
    """Median-Otsu brain mask of the mean b=0 image."""
    out = Path.cwd() / "mask.nii.gz"
    stages.mask_stage(dwi, bval, bvec, out)
    return File(out)


@python.define(outputs=["fa", "md", "ad", "rd", "v1", "s0", "status"])
def Tensor(dwi: File, bval: File, bvec: File, mask: File, code_version: str = "") -> tuple[File, File, File, File, File, File, File]:
    """Weighted least-squares tensor fit and its maps."""
    names = ("fa", "md", "ad", "rd", "v1", "s0", "status")
    written = stages.tensor_stage(dwi, bval, bvec, {n: Path.cwd() / f"{n}.nii.gz" for n in names}, mask=mask)
    return tuple(File(written[n]) for n in names)


@python.define(outputs=["response", "voxels"])
def Response(
    dwi: File, bval: File, bvec: File, mask: File, method: str = "fa", options: dict | None = None, code_version: str = ""
) -> tuple[File, File]:
    """Response function by ``method``: fa, ssst, tournier or tax; and the mask of the voxels it used."""
    out, voxels = Path.cwd() / "response.txt", Path.cwd() / "response_voxels.nii.gz"
    options = dict(options or {})
    if method == "fa":
        stages.fa_response_stage(dwi, bval, bvec, out, mask=mask, voxels_out=voxels, **options)
    elif method == "ssst":
        stages.ssst_response_stage(dwi, bval, bvec, out, mask=mask, voxels_out=voxels, **options)
    else:
        stages.iterative_response_stage(method, dwi, bval, bvec, out, mask=mask, voxels_out=voxels, options=options)
    return File(out), File(voxels)


@python.define(outputs=["fod", "status"])
def Csd(
    dwi: File, bval: File, bvec: File, response: File, mask: File, lmax: int | None = None, code_version: str = ""
) -> tuple[File, File]:
    """Constrained spherical deconvolution."""
    fod, status = Path.cwd() / "fod.nii.gz", Path.cwd() / "csd_status.nii.gz"
    stages.csd_stage(dwi, bval, bvec, response, fod, mask=mask, lmax=lmax, status_out=status)
    return File(fod), File(status)


RUMBA_TASK_OUTPUTS = ("fod", "fod_amplitudes", "combined_odf", "fwm", "fiso", "fgm", "fcsf", "snr", "status")


@python.define(outputs=list(RUMBA_TASK_OUTPUTS))
def Rumba(
    dwi: File, bval: File, bvec: File, mask: File, response: File | None = None, options: dict | None = None,
    code_version: str = "",
) -> tuple[File | None, File | None, File | None, File | None, File | None, File | None, File | None, File | None,
           File | None]:
    """RUMBA-SD; ``response`` (an SSST response with eigenvalues) replaces the default white-matter response.

    ``options``: gm_response, csf_response (None switches a compartment off), n_iter, recon_type, n_coils, R,
    global_fit, use_tv, sh_lmax, amplitudes (write the fODF on the sphere, default False).
    """
    options = dict(options or {})
    amplitudes = options.pop("amplitudes", False)
    wanted = [n for n in RUMBA_TASK_OUTPUTS if n != "fod_amplitudes" or amplitudes]
    if options.get("gm_response", 0.8e-3) is None:
        wanted.remove("fgm")
    if options.get("csf_response", 3.0e-3) is None:
        wanted.remove("fcsf")
    wm = options.pop("wm_response", None)
    written = stages.rumba_stage(dwi, bval, bvec, {n: Path.cwd() / f"rumba_{n}.nii.gz" for n in wanted}, mask=mask,
                                 wm_response=response if response is not None else wm, **options)
    return tuple(File(written[n]) if n in written else None for n in RUMBA_TASK_OUTPUTS)


MAPMRI_TASK_OUTPUTS = ("rtop", "rtap", "rtpp", "msd", "qiv", "ng", "ngpar", "ngperp", "lapnorm", "odf", "status",
                       "compare")


@python.define(outputs=list(MAPMRI_TASK_OUTPUTS))
def Mapmri(
    dwi: File, bval: File, bvec: File, mask: File, options: dict | None = None, code_version: str = "",
) -> tuple[File | None, File | None, File | None, File | None, File | None, File | None, File | None, File | None,
           File | None, File | None, File | None, File | None]:
    """MAP-MRI; ``options``: radial_order, anisotropic, laplacian_weighting, positivity, pos_grid, pos_radius,
    solver, big_delta, small_delta, bval_threshold, compare (variants: MAP, MAPL, CMAP, CMAPL, MAP+). Δ/δ are
    read from the DWI's sidecar unless given."""
    options = dict(options or {})
    wanted = [n for n in MAPMRI_TASK_OUTPUTS if (options.get("anisotropic", True) or n not in ("ng", "ngpar", "ngperp"))
              and (n != "compare" or options.get("compare"))]
    written = stages.mapmri_stage(dwi, bval, bvec, {n: Path.cwd() / f"mapmri_{n}.nii.gz" for n in wanted}, mask=mask,
                                  **options)
    return tuple(File(written[n]) if n in written else None for n in MAPMRI_TASK_OUTPUTS)


SMT_TASK_OUTPUTS = ("lpar", "lperp", "f", "fw", "mse", "r2", "status", "odi", "kappa", "mu", "fod", "fodmse", "beta",
                    "nu", "fodfrac")


@python.define(outputs=list(SMT_TASK_OUTPUTS))
def Smt(
    dwi: File, bval: File, bvec: File, mask: File, options: dict | None = None, code_version: str = "",
) -> tuple[File | None, File | None, File | None, File | None, File | None, File | None, File | None, File | None,
           File | None, File | None, File | None, File | None, File | None, File | None, File | None]:
    """SMT kernel and its FOD; ``options``: fod (none|watson|bingham), n_fod, free_water, lambda_par_bounds."""
    options = dict(options or {})
    skip = set() if options.get("free_water") else {"fw"}
    if options.get("fod", "watson") != "bingham":
        skip |= set(stages.SMT_BINGHAM_OUTPUTS)
    if options.get("fod", "watson") == "none":
        skip |= set(stages.SMT_FOD_OUTPUTS)
    if options.get("n_fod", 1) == 1 or options.get("fod", "watson") == "none":
        skip |= set(stages.SMT_MULTI_OUTPUTS)
    if "lambda_par_bounds" in options:
        options["lambda_par_bounds"] = tuple(options["lambda_par_bounds"])
    written = stages.smt_stage(dwi, bval, bvec, {n: Path.cwd() / f"smt_{n}.nii.gz" for n in SMT_TASK_OUTPUTS
                                                 if n not in skip}, mask=mask, **options)
    return tuple(File(written[n]) if n in written else None for n in SMT_TASK_OUTPUTS)


@python.define(outputs=["peaks"])
def Peaks(
    fod: File, mask: File, npeaks: int = 3, rel_threshold: float = 0.2, min_separation: float = 25.0,
    subtract_psf: bool = False, code_version: str = ""
) -> File:
    """FOD peaks."""
    out = Path.cwd() / "peaks.nii.gz"
    stages.peaks_stage(fod, out, mask=mask, npeaks=npeaks, rel_threshold=rel_threshold, min_separation=min_separation,
                       subtract_psf=subtract_psf)
    return File(out)


@python.define(outputs=["afd_total", "peak_amplitude", "nufo", "gfa"])
def FodMetrics(fod: File, peaks: File, code_version: str = "") -> tuple[File, File, File, File]:
    """Total AFD, per-peak amplitude, NuFO and GFA."""
    written = stages.fod_metrics_stage(fod, peaks, Path.cwd())
    return tuple(File(written[k]) for k in stages.FOD_METRIC_OUTPUTS)


# input name of StageDerivatives → (output key in bids_specs/outputs.yaml, extra entities)
DERIVATIVE_KEYS: dict[str, tuple[str, dict[str, str]]] = {
    "mask": ("brain_mask", {}),
    "fa": ("tensor_fa", {}), "md": ("tensor_md", {}), "ad": ("tensor_ad", {}), "rd": ("tensor_rd", {}),
    "v1": ("tensor_v1", {}), "s0": ("tensor_s0", {}), "tensor_status": ("tensor_status", {}),
    "response": ("response", {"model": "csd"}), "response_voxels": ("response_voxels", {}),
    "fod": ("csd_fod", {}), "csd_status": ("csd_status", {}),
    "peaks": ("peaks", {}),
    "afd_total": ("afd_total", {}), "peak_amplitude": ("peak_amplitude", {}),
    "nufo": ("nufo", {}), "gfa": ("gfa", {}),
    **{f"rumba_{n}": (f"rumba_{n}", {}) for n in RUMBA_TASK_OUTPUTS},
    **{f"mapmri_{n}": (f"mapmri_{n}", {}) for n in MAPMRI_TASK_OUTPUTS},
    **{f"smt_{n}": (f"smt_{n}", {}) for n in SMT_TASK_OUTPUTS},
}
MODEL_ENTITY = ("response", "peaks", "afd_total", "peak_amplitude", "nufo", "gfa")  # named after the FOD's model


def derivative_name(input_name: str, entities: dict, fod_model: str, response_method: str) -> tuple[str, str]:
    """(output key, BIDS file name) of a staged derivative, from its StageDerivatives input name."""
    from dwiflow.bids_specs.outputs import output_filename

    key, extra = DERIVATIVE_KEYS[input_name]
    ents = {**entities, **extra}
    if input_name in MODEL_ENTITY:
        ents["model"] = fod_model
    if input_name == "response":
        ents["desc"] = response_method
    if input_name == "response_voxels":
        ents["desc"] = f"{response_method}voxels"
    return key, output_filename(key, ents)


@python.define(outputs=["staged"])
def StageDerivatives(
    entities: dict,
    response_method: str = "",
    fod_model: str = "csd",
    mask: File | None = None, fa: File | None = None, md: File | None = None, ad: File | None = None,
    rd: File | None = None, v1: File | None = None, s0: File | None = None, tensor_status: File | None = None,
    response: File | None = None, response_voxels: File | None = None, fod: File | None = None, csd_status: File | None = None, peaks: File | None = None,
    afd_total: File | None = None, peak_amplitude: File | None = None, nufo: File | None = None, gfa: File | None = None,
    rumba_fod: File | None = None, rumba_fod_amplitudes: File | None = None, rumba_combined_odf: File | None = None,
    rumba_fwm: File | None = None, rumba_fiso: File | None = None, rumba_fgm: File | None = None,
    rumba_fcsf: File | None = None, rumba_snr: File | None = None, rumba_status: File | None = None,
    mapmri_rtop: File | None = None, mapmri_rtap: File | None = None, mapmri_rtpp: File | None = None,
    mapmri_msd: File | None = None, mapmri_qiv: File | None = None, mapmri_ng: File | None = None,
    mapmri_ngpar: File | None = None, mapmri_ngperp: File | None = None, mapmri_lapnorm: File | None = None,
    mapmri_odf: File | None = None, mapmri_status: File | None = None, mapmri_compare: File | None = None,
    smt_lpar: File | None = None, smt_lperp: File | None = None, smt_f: File | None = None, smt_fw: File | None = None,
    smt_mse: File | None = None, smt_r2: File | None = None, smt_status: File | None = None, smt_odi: File | None = None,
    smt_kappa: File | None = None, smt_mu: File | None = None, smt_fod: File | None = None,
    smt_fodmse: File | None = None, smt_beta: File | None = None, smt_nu: File | None = None,
    smt_fodfrac: File | None = None,
    code_version: str = "",
):
    """Copy a run's outputs (and their sidecars) under their BIDS derivative names into one folder."""
    import shutil

    from dwiflow.tasks.io import sidecar_path

    values = {"mask": mask, "fa": fa, "md": md, "ad": ad, "rd": rd, "v1": v1, "s0": s0, "tensor_status": tensor_status,
              "response": response, "response_voxels": response_voxels, "fod": fod, "csd_status": csd_status, "peaks": peaks, "afd_total": afd_total,
              "peak_amplitude": peak_amplitude, "nufo": nufo, "gfa": gfa,
              "rumba_fod": rumba_fod, "rumba_fod_amplitudes": rumba_fod_amplitudes, "rumba_combined_odf": rumba_combined_odf,
              "rumba_fwm": rumba_fwm, "rumba_fiso": rumba_fiso, "rumba_fgm": rumba_fgm, "rumba_fcsf": rumba_fcsf,
              "rumba_snr": rumba_snr, "rumba_status": rumba_status,
              "mapmri_rtop": mapmri_rtop, "mapmri_rtap": mapmri_rtap, "mapmri_rtpp": mapmri_rtpp, "mapmri_msd": mapmri_msd,
              "mapmri_qiv": mapmri_qiv, "mapmri_ng": mapmri_ng, "mapmri_ngpar": mapmri_ngpar,
              "mapmri_ngperp": mapmri_ngperp, "mapmri_lapnorm": mapmri_lapnorm, "mapmri_odf": mapmri_odf,
              "mapmri_status": mapmri_status, "mapmri_compare": mapmri_compare,
              "smt_lpar": smt_lpar, "smt_lperp": smt_lperp, "smt_f": smt_f, "smt_fw": smt_fw, "smt_mse": smt_mse,
              "smt_r2": smt_r2, "smt_status": smt_status, "smt_odi": smt_odi, "smt_kappa": smt_kappa, "smt_mu": smt_mu,
              "smt_fod": smt_fod, "smt_fodmse": smt_fodmse, "smt_beta": smt_beta, "smt_nu": smt_nu,
              "smt_fodfrac": smt_fodfrac}
    folder = Path.cwd() / "derivatives"
    folder.mkdir(exist_ok=True)
    for name, value in values.items():
        if value is None:
            continue
        target = folder / derivative_name(name, entities, fod_model, response_method)[1]
        shutil.copyfile(value, target)
        side = sidecar_path(value)
        if side.is_file():
            shutil.copyfile(side, sidecar_path(target))
    return Directory(folder)


@lru_cache(maxsize=1)
def figures_version() -> str:
    """Hash of the drawing code: the figures task reruns when it changes (and only it)."""
    return hashlib.sha256((Path(__file__).resolve().parent / "figures.py").read_bytes()).hexdigest()[:12]


@python.define(outputs=["figures"])
def Figures(staged: Directory, entities: dict, fod_model: str = "csd", response_method: str = "",
            code_version: str = ""):
    """QC figures of a run's staged derivatives, with a manifest; never fails (a failure becomes a note)."""
    import traceback

    from dwiflow.tasks.figures import figures_stage, write_manifest

    folder = Path.cwd() / "figures"
    folder.mkdir(exist_ok=True)
    files = {}
    for name in DERIVATIVE_KEYS:
        key, filename = derivative_name(name, entities, fod_model, response_method)
        files[key] = filename
    try:
        figures_stage(staged, folder, files, entities, fod_model, response_method)
    except Exception as exc:  # the report must never fail the run
        note = traceback.format_exception_only(type(exc), exc)[-1].strip()
        write_manifest(folder, entities, [{"section": "tensor", "title": "Figures", "file": "", "caption": "",
                                           "note": f"no figures could be drawn: {note}"}], [])
    return Directory(folder)
