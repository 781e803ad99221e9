"""Run untrusted Python programs (model-written code: HumanEval, paper §3; MTPB, §4) and get
back a verdict that no program can forge, for itself or for any other program.

Each program runs in a forked child of a judge (`python -E -s sandbox.py --judge`, one per
worker) inside bubblewrap; the child locks itself down (rlimits, Landlock, no capabilities,
an allowlist seccomp filter) and writes a random secret to a verdict pipe only after the
program's last line. Without bubblewrap it refuses unless the weaker fallback (the same
child on the host) is asked for. docs/sandbox.md: the design and each path's threat model.

    sandbox.run_many(programs, timeout=3.0, workers=8)    # Results in the order of `programs`
    python sandbox.py prog.py --timeout 3 --memory-mb 2048 [--allow-fallback]
"""
import contextlib
import ctypes
import dataclasses
import json
import os
import pathlib
import resource
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common

FILE_SIZE_MB = 16          # largest file a program may write (RLIMIT_FSIZE)
OPEN_FILES = 64            # RLIMIT_NOFILE
PROCESSES = 64             # threads at most: the judge counts them (and RLIMIT_NPROC under bwrap)
TMPFS_MB = 64              # the private /tmp under bwrap: all a program can write there
OUTPUT_CAP = 64 * 1024     # bytes kept of stdout and of stderr; more stops the program
JUDGE_SLACK = 20.0         # seconds a judge may take beyond the program's timeout to answer
INSTALL_HINT = "apt-get install bubblewrap"
_THIS_FILE = os.path.abspath(__file__)
_BWRAP = ["bwrap", "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534", "--die-with-parent",
          "--new-session", "--cap-drop", "ALL", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
          "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp"] + [   # and, if under /tmp, this dir and Python
    arg for path in {os.path.dirname(_THIS_FILE), sys.prefix, sys.base_prefix} if path.startswith("/tmp/")
    for arg in ("--ro-bind", path, path)] + ["--"]
_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass
class Result:
    status: str    # 'passed' | 'failed' | 'timed out' | 'error'
    reason: str    # one line, '' when passed
    stdout: str
    stderr: str
    seconds: float


# ----------------------------------------------------------------------------- the lock-down

