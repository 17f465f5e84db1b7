"""Output folders: checked before the work, reserved for the whole run, and put in place at the end without ever
replacing what someone else wrote there meanwhile.

The design, in three steps:

1. **Check** (`check_output_dir`, `check_writable`, `check_free_space`): before any work, refuse an output path
   that is a file (or lies under one), a folder on a read-only filesystem or one we cannot write into (a probe
   file is created and deleted, which also works for root, whom permission bits don't stop), a non-empty folder
   without `overwrite`, and a filesystem without room for what will be written.
2. **Reserve** (`reserve_output_dir`): the folder is created if missing (`os.mkdir` is atomic: of two racing
   processes exactly one creates it) and a lock file `.llmprune-lock` (pid, host, start time, a random token) is
   created in it with `O_CREAT | O_EXCL` (also atomic). A second run on the same folder finds the lock and
   refuses at once, naming the pid. The lock is removed when the run ends, whatever the outcome; a lock left by
   a killed run (its pid is gone) is never taken over silently: the message says which file to delete.
3. **Install** (`write_output_dir`): everything is written into a temporary sibling `.NAME.tmp-XXXX` (same
   filesystem), then swapped in: if the folder still holds our lock, `renameat2(RENAME_EXCHANGE)` swaps the two
   atomically and the old one (now at the temporary name) is deleted; so with `overwrite` there is always exactly
   one complete folder at the name, never both or neither. Without `renameat2` (not Linux, or a filesystem
   without it) the old folder is renamed aside, the new one renamed in with a no-replace rename, and the old one
   put back if that fails. If the folder lost our lock meanwhile (deleted and re-created by someone else), it is
   left alone and the finished result is kept beside it under a visible name given in the error. A no-replace
   rename is `renameat2(RENAME_NOREPLACE)`, else `os.mkdir(dst)` (which fails if anything is there) followed by
   renaming onto that empty folder of our own.

A full disk or an unwritable location while writing becomes one LLMPruneError line, and the temporary folder is
removed. `free_bytes` is the free-space function (tests replace it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import LLMPruneError

log = logging.getLogger(__name__)

LOCK_NAME = ".llmprune-lock"
SPACE_MARGIN = 0.05  # the estimate of a saved model is raised by 5 % ...
SPACE_SLACK = 32 * 2**20  # ... plus 32 MiB for the tokenizer, the record, the card and plots

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)}
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", -1)}


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes for an unprivileged writer on the filesystem holding `path` (an existing path)."""
    return shutil.disk_usage(path).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor."""
    p = Path(os.path.realpath(Path(path).expanduser()))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


# ---------------------------------------------------------------- 1. checks before the work

def check_writable(path: str | os.PathLike, what: str = "output folder", in_place: bool = True) -> Path:
    """Refuse a folder path that cannot be created or written: an existing file at `path`, a file where one of its
    parent folders should be, a read-only filesystem, or a location where a probe file can't be created. The probe
    goes where the files will be created: into the folder itself (or its nearest existing ancestor) when they are
    written `in_place`, else beside it, where a temporary sibling is made and renamed (`write_output_dir`; a
    probe inside would be seen by a run that is finishing there). Leaves nothing behind. Returns the path."""
    p = Path(path).expanduser()
    if os.path.lexists(p) and not p.is_dir():
        raise LLMPruneError(f"{what} {p} exists and is a file, not a folder")
    base = nearest_existing(p if in_place else Path(os.path.realpath(p)).parent)
    if not base.is_dir():
        raise LLMPruneError(f"{what} {p} cannot be created: {base} is a file, not a folder")
    try:
        readonly = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows): the probe decides
        readonly = False
    if readonly:
        raise LLMPruneError(f"{what} {p} is on a read-only filesystem ({base}); choose another location")
    try:
        fd, probe = tempfile.mkstemp(prefix=".llmprune-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LLMPruneError(f"{what} {p} is not writable: cannot create a file in {base} "
                            f"({e.strerror or type(e).__name__}); choose another location") from None
    return p


def check_free_space(path: str | os.PathLike, need: int | None, what: str = "the output") -> None:
    """Refuse when the filesystem that will hold `path` has less than `need` bytes (plus the margin) free.
    `need=None` (size unknown yet) checks nothing."""
    if need is None:
        return
    base = nearest_existing(path)
    want = int(need * (1 + SPACE_MARGIN)) + SPACE_SLACK
    free = free_bytes(base)
    if free < want:
        raise LLMPruneError(f"not enough free space for {what} in {Path(path).expanduser()}: it needs about "
                            f"{human_bytes(want)} ({human_bytes(need)} plus a margin) and {base} has "
                            f"{human_bytes(free)} free; free some space or choose another location")


def _read_lock(folder: Path) -> dict | None:
    """The lock's record, {} when it exists but can't be read yet, None when there is none."""
    f = folder / LOCK_NAME
    try:
        text = f.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _lock_message(folder: Path, info: dict) -> str:
    lock = folder / LOCK_NAME
    pid, host, since = info.get("pid"), info.get("host"), info.get("started")
    here = host in (None, socket.gethostname())
    when = f", started {since}" if since else ""
    if isinstance(pid, int) and here and not _pid_alive(pid):
        return (f"output folder {folder} holds the lock of an llmprune run that is no longer running (pid {pid}"
                f"{when}; killed?); delete {lock} (and the folder, if it holds nothing you need) and run again")
    who = f"pid {pid}" + ("" if here else f" on {host}") if pid is not None else "a run that is starting"
    return (f"output folder {folder} is being written by another llmprune run ({who}{when}); wait for it or "
            f"choose another output folder (if no such run is going, delete {lock})")


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output folder that can't be written (`check_writable`), one another llmprune run
    holds, and an existing non-empty one unless `overwrite`. Writes nothing (a probe file is created and deleted)."""
    p = check_writable(path, in_place=False)
    if p.is_dir():
        info = _read_lock(p)
        if info is not None:
            raise LLMPruneError(_lock_message(p, info))
        if not overwrite and any(p.iterdir()):
            raise LLMPruneError(f"output folder {p} exists and is not empty; pass --overwrite to replace it")
    return p


