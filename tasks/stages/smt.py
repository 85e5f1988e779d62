"""Stage ``smt``: the spherical mean technique (Kaden 2016) and a Watson or Bingham FOD on its kernel."""

from __future__ import annotations

from dataclasses import dataclass

from dwiflow.core.defaults import SMT_LAMBDA_PAR_BOUNDS
from dwiflow.core.errors import DwiflowInputError
from dwiflow.tasks.io import load_dwi
from dwiflow.tasks.options import Alias, OptionError, StageOptions, option
from dwiflow.tasks.registry import Input, Output, Stage
from dwiflow.tasks.stagelib import DWI_INPUTS, provenance, sh_basis_option, stage_warnings, voxels_to_fit, write_maps

KERNEL_MAPS = ("lpar", "lperp", "f", "fw", "mse", "r2", "status")
FOD_MAPS = ("odi", "kappa", "mu", "fod", "fodmse")  # Watson and Bingham
BINGHAM_MAPS = ("beta", "nu")
MULTI_MAPS = ("fodfrac",)  # with n_fod > 1


@dataclass(frozen=True)
class SmtOptions(StageOptions):
    """SMT kernel and FOD parameters."""

    fod: str = option("watson", choices=("none", "watson", "bingham"),
                      help="parametric FOD on the fitted kernel: Watson (mu, kappa/ODI) or Bingham (also beta, nu)")
    n_fod: int = option(1, minimum=1, maximum=3,
                        help="Watson FOD compartments (crossings; each with its mu, kappa/ODI and volume fraction)")
    free_water: bool = option(False, help="add a free-water compartment (3e-3 mm²/s)",
                              aliases=(Alias("isotropic_compartment", const=True, spec=False),))
    lambda_par_bounds: list[float] = option(list(SMT_LAMBDA_PAR_BOUNDS), length=2, exclusive_minimum=True, minimum=0,
                                            maximum=5e-3, metavar="LOW,HIGH", units="mm²/s",
                                            help="bounds of lambda_par")
    sh_lmax: int = option(8, help="SH degree of the FOD output", minimum=2, maximum=16, even=True)
    sh_basis: str = sh_basis_option()

    def check(self) -> None:
        low, high = self.lambda_par_bounds
        if not low < high:
            raise OptionError(f"{{lambda_par_bounds}}: the lower bound must be below the upper one, got "
                              f"{low:g},{high:g}", "lambda_par_bounds")
        if self.n_fod > 1 and self.fod != "watson":
            raise OptionError("several FOD compartments ({n_fod} > 1) are fitted as Watsons: {fod} must be watson",
                              "n_fod", "fod")

    def writes(self):
        names = [n for n in KERNEL_MAPS if n != "fw" or self.free_water]
        if self.fod != "none":
            names += list(FOD_MAPS)
            if self.fod == "bingham":
                names += list(BINGHAM_MAPS)
            if self.n_fod > 1:
                names += list(MULTI_MAPS)
        return names


def run_smt(files, outputs, options: SmtOptions, context):
    """SMT kernel (Kaden 2016) and optionally a Watson or Bingham FOD on it; writes the requested maps."""
    from dwiflow.core.smt import STATUS_CODES, SmtModel

    dwi = files["dwi"]
    run = load_dwi(dwi, files["bval"], files["bvec"])
    notes = stage_warnings(STAGES[0], run, dwi, options, files.get("mask") is not None)
    model = SmtModel(run.gtab, lambda_par_bounds=tuple(options.lambda_par_bounds), free_water=options.free_water)
    voxels = voxels_to_fit(run, files.get("mask"), dwi)
    fit = model.fit(run.data, voxels, progress=context.progress)
    maps = {"lpar": lambda: fit.lambda_par, "lperp": lambda: fit.lambda_perp, "f": lambda: fit.fraction,
            "fw": lambda: fit.free_water, "mse": lambda: fit.mse, "r2": lambda: fit.r2, "status": lambda: fit.status}
    if options.fod != "none" and set(FOD_MAPS + BINGHAM_MAPS + MULTI_MAPS) & set(outputs):
        fod = fit.fit_fod(options.fod, options.n_fod)
        maps.update({"odi": lambda: fod.odi, "kappa": lambda: fod.kappa, "fodmse": lambda: fod.mse,
                     "mu": lambda: fod.mu, "fod": lambda: fod.sh(options.sh_lmax),
                     "fodfrac": lambda: fod.fractions, "beta": lambda: fod.beta_fraction, "nu": lambda: fod.nu})
    params = {"Kernel": "zeppelin, lambda_perp = f * lambda_par", "LambdaParBounds": list(options.lambda_par_bounds),
              "FreeWater": options.free_water, "Fod": options.fod,
              "FodCompartments": options.n_fod if options.fod != "none" else 0,
              "ShellBvalues": [float(b) for b in model.bvalues],
              "VoxelsFailed": int((fit.status_rows != 0).sum())}

    return write_maps(STAGES[0], outputs, lambda name: maps[name](), run.affine, params,
                      {**provenance(dwi, files["bval"], files["bvec"], files.get("mask")), **notes}, STATUS_CODES,
                      {"fod": {"SphericalHarmonicDegree": int(options.sh_lmax)}}, sh_basis=options.sh_basis)


