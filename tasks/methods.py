"""The methods paragraph of a run (as fMRIPrep's and QSIRecon's boilerplate): what was done, with which parameters,
citing each method, generated from the recon spec's stages (their ``methods`` sentences and ``references`` in the
registry) and the run's acquisition. Users paste it into a paper's methods section and edit it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dwiflow._version import __version__

# Every work a stage cites, by key (stages name keys in their ``references``).
REFERENCES: dict[str, str] = {
    "bids": "Gorgolewski KJ, et al. The brain imaging data structure, a format for organizing and describing outputs "
            "of neuroimaging experiments. Sci Data. 2016;3:160044.",
    "pydra": "Jarecka D, Goncalves M, Markiewicz CJ, Esteban O, Lo N, Kaczmarzyk J, Ghosh S. Pydra - a flexible and "
             "lightweight dataflow engine for scientific analyses. Proc. 19th Python in Science Conf. 2020:132-139.",
    "mrtrix3": "Tournier JD, et al. MRtrix3: a fast, flexible and open software framework for medical image "
               "processing and visualisation. NeuroImage. 2019;202:116137.",
    "dipy": "Garyfallidis E, et al. Dipy, a library for the analysis of diffusion MRI data. Front Neuroinform. "
            "2014;8:8.",
    "otsu": "Otsu N. A threshold selection method from gray-level histograms. IEEE Trans Syst Man Cybern. "
            "1979;9(1):62-66.",
    "basser1994": "Basser PJ, Mattiello J, LeBihan D. MR diffusion tensor spectroscopy and imaging. Biophys J. "
                  "1994;66(1):259-267.",
    "veraart2013": "Veraart J, Sijbers J, Sunaert S, Leemans A, Jeurissen B. Weighted linear least squares estimation "
                   "of diffusion MRI parameters: strengths, limitations, and pitfalls. NeuroImage. 2013;81:335-346.",
    "daducci2015": "Daducci A, Canales-Rodriguez EJ, Zhang H, Dyrby TB, Alexander DC, Thiran JP. Accelerated "
                   "microstructure imaging via convex optimization (AMICO) from diffusion MRI data. NeuroImage. "
                   "2015;105:32-44.",
    "dhollander2016ss3t": "Dhollander T, Connelly A. A novel iterative approach to reap the benefits of multi-tissue "
                          "CSD from just single-shell (+b=0) diffusion MRI data. Proc Intl Soc Mag Reson Med. "
                          "2016;24:3010.",
    "delahaije2020": "Dela Haije T, Özarslan E, Feragen A. Enforcing necessary non-negativity constraints for "
                     "common diffusion MRI models using sum of squares programming. NeuroImage. 2020;209:116405.",
    "jensen2005": "Jensen JH, Helpern JA, Ramani A, Lu H, Kaczynski K. Diffusional kurtosis imaging: the "
                  "quantification of non-Gaussian water diffusion by means of magnetic resonance imaging. Magn Reson "
                  "Med. 2005;53(6):1432-1440.",
    "jensen2010": "Jensen JH, Helpern JA. MRI quantification of non-Gaussian water diffusion by kurtosis analysis. "
                  "NMR Biomed. 2010;23(7):698-710.",
    "tabesh2011": "Tabesh A, Jensen JH, Ardekani BA, Helpern JA. Estimation of tensors and tensor-derived measures in "
                  "diffusional kurtosis imaging. Magn Reson Med. 2011;65(3):823-836.",
    "hansen2013": "Hansen B, Lund TE, Sangill R, Jespersen SN. Experimentally and computationally fast method for "
                  "estimation of a mean kurtosis. Magn Reson Med. 2013;69(6):1754-1760.",
    "glenn2015": "Glenn GR, Helpern JA, Tabesh A, Jensen JH. Quantitative assessment of diffusional kurtosis "
                 "anisotropy. NMR Biomed. 2015;28(4):448-459.",
    "chung2006": "Chung S, Lu Y, Henry RG. Comparison of bootstrap approaches for estimation of uncertainties of DTI "
                 "parameters. NeuroImage. 2006;33(2):531-541.",
    "tournier2004": "Tournier JD, Calamante F, Gadian DG, Connelly A. Direct estimation of the fiber orientation "
                    "density function from diffusion-weighted MRI data using spherical deconvolution. NeuroImage. "
                    "2004;23(3):1176-1185.",
    "tournier2007": "Tournier JD, Calamante F, Connelly A. Robust determination of the fibre orientation "
                    "distribution in diffusion MRI: non-negativity constrained super-resolved spherical "
                    "deconvolution. NeuroImage. 2007;35(4):1459-1472.",
    "tournier2013": "Tournier JD, Calamante F, Connelly A. Determination of the appropriate b value and number of "
                    "gradient directions for high-angular-resolution diffusion-weighted imaging. NMR Biomed. "
                    "2013;26(12):1775-1786.",
    "tax2014": "Tax CMW, Jeurissen B, Vos SB, Viergever MA, Leemans A. Recursive calibration of the fiber response "
               "function for spherical deconvolution of diffusion MRI data. NeuroImage. 2014;86:67-80.",
    "dhollander2016": "Dhollander T, Raffelt D, Connelly A. Unsupervised 3-tissue response function estimation from "
                      "single-shell or multi-shell diffusion MR data without a co-registered T1 image. ISMRM "
                      "Workshop on Breaking the Barriers of Diffusion MRI. 2016:5.",
    "dhollander2019": "Dhollander T, Mito R, Raffelt D, Connelly A. Improved white matter response function "
                      "estimation for 3-tissue constrained spherical deconvolution. Proc. ISMRM 27. 2019:555.",
    "jeurissen2014": "Jeurissen B, Tournier JD, Dhollander T, Connelly A, Sijbers J. Multi-tissue constrained "
                     "spherical deconvolution for improved analysis of multi-shell diffusion MRI data. NeuroImage. "
                     "2014;103:411-426.",
    "raffelt2017": "Raffelt D, Dhollander T, Tournier JD, Tabbara R, Smith RE, Pierre E, Connelly A. Bias field "
                   "correction and intensity normalisation for quantitative analysis of apparent fibre density. "
                   "Proc. ISMRM 25. 2017:3541.",
    "dhollander2021": "Dhollander T, Tabbara R, Rosnarho-Tornstrand J, Tournier JD, Raffelt D, Connelly A. "
                      "Multi-tissue log-domain intensity and inhomogeneity normalisation for quantitative apparent "
                      "fibre density. Proc. ISMRM 29. 2021:2472.",
    "canales2015": "Canales-Rodriguez EJ, et al. Spherical deconvolution of multichannel diffusion MRI data with "
                   "non-Gaussian noise models and spatial regularization. PLoS ONE. 2015;10(10):e0138910.",
    "ozarslan2013": "Ozarslan E, et al. Mean apparent propagator (MAP) MRI: a novel diffusion imaging method for "
                    "mapping tissue microstructure. NeuroImage. 2013;78:16-32.",
    "fick2016": "Fick RHJ, Wassermann D, Caruyer E, Deriche R. MAPL: tissue microstructure estimation using "
                "Laplacian-regularized MAP-MRI and its application to HCP data. NeuroImage. 2016;134:365-385.",
    "kaden2016": "Kaden E, Kruggel F, Alexander DC. Quantitative mapping of the per-axon diffusion coefficients in "
                 "brain white matter. Magn Reson Med. 2016;75(4):1752-1763.",
    "zhang2012": "Zhang H, Schneider T, Wheeler-Kingshott CA, Alexander DC. NODDI: practical in vivo neurite "
                 "orientation dispersion and density imaging of the human brain. NeuroImage. 2012;61(4):1000-1016.",
    "tariq2016": "Tariq M, Schneider T, Alexander DC, Wheeler-Kingshott CAG, Zhang H. Bingham-NODDI: mapping "
                 "anisotropic orientation dispersion of neurites using diffusion MRI. NeuroImage. 2016;133:207-223.",
    "raffelt2012": "Raffelt D, Tournier JD, Rose S, Ridgway GR, Henderson R, Crozier S, Salvado O, Connelly A. "
                   "Apparent fibre density: a novel measure for the analysis of diffusion-weighted magnetic "
                   "resonance images. NeuroImage. 2012;59(4):3976-3994.",
    "smith2013": "Smith RE, Tournier JD, Calamante F, Connelly A. SIFT: Spherical-deconvolution informed filtering of "
                 "tractograms. NeuroImage. 2013;67:298-312.",
    "dellacqua2013": "Dell'Acqua F, Simmons A, Williams SCR, Catani M. Can spherical deconvolution provide more "
                     "information than fiber orientations? Hindrance modulated orientational anisotropy, a true-tract "
                     "specific index to characterize white matter diffusion. Hum Brain Mapp. 2013;34(10):2464-2483.",
    "tuch2004": "Tuch DS. Q-ball imaging. Magn Reson Med. 2004;52(6):1358-1372.",
}


def number(value: Any, digits: int = 3) -> str:
    """A parameter as a sentence shows it: 3 significant digits, no trailing zeros."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, (int, float)):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(v, digits) for v in value)
    return str(value)


