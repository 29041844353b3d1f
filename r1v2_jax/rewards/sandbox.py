"""Run untrusted Python programs against tests: one bounded subprocess per program run.

:class:`CodeRunner` runs a program on each test of a problem, in order, stopping at the first
failure (as LiveCodeBench does), and returns one :class:`CodeResult` with a verdict:

``passed`` / ``wrong_answer`` / ``runtime_error`` / ``timeout`` / ``memory`` /
``output_limit`` / ``killed``

(``killed``: the sandbox stopped the program for a forbidden operation, or it died of a signal
nobody asked for). Verdicts are counted in ``CodeRunner.counts``. Two test forms, as in
LiveCodeBench (``lcb_runner/evaluation/testing_util.py``):

* **stdin/stdout**: the program runs as ``__main__`` with the test input as its stdin; its
  stdout is compared with the expected output line by line after stripping (the whole text,
  then each line), a line matching when equal or when both are lists of equal decimals.
* **functional** (``fn_name`` given): the program is executed, ``Solution().fn_name`` (or a
  module-level ``fn_name`` when there is no ``class Solution``) is called with the test input's
  lines JSON-decoded as positional arguments, and the JSON of its result (tuples as lists) is
  compared with the JSON-decoded expected output, in the parent: nothing the program does can
  change the comparison.

Both forms prepend LiveCodeBench's ``import_string`` (``from math import *`` ...,
``sys.setrecursionlimit(50000)``), so programs that rely on it behave as there.

What bounds a run (:class:`SandboxLimits`):

* a fresh temporary directory per run, as cwd, ``HOME`` and ``TMPDIR``; removed afterwards;
* ``python -I -B`` (no user site, no ``PYTHON*`` variables, no .pyc written) with a minimal
  environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``, ``OMP_NUM_THREADS=1``);
* rlimits set by the child's first statements, before any program code runs (not in a
  ``preexec_fn``, which is unsafe in a parent holding threads, as one holding JAX does): CPU
  seconds (``RLIMIT_CPU``), address space (``RLIMIT_AS``), size of any file written
  (``RLIMIT_FSIZE``), open files, no core dumps, and processes/threads (``RLIMIT_NPROC``, only
  when the run is under its own uid, see below: the limit counts all processes of a uid, so
  under the caller's uid it would fail or starve the caller's other work);
* a wall-clock limit enforced by the parent; the child is a session leader and its whole
  process group is SIGKILLed at the deadline; a per-problem wall bound on top;
* stdout and stderr read by the parent in chunks up to ``output_bytes`` each (a program that
  writes more is killed: ``output_limit``); nothing unbounded is read into memory.

What is isolated, and how well:

* **Other users' files and processes** (when the caller is root, the default on our
  machines): the run is under uid/gid ``nobody`` (65534) with no supplementary groups, so it
  cannot read root's 0600/0700 files, signal the caller's processes, or exceed
  ``RLIMIT_NPROC`` processes+threads (shared by concurrent runs). Not root: the run keeps the
  caller's uid (no uid drop is possible without privileges) and ``RLIMIT_NPROC`` is not set.
* **Network**: when ``unshare`` works here (probed once), the run is in a new network
  namespace: no interface but a down loopback, so no connection can be made at all. Always,
  in addition: the audit hook below ends the program on any socket creation, connect, bind or
  name lookup.
* **An audit hook** (``sys.addaudithook``, installed before the program runs, cannot be
  removed) ends the program (``killed``, the operation named in ``detail``) on: opening a path
  for reading outside the temp dir, the interpreter's install (``sys.prefix``,
  ``sys.base_prefix``) and its ``sys.path`` folders (``/dev/null``, ``/dev/urandom``,
  ``/dev/stdin`` allowed); opening for writing, creating, renaming, removing or chmod-ing
  anything outside the temp dir; listing or changing into a folder outside those; ``os.fork``/``forkpty``, ``exec*``,
  ``spawn*``, ``posix_spawn``, ``system``, ``subprocess.Popen``; ``os.kill``/``killpg``;
  sockets; ``ctypes`` and ``_posixsubprocess`` (imports), ``resource.setrlimit``/``prlimit``,
  ``gc.get_objects``/``get_referrers``/``get_referents``. It covers what Python code does
  through the standard library; C extensions that call the OS directly are not seen by it
  (``ctypes`` is refused for that reason; numpy and other installed C modules are not), and
  ``os.stat`` of any path is not audited (existence of files outside can be probed).

Not isolated: the file system is the host's (no chroot or mount namespace; world-readable
files outside the allowed folders are refused only by the audit hook), CPU and memory are
limited per process (not a cgroup), the run can see other processes in ``/proc`` metadata
through ``os.stat``-like calls, and without root or ``unshare`` the network is guarded by the
audit hook alone. The audit hook is a guard against accidents and ordinary hostile programs,
not a security boundary against code written to escape it; the uid drop, network namespace
and rlimits are the boundary. For untrusted code at scale run this inside a container or VM.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import decimal
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

VERDICTS = ("passed", "wrong_answer", "runtime_error", "timeout", "memory", "output_limit", "killed")

NOBODY = 65534
_RESULT_MARK = b"\x1eR1V2_SANDBOX_RESULT\x1e"
_EXIT_RUNTIME, _EXIT_MEMORY, _EXIT_BLOCKED, _EXIT_FILE_SIZE = 70, 71, 72, 73

# LiveCodeBench's testing_util.import_string, prepended to every program as it does.
LCB_IMPORTS = (
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\n"
    "from heapq import *\nfrom bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\n"
    "from statistics import *\nfrom itertools import *\nfrom functools import *\nfrom operator import *\n"
    "from io import *\nfrom sys import *\nfrom json import *\nfrom builtins import *\nfrom typing import *\n"
    "import string\nimport re\nimport datetime\nimport collections\nimport heapq\nimport bisect\nimport copy\n"
    "import math\nimport random\nimport statistics\nimport itertools\nimport functools\nimport operator\n"
    "import io\nimport sys\nimport json\nsys.setrecursionlimit(50000)\n"
)

# The child's code (run with ``python -I -B -c``): limits, then the audit hook, then the program.
_HARNESS = r"""
import sys, os, resource, json
_cfg = json.loads(sys.argv[1])
def _limits(c):
    R = resource
    R.setrlimit(R.RLIMIT_CPU, (c["cpu"], c["cpu"] + 1))
    R.setrlimit(R.RLIMIT_AS, (c["mem"], c["mem"]))
    R.setrlimit(R.RLIMIT_FSIZE, (c["fsize"], c["fsize"]))
    R.setrlimit(R.RLIMIT_NOFILE, (64, 64))
    R.setrlimit(R.RLIMIT_CORE, (0, 0))
    if c["nproc"] > 0:
        R.setrlimit(R.RLIMIT_NPROC, (c["nproc"], c["nproc"]))
