"""``dwirecon``: file-level diffusion reconstruction commands, one subcommand per stage.

Every subcommand runs the same stage function (``dwiflow.tasks.stages``) as the
corresponding Pydra task. Bad input ends with a one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from dwiflow._version import __version__
from dwiflow.core.errors import DwiflowInputError

EXIT_INPUT_ERROR = 2


def _positive_int_triplet(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three integers like 10,10,10, got {text!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers like 10,10,10, got {text!r}")
    return values  # type: ignore[return-value]


def _number_list(kind: type, count: int | None = None):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__}s, got {text!r}") from None
        if not values or (count is not None and len(values) not in (1, count)):
            raise argparse.ArgumentTypeError(f"expected {'1 or ' + str(count) if count else 'one or more'} values, got {text!r}")
        return values
    return parse


def _cmd_response(args: argparse.Namespace) -> int:
    from dwiflow.tasks import stages

    if args.method == "amp2response":
        path = stages.amp2response_stage(
            args.dwi, args.bval, args.bvec, args.mask, args.directions_image, args.out,
            shells=args.shells, lmax=args.lmax, isotropic=args.isotropic, constrained=not args.noconstraint,
            directions_file=args.directions,
        )
    elif args.method == "fa":
        path = stages.fa_response_stage(
            args.dwi, args.bval, args.bvec, args.out, mask=args.mask, voxels_out=args.voxels,
            number=args.number, erode=args.erode, shells=args.shells, lmax=args.lmax,
        )
    elif args.method in ("tournier", "tax"):
        if args.method == "tournier":
            options = {"sf_voxels": args.sf_voxels, "iter_voxels": args.iter_voxels, "dilate": args.dilate,
                       "max_iters": args.max_iters, "lmax": args.lmax, "shell": args.shell}
        else:
            options = {"lmax": args.lmax or 8, "peak_thr": args.peak_thr, "init_fa": args.init_fa,
                       "init_trace": args.init_trace, "max_iters": args.max_iters, "convergence": args.convergence}
        path = stages.iterative_response_stage(args.method, args.dwi, args.bval, args.bvec, args.out, mask=args.mask,
                                               voxels_out=args.voxels, options=options)
    else:
        radii = args.roi_radii[0] if len(args.roi_radii) == 1 else tuple(args.roi_radii)
        path = stages.ssst_response_stage(
            args.dwi, args.bval, args.bvec, args.out, roi_radii=radii,
            roi_center=tuple(args.roi_center) if args.roi_center else None, fa_threshold=args.fa_thr,
            mask=args.mask, voxels_out=args.voxels,
        )
    print(f"response written to {path}")
    print(Path(path).read_text().rstrip())
    return 0


def _cmd_csd(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import csd_stage

    _set_threads(args.nthreads)
    path = csd_stage(args.dwi, args.bval, args.bvec, args.response, args.out, mask=args.mask, lmax=args.lmax,
                     shell=args.shell, neg_lambda=args.neg_lambda, threshold=args.threshold, niter=args.niter,
                     status_out=args.status)
    print(f"FOD written to {path}")
    return 0


def _diffusivity_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a diffusivity in mm²/s (e.g. 3e-3) or 'none', got {text!r}") from None


def _wm_response(text: str):
    """Three eigenvalues (or three per shell) separated by commas, or a response file with eigenvalues."""
    if "," in text:
        return _number_list(float)(text)
    return text


def _model_outputs(prefix: str, names: tuple[str, ...], dwi: str, out_dir: str, skip: set[str]) -> dict[str, Path]:
    """Output paths of a model's maps in OUT_DIR, named by bids_specs from the DWI's entities."""
    from dwiflow.bids_specs.outputs import entities_from_filename, output_filename

    entities = entities_from_filename(dwi)
    return {n: Path(out_dir) / output_filename(f"{prefix}_{n}", entities) for n in names if n not in skip}


def _progress(command: str, unit: str = "voxels"):
    def report(done: int, total: int) -> None:
        print(f"{command}: {done}/{total} {unit}", file=sys.stderr, flush=True)

    return report


def _cmd_rumba(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import RUMBA_OUTPUTS, describe_outputs, rumba_stage

    skip = set()
    if args.gm_response is None:
        skip.add("fgm")
    if args.csf_response is None:
        skip.add("fcsf")
    if args.no_amplitudes:
        skip.add("fod_amplitudes")
    outputs = _model_outputs("rumba", RUMBA_OUTPUTS, args.dwi, args.out_dir, skip)
    progress = _progress("rumba", "iterations" if args.global_fit else "voxels")
    written = rumba_stage(
        args.dwi, args.bval, args.bvec, outputs, mask=args.mask, wm_response=args.wm_response,
        gm_response=args.gm_response, csf_response=args.csf_response, n_iter=args.n_iter, recon_type=args.recon_type,
        n_coils=args.n_coils, R=args.R, global_fit=args.global_fit, use_tv=args.tv, sphere=args.sphere,
        sh_lmax=args.sh_lmax, precision=args.precision, n_threads=args.nthreads, progress=progress,
    )
    print("RUMBA-SD maps written:\n" + describe_outputs(written))
    return 0


def _cmd_mapmri(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import MAPMRI_OUTPUTS, describe_outputs, mapmri_stage

    skip = {"ng", "ngpar", "ngperp"} if args.isotropic else set()
    if not args.signal:
        skip.add("signal")
    compare = [name for name in (args.compare or "").split(",") if name]
    if not compare:
        skip.add("compare")
    outputs = _model_outputs("mapmri", MAPMRI_OUTPUTS, args.dwi, args.out_dir, skip)
    progress = _progress("mapmri")
    written = mapmri_stage(
        args.dwi, args.bval, args.bvec, outputs, mask=args.mask, radial_order=args.radial_order,
        anisotropic=not args.isotropic, laplacian_weighting=args.laplacian_weight, positivity=args.positivity,
        pos_grid=args.pos_grid, pos_radius=args.pos_radius, solver=args.solver, big_delta=args.big_delta,
        small_delta=args.small_delta, bval_threshold=args.bval_threshold, odf_moment=args.odf_moment, compare=compare,
        progress=progress,
    )
    print("MAP-MRI maps written:\n" + describe_outputs(written))
    return 0


def _cmd_smt(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import (SMT_BINGHAM_OUTPUTS, SMT_FOD_OUTPUTS, SMT_MULTI_OUTPUTS, SMT_OUTPUTS,
                                      describe_outputs, smt_stage)

    skip = set() if args.isotropic_compartment else {"fw"}
    if args.fod != "bingham":
        skip |= set(SMT_BINGHAM_OUTPUTS)
    if args.fod == "none":
        skip |= set(SMT_FOD_OUTPUTS)
    if args.n_fod == 1 or args.fod == "none":
        skip |= set(SMT_MULTI_OUTPUTS)
    outputs = _model_outputs("smt", SMT_OUTPUTS, args.dwi, args.out_dir, skip)
    progress = _progress("smt")
    written = smt_stage(args.dwi, args.bval, args.bvec, outputs, mask=args.mask, fod=args.fod, n_fod=args.n_fod,
                        free_water=args.isotropic_compartment, lambda_par_bounds=tuple(args.lambda_par_bounds),
                        progress=progress)
    print("SMT maps written:\n" + describe_outputs(written))
    return 0


def _radius(text: str):
    if text == "adaptive":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'adaptive' or a radius in mm, got {text!r}") from None


def _cmd_peaks(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import peaks_stage

    path = peaks_stage(args.fod, args.out, mask=args.mask, npeaks=args.npeaks, rel_threshold=args.rel_threshold,
                       threshold=args.threshold, min_separation=args.min_separation,
                       subtract_psf=args.subtract_psf)
    print(f"peaks written to {path}")
    return 0


def _cmd_fod_metrics(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import describe_outputs, fod_metrics_stage

    written = fod_metrics_stage(args.fod, args.peaks, args.out_dir, source_entities={"model": args.model})
    print("FOD metrics written:\n" + describe_outputs(written))
    return 0


def _set_threads(n: int | None) -> None:
    if n:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _cmd_shells(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import shells_of

    for bvalue, count in shells_of(args.bval, args.b0_threshold):
        label = "b=0" if bvalue <= args.b0_threshold else f"b={bvalue:.0f}"
        print(f"{label:>8s}  {count:4d} volumes  (mean b {bvalue:g})")
    return 0


def _cmd_mask(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import mask_stage

    path = mask_stage(args.dwi, args.bval, args.bvec, args.out)
    print(f"mask written to {path}")
    return 0


def _cmd_tensor(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import TENSOR_OUTPUTS, describe_outputs, tensor_stage

    outputs = {name: getattr(args, name) for name in TENSOR_OUTPUTS if getattr(args, name, None)}
    written = tensor_stage(args.dwi, args.bval, args.bvec, outputs, mask=args.mask, fit_method=args.method)
    print("tensor maps written:\n" + describe_outputs(written))
    return 0


def _cmd_phantom(args: argparse.Namespace) -> int:
    from dwiflow.tasks.stages import describe_outputs, phantom_stage

    snr = None if args.snr <= 0 else args.snr
    files = phantom_stage(args.out_dir, scheme=args.scheme, shape=args.shape, snr=snr, seed=args.seed)
    print(f"phantom dataset written to {args.out_dir}:\n" + describe_outputs(files))
    return 0


def _response_method(methods, name: str, help_text: str, description: str, mask_help: str) -> argparse.ArgumentParser:
    """A ``dwirecon response`` method taking DWI BVAL BVEC OUT_TXT [--mask] [--voxels]."""
    m = methods.add_parser(name, help=help_text, description=description)
    for arg in ("dwi", "bval", "bvec"):
        m.add_argument(arg)
    m.add_argument("out", metavar="OUT_TXT")
    m.add_argument("--mask", help=mask_help)
    m.add_argument("--voxels", metavar="OUT_MASK", help="write the selected voxels")
    return m


def _model_parser(sub, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A model command taking DWI BVAL BVEC OUT_DIR [--mask] and writing every map into OUT_DIR."""
    p = sub.add_parser(name, help=help_text, description=description)
    for arg in ("dwi", "bval", "bvec", "out_dir"):
        p.add_argument(arg)
    p.add_argument("--mask", help="voxels to fit (default: every voxel with signal)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dwirecon",
        description="File-level diffusion MRI reconstruction stages (NIfTI + FSL/BIDS bval/bvec in, "
        "NIfTI + JSON sidecar out). Gradient directions are converted to world coordinates on reading.",
    )
    parser.add_argument("--version", action="version", version=f"dwiflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("shells", help="list the shells of a .bval file", description="Print each shell's b-value and volume count.")
    p.add_argument("bval")
    p.add_argument("--b0-threshold", type=float, default=50.0, help="largest b counted as b=0 (default 50)")
    p.set_defaults(func=_cmd_shells)

    p = sub.add_parser("mask", help="brain mask from the b=0 volumes", description="Median-Otsu brain mask of the mean b=0 image.")
    for name in ("dwi", "bval", "bvec", "out"):
        p.add_argument(name)
    p.set_defaults(func=_cmd_mask)

    p = sub.add_parser("tensor", help="diffusion tensor fit and its maps",
                       description="Weighted least-squares tensor fit (Chung et al. 2006). Give one option per map to write.")
    for name in ("dwi", "bval", "bvec"):
        p.add_argument(name)
    p.add_argument("--mask", help="brain mask (default: every voxel with signal)")
    p.add_argument("--method", choices=("WLS", "OLS"), default="WLS")
    for name, text in (("fa", "fractional anisotropy"), ("md", "mean diffusivity"), ("ad", "axial diffusivity"),
                       ("rd", "radial diffusivity"), ("v1", "principal eigenvector (world frame)"),
                       ("s0", "fitted S0"), ("evals", "eigenvalues (3 volumes)"), ("status", "per-voxel fit status")):
        p.add_argument(f"--{name}", metavar="FILE", help=f"write the {text} map")
    p.set_defaults(func=_cmd_tensor)

    p = sub.add_parser("response", help="response-function estimation (amp2response, fa, ssst)",
                       description="Estimate a response function; writes MRtrix3's text format plus a JSON sidecar.")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")
    m = methods.add_parser("amp2response", help="MRtrix3 amp2response from a single-fibre mask and directions",
                           description="Constrained least squares over all selected voxels at once (Smith, Dhollander & "
                           "Connelly): one problem per shell, amplitude non-negative and increasing from the fibre axis to "
                           "the orthogonal plane.")
    for name in ("dwi", "bval", "bvec", "mask"):
        m.add_argument(name)
    m.add_argument("directions_image", metavar="DIRECTIONS", help="4D image of per-voxel fibre directions (world frame)")
    m.add_argument("out", metavar="OUT_TXT")
    m.add_argument("--shells", type=_number_list(float), help="b-values of the shells to use, e.g. 0,1000 (default: all)")
    m.add_argument("--lmax", type=_number_list(int), help="lmax per shell, e.g. 0,8,8 (default 10, 0 for b=0)")
    m.add_argument("--isotropic", action="store_true", help="lmax 0 for every shell")
    m.add_argument("--noconstraint", action="store_true", help="no non-negativity/monotonicity constraints")
    m.add_argument("--directions", metavar="FILE", help="DWI volumes are amplitudes along these directions "
                   "(N rows of x y z, or azimuth elevation in radians); BVAL/BVEC are then not used")
    m = _response_method(methods, "fa", "MRtrix3 dwi2response fa: top-FA voxels of the eroded mask",
                         "The NUMBER highest-FA voxels of the eroded brain mask, principal eigenvectors as directions, "
                         "then amp2response on the largest shell (or --shells).",
                         "brain mask (default: median-Otsu on the b=0 volumes)")
    m.add_argument("--number", type=int, default=300, help="voxels to select (default 300)")
    m.add_argument("--erode", type=int, default=3, help="erosions of the brain mask (default 3)")
    m.add_argument("--shells", type=_number_list(float), help="shells to estimate (default: the largest b)")
    m.add_argument("--lmax", type=_number_list(int), help="lmax per shell")
    m = _response_method(methods, "ssst", "DIPY auto_response_ssst: FA threshold in a central ROI",
                         "Tensor eigenvalues and S0 averaged over voxels with FA above a threshold in a cuboid ROI "
                         "(DIPY's mask_for_response_ssst + response_from_mask_ssst).", "only voxels of this mask")
    m.add_argument("--roi-radii", type=_number_list(int, 3), default=[10], metavar="R[,R,R]")
    m.add_argument("--roi-center", type=_number_list(int, 3), metavar="X,Y,Z", help="default: the volume's centre")
    m.add_argument("--fa-thr", type=float, default=0.7, help="FA threshold (default 0.7)")
    m = _response_method(methods, "tournier", "MRtrix3 dwi2response tournier (iterative, CSD-based)",
                         "Tournier et al. 2013: iterate CSD and the selection of the voxels with the largest "
                         "sqrt(p1)*(1-p2/p1)^2, ending in amp2response on the largest shell.",
                         "brain mask (default: median-Otsu on the b=0 volumes)")
    m.add_argument("--sf-voxels", type=int, default=300)
    m.add_argument("--iter-voxels", type=int, default=3000)
    m.add_argument("--dilate", type=int, default=1)
    m.add_argument("--max-iters", type=int, default=10)
    m.add_argument("--lmax", type=int)
    m.add_argument("--shell", type=float, help="shell to use (default: the largest)")
    m = _response_method(methods, "tax", "recursive calibration (Tax 2014; DIPY recursive_response)",
                         "Iterate DIPY-style CSD from a fat tensor response, keeping voxels whose second peak is below "
                         "--peak-thr of the first, ending in amp2response (b=0 and the shell).",
                         "voxels to consider, typically white matter (default: all)")
    m.add_argument("--lmax", type=int, default=8)
    m.add_argument("--peak-thr", type=float, default=0.01)
    m.add_argument("--init-fa", type=float, default=0.08)
    m.add_argument("--init-trace", type=float, default=0.0021)
    m.add_argument("--max-iters", type=int, default=8)
    m.add_argument("--convergence", type=float, default=0.001)
    p.set_defaults(func=_cmd_response)

    p = sub.add_parser("csd", help="constrained spherical deconvolution (Tournier 2007)",
                       description="Single-shell CSD with MRtrix3's dwi2fod csd formulation; FOD as SH (MRtrix3 basis, "
                       "world frame).")
    for name in ("dwi", "bval", "bvec", "response"):
        p.add_argument(name)
    p.add_argument("out", metavar="OUT_FOD")
    p.add_argument("--mask", help="voxels to fit (default: every voxel with signal, as MRtrix3)")
    p.add_argument("--lmax", type=int, help="FOD lmax (default 8, or the response's if lower)")
    p.add_argument("--shell", type=float, help="b-value of the shell to deconvolve (default: the largest)")
    p.add_argument("--neg-lambda", type=float, default=1.0, help="non-negativity regularisation (default 1)")
    p.add_argument("--threshold", type=float, default=0.0, help="amplitude threshold of the constraint (default 0)")
    p.add_argument("--niter", type=int, default=50, help="maximum iterations (default 50)")
    p.add_argument("--status", metavar="FILE", help="write the per-voxel status map")
    p.add_argument("--nthreads", type=int, help="threads for the per-voxel solver (default: all cores)")
    p.set_defaults(func=_cmd_csd)

    p = _model_parser(sub, "rumba", "RUMBA-SD deconvolution (Canales-Rodriguez 2015), voxelwise or global + TV",
                       "Robust and unbiased model-based spherical deconvolution: fODF on a dense sphere plus "
                       "GM/CSF isotropic fractions under Rician (smf) or noncentral-chi (sos) noise. Writes every map "
                       "(fODF as SH and amplitudes, combined ODF, fractions, SNR, status) into OUT_DIR, named from the "
                       "DWI's BIDS entities.")
    p.add_argument("--wm-response", type=_wm_response, metavar="L1,L2,L3|FILE",
                   help="white-matter tensor eigenvalues in mm²/s (default 1.7e-3,0.2e-3,0.2e-3; three per shell for "
                   "multi-shell), or a response file from `dwirecon response ssst`")
    p.add_argument("--gm-response", type=_diffusivity_or_none, default=0.8e-3, metavar="D|none",
                   help="grey-matter mean diffusivity (default 0.8e-3), 'none' to leave GM out")
    p.add_argument("--csf-response", type=_diffusivity_or_none, default=3.0e-3, metavar="D|none",
                   help="CSF mean diffusivity (default 3.0e-3), 'none' to leave CSF out")
    p.add_argument("--n-iter", type=int, default=600, help="iterations (default 600)")
    p.add_argument("--recon-type", choices=("smf", "sos"), default="smf",
                   help="smf: Rician noise (default); sos: noncentral chi, needs --n-coils")
    p.add_argument("--n-coils", type=int, help="receiver coils (sos)")
    p.add_argument("--R", type=int, default=1, help="acceleration factor (GRAPPA/SENSE/ASSET), default 1")
    p.add_argument("--global", dest="global_fit", action="store_true",
                   help="global fit of the whole volume (needs a 3D volume)")
    p.add_argument("--tv", action="store_true", help="total-variation regularisation (with --global)")
    p.add_argument("--sphere", default="repulsion724", help="fODF sphere (default repulsion724)")
    p.add_argument("--sh-lmax", type=int, default=8, help="SH degree of the fODF output (default 8)")
    p.add_argument("--precision", choices=("float32", "float64"), default="float32")
    p.add_argument("--no-amplitudes", action="store_true", help="do not write the fODF amplitudes on the sphere")
    p.add_argument("--nthreads", type=int, help="threads (default: all cores)")
    p.set_defaults(func=_cmd_rumba)

    p = _model_parser(sub, "mapmri", "MAP-MRI (Ozarslan 2013) with Laplacian regularisation and positivity",
                       "Mean apparent propagator MRI: q-space indices (RTOP, RTAP, RTPP, MSD, QIV, "
                       "non-Gaussianities), the Laplacian norm, the ODF as SH and the per-voxel status, one NIfTI + "
                       "sidecar each in OUT_DIR. Delta/delta come from the DWI's JSON sidecar (LargeDelta/SmallDelta, "
                       "seconds) unless given.")
    p.add_argument("--radial-order", type=int, default=6, help="even radial order (default 6; 8 for isotropic ODFs)")
    p.add_argument("--isotropic", action="store_true", help="isotropic basis (no tensor frame; better crossing ODFs)")
    p.add_argument("--laplacian-weight", default="0.2", metavar="W|gcv",
                   help="Laplacian regularisation weight, 0 for none, or 'gcv' (default 0.2)")
    p.add_argument("--positivity", choices=("none", "grid", "global"), default="none",
                   help="non-negative propagator at grid points or globally (sum of squares)")
    p.add_argument("--pos-grid", type=int, default=15, help="grid points per side for --positivity grid (default 15)")
    p.add_argument("--pos-radius", type=_radius, default="adaptive", help="grid radius in mm or 'adaptive'")
    p.add_argument("--solver", default="clarabel", help="CVXPY solver for positivity (clarabel, scs, osqp, mosek ...)")
    p.add_argument("--big-delta", type=float, metavar="S", help="gradient separation Delta in seconds")
    p.add_argument("--small-delta", type=float, metavar="S", help="gradient duration delta in seconds")
    p.add_argument("--bval-threshold", type=float, help="only b below this for the tensor (scales; e.g. 2000 for NG)")
    p.add_argument("--odf-moment", type=int, default=2, help="radial moment s of the ODF (default 2)")
    p.add_argument("--signal", action="store_true", help="also write the fitted signal")
    p.add_argument("--compare", metavar="V1,V2", help="also fit these variants (MAP, MAPL, CMAP, CMAPL, MAP+) and write "
                   "their indices beside this fit's (param-compare)")
    p.set_defaults(func=_cmd_mapmri)

    p = _model_parser(sub, "smt", "spherical mean technique (Kaden 2016) and a Watson or Bingham FOD on its kernel",
                       "Per-shell spherical means fitted by a zeppelin with lambda_perp = f*lambda_par "
                       "(optionally plus free water), then a Watson FOD on the fitted kernel from the full signal.")
    p.add_argument("--fod", choices=("none", "watson", "bingham"), default="watson",
                   help="parametric FOD on the fitted kernel: Watson (mu, kappa/ODI) or Bingham (also beta, nu)")
    p.add_argument("--n-fod", type=int, default=1, choices=(1, 2, 3),
                   help="Watson FOD compartments (crossings; each with its mu, kappa/ODI and volume fraction)")
    p.add_argument("--isotropic-compartment", action="store_true", help="add a free-water compartment")
    p.add_argument("--lambda-par-bounds", type=_number_list(float, 2), default=[0.1e-3, 3.0e-3], metavar="LOW,HIGH",
                   help="bounds of lambda_par in mm²/s (default 0.1e-3,3e-3)")
    p.set_defaults(func=_cmd_smt)

    p = sub.add_parser("peaks", help="FOD peaks, MRtrix3 sh2peaks layout",
                       description="Local maxima of the FOD on a dense sphere, refined to sub-degree accuracy "
                       "(as MRtrix3's sh2peaks); with --subtract-psf, peaks after the first are the maxima left "
                       "after subtracting the deconvolution's fitted image of each fibre found.")
    p.add_argument("fod")
    p.add_argument("out", metavar="OUT_PEAKS")
    p.add_argument("--mask")
    p.add_argument("--npeaks", type=int, default=3)
    p.add_argument("--rel-threshold", type=float, default=0.2,
                   help="minimum amplitude relative to the largest peak (default 0.2; 0.1 keeps the equatorial "
                   "ringing of lmax-8 CSD as spurious peaks)")
    p.add_argument("--threshold", type=float, default=0.0, help="minimum absolute amplitude (default 0)")
    p.add_argument("--min-separation", type=float, default=25.0, help="minimum angle between peaks in degrees")
    p.add_argument("--subtract-psf", action="store_true",
                   help="find peaks after the first by subtracting the FOD's point-spread function (from its "
                   "sidecar; dwirecon csd writes it): resolves fibres 30-50 deg apart whose lobes merge")
    p.set_defaults(func=_cmd_peaks)

    p = sub.add_parser("fod-metrics", help="total AFD, peak amplitudes, NuFO and GFA",
                       description="Scalar maps from an FOD and its peaks, one NIfTI + sidecar each.")
    p.add_argument("fod")
    p.add_argument("peaks")
    p.add_argument("out_dir")
    p.add_argument("--model", default="csd", help="model label in the output names (default csd)")
    p.set_defaults(func=_cmd_fod_metrics)

    p = sub.add_parser("phantom", help="write a small BIDS phantom dataset with ground truth",
                       description="Multi-tensor phantom (1-3 fibres per voxel, Rician noise) as a BIDS dataset.")
    p.add_argument("out_dir")
    p.add_argument("--scheme", choices=("single", "multi"), default="single")
    p.add_argument("--shape", type=_positive_int_triplet, default=(10, 10, 10), metavar="X,Y,Z",
                   help="size of the tissue block; the image adds 3,3,2 voxels of background on each side")
    p.add_argument("--snr", type=float, default=30.0, help="S0/sigma; 0 for noiseless (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = args.func(args)
        except DwiflowInputError as exc:
            print(f"dwirecon {args.command}: error: {exc}", file=sys.stderr)
            code = EXIT_INPUT_ERROR
        except (OSError, MemoryError) as exc:
            print(f"dwirecon {args.command}: error: {exc}", file=sys.stderr)
            code = 1
    for w in caught:
        if issubclass(w.category, UserWarning):
            print(f"dwirecon {args.command}: warning: {w.message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
