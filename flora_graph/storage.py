"""Files on disk: the one commit protocol for every artifact, name checks, no-follow reads.

**Single files** (:func:`atomic_file`, :func:`atomic_write_bytes`): the bytes go to a temporary
``.NAME.tmp-<hex>`` beside the destination, are fsynced, and one ``rename`` puts them in place
(the directory is fsynced after it). A reader sees the old file or the new one.

**Folders** (:func:`staged_folder`: a saved graph, a PEFT adapter folder, a Triton model
entry): every file is written into a fresh sibling ``.NAME.tmp-<hex>``, fsynced with its
folders, and the whole folder is committed in one step:

1. ``rename(staging, NAME)``: when ``NAME`` is absent or an empty folder, that is the commit;
2. otherwise the entries of the old folder that the artifact does not write (a README beside a
   PEFT adapter, the other versions of a Triton model), but those the artifact claims as its own
   (``owns``: an optional file this version leaves out), are hard-linked into the staging folder,
   and ``renameat2(staging, NAME, RENAME_EXCHANGE)`` swaps the two folders atomically; the old
   one, now under the temporary name, is removed;
3. where the filesystem has no exchange (``EINVAL``/``ENOSYS``, or not Linux): two renames,
   ``NAME -> .NAME.old-<hex>`` then ``staging -> NAME``. A kill between them leaves the old
   artifact whole under ``.NAME.old-<hex>``; the next write to ``NAME`` puts it back first;
4. where ``NAME`` cannot be renamed at all (a mount point: staged inside it; or ``EBUSY``/
   ``EXDEV``), or holds too many other entries to carry over, the artifact's own entries are
   renamed in one by one from a staging folder inside ``NAME`` (the old entries it claims and does
   not write removed first), the ``last`` one (the file that describes the others) last. Only this
   case can show a mix.

**ONNX with external data** (:mod:`flora_graph.runtimes.onnx_writer`): the model file is the
single commit point. Its data file gets a name the model now at the destination does not read
(``<model>.data``, else ``<model>.<hex>.data``), is written and renamed in first, and only then
is the model file renamed into place; data files of the family that the committed model does
not read are removed after it.

**Leftovers.** A killed writer leaves only hidden ``.NAME.tmp-<hex>`` / ``.NAME.old-<hex>``
entries (and, for ONNX, an unread data file). Readers never open them (they read fixed names);
the next write to the same destination removes them. A writer holds an ``flock`` on its
temporary file or folder while it works, so a concurrent writer never removes a live one.

**Faults.** Every ``OSError`` of a writer (``ENOSPC``, ``EROFS``, ``EACCES``, ...) is raised as
:class:`~flora_graph.errors.ArtifactWriteError` naming the destination; the temporary entries
and any parent folder the write created are removed, so a failed write leaves the destination
as it was. Tests inject faults through :data:`_fault_hook`, called with a label at every
commit boundary (``file:written``, ``file:committed``, ``folder:staged``, ...).

**Names.** :func:`check_name` is the one check for a name that becomes a path (graph, model,
adapter and weight names): one plain component, nothing else. :func:`read_regular` reads a
file without following a symlink and refuses anything but a regular file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from flora_graph.errors import ArtifactWriteError, UnsafeNameError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_file",
    "atomic_write_bytes",
    "atomic_write_figure",
    "boundary",
    "check_name",
    "fsync_dir",
    "new_file",
    "parents",
    "read_regular",
    "remove_leftovers",
    "staged_folder",
    "write_new",
    "writing",
]

_fault_hook: Callable[[str], None] | None = None
"""Tests set this to a callable that gets a label at every commit boundary (and may raise or exit)."""

MAX_NAME_BYTES = 255  # the usual file-name limit (ext4, xfs, tmpfs)
CARRY_LIMIT = 10_000  # entries of an old folder carried into a new one; past it, commit in place
_TOKEN = r"[0-9a-f]{12}"


def boundary(label: str) -> None:
    """A commit boundary: call :data:`_fault_hook` with ``label`` (a no-op unless a test set it)."""
    if _fault_hook is not None:
        _fault_hook(label)


def _token() -> str:
    return secrets.token_hex(6)


# ------------------------------------------------------------------ names
def check_name(name: object, what: str, *, error: type[Exception] = UnsafeNameError) -> str:
    """``name`` if it is one plain path component, else raise ``error`` naming ``what`` and the reason.

    Refused: a non-string, empty, ``.``/``..``, a ``/`` or ``\\`` separator (so no absolute
    path), NUL or another control character, more than 255 bytes in UTF-8 (and ``:`` on Windows).
    """
    reason = None
    if not isinstance(name, str):
        reason = f"a {type(name).__name__}, not a string"
    elif not name:
        reason = "empty"
    elif name in (".", ".."):
        reason = "a reference to a folder"
    elif "/" in name or "\\" in name:
        reason = "it holds a path separator"
    elif os.name == "nt" and ":" in name:  # pragma: no cover - a drive path or a stream
        reason = "it holds ':'"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        reason = "it holds a control character"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        reason = f"longer than {MAX_NAME_BYTES} bytes"
    if reason is not None:
        raise error(f"{what} {name!r} is not a plain directory name or file name (one path component): {reason}")
    return name  # type: ignore[return-value]


# ------------------------------------------------------------------ reading
def read_regular(path: str | Path) -> bytes:
    """The bytes of regular file ``path``, refusing a symlink (not followed) or a FIFO/device (never blocks).

    Raises ``OSError`` naming the path.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        if not hasattr(os, "O_NOFOLLOW") and path.is_symlink():  # pragma: no cover - not POSIX
            raise OSError(errno.ELOOP, "")
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise OSError(errno.ELOOP, "is a symbolic link, which is not followed", str(path)) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