_limits(_cfg)
sys.set_int_max_str_digits(50000)
_out_fd = os.dup(1)
_exit, _write = os._exit, os.write  # bound before the program runs: it may replace os._exit
_mode, _fn = _cfg["mode"], _cfg["fn"]
with open(os.path.join(_cfg["tmp"], "solution.py"), encoding="utf-8", errors="replace") as _f:
    _code = _f.read()
_devnull = open(os.devnull, "w") if _mode == "functional" else None
_stdin_text = sys.stdin.read() if _mode == "functional" else None

def _install(tmp, extra_read):
    import os as _os, sys as _sys
    realpath, fsdecode, sep = _os.path.realpath, _os.fsdecode, _os.sep
    tmp = realpath(tmp)
    read_roots = tuple(sorted({tmp} | {realpath(p) for p in extra_read if p}))
    read_files = ("/dev/null", "/dev/urandom", "/dev/zero", "/dev/stdin")
    deny = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "socket.__new__", "socket.connect", "socket.bind",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "resource.setrlimit", "resource.prlimit",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "os.setuid", "os.chroot",
    ))
    in_tmp_events = frozenset((
        "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate", "os.chmod",
        "os.chown", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
        "shutil.copytree", "shutil.move", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
    ))
    bad_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"))
    write = _os.write
    exit_now = _os._exit

    def under(p, roots):
        return any(p == r or p.startswith(r if r.endswith(sep) else r + sep) for r in roots)

    def path_of(a):
        if isinstance(a, int):
            return None
        try:
            return realpath(fsdecode(a))
        except Exception:
            return "?"

    def stop(what):
        try:
            write(2, ("\nsandbox: blocked " + what + "\n").encode("utf-8", "replace"))
        finally:
            exit_now(72)

    def hook(event, args):
        if event in deny:
            stop(event + repr(args)[:200])
        elif event == "open":
            p = path_of(args[0])
            if p is None or (isinstance(args[0], str) and args[0] in read_files):
                return
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = (mode is not None and any(c in mode for c in "wax+")) or (
                mode is None and flags & (_os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC)
            )
            if writing:
                if not under(p, (tmp,)):
                    stop("open(%r, write) outside the temp dir" % p)
            elif not (p in read_files or under(p, read_roots)):
                stop("open(%r) outside the temp dir" % p)
        elif event in ("os.listdir", "os.scandir", "os.chdir"):
            a = args[0] if args else None
            if a is None:
                return
            p = path_of(a)
            if p is not None and not under(p, read_roots if event != "os.chdir" else (tmp,)):
                stop("%s(%r)" % (event, p))
        elif event in in_tmp_events:
            for a in args:
                if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__"):
                    p = path_of(a)
                    if p is not None and not under(p, (tmp,)):
                        stop("%s(%r) outside the temp dir" % (event, p))
        elif event == "import" and args and str(args[0]).split(".")[0] in bad_imports:
            stop("import " + str(args[0]))

    _sys.addaudithook(hook)

