"""The group level: per-run summary statistics over a derivative dataset, and the dataset summary page.

Reads the participant level's outputs (names from ``bids_specs``), writes
``OUTPUT_DIR/desc-group_summary.tsv`` and ``OUTPUT_DIR/dataset_summary.html`` with each metric's
distribution per run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dwiflow.tasks.console import say

# columns of the group summary after run and voxels_in_mask: (column, output key, statistic over the mask);
# one number per column, "n/a" where the run has no such output (the recon spec did not make it)
SUMMARY_METRICS = (
    ("fa_mean", "tensor_fa", "mean"), ("md_mean", "tensor_md", "mean"),
    ("afd_total_mean", "fod_metrics_afd_total", "mean"), ("nufo_mean", "fod_metrics_nufo", "mean"),
    ("wm_fraction_mean", "mtnormalise_fractions", "mean:wm"),
    ("gm_fraction_mean", "mtnormalise_fractions", "mean:gm"),
    ("csf_fraction_mean", "mtnormalise_fractions", "mean:csf"),
    ("rumba_fwm_mean", "rumba_fwm", "mean"), ("rumba_fgm_mean", "rumba_fgm", "mean"),
    ("rumba_fcsf_mean", "rumba_fcsf", "mean"),
    ("mapmri_rtop_median", "mapmri_rtop", "median"), ("mapmri_msd_median", "mapmri_msd", "median"),
    ("mapmri_ng_median", "mapmri_ng", "median"),
    ("smt_lpar_mean", "smt_lpar", "mean"), ("smt_lperp_mean", "smt_lperp", "mean"), ("smt_odi_mean", "smt_odi", "mean"),
    ("dki_mk_mean", "dki_mk", "mean"), ("dki_kfa_mean", "dki_kfa", "mean"),
    ("noddi_icvf_mean", "noddi_icvf", "mean"), ("noddi_odi_mean", "noddi_odi", "mean"),
    ("noddi_isovf_mean", "noddi_isovf", "mean"),
)
SUMMARY_COLUMNS = ("run", "voxels_in_mask", *(c for c, _, _ in SUMMARY_METRICS), "response_wm_l0_highest_shell")


def participant_files(output_dir: Path, name: str, participants: list[str] | None = None) -> list[Path]:
    """Every run's file named ``*_<name>`` in the derivative dataset, of the given participants only (labels with or
    without ``sub-``; a BIDS App's group level analyses the participants it is given, else all)."""
    folders = ["sub-*"] if participants is None else [f"sub-{p.removeprefix('sub-')}" for p in participants]
    return sorted({path for folder in folders for path in output_dir.glob(f"{folder}/**/*_{name}")})


def check_participants(output_dir: Path, participants: list[str] | None) -> None:
    """Refuse participant labels that have no participant-level outputs in ``output_dir``."""
    missing = [p for p in participants or [] if not (output_dir / f"sub-{p.removeprefix('sub-')}").is_dir()]
    if missing:
        present = sorted(d.name.removeprefix("sub-") for d in output_dir.glob("sub-*") if d.is_dir())
        raise FileNotFoundError(f"participant(s) {missing} have no participant-level outputs in {output_dir} "
                                f"(there: {present})")


