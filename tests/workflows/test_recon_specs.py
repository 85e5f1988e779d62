"""Recon specs are validated against the stage registry before anything runs or is written."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dwiflow.cli.bidsapp import main
from dwiflow.cli.dwirecon import main as dwirecon
from dwiflow.tasks.recon_spec import load_recon_spec, validate_recon_spec

BASE = {"mask": {}, "tensor": {}, "response": {"method": "fa"}, "csd": {}, "peaks": {}, "fod_metrics": {}}


@pytest.fixture(scope="module")
def bids(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("specs")
    assert dwirecon(["phantom", str(root / "bids"), "--shape", "4,4,2", "--seed", "1"]) == 0
    return root / "bids"


def _spec(stages: dict | None = None, **top) -> str:
    import yaml

    return yaml.safe_dump({"name": "bad", "stages": stages if stages is not None else BASE, **top}, sort_keys=False)


def _with(stage: str, options) -> str:
    return _spec({**BASE, stage: options})


def _tree(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


BAD_SPECS = [
    # top level
    (_spec(colour="red"), "colour: unknown key (allowed: name, description, stages, resources, response_dir)"),
    (_spec(name=3), "name: must be text, got 3"),
    (_spec(response_dir=["a", "b"]), "response_dir: must be a folder path (text), got ['a', 'b']"),
    ("name: x\nstages: [mask, tensor]\n", "stages: must be a mapping of stage names to options"),
    ("stages: {mask: {}\n  tensor: [}", "is not valid YAML (line"),
    # unknown stages and options at every level
    (_spec({**BASE, "dti": {}}), "stages.dti: unknown stage (known: mask, tensor, dki, response"),
    (_with("tensor", 3), "stages.tensor: must be a mapping of options, got 3"),
    (_with("peaks", {"colour": "red"}), "stages.peaks.colour: unknown option (allowed: min_separation, npeaks"),
    (_with("response", {"method": "fa", "number": 50}), "stages.response.number: unknown key (a response stage "
                                                        "takes method and options)"),
    (_with("response", {"method": "fa", "options": {"depth": 2}}), "stages.response.options.depth: unknown option"),
    (_with("fod_metrics", {"model": "x"}), "stages.fod_metrics.model: a command-line option only (--model), not one "
                                           "of a recon spec (allowed here: none)"),
    # types and ranges, every stage
    (_with("mask", {"median_radius": 0}), "stages.mask.median_radius: must be >= 1, got 0"),
    (_with("tensor", {"method": "lsq"}), "stages.tensor.method: must be one of wls, ols, dipy-wls, dipy-ols, got 'lsq'"),
    (_with("tensor", {"maps": ["fa", "colour"]}), "stages.tensor.maps: every value must be one of fa, md, ad"),
    (_with("response", {"method": "magic"}), "stages.response.method: must be one of fa, ssst, tournier, tax, "
                                             "dhollander, got 'magic'"),
    (_with("response", {"method": "amp2response"}), "stages.response.method: amp2response needs inputs only a user "
                                                    "can give"),
    (_with("response", {"method": "fa", "options": {"number": "many"}}),
     "stages.response.options.number: must be int, got 'many'"),
    (_with("response", {"method": "ssst", "options": {"fa_threshold": 1.5}}),
     "stages.response.options.fa_threshold: must be <= 1, got 1.5"),
    (_with("csd", {"lmax": 7}), "stages.csd.lmax: must be an even integer, got 7"),
    (_with("csd", {"lmax": 8.5}), "stages.csd.lmax: must be int or null, got 8.5"),
    (_with("csd", {"neg_lambda": -1}), "stages.csd.neg_lambda: must be >= 0, got -1.0"),
    (_spec({"mask": {}, "rumba": {"sphere": "moon"}}), "stages.rumba.sphere: must be one of"),
    (_spec({"mask": {}, "rumba": {"n_iter": 0}}), "stages.rumba.n_iter: must be >= 1, got 0"),
    (_spec({"mask": {}, "mapmri": {"radial_order": 5}}), "stages.mapmri.radial_order: must be an even integer, got 5"),
    (_spec({"mask": {}, "mapmri": {"compare": ["MAPX"]}}), "stages.mapmri.compare: every value must be one of MAP"),
    (_spec({"mask": {}, "smt": {"n_fod": 4}}), "stages.smt.n_fod: must be <= 3, got 4"),
    (_spec({"mask": {}, "noddi": {"d_par": 0}}), "stages.noddi.d_par: must be > 0, got 0"),
    (_spec({"mask": {}, "response": {"method": "dhollander"}, "ss3t_csd": {"niter": 1}}),
     "stages.ss3t_csd.niter: must be >= 2, got 1"),
    (_spec({"mask": {}, "dki": {"method": "cls"}}), "stages.dki.method: must be one of dipy-wls, dipy-ols, dipy-cwls, "
                                                    "dipy-cls, wls, ols, got 'cls'"),
    (_with("fixels", {"fmls_lobe_merge_ratio": 1.5}), "stages.fixels.fmls_lobe_merge_ratio: must be <= 1, got 1.5"),
    (_with("peaks", {"npeaks": 0}), "stages.peaks.npeaks: must be >= 1, got 0"),
    (_with("peaks", {"rel_threshold": float("nan")}), "stages.peaks.rel_threshold: must be a finite number"),
    (_with("peaks", {"subtract_psf": "yes"}), "stages.peaks.subtract_psf: must be bool, got 'yes'"),
    # rules between options
    (_spec({"mask": {}, "rumba": {"use_tv": True}}), "stages.rumba.use_tv needs the global fit (stages.rumba.global_fit)"),
    (_spec({"mask": {}, "rumba": {"recon_type": "sos"}}), "stages.rumba.recon_type sos (noncentral chi noise) needs "
                                                          "stages.rumba.n_coils"),
    (_spec({"mask": {}, "mapmri": {"big_delta": 0.03}}), "give both stages.mapmri.big_delta and "
                                                         "stages.mapmri.small_delta (seconds), or neither"),
    (_spec({"mask": {}, "mapmri": {"anisotropic_scaling": False, "positivity": "global"}}),
     "stages.mapmri.positivity global (sum of squares) needs stages.mapmri.anisotropic_scaling"),
    (_spec({"mask": {}, "smt": {"n_fod": 2, "fod": "bingham"}}), "several FOD compartments (stages.smt.n_fod > 1) are "
                                                                 "fitted as Watsons"),
    (_spec({"mask": {}, "smt": {"lambda_par_bounds": [3e-3, 1e-3]}}), "stages.smt.lambda_par_bounds: the lower bound "
                                                                      "must be below the upper one"),
    # forbidden combinations and missing prerequisites
    (_spec({**BASE, "rumba": {}}), "stages.rumba: give one deconvolution stage per recon spec, not both stages.rumba "
                                   "and stages.csd"),
    (_spec({"mask": {}, "csd": {}}), "stages.csd: needs a response from an earlier stage (add stages.response)"),
    (_spec({"mask": {}, "msmt_csd": {}, "peaks": {}}), "stages.msmt_csd: needs a response_wm from an earlier stage "
                                                       "(add stages.response)"),
    (_spec({"mask": {}, "response": {"method": "dhollander"}, "msmt_csd": {"shells": [0, 1000]}, "mtnormalise": {}}),
     "stages.msmt_csd.shells: a command-line option only (--shells), not one of a recon spec"),
    (_spec({"mask": {}, "response": {"method": "dhollander"}, "msmt_csd": {"lmax": [8, 1, 0]}, "mtnormalise": {}}),
     "stages.msmt_csd.lmax"),
    (_spec({"mask": {}, "response": {"method": "dhollander"}, "msmt_csd": {}, "mtnormalise": {"order": 5}}),
     "stages.mtnormalise.order"),
    (_spec({"mask": {}, "response": {"method": "dhollander"}, "msmt_csd": {}, "csd": {}}),
     "stages.msmt_csd"),
    (_spec({"mask": {}, "tensor": {}, "peaks": {}}), "stages.peaks: needs a fod from an earlier stage (add "
                                                     "stages.csd or stages.msmt_csd or stages.ss3t_csd or "
                                                     "stages.mtnormalise or stages.rumba or stages.mapmri or "
                                                     "stages.smt)"),
    (_spec({"mask": {}, "tensor": {}, "fixels": {}}), "stages.fixels: needs a fod from an earlier stage"),
    (_spec({"mask": {}, "smt": {"fod": "none"}, "peaks": {}}), "stages.peaks: needs a fod from an earlier stage (the "
                                                               "FOD stage in this spec writes no FOD with these "
                                                               "options)"),
    (_spec({k: v for k, v in BASE.items() if k != "peaks"}), "stages.fod_metrics: needs a peaks from an earlier "
                                                             "stage (add stages.peaks)"),
    # cluster resources
    (_spec(resources={"csd": {"cpus": 0}}), "resources.csd.cpus: must be a positive integer, got 0"),
    (_spec(resources={"tensor": {"gpus": 1}}), "resources.tensor.gpus: unknown key"),
    (_spec(resources={"smt": {"cpus": 2}}), "resources.smt: not a stage of this recon spec"),
]


@pytest.mark.parametrize("text, message", BAD_SPECS, ids=[m.split(":")[0] for _, m in BAD_SPECS])
def test_a_bad_recon_spec_exits_2_naming_the_key_and_writes_nothing(bids, tmp_path, capsys, text, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("a file the user had here")
    before = _tree(work)
    code = main([str(bids), str(tmp_path / "out"), "participant", "--recon-spec", str(spec), "--work-dir", str(work)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"dwiflow: error: {spec}"), err
    assert message in err, err
    assert not (tmp_path / "out").exists()
    assert _tree(work) == before


def test_at_least_twenty_bad_specs_cover_every_pipeline_stage():
    from dwiflow.tasks.registry import stages

    assert len(BAD_SPECS) >= 20
    covered = {m.split(".")[1].split(":")[0] for _, m in BAD_SPECS if m.startswith("stages.")}
    covered |= {part.split(".")[1] for _, m in BAD_SPECS for part in m.split() if part.startswith("stages.")}
    assert {name for name, e in stages().items() if e.pipeline} <= covered


def test_old_option_names_still_work_and_warn():
    spec = validate_recon_spec({"stages": {"mask": {}, "mapmri": {"anisotropic": False}, "peaks": {"min_separation_deg": 30,
                                                                                                    "abs_threshold": 0.1}}})
    assert spec.options("mapmri").anisotropic_scaling is False
    assert spec.options("peaks").min_separation == 30.0 and spec.options("peaks").threshold == 0.1
    assert "stages.mapmri.anisotropic is deprecated; use stages.mapmri.anisotropic_scaling" in spec.warnings
    assert "stages.peaks.min_separation_deg is deprecated; use stages.peaks.min_separation" in spec.warnings


def test_builtin_specs_need_no_aliases_and_wire_the_fod_by_priority():
    for name, fod in (("csd", "csd"), ("rumba", "rumba"), ("mapmri", "mapmri"), ("smt", "smt")):
        spec = load_recon_spec(name)
        assert spec.warnings == () and spec.fod_source() == fod
    # MAP-MRI's ODF and SMT's Watson both provide an FOD; the higher priority (MAP-MRI) feeds the peaks
    both = validate_recon_spec({"stages": {"mask": {}, "mapmri": {}, "smt": {}, "peaks": {}}})
    assert both.fod_source() == "mapmri" and both.naming()["fod_model"] == "mapmri"
    # a YAML scalar for a list option is a list of one; 3e-3 (a string in YAML 1.1) is a number
    loose = validate_recon_spec({"stages": {"mask": {}, "response": {"method": "ssst", "options": {"roi_radii": 4}},
                                            "rumba": {"csf_response": "3e-3"}}})
    assert loose.options("response").roi_radii == [4] and loose.options("rumba").csf_response == 0.003
