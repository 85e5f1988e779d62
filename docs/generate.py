"""The documentation's generated pages: every command from the stage registry, the validation tables from the numbers
the tests record (``DWIFLOW_VALIDATION_DIR``) and the benchmark results, an example methods paragraph."""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VALIDATION_DIR = Path(os.environ.get("DWIFLOW_VALIDATION_DIR", ROOT / "build" / "validation"))
BENCHMARKS = ROOT / "benchmarks" / "results.json"


def _literal(markdown: str) -> str:
    """Markdown inline code (`x`) as reStructuredText literals (``x``); other text escaped where rst would read it."""
    parts = re.split(r"(`[^`]*`)", markdown)
    out = []
    for part in parts:
        if part.startswith("`") and part.endswith("`") and len(part) > 1:
            out.append(f"``{part[1:-1]}``" if part[1:-1] else "")
        else:
            out.append(part.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|"))
    return "".join(out)


def _table(header: list[str], rows: list[list[str]], widths: str = "") -> list[str]:
    lines = [".. list-table::", "   :header-rows: 1"] + ([f"   :widths: {widths}"] if widths else []) + [""]
    for row in [header, *rows]:
        lines.append(f"   * - {row[0] or ' '}")
        lines += [f"     - {cell or ' '}" for cell in row[1:]]
    return lines + [""]


def _usages(parser: argparse.ArgumentParser, prefix: list[str]) -> dict[str, str]:
    """Usage line of every (nested) subcommand, by its words after ``dwirecon``."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words = [*prefix, name]
                nested = _usages(sub, words)
                found.update(nested)
                if not nested:
                    found[" ".join(words)] = " ".join(sub.format_usage().split())
    return found


def commands_page() -> str:
    from dwiflow.cli.dwirecon import build_parser
    from dwiflow.tasks.options import markdown_rows
    from dwiflow.tasks.registry import StageGroup, stages

    usages = _usages(build_parser(), [])
    lines = ["``dwirecon`` commands", "=====================", "",
             "One command per stage, each generated from the stage registry with the options a recon spec takes "
             "(recon-spec key / command-line flag).", ""]
    for entry in stages().values():
        for stage in entry.methods.values() if isinstance(entry, StageGroup) else [entry]:
            words = stage.command + (f" {stage.method}" if stage.method else "")
            title = f"dwirecon {words}"
            lines += [title, "-" * len(title), "", _literal(stage.summary[:1].upper() + stage.summary[1:]) + ".", ""]
            lines += [_literal(stage.description), ""]
            if words in usages:
                lines += ["::", "", f"   {usages[words].replace('usage: ', '')}", ""]
            if not stage.pipeline:
                lines += ["Command line only (not a recon-spec stage).", ""]
            rows = [[_literal(c.strip()) for c in row.strip().strip("|").split(" | ")]
                    for row in markdown_rows(stage.options)]
            lines += _table(["option", "type", "default", "meaning"], rows, "25 12 12 51") if rows else ["No options.",
                                                                                                       ""]
    return "\n".join(lines)


def validation_records() -> list[dict]:
    records = []
    for path in sorted(VALIDATION_DIR.glob("*.jsonl")) if VALIDATION_DIR.is_dir() else []:
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    unique = {(r["model"], r["quantity"]): r for r in records}  # a rerun's record replaces the earlier one
    return sorted(unique.values(), key=lambda r: (r["model"], r["quantity"]))


def validation_page() -> str:
    lines = ["Validation", "==========", "",
             "Every number below was written by the test that asserts it (``tests/``, through the ``record`` "
             "fixture), in the test run before this documentation was built; the speed table is the last run of "
             "``benchmarks/run.py --json benchmarks/results.json``. Nothing here is typed by hand.", ""]
    records = validation_records()
    if records:
        lines += ["Agreement with the reference tools and with ground truth", "-" * 56, ""]
        rows = [[_literal(r["model"]), _literal(r["quantity"]), _literal(r["reference"]),
                 f"{r['value']:.3g}" if isinstance(r["value"], (int, float)) else _literal(str(r["value"])),
                 _literal(str(r["limit"])), f"``{r['test']}``"] for r in records]
        lines += _table(["model", "quantity", "against", "measured", "test's limit", "test"], rows,
                        "10 28 18 10 10 24")
    else:
        lines += [f"No test records in {VALIDATION_DIR}: run the test suite first (``python3 dev.py test``).", ""]
    if BENCHMARKS.is_file():
        bench = json.loads(BENCHMARKS.read_text())
        lines += ["Speed (whole commands unless the row says otherwise)", "-" * 52, "",
                  f"Run on {bench['date']} (dwiflow {bench['dwiflow']}, {_literal(bench['machine'])}): "
                  f"``{bench['command']}``. Ratio = reference seconds / dwiflow seconds (above 1: dwiflow faster).",
                  ""]
        rows = [[_literal(r["step"]), _literal(r["peer"]), str(r["voxels"]), f"{r['dwiflow_s']:.3g}",
                 f"{r['peer_s']:.3g}", f"{r['ratio']:.2f}" if r.get("ratio") else "-",
                 _literal(r["accuracy"] + (f" [{r['note']}]" if r.get("note") else ""))] for r in bench["rows"]]
        headers = ["step", "reference", "voxels", "dwiflow s", "reference s", "ratio", "accuracy"]
        widths = "10 26 8 8 8 6 34"
        machines = {r.get("machine") for r in bench["rows"]}
        if machines != {bench["machine"]}:  # rows merged from runs on other machines (ratios move with the CPU)
            for row, r in zip(rows, bench["rows"]):
                row.append(_literal(r.get("machine") or "not recorded (an earlier run)"))
            headers, widths = headers + ["measured on"], "9 22 7 7 7 5 29 14"
        lines += _table(headers, rows, widths)
    return "\n".join(lines)


def methods_page() -> str:
    from dwiflow.tasks.methods import methods_markdown
    from dwiflow.tasks.recon_spec import load_recon_spec

    example = methods_markdown(load_recon_spec("csd"), "sub-01_dwi", "The run comprised 65 volumes (5 at b=0, 60 at "
                               "b=2000 s/mm²) with 2×2×2 mm voxels.")
    body = example.split("\n", 2)[2]  # without the Markdown title
    lines = ["Methods paragraph", "=================", "",
             "Every run gets a methods paragraph with numbered references, written from the recon spec's stages and "
             "options and the run's acquisition, into ``OUTPUT_DIR/logs/`` (``<run>_methods.md``) and its report. "
             "For the built-in ``csd`` recon spec on a 65-volume single-shell run it reads:", ""]
    for paragraph in body.strip().split("\n\n"):
        if paragraph.startswith("## "):
            lines += [paragraph[3:], "-" * len(paragraph[3:]), ""]
        else:
            lines += [_literal(paragraph), ""]
    return "\n".join(lines)


def generate_pages(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("commands.rst", commands_page()), ("validation.rst", validation_page()),
                       ("methods.rst", methods_page()), ("python.rst", python_page())):
        path = folder / name
        if not path.is_file() or path.read_text() != text:  # unchanged pages keep their time: no rebuild
            path.write_text(text + "\n")


def python_page() -> str:
    """The README's "From Python" section (the examples the tests run), as reStructuredText."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## From Python\n")
    end = text.index("\n## ", start + 1)
    lines, in_code = ["Python: models on arrays and Pydra tasks", "========================================", ""], False
    for line in text[start:end].splitlines()[2:]:
        if line.startswith("```"):
            in_code = not in_code
            lines += [".. code-block:: python", ""] if in_code else [""]
        elif in_code:
            lines.append(f"   {line}" if line else "")
        elif line.startswith("### "):
            lines += [line[4:], "-" * len(line[4:])]
        else:
            lines.append(_literal(line))
    return "\n".join(lines)