_install(_cfg["tmp"], [sys.prefix, sys.base_prefix, sys.exec_prefix] + [p for p in sys.path if os.path.isdir(p)])
del _install, _limits
import builtins as _b, traceback as _tb
_src = _cfg["prefix"] + "\n" + _code
_ns = {"__name__": "__main__", "__builtins__": _b, "__file__": "solution.py"}

def _fail(e):
    if isinstance(e, MemoryError):
        _exit(71)
    if isinstance(e, OSError) and e.errno == 27:  # EFBIG: RLIMIT_FSIZE (Python ignores SIGXFSZ)
        _exit(73)
    try:
        _tb.print_exception(type(e), e, e.__traceback__, limit=6)
        sys.stderr.flush()
    finally:
        _exit(70)

if _mode == "stdin":
    try:
        exec(compile(_src, "solution.py", "exec"), _ns)
    except SystemExit:
        pass
    except BaseException as e:
        _fail(e)
    try:
        sys.stdout.flush()
    except BaseException:
        pass
    _exit(0)
else:
    _real_stdout, sys.stdout = sys.stdout, _devnull
    import io as _io
    sys.stdin = _io.StringIO("")
    try:
        exec(compile(_src, "solution.py", "exec"), _ns)
        if "class Solution" in _code:
            _obj = _ns["Solution"]()
            _m = getattr(_obj, _fn)
        else:
            _m = _ns[_fn]
        _args = json.loads(_stdin_text)
        _pred = _m(*_args)
    except BaseException as e:
        _fail(e)
    if isinstance(_pred, tuple):
        _pred = list(_pred)
    try:
        _payload = json.dumps({"ok": _pred})
    except BaseException as e:
        _payload = json.dumps({"unserialisable": type(_pred).__name__})
    _write(_out_fd, b"\n" + MARK + _payload.encode("utf-8", "replace") + b"\n")
    _exit(0)
