"""The group level: per-run summary statistics over a derivative dataset, and the dataset summary page.

Reads the participant level's outputs (names from ``bids_specs``), writes
``OUTPUT_DIR/desc-group_summary.tsv`` and ``OUTPUT_DIR/dataset_summary.html`` with each metric's
distribution per run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SUMMARY_COLUMNS = ("run", "voxels_in_mask", "mean_fa", "mean_md", "mean_afd_total", "response_l0")


def group_summary(output_dir: Path, progress=print) -> Path:
    """One TSV of per-run summary statistics over the whole derivative dataset."""
    import nibabel as nib
    import numpy as np

    from dwiflow.bids_specs.outputs import output_filename
    from dwiflow.core.response import ResponseFunction

    fa_name = output_filename("tensor_fa", {})  # names relative to a run: <run entities>_<name>
    mask_name = output_filename("mask", {})
    rows = []
    for fa_path in sorted(output_dir.rglob(f"*_{fa_name}")):
        label = fa_path.name[: -len(fa_name) - 1]
        folder = fa_path.parent

        def find(pattern: str) -> Path | None:
            hits = sorted(folder.glob(f"{label}_{pattern}"))
            return hits[0] if hits else None

        mask_path = find(mask_name)
        mask = nib.load(mask_path).get_fdata() > 0 if mask_path else None
        values: dict[str, Any] = {"run": label}

        def mean_of(pattern: str) -> str:
            path = find(pattern)
            if path is None:
                return "n/a"
            data = nib.load(path).get_fdata()
            sel = mask if mask is not None else np.isfinite(data)
            return f"{np.nanmean(data[sel]):.6g}"

        values["voxels_in_mask"] = str(int(mask.sum())) if mask is not None else "n/a"
        values["mean_fa"] = mean_of(fa_name)
        values["mean_md"] = mean_of(output_filename("tensor_md", {}))
        values["mean_afd_total"] = mean_of(output_filename("fod_metrics_afd_total", {}, {"fod_model": "*"}))
        response = find(output_filename("response", {}, {"fod_model": "*", "method": "*"}))
        values["response_l0"] = (",".join(f"{c:.6g}" for c in ResponseFunction.from_text(response.read_text()).coefficients[:, 0])
                                 if response else "n/a")
        rows.append(values)
    if not rows:
        raise FileNotFoundError(f"no participant-level outputs found in {output_dir}; run the participant level first")
    path = output_dir / output_filename("group_summary", {})
    tmp = output_dir / f".{path.name}.partial"
    tmp.write_text("\t".join(SUMMARY_COLUMNS) + "\n" + "".join("\t".join(r[c] for c in SUMMARY_COLUMNS) + "\n" for r in rows))
    os.replace(tmp, path)
    progress(f"[dwiflow] group summary of {len(rows)} run(s): {path}")
    try:
        page = _dataset_summary(output_dir, path)
        progress(f"[dwiflow] dataset summary page: {page}")
    except Exception as exc:  # the page is a view of the table; it never fails the group level
        progress(f"[dwiflow] WARNING: the dataset summary page could not be written: {exc}")
    return path


# (metric label, output key, entities to fill) drawn as distributions on the dataset summary page
DISTRIBUTION_METRICS = (("FA", "tensor_fa", "tensorfa"), ("MD", "tensor_md", "tensormd"),
                        ("AFD total", "fod_metrics_afd_total", "afdtotal"), ("RUMBA-SD f_wm", "rumba_fwm", "rumbafwm"),
                        ("MAP-MRI RTOP", "mapmri_rtop", "mapmrirtop"), ("SMT lambda_par", "smt_lpar", "smtlpar"),
                        ("SMT ODI", "smt_odi", "smtodi"))


def _dataset_summary(output_dir: Path, summary_tsv: Path) -> Path:
    """The group-level HTML page: the summary table and each metric's distribution per run."""
    import nibabel as nib
    import numpy as np

    from dwiflow.bids_specs.outputs import output_filename, output_spec
    from dwiflow.tasks.figures import distribution_figure
    from dwiflow.tasks.report import dataset_summary_page

    mask_name = output_filename("mask", {})
    mask_paths = {p.name[: -len(mask_name) - 1]: p for p in sorted(output_dir.glob(f"sub-*/**/*_{mask_name}"))}
    masks: dict[str, np.ndarray] = {}  # each run's mask, read once
    distributions = []
    for label, key, desc in DISTRIBUTION_METRICS:
        name = output_filename(key, {}, {"fod_model": "*"})
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


def group_responses(output_dir: Path, progress=print) -> dict[str, Path]:
    """The group-average response of every tissue the runs estimated (MRtrix3 ``responsemean`` semantics,
    :func:`dwiflow.core.response.response_mean`): ``OUTPUT_DIR/<group name>`` per tissue (names from
    ``bids_specs/outputs.yaml``), each with a sidecar listing the runs that went in."""
    from dwiflow.bids_specs.outputs import output_filename, sidecar
    from dwiflow.core.response import ResponseFunction, response_mean
    from dwiflow.tasks.io import atomic_outputs, read_text

    written: dict[str, Path] = {}
    with atomic_outputs() as out:
        for tissue in ("wm", "gm", "csf"):
            run_name = output_filename(f"response_{tissue}", {})
            files = sorted(p for p in output_dir.glob(f"sub-*/**/*_{run_name}"))
            if not files:
                continue
            responses = [ResponseFunction.from_text(read_text(p, "response"), str(p)) for p in files]
            mean = response_mean(responses)
            target = output_dir / output_filename(f"group_response_{tissue}", {})
            written[tissue] = out.text(target, mean.to_text())
            out.json(target.with_suffix(".json"), sidecar(
                f"group_response_{tissue}", None, Sources=[str(p.relative_to(output_dir)) for p in files],
                Runs=len(files), Shells=[float(b) for b in mean.bvalues],
                ResponseFunction={"Coefficients": mean.coefficients.tolist(), "Type": "zonal"}))
            progress(f"[dwiflow] group {tissue.upper()} response: mean of {len(files)} runs -> {target.name}")
    return written