def _call(function, *args):
    """A libc call, integers widened to unsigned long as the kernel reads them; -1 -> OSError."""
    if (ret := function(*(a if isinstance(a, bytes) else ctypes.c_ulong(a) for a in args))) == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when it has none (Linux < 5.13 or disabled)."""
    try:  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION): 444 on every arch
        return _call(_libc.syscall, 444, 0, 0, 1)
    except OSError:
        return 0


def _confine(directory):
    """Landlock: create, change or delete files only below `directory` (and write /dev/null);
    ABI >= 6: signal, or reach abstract unix sockets of, only its own domain. Reads stay free."""
    if (abi := landlock_abi()) == 0:
        return
    # LANDLOCK_ACCESS_FS_* bits: WRITE_FILE=1<<1, REMOVE_DIR..MAKE_SYM=1<<4..1<<12 (ABI 1),
    # REFER=1<<13 (ABI 2, links and renames across directories), TRUNCATE=1<<14 (ABI 3).
    write_file, truncate = 1 << 1, (1 << 14 if abi >= 3 else 0)
    handled = write_file | sum(1 << b for b in range(4, 13)) | (1 << 13 if abi >= 2 else 0) | truncate
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net (0: not restricted
    # here, seccomp has no socket()), scoped (ABSTRACT_UNIX_SOCKET=1 | SIGNAL=2)
    attr = struct.pack("=QQQ", handled, 0, 3) if abi >= 6 else struct.pack("=Q", handled)
    ruleset = _call(_libc.syscall, 444, attr, len(attr), 0)
    for path, allowed in ((directory, handled), ("/dev/null", write_file | truncate)):
        fd = os.open(path, os.O_PATH)
        _call(_libc.syscall, 445, ruleset, 1, struct.pack("=Qi", allowed, fd), 0)  # add_rule PATH_BENEATH
        os.close(fd)
    _call(_libc.syscall, 446, ruleset, 0)                 # landlock_restrict_self
    os.close(ruleset)


# seccomp allowlist: name:x86_64:aarch64 (asm-generic numbers; "-": no such call there).
# The last block passes only in the forms seccomp_filter checks; any other call fails (EPERM).
_SYSCALLS = """
read:0:63 write:1:64 open:2:- openat:257:56 openat2:437:437 close:3:57 close_range:436:436 pread64:17:67
pwrite64:18:68 readv:19:65 writev:20:66 preadv:295:69 pwritev:296:70 preadv2:327:286 pwritev2:328:287 lseek:8:62
stat:4:- fstat:5:80 lstat:6:- newfstatat:262:79 statx:332:291 statfs:137:43 fstatfs:138:44 access:21:-
faccessat:269:48 faccessat2:439:439 getdents64:217:61 truncate:76:45 ftruncate:77:46 fallocate:285:47 fsync:74:82
fdatasync:75:83 fadvise64:221:223 sendfile:40:71 copy_file_range:326:285 splice:275:76 dup:32:23 dup2:33:- dup3:292:24
pipe:22:- pipe2:293:59 select:23:- pselect6:270:72 poll:7:- ppoll:271:73 epoll_create1:291:20 epoll_ctl:233:21
epoll_wait:232:- epoll_pwait:281:22 epoll_pwait2:441:441 eventfd2:290:19 signalfd4:289:74 timerfd_create:283:85
timerfd_settime:286:86 timerfd_gettime:287:87 mmap:9:222 munmap:11:215 mprotect:10:226 mremap:25:216 madvise:28:233
mincore:27:232 msync:26:227 brk:12:214 rt_sigaction:13:134 rt_sigprocmask:14:135 rt_sigreturn:15:139
rt_sigsuspend:130:133 rt_sigpending:127:136 rt_sigtimedwait:128:137 sigaltstack:131:132 alarm:37:- getitimer:36:102
setitimer:38:103 timer_create:222:107 timer_settime:223:110 timer_gettime:224:108 timer_getoverrun:225:109
timer_delete:226:111 pause:34:- nanosleep:35:101 clock_nanosleep:230:115 clock_gettime:228:113 clock_getres:229:114
gettimeofday:96:169 getrlimit:97:163 setrlimit:160:164 getrusage:98:165 times:100:153 sysinfo:99:179 uname:63:160
getpriority:140:141 sched_yield:24:124 sched_getparam:143:121 sched_getscheduler:145:120 sched_getaffinity:204:123
getpid:39:172 gettid:186:178 getppid:110:173 getuid:102:174 geteuid:107:175 getgid:104:176 getegid:108:177
getgroups:115:158 getresuid:118:148 getresgid:120:150 getpgrp:111:- getpgid:121:155 getsid:124:156 getcwd:79:17
chdir:80:49 fchdir:81:50 mkdir:83:- mkdirat:258:34 rmdir:84:- unlink:87:- unlinkat:263:35 rename:82:- renameat:264:38
renameat2:316:276 link:86:- linkat:265:37 symlink:88:- symlinkat:266:36 readlink:89:- readlinkat:267:78 umask:95:166
getxattr:191:8 lgetxattr:192:9 fgetxattr:193:10 listxattr:194:11 llistxattr:195:12 flistxattr:196:13 exit:60:93
exit_group:231:94 wait4:61:260 waitid:247:95 futex:202:98 futex_waitv:449:449 set_robust_list:273:99 rseq:334:293
set_tid_address:218:96 arch_prctl:158:- restart_syscall:219:128 getrandom:318:278 capget:125:90 sendto:44:206
recvfrom:45:207 sendmsg:46:211 recvmsg:47:212 shutdown:48:210 getsockopt:55:209 setsockopt:54:208 getsockname:51:204
getpeername:52:205
clone:56:220 clone3:435:435 kill:62:129 tgkill:234:131 prlimit64:302:261 setpriority:141:140 sched_setaffinity:203:122
prctl:157:167 fcntl:72:25 ioctl:16:29 socketpair:53:199 flock:73:32 utimensat:280:88 chmod:90:- fchmod:91:52
fchmodat:268:53 fchmodat2:452:452
"""
_ARCHES = {"x86_64": (0xC000003E, 1), "aarch64": (0xC00000B7, 2)}   # AUDIT_ARCH_*, column above
_PRETENDED = "flock utimensat chmod fchmod fchmodat fchmodat2"   # return 0, do nothing (no lock, no change)


def seccomp_filter(machine, pid):
    """A classic-BPF seccomp program (bytes) for `machine` (None for an unknown one) that
    lets process `pid` reach nothing outside itself: docs/sandbox.md lists what it denies."""
    if machine not in _ARCHES:
        return None
    rows, column = [entry.split(":") for entry in _SYSCALLS.split()], _ARCHES[machine][1]
    nr = {row[0]: int(row[column]) for row in rows if row[column] != "-"}
    LD, AND, JEQ, JGE, RET = 0x20, 0x54, 0x15, 0x35, 0x06   # BPF_LD|W|ABS, BPF_ALU|AND|K, BPF_JMP|.., BPF_RET|K
    ALLOW, KILL, EPERM, PRETEND, ENOSYS, ENOTTY = (  # RET_ERRNO|errno: fail; PRETEND: 0, do nothing
        0x7FFF0000, 0x80000000, 0x00050001, 0x00050000, 0x00050026, 0x00050019)

    def op(code, k, jt=0, jf=0):
        return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)

    def when(name, *body):          # run `body` (ending in a RET) if the syscall is `name`
        return [op(JEQ, nr[name], 0, len(body)), *body] if name in nr else []

    def switch(arg, cases, default=EPERM, mask=None):
        """Load args[arg] (low 32 bits, & mask); the action of the first case holding it."""
        tests = [(v, k) for k, (values, _) in enumerate(cases) for v in values]
        head = [op(LD, 16 + 8 * arg)] + ([op(AND, mask)] if mask else [])   # struct seccomp_data
        jumps = [op(JEQ, v, len(tests) + k - i, 0) for i, (v, k) in enumerate(tests)]
        return head + jumps + [op(RET, default)] + [op(RET, action) for _, action in cases]

    prog = [op(LD, 4), op(JEQ, _ARCHES[machine][0], 1, 0), op(RET, KILL), op(LD, 0)]   # arch, nr
    if machine == "x86_64":         # x32 syscalls (nr | 0x40000000) would dodge the numbers below
        prog += [op(JGE, 0x40000000, 0, 1), op(RET, KILL)]
    itself = [((pid, 0), ALLOW)]
    prog += when("clone", *switch(0, [((0x10000,), ALLOW)], mask=0x10000))    # CLONE_THREAD: threads only
    prog += when("clone3", op(RET, ENOSYS))    # its flags sit behind a pointer: glibc falls back to clone
    prog += when("kill", *switch(0, [((pid, 0, -pid), ALLOW)]))   # itself or its own process group
    prog += when("tgkill", *switch(0, [((pid,), ALLOW)]))
    prog += when("prlimit64", *switch(0, itself)) + when("sched_setaffinity", *switch(0, itself))
    prog += when("setpriority", op(LD, 16), op(JEQ, 0, 1, 0), op(RET, EPERM),   # PRIO_PROCESS only
                 *switch(1, itself))
    # PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME, PR_GET_SECCOMP,
    # PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS, PR_SET_VMA (names memory areas)
    prog += when("prctl", *switch(0, [((2, 3, 15, 16, 21, 23, 39, 0x53564D41), ALLOW)]))
    # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETLK, F_OFD_GETLK, F_DUPFD_CLOEXEC;
    # locks (F_SETLK, F_SETLKW, F_OFD_SETLK, F_OFD_SETLKW) pretended; not F_SETOWN & co.
    prog += when("fcntl", *switch(1, [((0, 1, 2, 3, 4, 5, 36, 1030), ALLOW), ((6, 7, 37, 38), PRETEND)]))
    # TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX; anything else "not a tty"
    prog += when("ioctl", *switch(1, [((0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451), ALLOW)], ENOTTY))
    prog += when("socketpair", op(LD, 16), op(JEQ, 1, 1, 0), op(RET, EPERM),   # AF_UNIX, and
                 *switch(1, [((1,), ALLOW)], mask=0xF))                       # SOCK_STREAM (+ flags)
    for name in _PRETENDED.split():
        prog += when(name, op(RET, PRETEND))
    conditional = set(_SYSCALLS[_SYSCALLS.index("\nclone:"):].replace(":", " ").split())
    for name in sorted(set(nr) - conditional, key=nr.get):
        prog += when(name, op(RET, ALLOW))
    return b"".join(prog + [op(RET, EPERM)])


def _lock_down(workdir, timeout, memory_mb):
    """Limits, Landlock, no capabilities, seccomp, in this order: each needs the last, each removes rights."""
    cpu = int(-(-timeout // 1)) + 1                       # ceil(timeout) + 1 s: the wall clock is the real limit
    # RLIMIT_NPROC counts every process of the uid in its user namespace: only bwrap's holds just us
    nproc = ((resource.RLIMIT_NPROC, PROCESSES),) if sys.argv[2:] == ["bwrap"] else ()   # the judge's argv
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_CPU, cpu),
                         (resource.RLIMIT_FSIZE, FILE_SIZE_MB << 20), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NOFILE, OPEN_FILES), *nproc):
        resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
    _call(_libc.prctl, 38, 1, 0, 0, 0)                   # PR_SET_NO_NEW_PRIVS: Landlock and seccomp need it
    _confine(workdir)
    _call(_libc.capset, struct.pack("=Ii", 0x20080522, 0), bytes(24))   # no capabilities (header v3), ever
    bpf = seccomp_filter(os.uname().machine, os.getpid())
    if bpf is not None:
        bpf_buffer = ctypes.create_string_buffer(bpf)
        fprog = ctypes.create_string_buffer(struct.pack("=H6xQ", len(bpf) // 8, ctypes.addressof(bpf_buffer)))
        _call(_libc.prctl, 22, 2, ctypes.addressof(fprog), 0, 0)   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


# ----------------------------------------------------------------------------- the child

def _one_line(exc):
    """'ValueError: bad input' from an exception: one line, bounded."""
    try:
        text = str(exc).strip().splitlines()
    except BaseException:  # a program's exception may even fail to print
        text = []
    return (f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__)[:300]


def _child(program, secret, pipes, workdir, timeout, memory_mb):
    """In the forked child: lock down, run the program, write the verdict; never returns. Verdict
    pipe: "?reason" (lock-down failed), or "S" then the secret (ran to its end) or "!reason"."""
    write, exit_now = os.write, os._exit   # our own references: the program may reassign os.*
    try:
        os.setpgid(0, 0)                             # own process group: killpg(0) hits only itself
        _call(_libc.prctl, 1, signal.SIGKILL)        # PR_SET_PDEATHSIG: die with the judge
        for fd, target in zip((os.open("/dev/null", os.O_RDONLY), *pipes), range(4)):
            os.dup2(fd, target, inheritable=False)   # stdin, stdout, stderr, the verdict pipe
        os.closerange(4, resource.getrlimit(resource.RLIMIT_NOFILE)[0])   # nothing of the judge's stays open
        os.chdir(workdir)
        os.environ.clear()
        os.environ.update(HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8", PATH=os.defpath,
                          OMP_NUM_THREADS="1")       # as openai's guard: one BLAS thread
        tempfile.tempdir = workdir
        _lock_down(workdir, timeout, memory_mb)
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
        with contextlib.suppress(BaseException):
            stream.flush()
    write(3, verdict)
    exit_now(0)                            # no atexit hooks, no waiting for the program's threads


# ----------------------------------------------------------------------------- the judge

def _judge(program, timeout, memory_mb):
    """The Result fields of one program, run in a forked child, as a dict; `clean`: its dir is gone."""
    start, secret = time.monotonic(), secrets.token_hex(16).encode()
    workdir = tempfile.mkdtemp(prefix="program-")
    (out_r, out_w), (err_r, err_w), (verdict_r, verdict_w) = os.pipe(), os.pipe(), os.pipe()
    pid = os.fork()     # if this or pidfd_open raises, the evaluating process replaces the judge
    if pid == 0:
        try:
            _child(program, secret, (out_w, err_w, verdict_w), workdir, timeout, memory_mb)
        finally:
            os._exit(1)
    out, err, verdict = bytearray(), bytearray(), bytearray()
    for fd in (out_w, err_w, verdict_w):
        os.close(fd)
    bufs = {out_r: (out, OUTPUT_CAP, "stdout"), err_r: (err, OUTPUT_CAP, "stderr"),
            verdict_r: (verdict, 4096, "the verdict pipe")}
    pidfd = os.pidfd_open(pid)             # becomes readable when the child exits (Linux >= 5.3)
    problem, watched = None, [*bufs, pidfd]
    while watched and problem is None:
        if (remaining := start + timeout - time.monotonic()) <= 0:
            problem = ("timed out", f"exceeded the {timeout:g} s wall-clock limit")
        elif _threads(pid) > PROCESSES:    # RLIMIT_NPROC does not bind root: count them every 10 ms
            problem = ("failed", f"started more than {PROCESSES} threads")
        for fd in select.select(watched, [], [], min(remaining, 0.01))[0] if problem is None else []:
            chunk = b"" if fd == pidfd else os.read(fd, 65536)
            if not chunk:                  # exited (its pipes now drain to EOF), or EOF
                watched.remove(fd)
                continue
            buf, cap, name = bufs[fd]
            buf += chunk
            if len(buf) > cap:
                problem = ("error", f"exceeded the output cap ({cap} bytes on {name})")
                break
    if problem is not None:
        os.kill(pid, signal.SIGKILL)       # no other process to kill: it could not make any
    _, wait_status = os.waitpid(pid, 0)
    for fd in (*bufs, pidfd):
        os.close(fd)
    status, reason = problem or _verdict(bytes(verdict), secret, os.waitstatus_to_exitcode(wait_status))
    return dict(status=status, reason=reason, stdout=out[:OUTPUT_CAP].decode("utf-8", "replace"),
                stderr=err[:OUTPUT_CAP].decode("utf-8", "replace"), seconds=time.monotonic() - start,
                clean=_remove_tree(workdir))


def _threads(pid):
    """How many threads process `pid` has (0 once it has gone)."""
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[17])    # field 20, num_threads
    return 0


def _verdict(verdict, secret, exitcode):
    """(status, reason) of a child that ended by itself; exitcode < 0 is -signal."""
    body = verdict[1:]
    if verdict.startswith(b"?"):
        return "error", "sandbox setup failed: " + body.decode("utf-8", "replace")
    if verdict.startswith(b"S") and body == secret and exitcode == 0:
        return "passed", ""
    if body.startswith(b"!"):
        return "failed", body[1:].decode("utf-8", "replace")
    if exitcode == -signal.SIGXCPU:
        return "timed out", "exceeded the CPU time limit"
    if exitcode < 0:
        return "failed", f"killed by signal {-exitcode} ({signal.strsignal(-exitcode)})"
    return "failed", f"exited with code {exitcode} before the end of the program"


def _remove_tree(path):
    """Delete a tree whatever it holds (any depth, dirs without permissions); True when it is gone;
    never raises. One directory fd at a time, names relative to it: PATH_MAX does not matter."""
    flags, below, fd = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, [], None   # below: names down to fd
    try:
        fd = os.open(path, flags)
        while True:
            os.fchmod(fd, 0o700)                     # a program may create directories with mode 0
            with os.scandir(fd) as entries:
                names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
            subdirs = [name for name, is_dir in names if is_dir]
            for name in {name for name, _ in names} - set(subdirs):
                os.unlink(name, dir_fd=fd)
            if not subdirs and not below:
                break
            fd, previous = os.open(subdirs[0] if subdirs else "..", flags, dir_fd=fd), fd
            os.close(previous)
            if subdirs:                              # went down into it
                below.append(subdirs[0])
            else:                                    # came up from an emptied directory
                os.rmdir(below.pop(), dir_fd=fd)
        os.rmdir(path)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)
    return not os.path.lexists(path)


def _serve():
    """The judge's loop: a request on stdin, the answer on stdout (a line of JSON each)."""
    _call(_libc.prctl, 4, 0)               # PR_SET_DUMPABLE 0: no process may read or write our memory
    _call(_libc.prctl, 1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the evaluating process
    del sys.path[0]                        # this file's directory: its modules are not the programs'
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            reply = _judge(request["program"], request["timeout"], request["memory_mb"])
        except Exception as e:   # e.g. fork failed: this program gets 'error', a new judge the next
            reply = dict(status="error", reason=f"the judge failed: {_one_line(e)}", stdout="",
                         stderr="", seconds=0.0, clean=False)
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.flush()


# ----------------------------------------------------------------------------- the evaluating process

class _Judge:
    """A judge process, started on first use and replaced if it fails or cannot clean up."""

    def __init__(self, use_bwrap):
        self.use_bwrap, self.proc, self.last_words = use_bwrap, None, ""

    def run(self, program, timeout, memory_mb):
        if self.proc is None:
            # Without bwrap the programs' dirs go in a dir of ours, removed in close() in any case
            self.tmpdir = "/tmp" if self.use_bwrap else tempfile.mkdtemp(prefix="sandbox-")
            cmd = [sys.executable, "-E", "-s", _THIS_FILE, "--judge", "bwrap" if self.use_bwrap else "host"]
            pipe = subprocess.PIPE
            self.proc = subprocess.Popen(_BWRAP + cmd if self.use_bwrap else cmd, stdin=pipe, stdout=pipe,
                                         stderr=pipe, cwd="/", start_new_session=True,
                                         env={"LANG": "C.UTF-8", "PATH": os.defpath, "TMPDIR": self.tmpdir})
        start, poll = time.monotonic(), select.poll()
        with contextlib.suppress(BrokenPipeError):    # if it died, it says nothing and we report why
            self.proc.stdin.write(json.dumps(dict(program=program, timeout=timeout, memory_mb=memory_mb)).encode()
                                  + b"\n")
            self.proc.stdin.flush()
        poll.register(self.proc.stdout, select.POLLIN)
        answered = poll.poll((timeout + JUDGE_SLACK) * 1000) and (line := self.proc.stdout.readline())
        reply = json.loads(line) if answered else None
        if reply is None or not reply.pop("clean"):   # a fresh judge (and /tmp) for the next program
            self.close()
        return Result(**reply) if reply is not None else Result(
            "error", f"the judge failed: {self.last_words or 'no answer'}", "", "", time.monotonic() - start)

    def close(self):
        """Stop the judge (SIGKILL to its group: between programs it has nothing to finish)."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        with self.proc:                    # then it closes the pipes and waits
            lines = self.proc.stderr.read(OUTPUT_CAP).decode("utf-8", "replace").strip().splitlines()
        self.last_words, self.proc = lines[-1][:300] if lines else "", None
        if not self.use_bwrap:
            _remove_tree(self.tmpdir)


_isolation, _warned, _isolation_lock = None, False, threading.Lock()   # _isolation: (path, why)


def isolation(allow_fallback=None):
    """'bwrap' or 'rlimits': the path programs run on here. Given `allow_fallback`, the fallback
    raises OSError unless it is true or SANDBOX_ISOLATION=rlimits, else warns once per process."""
    global _isolation, _warned
    with _isolation_lock:
        if _isolation is None and os.environ.get("SANDBOX_ISOLATION") == "rlimits":
            _isolation = ("rlimits", "SANDBOX_ISOLATION=rlimits")
        elif _isolation is None and shutil.which("bwrap") is None:
            _isolation = ("rlimits", "bwrap not found")
        elif _isolation is None:             # probe it: user namespaces may be off, bwrap too old
            probe = _Judge(use_bwrap=True)
            reason = probe.run("pass", 10.0, 2048).reason
            probe.close()
            _isolation = ("rlimits", f"bwrap fails here ({reason})") if reason else ("bwrap", "")
        path, why = _isolation
        if path == "bwrap" or allow_fallback is None:
            return path
        if not (allow_fallback or os.environ.get("SANDBOX_ISOLATION") == "rlimits"):
            raise OSError(f"the sandbox needs bubblewrap ({why}): {INSTALL_HINT}; or ask for the weaker "
                          "fallback with SANDBOX_ISOLATION=rlimits (sandbox.py: --allow-fallback)")
        if not _warned:
            _warned = True
            gaps = ["namespaces"] + ["Landlock: files NOT protected"] * (landlock_abi() == 0) + [
                f"seccomp on {os.uname().machine}: processes may fork"] * (os.uname().machine not in _ARCHES)
            print(f"sandbox: {why}; programs run less isolated (no {'; no '.join(gaps)}); "
                  f"for the strong path: {INSTALL_HINT}", file=sys.stderr)
        return path


def run_many(programs, timeout=3.0, workers=None, memory_mb=2048, progress=None, allow_fallback=False):
    """Run every program (Python source), `workers` at a time (default: the CPU count); their
    Results in input order. 'passed' iff it ran to its end within `timeout` wall-clock seconds
    and `memory_mb` of address space. `progress(done, total)` is called after each program
    (one call at a time). Without bubblewrap: OSError, unless `allow_fallback`."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout ({timeout}) and memory_mb ({memory_mb}) must be positive")
    use_bwrap = isolation(allow_fallback) == "bwrap"
    local, judges, lock, done = threading.local(), [], threading.Lock(), [0]

    def one(program):
        if not hasattr(local, "judge"):              # one judge per worker thread
            local.judge = _Judge(use_bwrap)
            judges.append(local.judge)
        result = local.judge.run(program, timeout, memory_mb)
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(programs))
        return result

    try:
        with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, len(programs)))) as pool:
            return list(pool.map(one, programs))
    finally:
        for judge in judges:
            judge.close()


