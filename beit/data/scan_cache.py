"""The cached ImageFolder scan: the file list of a folder is kept in `~/.cache/beit/scan/` (or
`$BEIT_CACHE_DIR/scan/`), keyed by the modification times of the folder and its class folders, so a tree of
millions of files is listed once, not on every launch. Adding or removing a file changes its directory's
mtime and invalidates the list (a file added deeper than a class folder's own entries is not seen: delete
the cache file).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger("beit.data.extra")  # where cached_scan lived: the same logger name


def cache_dir() -> Path:
    return Path(os.environ.get("BEIT_CACHE_DIR", Path.home() / ".cache" / "beit")) / "scan"


def cached_scan(root: Path, scan: Callable[[Path], tuple[list[str], list[tuple[str, int]]]]):
    """`scan(root)` -> (classes, samples), reused while the mtimes of root and its class folders are unchanged."""
    root = Path(root).resolve()
    dirs = [root] + sorted(d for d in root.iterdir() if d.is_dir())
    key = "\t".join(f"{d.name}:{d.stat().st_mtime_ns}" for d in dirs)
    path = cache_dir() / (hashlib.sha1(str(root).encode()).hexdigest()[:16] + ".tsv.gz")
    try:
        with gzip.open(path, "rt") as f:
            if f.readline().rstrip("\n") == key:
                classes = f.readline().rstrip("\n").split("\t")
                samples = [(str(root / rel), int(lbl)) for lbl, rel in (line.rstrip("\n").split("\t", 1) for line in f)]
                return classes, samples
    except (OSError, ValueError, EOFError):
        pass  # no cache yet, or unreadable: rescan
    classes, samples = scan(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with gzip.open(tmp, "wt") as f:
            f.write(key + "\n" + "\t".join(classes) + "\n")
            f.writelines(f"{lbl}\t{os.path.relpath(p, root)}\n" for p, lbl in samples)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home is no reason to fail; the scan is still correct
        log.warning("could not cache the file list of %s in %s: %s", root, path, e)
    return classes, samples