def acquisition_sentence(bval: Path, dwi_shape: tuple[int, ...], zooms: tuple[float, ...]) -> str:
    """The acquisition as the run's files give it: volumes per shell and voxel size."""
    from dwiflow.core.gradients import cluster_shells
    from dwiflow.tasks.io import read_bvals

    shells = cluster_shells(read_bvals(bval))
    parts = [f"{s.count} at b=0" if s.is_b0 else f"{s.count} at b={s.bvalue:.0f} s/mm²" for s in shells]
    size = "×".join(f"{z:.3g}" for z in zooms[:3])
    return (f"The run comprised {dwi_shape[3] if len(dwi_shape) > 3 else 1} volumes ({', '.join(parts)}) with "
            f"{size} mm voxels.")


def _group_response_sentence(files: dict[str, Path]) -> str:
    """What the methods say of group responses: how many runs they average, at which b-values."""
    from dwiflow.tasks.io import read_sidecar

    side = read_sidecar(files.get("wm") or next(iter(files.values()))) or {}
    runs, shells = side.get("Runs"), side.get("Shells")
    what = (f"the group averages of {runs} run{'s' if runs != 1 else ''}" if isinstance(runs, int)
            else "group averages")
    at = f" at b = {', '.join(f'{b:g}' for b in shells)} s/mm²" if isinstance(shells, list) and shells else ""
    return (f"The response functions were {what}{at}, each run's response first scaled to the group's l=0 terms, as "
            "MRtrix3's responsemean computes them.")


