"""``dwirecon``: file-level diffusion reconstruction commands, one subcommand per stage.

Every subcommand runs the same stage function (``dwiflow.tasks.stages``) as the
corresponding Pydra task. Bad input ends with a one-line error on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

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

    p = sub.add_parser("phantom", help="write a small BIDS phantom dataset with ground truth",
                       description="Multi-tensor phantom (1-3 fibres per voxel, Rician noise) as a BIDS dataset.")
    p.add_argument("out_dir")
    p.add_argument("--scheme", choices=("single", "multi"), default="single")
    p.add_argument("--shape", type=_positive_int_triplet, default=(10, 10, 10), metavar="X,Y,Z")
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