# ------------------------------------------------------------------ faults -> typed errors
def _wrap(exc: OSError, path: Path, what: str) -> ArtifactWriteError:
    err = ArtifactWriteError(f"cannot write {what} to {str(path)!r}: {exc.strerror or exc}")
    err.errno, err.strerror, err.filename = exc.errno, exc.strerror, str(path)
    return err


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest last."""
    missing = []
    p = folder
    while not os.path.lexists(p) and p.parent != p:
        missing.append(p)
        p = p.parent
    created = []
    try:
        for d in reversed(missing):
            os.mkdir(d)
            created.append(d)
    except FileExistsError:
        if not folder.is_dir():
            _remove_created(created)
            raise
    except OSError:
        _remove_created(created)
        raise
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            os.rmdir(d)
        except OSError:
            break


@contextlib.contextmanager
def parents(folder: str | Path) -> Iterator[None]:
    """Create ``folder`` (and missing parents) for the block; remove the ones created if it fails."""
    created = _make_dirs(Path(os.path.abspath(folder)))
    try:
        yield
    except BaseException:
        _remove_created(created)
        raise


@contextlib.contextmanager
def writing(path: str | Path, what: str) -> Iterator[None]:
    """Raise an ``OSError`` of the block as :class:`ArtifactWriteError` naming ``path`` and ``what``."""
    try:
        yield
    except ArtifactWriteError:
        raise
    except OSError as exc:
        raise _wrap(exc, Path(path), what) from exc


# ------------------------------------------------------------------ durability, locks
def fsync_dir(folder: str | Path) -> None:
    """fsync a folder so the renames in it are durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path, names: Iterable[str]) -> None:
    """fsync every file and folder under ``root/name`` for ``names``, then ``root`` itself."""
    for name in names:
        top = root / name
        if top.is_symlink() or not top.is_dir():
            if top.is_file() and not top.is_symlink():
                _fsync_file(top)
            continue
        for folder, _dirs, files in os.walk(top, topdown=False):
            for f in files:
                p = Path(folder) / f
                if not p.is_symlink():
                    _fsync_file(p)
            fsync_dir(folder)
    fsync_dir(root)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold(fd: int) -> None:
    """Mark a temporary file or folder as in use: an exclusive ``flock`` released when ``fd`` closes."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _abandoned(path: Path) -> bool:
    """Whether no live writer holds ``path`` (a leftover of a killed or failed write)."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # a symlink or something unreadable under a temporary name: not a live writer's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _remove(path: Path) -> None:
    """Remove a file or folder, best effort (a read-only or vanished entry is left alone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_leftovers(parent: str | Path, name: str, extra: re.Pattern[str] | None = None) -> None:
    """Remove what interrupted writes of ``parent/name`` left: ``.name.tmp-*`` (and the older
    ``.name.XXXXXXXX.tmp``) nobody holds, and ``.name.old-*``, which is first renamed back to
    ``name`` when ``name`` is missing (a kill between the two renames of the fallback swap).
    ``extra`` matches further names of the artifact's own leftovers."""
    parent = Path(parent)
    pattern = re.compile(rf"\.{re.escape(name)}\.(?:(tmp|old)-{_TOKEN}|[a-z0-9_]{{8}}\.tmp)")
    olds: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        p = parent / entry.name
        if m is not None and m.group(1) == "old":
            olds.append(p)
        elif (m is not None or (extra is not None and extra.fullmatch(entry.name))) and _abandoned(p):
            _remove(p)
    if olds:
        olds.sort(key=lambda p: p.lstat().st_mtime_ns)
        dest = parent / name
        if not os.path.lexists(dest):
            os.replace(olds.pop(), dest)
            fsync_dir(parent)
        for p in olds:
            _remove(p)