""".replace("MARK", repr(_RESULT_MARK))


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Bounds of one program run and of one problem (all of its tests).

    LiveCodeBench gives each test 6 s (a wall-clock alarm in its process); here that is CPU
    time, and the wall limit (which also catches sleeping programs) is twice it, so a loaded
    machine does not fail correct programs."""

    cpu_seconds: int = 6
    wall_seconds: float = 12.0
    memory_bytes: int = 2 << 30  # address space (RLIMIT_AS)
    output_bytes: int = 16 << 20  # stdout (and separately stderr) captured at most; more is output_limit
    file_bytes: int = 16 << 20  # any file the program writes (RLIMIT_FSIZE)
    max_processes: int = 64  # RLIMIT_NPROC for the sandbox uid (only under a dropped uid)
    problem_seconds: float | None = None  # wall bound on all tests of a problem; None: LiveCodeBench's (cpu+1)·n+5
    user: str = "auto"  # "auto": nobody when root, else the caller; "none": never drop; or a uid
    network_namespace: str = "auto"  # "auto": unshare --net when it works here; "none": never
    python: str = ""  # interpreter; "" = this one, or else a python3 the sandbox uid can run

    def __post_init__(self):
        for k in ("cpu_seconds", "wall_seconds", "memory_bytes", "output_bytes", "file_bytes", "problem_seconds"):
            v = getattr(self, k)
            if k == "problem_seconds" and v is None:
                continue
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"sandbox.{k}: must be a finite number > 0, got {v!r}")
        if int(self.cpu_seconds) != self.cpu_seconds:
            raise ValueError(f"sandbox.cpu_seconds: must be a whole number of seconds, got {self.cpu_seconds!r}")
        if self.network_namespace not in ("auto", "none"):
            raise ValueError(f"sandbox.network_namespace: 'auto' or 'none', got {self.network_namespace!r}")
        if self.user not in ("auto", "none") and not str(self.user).isdigit():
            raise ValueError(f"sandbox.user: 'auto', 'none' or a numeric uid, got {self.user!r}")


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """One program run: ``status`` is ``ok`` or a failure verdict; ``stdout`` at most the cap."""

    status: str
    stdout: bytes
    stderr: bytes
    detail: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class CodeResult:
    """A program against all tests of a problem: ``verdict`` one of :data:`VERDICTS`, ``passed``
    the tests passed before the first failure (of ``total``), ``detail`` why it failed."""

    verdict: str
    passed: int
    total: int
    detail: str = ""
    seconds: float = 0.0

    @property
    def correct(self) -> bool:
        return self.verdict == "passed"


# ---- comparison, as LiveCodeBench's grade_stdio / grade_call_based ------------------------


def _stripped_lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.strip().split("\n")]


def _decimals(line: str) -> list[decimal.Decimal] | None:
    try:
        return [decimal.Decimal(x) for x in line.split()]
    except (decimal.InvalidOperation, ValueError):
        return None


def stdout_matches(output: str, expected: str) -> bool:
    """LiveCodeBench's stdin/stdout rule: same number of lines after stripping the text; each
    line equal after stripping, or both lines lists of equal decimals ("1.50" matches "1.5")."""
    got, want = _stripped_lines(output), _stripped_lines(expected)
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if g == w:
            continue
        dg, dw = _decimals(g), _decimals(w)
        if dg is None or dw is None or dg != dw:
            return False
    return True


def functional_args(test_input: str) -> list:
    """The positional arguments of a functional test: one JSON value per line (raises
    ``ValueError`` on a line that is not JSON)."""
    return [json.loads(line) for line in test_input.split("\n")]


# ---- the environment: which uid, which interpreter, whether a network namespace works -----

_ENV_CACHE: dict[tuple, tuple] = {}
_ENV_LOCK = threading.Lock()


