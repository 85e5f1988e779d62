"""Compile every numba kernel once, so that later runs load them from numba's cache instead of compiling.

The container build runs ``python -m dwiflow.warmup``: it writes a small multi-shell phantom dataset and runs
every built-in recon spec on it with the debug worker (each stage's kernels compile on first use and are cached in
``NUMBA_CACHE_DIR``, or beside the package when that is writable), then the commands no spec runs (``dwirecon
fixels``). Nothing is kept but numba's cache.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def warm_up(specs: list[str] | None = None) -> int:
    """Run each built-in recon spec (default: all) on a 14x14x10 three-tissue phantom; 0 when every spec ran."""
    from dwiflow.cli.bidsapp import main as bidsapp
    from dwiflow.tasks.recon_spec import builtin_specs
    from dwiflow.tasks.stages.phantom import keep_one_shell, write_phantom_dataset

    failed = []
    with tempfile.TemporaryDirectory(prefix="dwiflow-warmup-") as tmp:
        root = Path(tmp)
        files = write_phantom_dataset(root / "bids", scheme="multi", shape=(14, 14, 10), snr=30.0, seed=1,
                                      tissues="three", diffusion_times=(0.04, 0.02))  # Δ, δ: MAP-MRI's indices
        # single-shell specs (ss3t) run on a copy with b=0 and the b=3000 shell
        import shutil

        shutil.copytree(root / "bids", root / "bids_single")
        keep_one_shell(root / "bids_single" / files["dwi"].relative_to(root / "bids"), 3000.0)
        for name in specs or builtin_specs():
            t0 = time.perf_counter()
            spec = _small_data_spec(name, root)
            bids = root / ("bids_single" if name == "ss3t" else "bids")
            code = bidsapp([str(bids), str(root / f"out_{name}"), "participant", "--recon-spec", spec,
                            "--mask-dir", str(bids / "derivatives" / "masks"), "--work-dir",
                            str(root / f"work_{name}"), "--worker", "debug"])
            print(f"[warmup] recon spec {name}: exit {code} in {time.perf_counter() - t0:.1f} s", flush=True)
            if code != 0:
                failed.append(name)
        # commands that no recon spec runs: fixels (from one of the FODs just written)
        from dwiflow.cli.dwirecon import main as dwirecon

        fod = next(iter(sorted(root.glob("out_*/sub-*/**/*_param-fod_dwimap.nii.gz"))), None)
        if fod is not None:
            code = dwirecon(["fixels", str(fod), str(root / "fixels"), "--afd", "--peak-amp", "-q"])
            print(f"[warmup] dwirecon fixels: exit {code}", flush=True)
            if code != 0:
                failed.append("fixels")
    if failed:
        print(f"[warmup] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _small_data_spec(name: str, root: Path) -> str:
    """The built-in spec, or for dhollander a copy for small data (no mask erosion, 5% single-fibre WM)."""
    import yaml

    from dwiflow.tasks import recon_spec

    text = (Path(recon_spec.__file__).parent / "recon_specs" / f"{name}.yaml").read_text()
    spec = yaml.safe_load(text)
    response = spec.get("stages", {}).get("response") or {}
    if response.get("method") == "dhollander":  # msmt, ss3t
        response["options"] = {**(response.get("options") or {}), "erode": 0, "sfwm": 5.0}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)
    return name


if __name__ == "__main__":
    sys.exit(warm_up(sys.argv[1:] or None))
