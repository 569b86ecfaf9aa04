"""Run directories and training checkpoints: atomic writes, keep-last-N, exact resume.

A checkpoint is a plain dict loadable with `torch.load(weights_only=True)`:
`{"format_version", "model", "optimizer", "scaler", "step", "rng", "config", ...}`, with the *unwrapped*
model's state dict (no `module.` / `_orig_mod.` prefixes) so any loader can read it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import logging
import os
import random
import shutil
from pathlib import Path

import torch

from beit.convert.runs import list_checkpoints

log = logging.getLogger("beit")
FORMAT_VERSION = 1


class RunDirError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ run lock
# A run directory belongs to one process at a time: an advisory flock on `<out_dir>/.<run_name>.lock` (beside
# the directory, so --overwrite's delete cannot remove it), holding the owner's pid. The kernel drops the lock
# when its process dies however it dies, so a lock file left by a killed run blocks nothing.
_HELD: dict[str, int] = {}  # lock file -> descriptor this process holds it with


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir).parent / f".{Path(run_dir).name}.lock"


def _pid_in(path: Path) -> str:
    try:
        return path.read_text().strip() or "?"
    except OSError:
        return "?"


def _in_use(run_dir: Path, pid: str) -> RunDirError:
    return RunDirError(f"run directory '{run_dir}' is in use by process {pid} (lock {lock_path(run_dir)}); wait for "
                       f"it to finish or stop it (kill {pid}), then rerun; --resume and --overwrite wait too")


def lock_holder(run_dir: Path) -> str | None:
    """The pid of another live process that holds `run_dir`'s lock, else None. Takes nothing."""
    path = lock_path(run_dir)
    if str(path) in _HELD:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails only while a holder has it exclusively
        return None
    except BlockingIOError:
        return _pid_in(path)
    finally:
        os.close(fd)  # also drops the probe's shared lock


def acquire_run_lock(run_dir: Path) -> bool:
    """Take `run_dir`'s lock for this process (held until `release_run_locks` or exit), or raise RunDirError
    naming the holder's pid. Returns False if this process already held it."""
    path = lock_path(run_dir)
    if str(path) in _HELD:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(run_dir, _pid_in(path)) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # its last holder removed the file while we waited: lock the current one
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD[str(path)] = fd
    return True


def release_run_locks(only: Path | None = None):
    """Drop this process's run-directory locks (all, or `only`'s), removing their files."""
    for key in [k for k in _HELD if only is None or k == str(lock_path(only))]:
        fd = _HELD.pop(key)
        try:
            if os.fstat(fd).st_ino == os.stat(key).st_ino:
                os.unlink(key)  # while still locked: a waiting process then retries on a fresh file
        except OSError:
            pass
        os.close(fd)


atexit.register(release_run_locks)


def check_run_dir(path: Path, resume: bool, overwrite: bool):
    """Never clobber a run: an existing non-empty directory needs --resume or --overwrite, and one another
    live process holds (its lock) is refused whatever the flags. Touches nothing."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite are mutually exclusive")
    holder = lock_holder(path)
    if holder is not None:
        raise _in_use(path, holder)
    exists = path.exists() and any(path.iterdir())
    if exists and not (resume or overwrite):
        raise RunDirError(
            f"run directory '{path}' already exists; pass --resume to continue it, --overwrite to replace "
            f"it, or choose another train.run_name / train.out_dir"
        )
    if resume and not exists:
        raise RunDirError(f"--resume given but '{path}' holds no run to resume")


def prepare_run_dir(path: Path, resume: bool, overwrite: bool) -> Path:
    """Lock the run directory for this process, check it (`check_run_dir`), then create or replace it. The
    lock makes the check and the creation one step: of two processes starting the same run, one is refused."""
    taken = acquire_run_lock(path)
    try:
        check_run_dir(path, resume, overwrite)
        if overwrite and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
    except BaseException:
        if taken:
            release_run_locks(path)
        raise
    return path


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the earlier files are untouched."""


def atomic_save(obj: dict, path: Path):
    """Write to a temp file in the same directory, fsync, rename, fsync the directory: a crash or a failed
    write never leaves a half file, and a failed write leaves no temp file either."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, e) from None
    _fsync_dir(path.parent)  # the rename itself is durable only once the directory entry is


def write_failure_reason(e: BaseException, path: Path) -> str:
    """Why a write failed, in words: a full disk is said as such (torch.save reports it as RuntimeError
    "[enforce fail at inline_container.cc:...] unexpected pos ..."; plain writes as ENOSPC)."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in text or "No space left" in text:
        return f"disk full: no space left on the device holding '{path.parent}'"
    if getattr(e, "errno", None) == errno.EFBIG or "File too large" in text:
        return "file too large: it exceeds the file-size limit (ulimit -f) or the filesystem's"
    if getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"no permission to write in '{path.parent}' ({e.strerror})"
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _write_failed(path: Path, e: BaseException) -> CheckpointWriteError:
    earlier = [p for p in list_checkpoints(path.parent) if p != path]
    fix = "Free disk space or fix permissions"
    if earlier:
        then = (f"earlier checkpoints in '{path.parent}' are intact (newest {earlier[-1].name}). {fix}, then rerun "
                f"with --resume")
    else:
        then = f"no checkpoint of this run was written before it. {fix}, then rerun the same command"
    return CheckpointWriteError(f"could not write '{path}': {write_failure_reason(e, path)}; {then}")


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_checkpoint(run_dir: Path, state: dict, step: int, keep_last: int) -> Path:
    path = run_dir / f"ckpt-{step:08d}.pt"
    atomic_save({"format_version": FORMAT_VERSION, "step": step, **state}, path)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        old.unlink()
    return path


def stored_global_batch(run_dir: Path) -> int | None:
    """The global batch of the newest readable checkpoint, the one a resume continues from (see
    `load_latest_intact`); None if unknown. Memory-mapped: reads no tensors."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, mmap=True, weights_only=True).get("global_batch")
        except Exception:  # corrupt or foreign: passed over here as on resume, which reports it
            continue
    return None


def load_training_checkpoint(path: Path, map_location="cpu") -> dict:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt or foreign file; torch's own text suggests unpickling: not ours
        raise RunDirError(f"cannot read checkpoint '{path}': truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise RunDirError(f"'{path}' is not a beit training checkpoint (format_version {FORMAT_VERSION})")
    return ckpt


def load_latest_intact(run_dir: Path) -> tuple[Path, dict]:
    """The newest readable training checkpoint of `run_dir`. A truncated or corrupt newer one is passed over
    with a warning naming both files; none readable is an error naming them all."""
    found = list_checkpoints(run_dir)
    if not found:
        raise RunDirError(f"--resume: no ckpt-*.pt in '{run_dir}'")
    bad = []
    for path in reversed(found):
        try:
            state = load_training_checkpoint(path)
        except RunDirError as e:
            bad.append((path, e))
            continue
        for b, e in bad:
            log.warning(f"checkpoint {b} is unreadable ({e}); resuming from the newest intact one, {path}")
        return path, state
    raise RunDirError(f"--resume: no intact checkpoint in '{run_dir}': " + "; ".join(str(e) for _, e in bad))


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