def _probe(cmd: list[str], user: int | None) -> bool:
    try:
        kw: dict[str, Any] = {}
        if user is not None:
            kw.update(user=user, group=user, extra_groups=[])
        r = subprocess.run(cmd, capture_output=True, timeout=30, cwd=tempfile.gettempdir(), env=_base_env("/"), **kw)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _environment(limits: SandboxLimits) -> tuple[int | None, str, list[str]]:
    """(uid to run as or None, interpreter, command prefix), probed once per setting."""
    key = (limits.user, limits.network_namespace, limits.python)
    with _ENV_LOCK:
        if key in _ENV_CACHE:
            return _ENV_CACHE[key]
        if limits.user == "none" or (limits.user == "auto" and os.geteuid() != 0):
            uid = None
        else:
            uid = NOBODY if limits.user == "auto" else int(limits.user)
        candidates = (
            [limits.python] if limits.python else [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
        )
        python = next((c for c in candidates if c and _probe([c, "-I", "-c", "pass"], uid)), None)
        if python is None:
            raise RuntimeError(
                f"sandbox: no Python interpreter among {candidates} can be run"
                + (f" as uid {uid} (set sandbox.python, or sandbox.user='none')" if uid is not None else "")
            )
        prefix: list[str] = []
        unshare = shutil.which("unshare")
        if limits.network_namespace == "auto" and unshare:
            as_root = uid is None and os.geteuid() == 0
            for cand in (
                ([unshare, "--net"], [unshare, "--user", "--net"]) if as_root else ([unshare, "--user", "--net"],)
            ):
                if _probe([*cand, python, "-I", "-c", "pass"], uid):
                    prefix = cand
                    break
        _ENV_CACHE[key] = (uid, python, prefix)
        return _ENV_CACHE[key]


def sandbox_description(limits: SandboxLimits | None = None) -> dict:
    """What a run here is isolated by (for logs and the results table)."""
    limits = limits or SandboxLimits()
    uid, python, prefix = _environment(limits)
    return {"uid": uid if uid is not None else os.geteuid(), "python": python, "network_namespace": bool(prefix)}


def _base_env(tmp: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": tmp,
        "TMPDIR": tmp,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }


# ---- one run -----------------------------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except OSError:
        pass


def run_program(
    code: str,
    stdin: str | bytes,
    limits: SandboxLimits,
    *,
    fn_name: str | None = None,
    deadline: float | None = None,
) -> RunOutcome:
    """Run ``code`` once in a fresh sandbox (see the module docstring), ``stdin`` as its input
    (``fn_name``: the functional form, ``stdin`` the JSON list of arguments). Never raises for
    anything the program does; returns within about ``wall_seconds`` (or ``deadline``, a
    ``time.monotonic()`` time, if sooner) plus the time to kill it."""
    uid, python, prefix = _environment(limits)
    t0 = time.monotonic()
    end = t0 + limits.wall_seconds if deadline is None else min(t0 + limits.wall_seconds, deadline)
    tmp = tempfile.mkdtemp(prefix="r1v2-sandbox-")
    try:
        with open(os.path.join(tmp, "solution.py"), "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        data = stdin.encode("utf-8", "replace") if isinstance(stdin, str) else stdin
        in_path = os.path.join(tmp, ".stdin")
        with open(in_path, "wb") as f:
            f.write(data)
        kw: dict[str, Any] = {}
        if uid is not None:
            os.chown(tmp, uid, uid)
            os.chmod(os.path.join(tmp, "solution.py"), 0o644)
            kw.update(user=uid, group=uid, extra_groups=[])
        cfg = {
            "cpu": int(limits.cpu_seconds),
            "mem": int(limits.memory_bytes),
            "fsize": int(limits.file_bytes),
            "nproc": int(limits.max_processes) if uid is not None else 0,
            "mode": "functional" if fn_name else "stdin",
            "fn": fn_name or "",
            "tmp": tmp,
            "prefix": LCB_IMPORTS,
        }
        cmd = [*prefix, python, "-I", "-B", "-c", _HARNESS, json.dumps(cfg)]
        with open(in_path, "rb") as fin:
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=fin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=tmp,
                    env=_base_env(tmp),
                    start_new_session=True,
                    close_fds=True,
                    **kw,
                )
            except OSError as e:
                return RunOutcome("killed", b"", b"", f"could not start the sandbox: {e}", time.monotonic() - t0)
            os.unlink(in_path)
            return _collect(proc, limits, end, t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exited(pid: int, end: float) -> bool:
    """Wait until ``pid`` exits (without reaping it) or ``end``; True if it exited."""
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.005)


def _reap(proc: subprocess.Popen, wait: float = 10.0) -> float | None:
    """Reap the (killed) child; its CPU seconds, or None if it did not end within ``wait``."""
    end = time.monotonic() + wait
    while True:
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere
            proc.wait(timeout=0)
            return 0.0
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() >= end:
            return None
        time.sleep(0.005)


def _collect(proc: subprocess.Popen, limits: SandboxLimits, end: float, t0: float) -> RunOutcome:
    """Read the child's output up to the caps until it exits or the deadline; classify."""
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    stopped = ""  # why we killed it
    sel = selectors.DefaultSelector()
    for s in bufs:
        os.set_blocking(s.fileno(), False)
        sel.register(s, selectors.EVENT_READ)
    try:
        while sel.get_map() and not stopped:
            left = end - time.monotonic()
            if left <= 0:
                stopped = "timeout"
                break
            for key, _ in sel.select(timeout=min(left, 0.5)):
                try:
                    chunk = os.read(key.fileobj.fileno(), 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                buf = bufs[key.fileobj]
                room = limits.output_bytes - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    stopped = "output_limit"
                    break
        if not stopped and not _exited(proc.pid, end):
            stopped = "timeout"
    finally:
        # The leader is not reaped yet (a zombie at most), so its pid still names its group:
        # whatever it left running in the group dies with it.
        _kill_group(proc)
        sel.close()
        cpu = _reap(proc)
        if cpu is None:  # unkillable (D state): give up on it, never hang
            stopped = stopped or "killed"
        for s in bufs:
            s.close()
    out, err = bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])
    secs = time.monotonic() - t0
    tail = err[-600:].decode("utf-8", "replace").strip()
    if stopped == "timeout":
        return RunOutcome(
            "timeout", out, err, f"wall time over {limits.wall_seconds:g} s (or the problem's bound)", secs
        )
    if stopped == "output_limit":
        return RunOutcome("output_limit", out, err, f"more than {limits.output_bytes} bytes of output", secs)
    if stopped:
        return RunOutcome(stopped, out, err, "the sandboxed process could not be reaped", secs)
    rc = proc.returncode
    if rc == 0:
        return RunOutcome("ok", out, err, "", secs)
    if rc == _EXIT_MEMORY:
        return RunOutcome("memory", out, err, f"MemoryError (address space {limits.memory_bytes} bytes)", secs)
    if rc == _EXIT_FILE_SIZE:
        return RunOutcome("output_limit", out, err, f"wrote a file over {limits.file_bytes} bytes", secs)
    if rc == _EXIT_BLOCKED:
        return RunOutcome("killed", out, err, tail.rsplit("sandbox: ", 1)[-1], secs)
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= limits.cpu_seconds):
            return RunOutcome("timeout", out, err, f"CPU time over {limits.cpu_seconds} s", secs)
        if sig == signal.SIGXFSZ:
            return RunOutcome("output_limit", out, err, f"wrote a file over {limits.file_bytes} bytes", secs)
        if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL):
            return RunOutcome("runtime_error", out, err, f"died of {name}", secs)
        return RunOutcome("killed", out, err, f"died of {name}", secs)
    return RunOutcome("runtime_error", out, err, tail[-300:] or f"exit code {rc}", secs)


