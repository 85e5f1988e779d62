"""Group responses of a dataset whose runs have different b-values: one group response per set of b-values, and
each run deconvolved with the set of its own b-values."""

import json

import numpy as np
import pytest

from dwiflow.bids_specs.outputs import output_filename
from dwiflow.core.errors import DwiflowInputError
from dwiflow.core.response import ResponseFunction, response_mean
from dwiflow.tasks.group import group_responses
from dwiflow.tasks.preflight import DataSummary, group_responses_for, responses_for_run
from dwiflow.tasks.recon_spec import load_recon_spec


def _write_run_responses(out, subject: str, bvalues, scale: float, rng) -> dict[str, ResponseFunction]:
    folder = out / f"sub-{subject}" / "dwi"
    folder.mkdir(parents=True)
    written = {}
    for tissue, width in (("wm", 5), ("gm", 1), ("csf", 1)):
        coefficients = np.zeros((len(bvalues), width))
        coefficients[:, 0] = scale * 1000 * np.exp(-np.asarray(bvalues) * (0.7e-3 if tissue != "csf" else 3e-3))
        if width > 1:
            coefficients[1:, 1:] = -0.2 * coefficients[1:, :1] * rng.uniform(0.8, 1.2, (len(bvalues) - 1, width - 1))
        response = ResponseFunction(np.asarray(bvalues, dtype=float), coefficients)
        (folder / output_filename(f"response_{tissue}", {"sub": subject})).write_text(response.to_text())
        written[tissue] = response
    return written


def _summary(b0: int, shells) -> DataSummary:
    return DataSummary(b0 + 30 * len(shells), b0, tuple((float(b), 30) for b in shells), False, True)


def test_runs_with_other_b_values_get_their_own_group_response(tmp_path):
    rng = np.random.default_rng(3)
    out = tmp_path / "out"
    two_shells = [_write_run_responses(out, s, [0, 1000, 2000], scale, rng) for s, scale in (("01", 1.0), ("02", 1.6))]
    one_shell = _write_run_responses(out, "03", [0, 3000], 0.8, rng)
    messages = []
    written = group_responses(out, messages.append)
    names = {tissue: sorted(p.name for p in paths) for tissue, paths in written.items()}
    assert names["wm"] == ["model-msmtcsd_desc-wmgroupb0b1000b2000_response.txt",
                           "model-msmtcsd_desc-wmgroupb0b3000_response.txt"]
    assert len(names["gm"]) == len(names["csf"]) == 2
    for tissue in ("wm", "gm", "csf"):
        pair = out / output_filename(f"group_response_{tissue}", {}, {"shells": "b0b1000b2000"})
        expected = response_mean([r[tissue] for r in two_shells]).coefficients
        assert np.allclose(np.loadtxt(pair, comments="#", ndmin=2), expected, rtol=1e-6)
        side = json.loads(pair.with_suffix(".json").read_text())
        assert side["Runs"] == 2 and side["Shells"] == [0.0, 1000.0, 2000.0]
        assert [s.split("/")[0] for s in side["Sources"]] == ["sub-01", "sub-02"]
        single = out / output_filename(f"group_response_{tissue}", {}, {"shells": "b0b3000"})
        assert np.allclose(np.loadtxt(single, comments="#", ndmin=2), one_shell[tissue].coefficients, rtol=1e-6)
    assert any("mean of 2 runs with b=0, 1000, 2000" in m for m in messages), messages

    # --response-dir: each run gets the set of its b-values; a run with others is refused naming every set
    sets = group_responses_for(out, load_recon_spec("msmt"))
    assert sorted(s.bvalues for s in sets) == [(0.0, 1000.0, 2000.0), (0.0, 3000.0)]
    assert [s.bvalues for s in group_responses_for(out, load_recon_spec("ss3t"))] == [
        s.bvalues for s in sets]  # single-shell runs take them too
    with pytest.raises(DwiflowInputError, match=r"--response-dir: recon spec csd deconvolves with no multi-tissue "
                       r"response \(use recon spec msmt for multi-shell data, ss3t for single-shell data\)"):
        group_responses_for(out, load_recon_spec("csd"), "--response-dir")
    chosen = responses_for_run("sub-04", _summary(5, [1000, 2000]), sets)
    assert chosen["wm"].name == "model-msmtcsd_desc-wmgroupb0b1000b2000_response.txt"
    assert set(chosen) == {"wm", "gm", "csf"}
    assert responses_for_run("sub-05", _summary(5, [2990]), sets)["csf"].name == \
        "model-msmtcsd_desc-csfgroupb0b3000_response.txt"  # within MRtrix3's 80 s/mm² shell tolerance
    problem = responses_for_run("sub-06", _summary(5, [2500]), sets)
    assert isinstance(problem, str) and problem.startswith("sub-06: its b-values 0, 2500 do not match the group "
                                                           "responses ")
    assert "(b=0, 1000, 2000)" in problem and "(b=0, 3000)" in problem

    # the one-shell run leaves the dataset: one set again, under the plain name, and the labelled files are gone
    for path in (out / "sub-03").rglob("*_response.txt"):
        path.unlink()
    written = group_responses(out, messages.append)
    assert sorted(p.name for p in out.glob("*group*_response.*")) == sorted(
        f"model-msmtcsd_desc-{t}group_response.{e}" for t in ("wm", "gm", "csf") for e in ("txt", "json"))
    sets = group_responses_for(out, load_recon_spec("msmt"))
    assert len(sets) == 1 and sets[0].files["wm"].name == "model-msmtcsd_desc-wmgroup_response.txt"