# ---------------------------------------------------------------- 2. the reservation

class OutputReservation:
    """A lock on an output folder, held from the start of a run to its end (see the module docstring).
    `release()` removes the lock, and the folders the reservation created if they are still empty; it is
    idempotent and also runs on leaving a `with` block."""

    def __init__(self, path: Path, token: str, created: list[Path], overwrite: bool):
        self.path, self.token, self.created, self.overwrite = path, token, created, overwrite
        self.released = False

    def holds(self) -> bool:
        """Whether `path` is still the folder we locked (its lock carries our token)."""
        info = _read_lock(self.path) if self.path.is_dir() else None
        return bool(info) and info.get("token") == self.token

    def foreign_entries(self) -> list[str]:
        """What else the folder holds besides our lock (files a user put there meanwhile, or the old contents)."""
        return sorted(e.name for e in self.path.iterdir() if e.name != LOCK_NAME) if self.path.is_dir() else []

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        if self.holds():
            with contextlib.suppress(OSError):
                (self.path / LOCK_NAME).unlink()
        for d in reversed(self.created):  # only folders we made, only while empty
            with contextlib.suppress(OSError):
                os.rmdir(d)

    def __enter__(self) -> OutputReservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reserve_output_dir(path: str | os.PathLike, overwrite: bool = False) -> OutputReservation:
    """Check `path` (`check_output_dir`), create it if missing and lock it for this run; refuse with one line when
    another run holds it or it has content (without `overwrite`). Use as `with reserve_output_dir(...) as r:`."""
    p = Path(os.path.realpath(check_output_dir(path, overwrite)))  # a symlinked folder: its target is locked
    created: list[Path] = []
    try:
        for d in [*reversed(p.parents), p]:
            if not os.path.lexists(d):
                try:
                    os.mkdir(d)
                    created.append(d)
                except FileExistsError:  # made meanwhile by someone else: not ours to remove later
                    pass
        if not p.is_dir():
            raise LLMPruneError(f"output folder {p} exists and is a file, not a folder")
        token = uuid.uuid4().hex
        try:
            fd = os.open(p / LOCK_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise LLMPruneError(_lock_message(p, _read_lock(p) or {})) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "token": token,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    except LLMPruneError:
        OutputReservation(p, "", created, overwrite).release()
        raise
    except OSError as e:
        OutputReservation(p, "", created, overwrite).release()
        raise LLMPruneError(f"output folder {p} is not writable ({e.strerror or type(e).__name__}); choose "
                            "another location") from None
    r = OutputReservation(p, token, created, overwrite)
    if not overwrite and r.foreign_entries():  # another run finished here between our check and our lock
        r.release()
        raise LLMPruneError(f"output folder {p} exists and is not empty; pass --overwrite to replace it")
    log.debug("reserved %s", p)
    return r


# ---------------------------------------------------------------- 3. no-replace rename and swap

def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False when the kernel, libc or filesystem lacks it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename the folder `src` to `dst`, failing with FileExistsError if anything is at `dst`, even something that
    appeared a moment ago: one of two processes racing for `dst` wins, the other fails, nothing is replaced."""
    src, dst = Path(src), Path(dst)
    try:
        if _rename2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise
    os.mkdir(dst)  # atomic claim: FileExistsError if anything is there
    try:
        os.rename(src, dst)  # onto our own empty folder; fails if someone put a file in it meanwhile
    except OSError as e:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "exists", str(dst)) from None
        raise


def swap_in(new: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Put the folder `new` at `out`, where a folder exists; return where the old folder now is (to delete).
    Atomic with renameat2(RENAME_EXCHANGE); otherwise old aside, new in (no-replace), old put back on failure."""
    new, out = Path(new), Path(out)
    if _rename2(new, out, _RENAME_EXCHANGE):
        return new
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        rename_noreplace(new, out)
    except BaseException:
        try:
            os.rename(old, out)
        except OSError:
            raise LLMPruneError(f"could not put the new folder in place at {out}; the old one is at {old} and "
                                f"the new one at {new}") from None
        raise
    return old


# ---------------------------------------------------------------- writing an output folder

def is_disk_full(e: BaseException) -> bool:
    """A full disk or quota, as an OSError or as a library's error that wraps one (safetensors' 'os error 28')."""
    cur, seen = e, 0
    while cur is not None and seen < 10:
        if isinstance(cur, OSError) and cur.errno in _FULL:
            return True
        text = str(cur)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        cur, seen = cur.__cause__ or cur.__context__, seen + 1
    return False


def _write_error(e: BaseException, out: Path, where: Path) -> LLMPruneError | None:
    """The one-line error for an environment failure while writing `out`, or None for anything else."""
    if is_disk_full(e):
        base = nearest_existing(where)
        try:
            free = f"; {human_bytes(free_bytes(base))} free on {base} now"
        except OSError:
            free = ""
        return LLMPruneError(f"the disk filled up while writing {out}{free}; nothing was saved (the partial files "
                             "were removed): free some space or choose another location")
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LLMPruneError(f"cannot write {out}: {e.strerror}; nothing was saved")
    return None


@contextlib.contextmanager
def output_errors(out: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk or an unwritable location while writing `out` into one LLMPruneError line."""
    try:
        yield
    except LLMPruneError:
        raise
    except Exception as e:  # noqa: BLE001 - only environment failures are translated, the rest re-raised
        err = _write_error(e, Path(out), Path(out))
        if err is None:
            raise
        raise err from None


def _install(tmp: Path, r: OutputReservation) -> Path:
    """The final step: put the finished `tmp` at `r.path`, never replacing a folder that isn't ours."""
    out = r.path

    def keep(why: str) -> LLMPruneError:
        kept = out.parent / f"{out.name}.unsaved-{uuid.uuid4().hex[:6]}"
        try:
            rename_noreplace(tmp, kept)
        except OSError:
            kept = tmp
        return LLMPruneError(f"{why}; it was left as it is, and this run's finished output is in {kept}")

    if r.holds():
        extra = r.foreign_entries()
        if extra and not r.overwrite:
            raise keep(f"files appeared in output folder {out} while this run worked ({', '.join(extra[:3])}"
                       f"{', ...' if len(extra) > 3 else ''})")
        old = swap_in(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.lexists(old):
            log.warning("the previous contents of %s could not all be deleted; they are in %s", out, old)
        return out
    if os.path.lexists(out):
        raise keep(f"output folder {out} was replaced by someone else while this run worked (its llmprune lock "
                   "is gone)")
    try:
        rename_noreplace(tmp, out)
    except FileExistsError:
        raise keep(f"output folder {out} appeared while this run worked") from None
    return out


def check_results_free(folder: str | os.PathLike, names, overwrite: bool = False) -> None:
    """Refuse, before any work, to write result files `names` into `folder` where a run holds its lock, or, unless
    `overwrite`, where such a file already stands (an earlier evaluation, or the model's own results.json that
    `push` would upload). One line each."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return
    if (folder / LOCK_NAME).exists():
        raise LLMPruneError(f"output folder {folder} is being written by another llmprune run "
                            f"({LOCK_NAME} is there); wait for it or choose another --output-dir")
    there = [n for n in names if (folder / n).exists()]
    if there and not overwrite:
        raise LLMPruneError(f"{folder} already holds {', '.join(there)} from an earlier run; pass --overwrite to "
                            "replace it or choose another --output-dir")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write one text file atomically: into a temporary file beside `path`, flushed to disk, then renamed over it
    (os.replace), so readers see the old file or the new one, never half of one, and a hard-linked original is
    replaced, never written through. Nothing is left behind on failure. Returns the path."""
    p = Path(path)
    tmp = p.parent / f".{p.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_output_dir(out_dir: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False,
                     reservation: OutputReservation | None = None, need: int | None = None,
                     what: str = "the output") -> Path:
    """Write a whole output folder atomically: `write(tmp)` fills a temporary sibling folder, which then takes
    the place of `out_dir` (see the module docstring). `reservation`: the lock taken at the start of the run
    (else one is taken now and released at the end). `need`: bytes expected, checked against the free space
    first. A failure leaves `out_dir` as it was and no temporary folder; a full disk is one LLMPruneError line."""
    own = reservation is None
    r = reservation if reservation is not None else reserve_output_dir(out_dir, overwrite)
    try:
        out = r.path
        if Path(os.path.realpath(Path(out_dir).expanduser())) != out:
            raise ValueError(f"the reservation is for {out}, not {out_dir}")
        check_free_space(out, need, what)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            os.mkdir(tmp)
            write(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            err = None if isinstance(e, LLMPruneError) else _write_error(e, out, out.parent)
            if err is None:
                raise
            raise err from None
        try:
            return _install(tmp, r)
        except LLMPruneError:
            raise
        except OSError as e:
            if tmp.exists():
                raise LLMPruneError(f"could not put {out} in place ({e.strerror or type(e).__name__}); this run's "
                                    f"finished output is in {tmp}") from None
            raise
    finally:
        if own:
            r.release()


__all__ = ["check_output_dir", "check_writable", "check_free_space", "reserve_output_dir", "OutputReservation",
           "write_output_dir", "check_results_free", "write_text_atomic", "rename_noreplace", "swap_in",
           "output_errors", "free_bytes", "is_disk_full", "LOCK_NAME"]
