"""Compile every numba kernel once, so that later runs load them from numba's cache instead of compiling.

The container build runs ``python -m dwiflow.warmup``: it writes a small multi-shell phantom dataset and runs
every built-in recon spec on it with the debug worker (each stage's kernels compile on first use and are cached in
``NUMBA_CACHE_DIR``, or beside the package when that is writable). Nothing is kept but numba's cache.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def warm_up(specs: list[str] | None = None) -> int:
    """Run each built-in recon spec (default: all) on a 12x12x8 phantom; returns 0 when every spec ran."""
    from dwiflow.cli.bidsapp import main as bidsapp
    from dwiflow.tasks.recon_spec import builtin_specs
    from dwiflow.tasks.stages.phantom import write_phantom_dataset

    failed = []
    with tempfile.TemporaryDirectory(prefix="dwiflow-warmup-") as tmp:
        root = Path(tmp)
        files = write_phantom_dataset(root / "bids", scheme="multi", shape=(14, 14, 10), snr=30.0, seed=1)
        _three_tissues(files["dwi"])
        for name in specs or builtin_specs():
            t0 = time.perf_counter()
            spec = _small_data_spec(name, root)
            code = bidsapp([str(root / "bids"), str(root / f"out_{name}"), "participant", "--recon-spec", spec,
                            "--mask-dir", str(root / "bids" / "derivatives" / "masks"), "--work-dir",
                            str(root / f"work_{name}"), "--worker", "debug"])
            print(f"[warmup] recon spec {name}: exit {code} in {time.perf_counter() - t0:.1f} s", flush=True)
            if code != 0:
                failed.append(name)
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
    if response.get("method") == "dhollander":
        response["options"] = {**(response.get("options") or {}), "erode": 0, "sfwm": 5.0}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return str(path)
    return name


def _three_tissues(dwi: Path) -> None:
    """Make the phantom's tissue block WM/GM/CSF patches (what dhollander needs) and give its sidecar the
    diffusion times MAP-MRI needs."""
    import json

    import nibabel as nib
    import numpy as np

    from dwiflow.core.sims import acquisition_scheme, smooth_tissue_fractions, three_tissue_phantom

    img = nib.load(dwi)
    data = np.asarray(img.dataobj, dtype=np.float32)
    block = (slice(3, -3), slice(3, -3), slice(2, -2))
    shape = data[block].shape[:3]
    tissues = three_tissue_phantom(acquisition_scheme("multi"), shape, seed=2,
                                   fractions=smooth_tissue_fractions(shape, width=2.0, seed=2))
    data[block] = tissues.data
    nib.save(nib.Nifti1Image(data, img.affine, img.header), dwi)
    sidecar = Path(str(dwi).replace(".nii.gz", ".json"))
    content = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    content.update(LargeDelta=0.04, SmallDelta=0.02)
    sidecar.write_text(json.dumps(content, indent=2))


if __name__ == "__main__":
    sys.exit(warm_up(sys.argv[1:] or None))