def test_a_response_the_group_level_cannot_read_is_one_line(tmp_path, capsys):
    """A damaged run response: the group level ends with one line naming the file, exit 2, and writes no group
    response (it stopped with a traceback)."""
    from dwiflow.cli.bidsapp import main

    out = tmp_path / "out"
    _write_run_responses(out, "01", [0, 1000], 1.0, np.random.default_rng(1))
    damaged = out / "sub-01" / "dwi" / output_filename("response_gm", {"sub": "01"})
    damaged.write_text("not a response\n")
    capsys.readouterr()
    assert main([str(tmp_path), str(out), "group"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dwiflow: error:") and damaged.name in err[0], err
    assert not list(out.glob("*group*_response.*"))


def test_the_group_level_covers_the_participants_it_is_given(tmp_path, capsys):
    """BIDS Apps' --participant-label at the group level: the group responses average those participants' runs
    only; a label without outputs is one line, exit 2."""
    from dwiflow.cli.bidsapp import main

    out = tmp_path / "out"
    rng = np.random.default_rng(8)
    runs = {s: _write_run_responses(out, s, [0, 1000, 2000], scale, rng) for s, scale in (("01", 1.0), ("02", 2.0),
                                                                                        ("03", 0.7))}
    import nibabel as nib

    for subject in runs:  # the brain masks the summary reads
        nib.save(nib.Nifti1Image(np.ones((3, 3, 2), np.uint8), np.eye(4)),
                 str(out / f"sub-{subject}" / "dwi" / output_filename("mask", {"sub": subject})))
    capsys.readouterr()
    assert main([str(tmp_path), str(out), "group", "--participant-label", "01", "sub-03"]) == 0
    summary = (out / output_filename("group_summary", {})).read_text().splitlines()
    assert [line.split("\t")[0] for line in summary[1:]] == ["sub-01", "sub-03"]
    group_wm = out / output_filename("group_response_wm", {}, {"shells": ""})
    side = json.loads(group_wm.with_suffix(".json").read_text())
    assert [s.split("/")[0] for s in side["Sources"]] == ["sub-01", "sub-03"]
    expected = response_mean([runs["01"]["wm"], runs["03"]["wm"]]).coefficients
    assert np.allclose(np.loadtxt(group_wm, comments="#", ndmin=2), expected, rtol=1e-6)
    capsys.readouterr()
    assert main([str(tmp_path), str(out), "group", "--participant-label", "09"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "['09']" in err[0] and "'01', '02', '03'" in err[0], err
