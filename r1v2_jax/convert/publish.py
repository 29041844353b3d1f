"""Publishing an output folder atomically.

Publishing (:func:`fresh_output_dir` + :func:`publish_dir`, used by every writer of an output
folder): the output is assembled in a hidden sibling ``.NAME.partial-PID-*`` and moved into
place only when complete. Replacing an existing folder (``overwrite``) swaps the two paths in
one system call (Linux ``renameat2(RENAME_EXCHANGE)``), so a SIGKILL at any moment leaves
``NAME`` holding the complete old or the complete new folder. Where the exchange is not
available (another OS, a file system without it) the fallback is two renames: the old folder
moves to ``.NAME.replaced-PID-*`` first, and if the process dies before the second rename the
next run puts it back before doing anything else. A symlinked ``NAME`` is refused before any
work; published folders get the umask's permissions (not ``mkdtemp``'s 0700); an unwritable or
full target is an :class:`OutputError` naming the path.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
import tempfile

log = logging.getLogger("r1v2_jax.convert")


class OutputError(ValueError):
    """An output folder cannot be written (a symlink, read-only, full): nothing was published."""


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> str:
    """The absolute ``out_dir``, after the checks that need no work: a symlink, a file, or (unless
    ``overwrite``) a non-empty folder there is refused."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.islink(out_dir):
        raise OutputError(
            f"{out_dir}: is a symbolic link (to {os.readlink(out_dir)!r}); refusing to replace it: "
            "give the link's target as the output folder instead"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    return out_dir


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _dead(name: str, prefix: str) -> bool:
    pid = name[len(prefix) :].split("-")[0]
    return pid.isdigit() and not _pid_alive(int(pid))


def recover_output_dir(out_dir: str) -> None:
    """Clean up after killed publishes of ``out_dir``: partial folders of dead processes are
    removed; an old copy set aside by the two-rename fallback is put back when ``out_dir`` is
    missing (the kill came between the renames), else removed."""
    parent, base = os.path.split(out_dir)
    if not os.path.isdir(parent):
        return
    partial, replaced = f".{base}.partial-", f".{base}.replaced-"
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(replaced) and _dead(name, replaced):
            if not os.path.lexists(out_dir):
                os.rename(path, out_dir)
                log.warning("%s: restored the previous copy from %s (a replacement was interrupted)", out_dir, name)
            else:
                shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(partial) and _dead(name, partial):
            shutil.rmtree(path, ignore_errors=True)


def fresh_output_dir(out_dir: str | os.PathLike, overwrite: bool) -> tuple[str, str]:
    """Check ``out_dir`` may be written and make a temporary sibling to assemble it in.

    Returns (out_dir, tmp_dir). A symlink is refused; a non-empty ``out_dir`` is refused unless
    ``overwrite``. Leftovers of earlier, killed runs for the same ``out_dir`` are recovered
    first (:func:`recover_output_dir`). The temporary folder has the umask's permissions.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_output_dir(out_dir, True)  # a symlink or a file: refused before touching anything
    try:
        recover_output_dir(out_dir)
        check_output_dir(out_dir, overwrite)
        parent, base = os.path.split(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{base}.partial-{os.getpid()}-", dir=parent)
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        raise OutputError(
            f"{out_dir}: cannot write the output folder ({e.strerror or e}); nothing was written"
        ) from None
    return out_dir, tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``, glibc >= 2.28).
    False when that is not available here (another OS, an old libc, a file system without it)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def publish_dir(tmp: str, out_dir: str) -> None:
    """Move a completed temporary folder into place, replacing ``out_dir`` if it exists: by an
    atomic exchange where available (then the old copy, now at ``tmp``, is deleted), else by
    the two-rename fallback described in the module docstring."""
    try:
        if not os.path.lexists(out_dir):
            os.rename(tmp, out_dir)
        elif exchange_paths(tmp, out_dir):
            shutil.rmtree(tmp)
        else:
            parent, base = os.path.split(out_dir)
            old = tempfile.mkdtemp(prefix=f".{base}.replaced-{os.getpid()}-", dir=parent)
            os.rmdir(old)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
    except OSError as e:
        raise OutputError(f"{out_dir}: cannot publish the output folder ({e.strerror or e})") from None