def methods_markdown(spec, run_label: str, acquisition: str, given_mask: bool = False,
                     group_responses: dict[str, Path] | None = None) -> str:
    """The methods paragraph of one run of ``spec`` (a :class:`~dwiflow.tasks.recon_spec.ReconSpec`), with its
    numbered references, as Markdown. ``group_responses``: the group responses the run was deconvolved with (by
    tissue; their sidecars say how many runs each averages)."""
    cited: list[str] = []

    def cite(keys) -> str:
        marks = []
        for key in keys:
            if key not in cited:
                cited.append(key)
            marks.append(str(cited.index(key) + 1))
        return f" [{', '.join(sorted(marks, key=int))}]" if marks else ""

    sentences = [f"Diffusion MRI run {run_label} was processed with dwiflow {__version__}{cite(['pydra', 'bids'])}, "
                 f"recon spec {spec.name}. {acquisition}"]
    for name, configured in spec.stages.items():
        stage, options = configured.stage, configured.options
        if name == "mask" and given_mask:
            sentences.append("The brain mask was the one provided with the data.")
            continue
        if name == "response" and group_responses:
            sentences.append(_group_response_sentence(group_responses))
            continue
        if stage.methods is None:
            continue
        references = stage.references(options) if callable(stage.references) else stage.references
        sentences.append(stage.methods(options).rstrip(".") + cite(references) + ".")
    sentences.append("Where a voxel's fit failed or gave a non-physical value, its maps hold NaN and its status map "
                     "says why.")
    lines = [f"# Methods: {run_label}", "", "This paragraph was written by dwiflow from the parameters of this run; "
             "edit it freely.", "", " ".join(sentences), "", "## References", ""]
    lines += [f"{i}. {REFERENCES[key]}" for i, key in enumerate(cited, 1)]
    return "\n".join(lines) + "\n"


def write_methods(path: Path, text: str) -> Path:
    """Write the paragraph atomically (a rerun replaces it whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    tmp.replace(path)
    return path

