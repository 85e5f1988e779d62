"""Per-subject HTML reports and the dataset summary page (HTML assembly only; drawing is in figures.py).

``OUTPUT_DIR/sub-<label>.html`` holds every run of the subject that was processed: its status, the
recon spec's parameters and the parameters each model recorded, software versions, time per stage,
warnings and the QC figures (``sub-<label>/figures/``, linked relatively). A model that did not run
has no section; a figure that could not be drawn shows the note saying why.
"""

from __future__ import annotations

import html
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

VERSIONED_PACKAGES = ("dwiflow", "numpy", "scipy", "nibabel", "pydra", "numba", "cvxpy", "clarabel", "matplotlib",
                      "pybids")

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0; color: #222; }
header { background: #1c3d5a; color: white; padding: 14px 24px; }
header h1 { margin: 0; font-size: 22px; }
header p { margin: 4px 0 0; font-size: 13px; opacity: 0.85; }
nav { background: #eef2f6; padding: 8px 24px; font-size: 13px; }
nav a { margin-right: 14px; }
main { padding: 8px 24px 40px; max-width: 1400px; }
h2 { border-bottom: 2px solid #1c3d5a; padding-bottom: 4px; margin-top: 32px; }
h3 { margin-top: 24px; color: #1c3d5a; }
figure { margin: 12px 0 20px; }
figure img { max-width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 13px; color: #444; margin-top: 4px; }
.note { background: #fff4e6; border-left: 4px solid #f08c00; padding: 6px 10px; font-size: 13px; }
.failed { background: #ffe3e3; border-left: 4px solid #c92a2a; padding: 6px 10px; }
.ok { color: #2b8a3e; font-weight: bold; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
table.summary td:first-child { white-space: nowrap; }
pre { background: #f6f8fa; padding: 8px; font-size: 12px; overflow-x: auto; }
pre.methods { white-space: pre-wrap; font-size: 13px; }
details { margin: 8px 0; }
"""


@dataclass
class RunReport:
    """What the report says about one run."""

    label: str
    entities: dict[str, str]
    ok: bool
    error: str = ""
    log: str = ""
    seconds: float = 0.0
    figures_dir: Path | None = None
    derivative_dir: Path | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # warnings about the run from the BIDS App (e.g. no given mask)
    methods: Path | None = None  # the run's methods paragraph (Markdown), when written


def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages dwiflow runs on (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def read_timing_records(log: Path | None) -> list[dict[str, Any]]:
    """Every readable record of the JSON-lines timing log, in order."""
    records: list[dict[str, Any]] = []
    if log is None or not Path(log).is_file():
        return records
    for line in Path(log).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a killed job
        if isinstance(record, dict) and "run" in record and "stage" in record:
            records.append(record)
    return records


def read_timings(log: Path | None) -> dict[tuple[str, str], dict[str, Any]]:
    """The last timing record of each (run, stage) in the JSON-lines timing log."""
    return {(record["run"], record["stage"]): record for record in read_timing_records(log)}


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: Iterable[Iterable[Any]], header: Iterable[str] | None = None, css_class: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    opening = f'<table class="{css_class}">' if css_class else "<table>"
    return f"{opening}{head}{body}</table>"


def read_sidecars(files) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, content) of every JSON file among ``files`` that holds a readable object, in the given order."""
    for path in files:
        if Path(path).suffix != ".json":
            continue
        try:
            content = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(content, dict):
            yield Path(path), content


def _model_parameters(run: RunReport) -> list[tuple[str, str]]:
    """(model or output, parameters) recorded in the run's derivative sidecars, one row per distinct set."""
    from dwiflow.bids_specs.outputs import entities_from_filename

    rows: dict[tuple[str, str], None] = {}
    for path, content in read_sidecars(sorted(run.files)):
        model = content.get("Model") if isinstance(content.get("Model"), dict) else {}
        params = model.get("Parameters") or content.get("Parameters")
        if not params:
            continue
        entities = entities_from_filename(path.name)
        what = f"response ({entities.get('desc', '')})" if "_response" in path.name else entities.get("model", path.name)
        rows[(what, json.dumps(params, sort_keys=True))] = None
    return list(rows)


def _figures_html(run: RunReport, report_dir: Path) -> tuple[str, list[str]]:
    from dwiflow.bids_specs.outputs import output_filename

    manifest_path = run.figures_dir / output_filename("figures_manifest", run.entities) if run.figures_dir else None
    manifest_files = [manifest_path] if manifest_path is not None and manifest_path.is_file() else []
    if not manifest_files:
        return '<p class="note">No figures were drawn for this run.</p>', ["no figures for this run"]
    manifest = json.loads(manifest_files[0].read_text())
    warnings = list(manifest.get("warnings", []))
    by_section: dict[str, list[dict[str, Any]]] = {}
    for entry in manifest.get("figures", []):
        by_section.setdefault(entry.get("section", "other"), []).append(entry)
    parts = []
    from dwiflow.tasks.registry import stage_titles

    titles = stage_titles()  # sections in the order a run goes through the stages
    for section in [s for s in titles if s in by_section] + [s for s in by_section if s not in titles]:
        parts.append(f"<h3>{_esc(titles.get(section, section))}</h3>")
        for entry in by_section[section]:
            if entry.get("file"):
                rel = os.path.relpath(run.figures_dir / entry["file"], report_dir)
                parts.append(f'<figure><a href="{_esc(rel)}"><img src="{_esc(rel)}" alt="{_esc(entry["title"])}"></a>'
                             f'<figcaption><b>{_esc(entry["title"])}.</b> {_esc(entry.get("caption", ""))} '
                             f'(click to open at full resolution)</figcaption></figure>')
            else:
                parts.append(f'<p class="note"><b>{_esc(entry["title"])}</b>: {_esc(entry.get("note", "not drawn"))}</p>')
                warnings.append(f"{entry['title']}: {entry.get('note', 'not drawn')}")
    return "\n".join(parts), warnings


def subject_report(output_dir: Path, subject: str, runs: list[RunReport], recon_spec: dict[str, Any],
                   timing_log: Path | None = None) -> Path:
    """Write ``OUTPUT_DIR/sub-<subject>.html`` (atomically) and return its path."""
    timings = read_timings(timing_log)
    versions = software_versions()
    nav = " ".join(f'<a href="#{_esc(r.label)}">{_esc(r.label)}</a>' for r in runs)
    body = []
    for run in runs:
        body.append(f'<h2 id="{_esc(run.label)}">{_esc(run.label)}</h2>')
        records = sorted((rec for (label, _), rec in timings.items() if label == run.label),
                         key=lambda rec: rec.get("finished", 0))
        stage_rows = [(rec["stage"], f"{rec['seconds']:.2f}", "failed" if rec.get("errored") else "ok",
                       time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("finished", 0)))) for rec in records]
        if run.ok and not records:
            body.append(f'<p><span class="ok">completed</span> (every stage from the cache, or published by an earlier '
                        f'invocation). Derivatives: {_esc(run.derivative_dir or "")}</p>')
        elif run.ok:
            compute = sum(rec["seconds"] for rec in records)
            body.append(f'<p><span class="ok">completed</span>: {compute:.1f} s of stage computation (see the time per '
                        f'stage; stages reused from the cache take no time). Derivatives: '
                        f'{_esc(run.derivative_dir or "")}</p>')
        else:
            body.append(f'<p class="failed"><b>FAILED</b>: {_esc(run.error)}<br>log: {_esc(run.log)}</p>')
        figures, warnings = _figures_html(run, output_dir) if run.ok else ("", [])
        warnings = list(run.notes) + warnings
        if not run.ok:
            warnings.append(f"the run failed: {run.error}")
        body.append("<details open><summary><b>Warnings</b> "
                    f"({len(warnings)})</summary>" + ("<ul>" + "".join(f"<li>{_esc(w)}</li>" for w in warnings) + "</ul>"
                                                      if warnings else "<p>none</p>") + "</details>")
        body.append("<details><summary><b>Time per stage</b></summary>"
                    + (_table(stage_rows, ("stage", "seconds", "state", "finished")) if stage_rows
                       else "<p>no timing recorded (all stages came from the cache of an earlier version)</p>")
                    + "</details>")
        if run.methods is not None and Path(run.methods).is_file():
            rel = os.path.relpath(run.methods, output_dir)
            body.append(f'<details><summary><b>Methods</b> (for a paper: edit freely; <a href="{_esc(rel)}">'
                        f'{_esc(rel)}</a>)</summary><pre class="methods">{_esc(Path(run.methods).read_text())}</pre>'
                        "</details>")
        params = _model_parameters(run) if run.ok else []
        if params:
            body.append("<details><summary><b>Parameters recorded by the models</b></summary>"
                        + _table(params, ("output", "parameters")) + "</details>")
        body.append(figures)
    spec_text = json.dumps(recon_spec.get("stages", {}), indent=2)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dwiflow: sub-{_esc(subject)}</title>
<style>{STYLE}</style></head>
<body>
<header><h1>dwiflow report: sub-{_esc(subject)}</h1>
<p>recon spec <b>{_esc(recon_spec.get('name', ''))}</b>: {_esc(recon_spec.get('description', ''))}</p>
<p>written {time.strftime('%Y-%m-%d %H:%M:%S')} by dwiflow {_esc(versions.get('dwiflow', ''))}</p></header>
<nav>runs: {nav} <a href="#about">parameters and software</a></nav>
<main>
{''.join(body)}
<h2 id="about">Parameters and software</h2>
<h3>Recon spec stages</h3><pre>{_esc(spec_text)}</pre>
<h3>Software versions</h3>{_table(sorted(versions.items()), ('software', 'version'))}
<p>Figures: axial slices in the neurological convention (subject's left on the image left), reoriented to the
closest RAS voxel order without resampling.</p>
</main></body></html>
"""
    path = output_dir / f"sub-{subject}.html"
    tmp = output_dir / f".{path.name}.partial"
    tmp.write_text(page)
    os.replace(tmp, path)
    return path


def _group_responses_section(output_dir: Path) -> str:
    """The group responses the group level wrote (one set per set of b-values): tissue, b-values, runs, file."""
    from dwiflow.bids_specs.outputs import WILDCARDS, output_filename

    rows = []
    for tissue in ("wm", "gm", "csf"):
        pattern = output_filename(f"group_response_{tissue}", {}, WILDCARDS)
        for path, side in read_sidecars(sorted(output_dir.glob(pattern.replace(".txt", ".json")))):
            shells = ", ".join(f"{b:.0f}" for b in side.get("Shells", []))
            runs = ", ".join(Path(s).name.split("_model-")[0] for s in side.get("Sources", []))
            rows.append([tissue.upper(), shells, f"{side.get('Runs', '?')}: {runs}", path.with_suffix(".txt").name])
    if not rows:
        return ""
    return ("<h2>Group responses</h2><p>MRtrix3 responsemean averages of the runs' responses, one set per set of "
            "b-values (<code>--response-dir</code> gives each run the set of its own).</p>"
            + _table(rows, ["tissue", "b-values (s/mm²)", "runs", "file"], "summary"))


def dataset_summary_page(output_dir: Path, summary_tsv: Path, distributions: list[tuple[str, Path | None, str]],
                         subjects: list[str]) -> Path:
    """Write ``OUTPUT_DIR/dataset_summary.html``: the group summary table and one distribution figure per metric.

    ``distributions``: (metric, figure path or None, note when the figure is missing).
    """
    lines = summary_tsv.read_text().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    # the TSV has a column per headline metric of every model; the page shows those some run has
    shown = [i for i, name in enumerate(header) if i == 0 or any(row[i] != "n/a" for row in rows if i < len(row))]
    left_out = [name for i, name in enumerate(header) if i not in shown]
    table = _table([[row[i] if i < len(row) else "" for i in shown] for row in rows], [header[i] for i in shown],
                   "summary")
    if left_out:
        table += (f'<p class="note">In the TSV only (n/a for every run: no run made them): '
                  f'{_esc(", ".join(left_out))}.</p>')
    parts = []
    for metric, figure, note in distributions:
        if figure is not None:
            rel = os.path.relpath(figure, output_dir)
            parts.append(f'<figure><img src="{_esc(rel)}" alt="{_esc(metric)}"><figcaption>{_esc(metric)} '
                         f'distribution per run</figcaption></figure>')
        else:
            parts.append(f'<p class="note">{_esc(metric)}: {_esc(note)}</p>')
    links = " ".join(f'<a href="sub-{_esc(s)}.html">sub-{_esc(s)}</a>' for s in subjects
                     if (output_dir / f"sub-{s}.html").is_file())
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dwiflow: dataset summary</title><style>{STYLE}</style></head>
<body><header><h1>dwiflow dataset summary</h1><p>{len(rows)} runs; written {time.strftime('%Y-%m-%d %H:%M:%S')}</p>
</header><nav>subject reports: {links}</nav><main>
<h2>Summary table</h2><p>{_esc(summary_tsv.name)}</p>{table}
{_group_responses_section(output_dir)}{'<h2>Distributions per metric</h2>' + ''.join(parts) if parts else ''}
</main></body></html>
"""
    path = output_dir / "dataset_summary.html"
    tmp = output_dir / f".{path.name}.partial"
    tmp.write_text(page)
    os.replace(tmp, path)
    return path