# ---- a program against a problem's tests ---------------------------------------------------


def _result_of(outcome: RunOutcome) -> tuple[bool, Any]:
    """(found, value) of the functional harness's result line."""
    i = outcome.stdout.rfind(_RESULT_MARK)
    if i < 0:
        return False, None
    line = outcome.stdout[i + len(_RESULT_MARK) :].split(b"\n", 1)[0]
    try:
        return True, json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        return False, None


def _short(x: Any, n: int = 120) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= n else s[: n // 2] + "..." + s[-n // 2 :]


class CodeRunner:
    """Runs programs against tests in the sandbox; counts verdicts (``counts``, thread-safe).

    ``run(code, tests, fn_name)``: one program; ``run_many(jobs, workers)``: many, ``workers``
    at a time (each job ``(code, tests, fn_name)``). ``tests``: ``[{"input": str, "output":
    str}, ...]``. No call takes longer than :meth:`problem_bound` per job plus the time to
    kill one run."""

    def __init__(self, limits: SandboxLimits | None = None):
        self.limits = limits or SandboxLimits()
        self.counts: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def problem_bound(self, n_tests: int) -> float:
        """Seconds all ``n_tests`` tests of one problem may take together."""
        if self.limits.problem_seconds is not None:
            return float(self.limits.problem_seconds)
        return (self.limits.cpu_seconds + 1) * n_tests + 5.0  # lcb_runner's global timeout

    def run(self, code: str, tests: Sequence[dict], fn_name: str | None = None) -> CodeResult:
        res = self._run(code, tests, fn_name)
        with self._lock:
            self.counts[res.verdict] += 1
        return res

    def run_many(self, jobs: Sequence[tuple[str, Sequence[dict], str | None]], workers: int = 2) -> list[CodeResult]:
        if int(workers) != workers or workers < 1:
            raise ValueError(f"sandbox workers: must be an integer >= 1, got {workers!r}")
        if workers == 1 or len(jobs) <= 1:
            return [self.run(*j) for j in jobs]
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1v2-sandbox") as ex:
            return list(ex.map(lambda j: self.run(*j), jobs))

    def _run(self, code: str, tests: Sequence[dict], fn_name: str | None) -> CodeResult:
        t0 = time.monotonic()
        total = len(tests)
        bound = self.problem_bound(total)
        deadline = t0 + bound
        if total == 0:
            return CodeResult("runtime_error", 0, 0, "the problem has no tests", 0.0)
        for i, t in enumerate(tests):
            if time.monotonic() >= deadline:
                return CodeResult("timeout", i, total, f"problem wall bound {bound:g} s", _el(t0))
            if fn_name:
                try:
                    stdin = json.dumps(functional_args(t["input"]))
                    want = json.loads(t["output"])
                except ValueError as e:
                    return CodeResult("runtime_error", i, total, f"test {i}: not JSON ({e})", _el(t0))
            else:
                stdin = t["input"]
            out = run_program(code, stdin, self.limits, fn_name=fn_name, deadline=deadline)
            if out.status != "ok":
                return CodeResult(out.status, i, total, f"test {i}: {out.detail}", _el(t0))
            if fn_name:
                found, value = _result_of(out)
                if not found:
                    return CodeResult("runtime_error", i, total, f"test {i}: no result from {fn_name}", _el(t0))
                if "ok" not in value:
                    why = f"returned an unserialisable {value.get('unserialisable')}"
                    return CodeResult("wrong_answer", i, total, f"test {i}: {why}", _el(t0))
                if value["ok"] != want:
                    why = f"got {_short(value['ok'])}, expected {_short(want)}"
                    return CodeResult("wrong_answer", i, total, f"test {i}: {why}", _el(t0))
            else:
                got = out.stdout.decode("utf-8", "replace")
                if not stdout_matches(got, t["output"]):
                    why = f"got {_short(got.strip())}, expected {_short(t['output'].strip())}"
                    return CodeResult("wrong_answer", i, total, f"test {i}: {why}", _el(t0))
        return CodeResult("passed", total, total, "", _el(t0))


def _el(t0: float) -> float:
    return time.monotonic() - t0