# ------------------------------------------------------------------ single files
@contextlib.contextmanager
def atomic_file(path: str | Path, *, what: str = "file",
                before_commit: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """A binary file that appears at ``path`` (fsynced, mode 0644) only when the block succeeds.

    The block writes a temporary ``.NAME.tmp-<hex>`` beside ``path``; ``before_commit(tmp)``
    may check it; one rename puts it in place. On any failure the temporary file (and any
    parent folder this call created) is removed and ``path`` is left as it was; an ``OSError``
    is raised as :class:`ArtifactWriteError` naming ``path``.
    """
    path = Path(os.path.abspath(path))
    created: list[Path] = []
    tmp: Path | None = None
    try:
        created = _make_dirs(path.parent)
        remove_leftovers(path.parent, path.name)
        tmp = path.parent / f".{path.name}.tmp-{_token()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        with os.fdopen(fd, "wb") as f:
            _hold(f.fileno())
            os.fchmod(f.fileno(), 0o644)  # whatever the umask: a serving user must read it
            yield f
            f.flush()
            os.fsync(f.fileno())
            if before_commit is not None:
                before_commit(tmp)
            boundary("file:written")
            os.replace(tmp, path)
        tmp = None
        boundary("file:committed")
        fsync_dir(path.parent)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        _remove_created(created)
        if isinstance(exc, OSError) and not isinstance(exc, ArtifactWriteError):
            raise _wrap(exc, path, what) from exc
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + rename."""
    with atomic_file(path, what=what) as f:
        f.write(data)


def atomic_write_figure(path: str | Path, fig: Any, *, fmt: str = "png", what: str = "figure") -> None:
    """Save the matplotlib figure ``fig`` to ``path`` (``fmt``, 110 dpi) as :func:`atomic_file` commits
    a file, then close it."""
    import matplotlib.pyplot as plt  # the caller made fig with it: no import cost here

    try:
        with atomic_file(path, what=what) as f:
            fig.savefig(f, format=fmt, dpi=110)
    finally:
        plt.close(fig)


@contextlib.contextmanager
def new_file(path: str | Path) -> Iterator[BinaryIO]:
    """A new file (it must not exist: for a staging folder), mode 0644, fsynced when the block ends."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)
        yield f
        f.flush()
        os.fsync(f.fileno())
    boundary("file:new")


def write_new(path: str | Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` (see :func:`new_file`)."""
    with new_file(path) as f:
        f.write(data)


# ------------------------------------------------------------------ folders
def _exchange(a: Path, b: Path) -> None:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ENOSYS where there is none."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(b))


_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, getattr(errno, "ENOTSUP", errno.EINVAL), errno.EOPNOTSUPP}
_NOT_RENAMABLE = {errno.EBUSY, errno.EXDEV}


def _destination(dest: str | Path, what: str) -> Path:
    p = Path(os.path.abspath(dest))
    if p.is_symlink():  # the user's choice of folder: write into its target
        p = Path(os.path.realpath(p))
    if os.path.lexists(p) and not p.is_dir():
        raise ArtifactWriteError(f"cannot write {what} to {str(p)!r}: it exists and is not a directory")
    return p


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def _carry(dest: Path, staging: Path, own: set[str], owns: Callable[[str], bool] | None = None) -> bool:
    """Hard-link the entries of ``dest`` the new artifact does not write into ``staging``, but those
    ``owns`` claims (the artifact's own names that this version leaves out: they go with the old one).

    Returns False (nothing carried) when they are too many or another filesystem is mounted
    among them; the caller then commits in place.
    """
    leftover = re.compile(rf"\.({'|'.join(re.escape(n) for n in own)})\.(?:tmp-{_TOKEN}|[a-z0-9_]{{8}}\.tmp)") if own else None
    todo = [e for e in os.scandir(dest) if e.name not in own and not (leftover and leftover.fullmatch(e.name))
            and not (owns and owns(e.name))]
    device, count = dest.stat().st_dev, 0
    for e in todo:
        st = e.stat(follow_symlinks=False)
        count += 1
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != device:
                return False
            for folder, dirs, files in os.walk(e.path):
                count += len(dirs) + len(files)
                if count > CARRY_LIMIT or any(os.lstat(os.path.join(folder, d)).st_dev != device for d in dirs):
                    return False
        if count > CARRY_LIMIT:
            return False
    for e in todo:
        if e.is_dir(follow_symlinks=False):
            shutil.copytree(e.path, staging / e.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(e.path, str(staging / e.name))
    return True


def _commit_in_place(staging: Path, dest: Path, own: list[str], owns: Callable[[str], bool] | None = None) -> None:
    """Rename the artifact's entries into ``dest`` one by one (``own`` in order); not atomic. The entries
    of ``dest`` that ``owns`` claims and this version does not write are removed first.

    A staging folder outside ``dest`` is first copied into it (renames do not cross mounts).
    """
    if staging.parent != dest:
        inner = dest / f".{dest.name}.tmp-{_token()}"
        try:
            shutil.copytree(staging, inner, symlinks=True)
            _fsync_tree(inner, own)
            _commit_in_place(inner, dest, own, owns)
        finally:
            _remove(inner)
        return
    if owns is not None:
        for e in list(os.scandir(dest)):
            if e.name not in own and not e.name.startswith(".") and owns(e.name):
                _remove(Path(e.path))
                boundary("folder:dropped")
    for name in own:
        src, dst = staging / name, dest / name
        if src.is_dir() and dst.is_dir() and not dst.is_symlink():
            try:
                _exchange(src, dst)
            except OSError:
                shutil.rmtree(dst)
                os.replace(src, dst)
        else:
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            os.replace(src, dst)
        boundary("folder:in-place")
    fsync_dir(dest)


def _swap_by_two_renames(staging: Path, dest: Path) -> None:
    old = dest.parent / f".{dest.name}.old-{_token()}"
    os.replace(dest, old)
    boundary("folder:moved-old")
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    os.replace(old, staging)  # the caller removes the old artifact from there


def _commit_folder(staging: Path, dest: Path, own: list[str], owns: Callable[[str], bool] | None = None) -> None:
    """Make ``staging`` the folder ``dest`` (see the module's docstring, steps 1-4)."""
    try:
        os.replace(staging, dest)  # dest absent or an empty folder
        return
    except OSError as exc:
        if exc.errno in _NOT_RENAMABLE:
            _commit_in_place(staging, dest, own, owns)
            return
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not _carry(dest, staging, set(own), owns):
        _commit_in_place(staging, dest, own, owns)
        return
    fsync_dir(staging)
    boundary("folder:carried")
    try:
        _exchange(staging, dest)
    except OSError as exc:
        if exc.errno in _NOT_RENAMABLE:
            _commit_in_place(staging, dest, own, owns)
            return
        if exc.errno not in _NO_EXCHANGE:
            raise
        _swap_by_two_renames(staging, dest)


@contextlib.contextmanager
def staged_folder(dest: str | Path, *, what: str = "folder", last: str | None = None,
                  owns: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A fresh empty staging folder for the artifact at ``dest``; committed as ``dest`` when the block succeeds.

    Write every file of the artifact into the yielded folder (:func:`write_new`,
    :func:`new_file`, or any writer). At the end of the block they are fsynced and the folder
    is committed as described in the module docstring; entries of an existing ``dest`` that
    the artifact does not write are kept, but those whose names ``owns`` claims: names an artifact of
    this kind writes in some versions and not in others (a package's optional model, its adapters
    folder), which would otherwise pair an old file with the new artifact. ``last`` names the entry renamed last in the
    (non-atomic) in-place case. On failure nothing at ``dest`` changes, the staging folder and
    any parent folder this call created are removed, and an ``OSError`` is raised as
    :class:`ArtifactWriteError` naming ``dest``.
    """
    dest = _destination(dest, what)
    if dest.parent == dest:
        raise ArtifactWriteError(f"cannot write {what} as the root folder {str(dest)!r}")
    parent = dest.parent
    inside = os.path.ismount(dest)  # a mount point cannot be renamed: stage inside it, commit in place
    created: list[Path] = []
    staging: Path | None = None
    fd: int | None = None
    committed = False
    cwd = _cwd_under(dest)
    try:
        created = _make_dirs(parent)
        remove_leftovers(parent, dest.name)
        if dest.is_dir():  # an in-place commit stages inside the folder
            remove_leftovers(dest, dest.name)
        name = (dest if inside else parent) / f".{dest.name}.tmp-{_token()}"
        os.mkdir(name)
        staging = name
        fd = os.open(staging, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        _hold(fd)
        yield staging
        own = sorted(os.listdir(staging), key=lambda n: (n == last, n))
        _fsync_tree(staging, own)
        boundary("folder:staged")
        if inside:
            _commit_in_place(staging, dest, own, owns)
        else:
            _commit_folder(staging, dest, own, owns)
        committed = True
        fsync_dir(parent)
        boundary("folder:committed")
        if cwd is not None:  # the process worked inside the old folder: follow the path to the new one
            with contextlib.suppress(OSError):
                os.chdir(cwd)
        _remove(staging)  # the old artifact after an exchange; nothing after a plain rename
        boundary("folder:cleaned")
    except BaseException as exc:
        if staging is not None and not committed:
            _remove(staging)
        if not committed:
            _remove_created(created)
        if isinstance(exc, OSError) and not isinstance(exc, ArtifactWriteError):
            raise _wrap(exc, dest, what) from exc
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _cwd_under(dest: Path) -> str | None:
    try:
        cwd = os.getcwd()
    except OSError:
        return None
    d = str(dest)
    return cwd if cwd == d or cwd.startswith(d.rstrip(os.sep) + os.sep) else None