def group_summary(output_dir: Path, progress=say, participants: list[str] | None = None) -> Path:
    """One TSV of per-run summary statistics over the whole derivative dataset: a row per run (every run with a
    brain mask), a column per headline metric of every model that can run (``SUMMARY_METRICS``: one number each,
    over the run's mask), and the l=0 term of the (WM) response on its highest shell; of ``participants`` only when
    given."""
    import nibabel as nib
    import numpy as np

    from dwiflow.bids_specs.outputs import WILDCARDS, output_filename
    from dwiflow.core.response import ResponseFunction
    from dwiflow.tasks.io import read_sidecar

    mask_name = output_filename("mask", {})  # names relative to a run: <run entities>_<name>
    rows = []
    for mask_path in participant_files(output_dir, mask_name, participants):
        label = mask_path.name[: -len(mask_name) - 1]
        folder = mask_path.parent

        def find(pattern: str) -> Path | None:
            hits = sorted(folder.glob(f"{label}_{pattern}"))
            return hits[0] if hits else None

        mask = nib.load(mask_path).get_fdata() > 0
        values: dict[str, Any] = {"run": label, "voxels_in_mask": str(int(mask.sum()))}
        for column, key, statistic in SUMMARY_METRICS:
            path = find(output_filename(key, {}, WILDCARDS))
            if path is None:
                values[column] = "n/a"
                continue
            data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
            if ":" in statistic:  # one tissue of a 4D map, found by its sidecar's TissueOrder
                statistic, tissue = statistic.split(":")
                order = [str(t).lower().split(" ")[0] for t in (read_sidecar(path) or {}).get("TissueOrder", [])]
                if tissue not in order:
                    values[column] = "n/a"
                    continue
                data = data[..., order.index(tissue)]
            inside = data[mask]
            inside = inside[np.isfinite(inside)]
            values[column] = (f"{(np.mean if statistic == 'mean' else np.median)(inside):.6g}" if inside.size
                              else "n/a")
        response = (find(output_filename("response_wm", {}, WILDCARDS))
                    or find(output_filename("response", {}, WILDCARDS)))
        values["response_wm_l0_highest_shell"] = (
            f"{ResponseFunction.from_text(response.read_text()).coefficients[-1, 0]:.6g}" if response else "n/a")
        rows.append(values)
    if not rows:
        raise FileNotFoundError(f"no participant-level outputs found in {output_dir}; run the participant level first")
    path = output_dir / output_filename("group_summary", {})
    tmp = output_dir / f".{path.name}.partial"
    tmp.write_text("\t".join(SUMMARY_COLUMNS) + "\n" + "".join("\t".join(r[c] for c in SUMMARY_COLUMNS) + "\n" for r in rows))
    os.replace(tmp, path)
    progress(f"[dwiflow] group summary of {len(rows)} run(s): {path}")
    try:
        page = _dataset_summary(output_dir, path, participants)
        progress(f"[dwiflow] dataset summary page: {page}")
    except Exception as exc:  # the page is a view of the table; it never fails the group level
        progress(f"[dwiflow] WARNING: the dataset summary page could not be written: {exc}")
    return path


# (metric label, output key, entities to fill) drawn as distributions on the dataset summary page
DISTRIBUTION_METRICS = (("FA", "tensor_fa", "tensorfa"), ("MD", "tensor_md", "tensormd"),
                        ("AFD total", "fod_metrics_afd_total", "afdtotal"), ("RUMBA-SD f_wm", "rumba_fwm", "rumbafwm"),
                        ("MAP-MRI RTOP", "mapmri_rtop", "mapmrirtop"), ("SMT lambda_par", "smt_lpar", "smtlpar"),
                        ("SMT ODI", "smt_odi", "smtodi"), ("DKI MK", "dki_mk", "dkimk"),
                        ("NODDI ICVF", "noddi_icvf", "noddiicvf"), ("NODDI ODI", "noddi_odi", "noddiodi"))


def _dataset_summary(output_dir: Path, summary_tsv: Path, participants: list[str] | None = None) -> Path:
    """The group-level HTML page: the summary table and each metric's distribution per run."""
    import nibabel as nib
    import numpy as np

    from dwiflow.bids_specs.outputs import WILDCARDS, output_filename, output_spec
    from dwiflow.tasks.figures import distribution_figure
    from dwiflow.tasks.report import dataset_summary_page

    mask_name = output_filename("mask", {})
    mask_paths = {p.name[: -len(mask_name) - 1]: p for p in participant_files(output_dir, mask_name, participants)}
    masks: dict[str, np.ndarray] = {}  # each run's mask, read once
    distributions = []
    for label, key, desc in DISTRIBUTION_METRICS:
        name = output_filename(key, {}, WILDCARDS)
        values = {}
        for run, mask_path in mask_paths.items():
            hits = sorted(mask_path.parent.glob(f"{run}_{name}"))
            if hits:
                if run not in masks:
                    masks[run] = nib.load(mask_path).get_fdata() > 0
                values[run] = np.asarray(nib.load(hits[0]).dataobj, dtype=np.float32)[masks[run]]
        if not values:
            continue  # no run has this metric: no panel
        figure = output_dir / "figures" / output_filename("group_distribution", {"desc": desc})
        try:
            distributions.append((label, distribution_figure(figure, label, values, output_spec(key).get("Units", "")), ""))
        except Exception as exc:  # a figure that cannot be drawn becomes a note
            distributions.append((label, None, f"not drawn: {exc}"))
    subjects = sorted({run.split("_")[0].removeprefix("sub-") for run in mask_paths})
    return dataset_summary_page(output_dir, summary_tsv, distributions, subjects)


