"""The hostile-input catalogue: its index, and a guard that it only grows.

The cases live beside the code they attack, one module per area:

- ``test_hostile_core.py``      FusedTransform / Layer / apply: shapes, dtypes, threads, torch views
- ``test_hostile_convert.py``   ``bc-fast convert``: overwrite, journals, sidecars, kills, bad tables
- ``test_hostile_registry.py``  registries: symlinks, planted pickles, malformed safetensors, kills, races
- ``test_hostile_index.py``     legacy indexes: edited sidecars, damaged index files, bad queries

Each case feeds one bad or hostile input and asserts a clear error (naming the file or argument) or a
correct recovery, and that nothing was left half-written. ``tests/test_fuzz.py`` adds bounded
random mutations of the same parsers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
AREAS = ("core", "convert", "registry", "index")
# Cases per area when the catalogue was last extended; raise these when adding cases, never lower them.
FLOOR = {"core": 92, "convert": 64, "registry": 64, "index": 106}


def _collected(module: Path) -> int:
    # cwd=tests/: no bc_fast/ source folder there to shadow the installed package.
    res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(module)], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return sum(1 for line in res.stdout.splitlines() if "::" in line)


def test_catalogue_only_grows() -> None:
    counts = {area: _collected(HERE / f"test_hostile_{area}.py") for area in AREAS}
    shrunk = {a: (counts[a], FLOOR[a]) for a in AREAS if counts[a] < FLOOR[a]}
    assert not shrunk, f"hostile cases were removed (area: (now, floor)): {shrunk}"
    assert sum(counts.values()) >= 326