def run(program, timeout=3.0, memory_mb=2048, allow_fallback=False):
    """run_many for a single program."""
    return run_many([program], timeout, 1, memory_mb, allow_fallback=allow_fallback)[0]


def _shown(text, prefix):
    """Output safe for a terminal: each line starts with `prefix`; control and invisible characters
    (escape sequences, \\r, bidi overrides) are Python escapes: no hiding or faking other lines."""
    lines = text.removesuffix("\n").split("\n") if text else []
    return "".join(prefix + "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in line) + "\n"
                   for line in lines)


def main(argv=None):
    parser = common.ArgumentParser(description="Run a Python file in the sandbox: its output, then the verdict.")
    parser.add_argument("file", help="the Python program to run")
    parser.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds")
    parser.add_argument("--memory-mb", type=int, default=2048, help="address-space limit")
    parser.add_argument("--allow-fallback", action="store_true", help="without bubblewrap, run on the "
                        f"weaker fallback path instead of refusing ({INSTALL_HINT} for the strong path)")
    args = parser.parse_args(argv)
    try:
        program = pathlib.Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        common.die(f"cannot read {args.file}: {e}")
    result = run(program, args.timeout, args.memory_mb, allow_fallback=args.allow_fallback)
    sys.stdout.write(_shown(result.stdout, "stdout| ") + _shown(result.stderr, "stderr| "))
    print(f"{result.status}{': ' + _shown(result.reason, '').strip() if result.reason else ''} "
          f"({result.seconds:.2f} s, isolation: {isolation()})", flush=True)
    return 0 if result.status == "passed" else 1


if __name__ == "__main__":
    raise SystemExit(_serve() if sys.argv[1:2] == ["--judge"] else common.run_main(main))