def shells_label(bvalues) -> str:
    """The name part of a group response for one set of b-values (``b0b1000b2000``), when a dataset has several."""
    return "".join(f"b{b:.0f}" for b in bvalues)


def group_responses(output_dir: Path, progress=say, participants: list[str] | None = None) -> dict[str, list[Path]]:
    """The group-average response of every tissue the runs estimated (MRtrix3 ``responsemean`` semantics,
    :func:`dwiflow.core.response.response_mean`): ``OUTPUT_DIR/<group name>`` per tissue (names from
    ``bids_specs/outputs.yaml``), each with a sidecar listing the runs that went in.

    Runs with other b-values cannot be averaged (a response is one row per shell): when the runs' b-values differ,
    each set of b-values gets its own group responses, averaging the runs that have them and named by them
    (``…_desc-wmgroupb0b1000_response.txt``); ``--response-dir`` then gives each run the set that matches it.
    Only the runs of ``participants`` when given. Returns the files written per tissue."""
    from dwiflow.bids_specs.outputs import WILDCARDS, output_filename, sidecar
    from dwiflow.core.response import ResponseFunction, response_mean, same_shells
    from dwiflow.tasks.io import atomic_outputs, read_text

    written: dict[str, list[Path]] = {}
    with atomic_outputs() as out:
        for tissue in ("wm", "gm", "csf"):
            run_name = output_filename(f"response_{tissue}", {})
            files = participant_files(output_dir, run_name, participants)
            if not files:
                continue
            responses = [ResponseFunction.from_text(read_text(p, "response"), str(p)) for p in files]
            sets: list[list[int]] = []  # runs by their b-values, in the order first seen
            for index, response in enumerate(responses):
                home = next((members for members in sets if same_shells(responses[members[0]].bvalues,
                                                                          response.bvalues)), None)
                if home is None:
                    sets.append([index])
                else:
                    home.append(index)
            for members in sorted(sets, key=lambda m: (len(responses[m[0]].bvalues), list(responses[m[0]].bvalues))):
                mean = response_mean([responses[i] for i in members])
                label = shells_label(mean.bvalues) if len(sets) > 1 else ""
                target = output_dir / output_filename(f"group_response_{tissue}", {}, {"shells": label})
                written.setdefault(tissue, []).append(out.text(target, mean.to_text()))
                out.json(target.with_suffix(".json"), sidecar(
                    f"group_response_{tissue}", None, Sources=[str(files[i].relative_to(output_dir)) for i in members],
                    Runs=len(members), Shells=[float(b) for b in mean.bvalues],
                    ResponseFunction={"Coefficients": mean.coefficients.tolist(), "Type": "zsh"}))
                shells = f" with b={', '.join(f'{b:.0f}' for b in mean.bvalues)}" if label else ""
                runs = f"{len(members)} run{'s' if len(members) != 1 else ''}"
                progress(f"[dwiflow] group {tissue.upper()} response: mean of {runs}{shells} -> "
                         f"{target.name}")
    # group responses of an earlier group level that this one did not write (other b-value sets): --response-dir
    # would otherwise find them beside the new ones
    kept = {p for paths in written.values() for p in paths}
    for tissue in ("wm", "gm", "csf"):
        for old in output_dir.glob(output_filename(f"group_response_{tissue}", {}, WILDCARDS)):
            if old not in kept:
                old.unlink()
                old.with_suffix(".json").unlink(missing_ok=True)
    return written