def check_smt_data(data, options: SmtOptions) -> None:
    if data.n_b0 == 0:
        raise DwiflowInputError("SMT needs b=0 volumes (spherical means are normalised by the mean b=0); none found")
    if data.n_dw_shells < 2:
        raise DwiflowInputError(f"SMT needs at least two diffusion-weighted shells (the spherical mean's decay over b "
                                f"separates λ∥ from λ⊥); this run has {data.n_dw_shells}")


def smt_data_warnings(data, options: SmtOptions) -> list[str]:
    """Data that determine the SMT kernel exactly: as many kernel parameters (λ∥ and λ⊥/λ∥, plus the free-water
    fraction) as shell means leave no residual, so MSE 0 and R² 1 hold by construction and say nothing."""
    parameters = 2 + int(options.free_water)
    if data.n_b0 == 0 or not 2 <= data.n_dw_shells <= parameters:
        return []
    return [f"SMT fits {parameters} kernel parameters to {data.n_dw_shells} shell means: the fit is exact by "
            "construction (MSE 0, R² 1 say nothing about the model) and λ∥ may sit on its bound; more shells "
            "determine it"]


STAGES = (
    Stage(
        name="smt", order=70, title="Spherical mean technique (Kaden 2016)",
        methods=lambda o: ("The spherical mean technique was fitted to the shells' direction averages "
                           f"(parallel diffusivity within {o.lambda_par_bounds[0]:g}-{o.lambda_par_bounds[1]:g} mm²/s"
                           f"{', with a free-water compartment' if o.free_water else ''})"
                           + ("" if o.fod == "none" else
                              f", then {'a ' + o.fod if o.n_fod == 1 else str(o.n_fod) + ' ' + o.fod} orientation "
                              "distribution" + ("" if o.n_fod == 1 else "s") + " to the full signal with that kernel")),
        references=lambda o: ("kaden2016",) + {"watson": ("zhang2012",), "bingham": ("tariq2016",)}.get(o.fod, ()),
        summary="spherical mean technique (Kaden 2016) and a Watson or Bingham FOD on its kernel",
        description="Per-shell spherical means fitted by a zeppelin with lambda_perp = f*lambda_par (optionally plus "
                    "free water), then a Watson (or Bingham, or several Watsons) FOD on the fitted kernel from the "
                    "full signal.",
        options=SmtOptions, run=run_smt,
        inputs=DWI_INPUTS + (Input("mask", "MASK", "voxels to fit (default: every voxel with signal)", required=False,
                                   flag=True),),
        outputs=tuple(Output(name, text) for name, text in (
            ("lpar", "parallel diffusivity"), ("lperp", "perpendicular diffusivity"),
            ("f", "ratio lambda_perp/lambda_par"), ("fw", "free-water fraction"), ("mse", "kernel fit MSE"),
            ("r2", "kernel fit R²"), ("status", "per-voxel status"), ("odi", "orientation dispersion index"),
            ("kappa", "Watson concentration"), ("mu", "FOD axis"), ("fod", "the FOD as SH"),
            ("fodmse", "FOD fit MSE"), ("beta", "Bingham beta/kappa"), ("nu", "Bingham second axis"),
            ("fodfrac", "FOD compartment fractions"))),
        provides={"fod": "fod"}, fod_priority=10, progress="voxels", check_data=check_smt_data,
        data_warnings=smt_data_warnings,
    ),
)
