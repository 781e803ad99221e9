"""Run untrusted Python programs (model-written code: HumanEval, paper §3;
MTPB, §4) and get back their verdicts, each decided where the program
cannot reach.

A judge (`python -E -s sandbox.py --judge`, one per worker) runs inside
bubblewrap. For each program it forks a child that locks itself down
(rlimits, Landlock, no capabilities, an allowlist seccomp filter) and then
becomes a fresh interpreter, holding nothing of the judge's memory, that
runs the program. Given a check (the evaluations' tests), a second
locked-down child runs it: it calls the program's functions and gets plain
data back, and its own verdict is the program's, so nothing the program
does can fake a pass. A program alone passes if it sends a random secret
after its last line: this stops exits and printed "passed", but a program
that searches its memory can pass itself. Without bubblewrap it refuses
unless the weaker fallback (the same children on the host) is asked for.
docs/sandbox.md: the design and each path's threat model.

    # Results in the order of `programs`
    sandbox.run_many(programs, timeout=3.0, workers=8)
    # check: remote('f')(1) == 2
    sandbox.run_many([(program, check)])
    python sandbox.py prog.py --timeout 3 --memory-mb 2048 [--allow-fallback]
"""
import ast
import contextlib
import ctypes
import dataclasses
import inspect
import json
import os
import pathlib
import resource
import secrets
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common

FILE_SIZE_MB = 16      # largest file a program may write (RLIMIT_FSIZE)
OPEN_FILES = 64        # RLIMIT_NOFILE
# threads at most: the judge counts them (and RLIMIT_NPROC under bwrap)
PROCESSES = 64
# the private /tmp under bwrap: all a program can write there
TMPFS_MB = 64
# files and dirs in the private /tmp: the judge counts them every 10 ms
FILES = 10_000
# bytes kept of stdout and of stderr; more stops the program
OUTPUT_CAP = 64 * 1024
# seconds a judge may take beyond the program's timeout to answer
JUDGE_SLACK = 20.0
INSTALL_HINT = "apt-get install bubblewrap"
_THIS_FILE = os.path.abspath(__file__)


# what Python runs on
SYSTEM = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64",
          "/etc/ld.so.cache")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")


def _python_dirs():
    """Python's own directories (where this interpreter and its packages
    live)."""
    return sorted({sys.prefix, sys.base_prefix} - {"/usr"})


def _bwrap_command():
    """bwrap's arguments: new namespaces, the judge as PID 1, no
    capabilities, and a private view of the file system: read-only the
    system's programs and libraries, Python, and the two files the judge
    runs; /proc read-only; /dev with DEVICES only; a private /tmp. The
    view comes after /tmp: Python or this file may live under /tmp."""
    view = []
    for path in SYSTEM:
        if os.path.islink(path):
            view += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            view += ["--ro-bind", path, path]
    common_py = os.path.join(os.path.dirname(_THIS_FILE), "common.py")
    for path in [*_python_dirs(), _THIS_FILE, common_py]:
        view += ["--ro-bind", path, path]
    devices = []
    for path in DEVICES:
        devices += ["--dev-bind", path, path]
    nobody = ["--uid", "65534", "--gid", "65534"]
    tmp = ["--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp"]
    proc = ["--proc", "/proc", "--remount-ro", "/proc"]
    dev = ["--tmpfs", "/dev", *devices, "--remount-ro", "/dev"]
    return ["bwrap", "--unshare-all", "--unshare-user", *nobody,
            "--die-with-parent", "--new-session", "--as-pid-1",
            "--cap-drop", "ALL", *tmp, *view, *proc, *dev, "--"]


_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass
class Result:
    status: str    # 'passed' | 'failed' | 'timed out' | 'error'
    reason: str    # one line, '' when passed
    stdout: str
    stderr: str
    seconds: float


# -------------------------------------------------- the lock-down

def _call(function, *args):
    """A libc call, integers widened to unsigned long as the kernel reads
    them; -1 -> OSError."""
    widened = []
    for a in args:
        widened.append(a if isinstance(a, bytes) else ctypes.c_ulong(a))
    ret = function(*widened)
    if ret == -1:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


def landlock_abi():
    """The kernel's Landlock ABI version, 0 when it has none (Linux < 5.13
    or disabled) or when SANDBOX_LANDLOCK=off asks to behave as if so (how
    tests try such a kernel)."""
    if os.environ.get("SANDBOX_LANDLOCK") == "off":
        return 0
    # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION):
    # 444 on every arch
    try:
        return _call(_libc.syscall, 444, 0, 0, 1)
    except OSError:
        return 0


def _confine(directory):
    """Landlock: read only SYSTEM, Python's dirs, DEVICES, its own
    /proc/PID and `directory` (and list any directory); create, change or
    delete files only below `directory` (and write /dev/null); ABI >= 6:
    signal, or reach abstract unix sockets of, only its domain."""
    abi = landlock_abi()
    if abi == 0:
        return
    # LANDLOCK_ACCESS_FS_* bits: EXECUTE=1<<0, WRITE_FILE=1<<1,
    # READ_FILE=1<<2, READ_DIR=1<<3, REMOVE_DIR..MAKE_SYM=1<<4..1<<12
    # (ABI 1), REFER=1<<13 (ABI 2, links and renames across directories),
    # TRUNCATE=1<<14 (ABI 3).
    read = 0b1101
    read_dir = 1 << 3
    write_file = 1 << 1
    truncate = 1 << 14 if abi >= 3 else 0
    refer = 1 << 13 if abi >= 2 else 0
    make_and_remove = sum(1 << b for b in range(4, 13))
    handled = read | write_file | make_and_remove | refer | truncate
    file_rights = read | write_file | truncate
    # struct landlock_ruleset_attr: handled_access_fs, handled_access_net
    # (0: not restricted here, seccomp has no socket()), scoped
    # (ABSTRACT_UNIX_SOCKET=1 | SIGNAL=2)
    if abi >= 6:
        attr = struct.pack("=QQQ", handled, 0, 3)
    else:
        attr = struct.pack("=Q", handled)
    ruleset = _call(_libc.syscall, 444, attr, len(attr), 0)
    rules = [(directory, handled),
             ("/dev/null", file_rights),
             (f"/proc/{os.getpid()}", read),
             # names of directories, which getcwd needs beyond PATH_MAX;
             # no file's content
             ("/", read_dir)]
    for path in (*SYSTEM, *_python_dirs(), *DEVICES[1:]):
        if os.path.exists(path):
            rules.append((path, read))
    for path, allowed in rules:
        fd = os.open(path, os.O_PATH)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            allowed &= handled
        else:      # a file takes file rights only, and no READ_DIR
            allowed &= file_rights & ~read_dir
        rule = struct.pack("=Qi", allowed, fd)
        _call(_libc.syscall, 445, ruleset, 1, rule, 0)
        os.close(fd)
    _call(_libc.syscall, 446, ruleset, 0)         # landlock_restrict_self
    os.close(ruleset)


# seccomp allowlist: name:x86_64:aarch64 (asm-generic numbers; "-": no such
# call there). The last block passes only in the forms seccomp_filter
# checks; any other call fails (EPERM).
_SYSCALLS = """
read:0:63 write:1:64 open:2:- openat:257:56 openat2:437:437 close:3:57
close_range:436:436 pread64:17:67 pwrite64:18:68 readv:19:65 writev:20:66
preadv:295:69 pwritev:296:70 preadv2:327:286 pwritev2:328:287 lseek:8:62
stat:4:- fstat:5:80 lstat:6:- newfstatat:262:79 statx:332:291 statfs:137:43
fstatfs:138:44 access:21:- faccessat:269:48 faccessat2:439:439
getdents64:217:61 truncate:76:45 ftruncate:77:46 fallocate:285:47
fsync:74:82 fdatasync:75:83 sendfile:40:71 copy_file_range:326:285
splice:275:76 dup:32:23 dup2:33:- dup3:292:24 pipe:22:- pipe2:293:59
select:23:- pselect6:270:72 poll:7:- ppoll:271:73 epoll_create1:291:20
epoll_ctl:233:21 epoll_wait:232:- epoll_pwait:281:22 epoll_pwait2:441:441
eventfd2:290:19 signalfd4:289:74 timerfd_create:283:85
timerfd_settime:286:86 timerfd_gettime:287:87 mmap:9:222 munmap:11:215
mprotect:10:226 mremap:25:216 mincore:27:232 msync:26:227 brk:12:214
rt_sigaction:13:134 rt_sigprocmask:14:135 rt_sigreturn:15:139
rt_sigsuspend:130:133 rt_sigpending:127:136 rt_sigtimedwait:128:137
sigaltstack:131:132 alarm:37:- getitimer:36:102 setitimer:38:103
timer_create:222:107 timer_settime:223:110 timer_gettime:224:108
timer_getoverrun:225:109 timer_delete:226:111 pause:34:- nanosleep:35:101
clock_nanosleep:230:115 clock_gettime:228:113 clock_getres:229:114
gettimeofday:96:169 getrlimit:97:163 setrlimit:160:164 getrusage:98:165
times:100:153 sysinfo:99:179 uname:63:160 getpriority:140:141
sched_yield:24:124 sched_getparam:143:121 sched_getscheduler:145:120
sched_getaffinity:204:123 getpid:39:172 gettid:186:178 getppid:110:173
getuid:102:174 geteuid:107:175 getgid:104:176 getegid:108:177
getgroups:115:158 getresuid:118:148 getresgid:120:150 getpgrp:111:-
getpgid:121:155 getsid:124:156 getcwd:79:17 chdir:80:49 fchdir:81:50
mkdir:83:- mkdirat:258:34 rmdir:84:- unlink:87:- unlinkat:263:35 rename:82:-
renameat:264:38 renameat2:316:276 link:86:- linkat:265:37 symlink:88:-
symlinkat:266:36 readlink:89:- readlinkat:267:78 umask:95:166 getxattr:191:8
lgetxattr:192:9 fgetxattr:193:10 listxattr:194:11 llistxattr:195:12
flistxattr:196:13 exit:60:93 exit_group:231:94 wait4:61:260 waitid:247:95
execve:59:221 set_robust_list:273:99 rseq:334:293 set_tid_address:218:96
arch_prctl:158:- restart_syscall:219:128 getrandom:318:278 capget:125:90
sendto:44:206 recvfrom:45:207 sendmsg:46:211 recvmsg:47:212 shutdown:48:210
getsockopt:55:209 setsockopt:54:208 getsockname:51:204 getpeername:52:205
clone:56:220 clone3:435:435 kill:62:129 tgkill:234:131 prlimit64:302:261
setpriority:141:140 sched_setaffinity:203:122 prctl:157:167 fcntl:72:25
ioctl:16:29 socketpair:53:199 flock:73:32 utimensat:280:88 chmod:90:-
fchmod:91:52 fchmodat:268:53 fchmodat2:452:452 fadvise64:221:223
futex:202:98 madvise:28:233
"""
# AUDIT_ARCH_* of each machine, and its column in _SYSCALLS
_ARCHES = {"x86_64": (0xC000003E, 1), "aarch64": (0xC00000B7, 2)}
# calls that return 0 and do nothing
_PRETENDED = "flock utimensat chmod fchmod fchmodat fchmodat2 fadvise64"

# classic BPF opcodes: BPF_LD|W|ABS, BPF_ALU|AND|K, BPF_JMP|JEQ|K,
# BPF_JMP|JGE|K, BPF_RET|K
_LD = 0x20
_AND = 0x54
_JEQ = 0x15
_JGE = 0x35
_RET = 0x06
# seccomp's actions; RET_ERRNO|errno fails the call, and _PRETEND (errno 0)
# returns 0 having done nothing
_ALLOW = 0x7FFF0000
_KILL = 0x80000000
_EPERM = 0x00050001
_PRETEND = 0x00050000
_ENOSYS = 0x00050026
_ENOTTY = 0x00050019


def _op(code, k, jt=0, jf=0):
    """One BPF instruction (struct sock_filter)."""
    return struct.pack("=HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _switch(arg, cases, default=_EPERM, mask=None):
    """Load args[arg] (low 32 bits, & mask); the action of the first case
    holding it, else `default`. `cases`: [(values, action)]."""
    tests = []
    for k, (values, _) in enumerate(cases):
        for v in values:
            tests.append((v, k))
    head = [_op(_LD, 16 + 8 * arg)]              # struct seccomp_data
    if mask:
        head.append(_op(_AND, mask))
    jumps = []
    for i, (v, k) in enumerate(tests):
        jumps.append(_op(_JEQ, v, len(tests) + k - i, 0))
    returns = [_op(_RET, action) for _, action in cases]
    return head + jumps + [_op(_RET, default)] + returns


def _syscall_numbers(machine):
    """name -> number of every call in _SYSCALLS that `machine` has."""
    column = _ARCHES[machine][1]
    nr = {}
    for entry in _SYSCALLS.split():
        row = entry.split(":")
        if row[column] != "-":
            nr[row[0]] = int(row[column])
    return nr


def _argument_rules(when, pid):
    """The filter's part for the calls of _SYSCALLS' last block, allowed
    only with some arguments: `when(name, *body)` runs body for call
    `name`, and process `pid` may act on itself only."""
    itself = [((pid, 0), _ALLOW)]
    prog = []
    # CLONE_THREAD: threads only
    prog += when("clone", *_switch(0, [((0x10000,), _ALLOW)], mask=0x10000))
    # its flags sit behind a pointer: glibc falls back to clone
    prog += when("clone3", _op(_RET, _ENOSYS))
    # itself or its own process group
    prog += when("kill", *_switch(0, [((pid, 0, -pid), _ALLOW)]))
    prog += when("tgkill", *_switch(0, [((pid,), _ALLOW)]))
    prog += when("prlimit64", *_switch(0, itself))
    prog += when("sched_setaffinity", *_switch(0, itself))
    # PRIO_PROCESS only
    prog += when("setpriority",
                 _op(_LD, 16), _op(_JEQ, 0, 1, 0), _op(_RET, _EPERM),
                 *_switch(1, itself))
    # PR_GET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_NAME, PR_GET_NAME,
    # PR_GET_SECCOMP, PR_CAPBSET_READ, PR_GET_NO_NEW_PRIVS, PR_SET_VMA
    # (names memory areas)
    prctl = (2, 3, 15, 16, 21, 23, 39, 0x53564D41)
    prog += when("prctl", *_switch(0, [(prctl, _ALLOW)]))
    # F_DUPFD, F_GETFD, F_SETFD, F_GETFL, F_SETFL, F_GETLK, F_OFD_GETLK,
    # F_DUPFD_CLOEXEC; locks (F_SETLK, F_SETLKW, F_OFD_SETLK,
    # F_OFD_SETLKW) pretended; not F_SETOWN & co.
    fcntl = [((0, 1, 2, 3, 4, 5, 36, 1030), _ALLOW),
             ((6, 7, 37, 38), _PRETEND)]
    prog += when("fcntl", *_switch(1, fcntl))
    # TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX; anything
    # else "not a tty"
    ioctl = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)
    prog += when("ioctl", *_switch(1, [(ioctl, _ALLOW)], _ENOTTY))
    # FUTEX_PRIVATE_FLAG: a futex word of this process only, never one in
    # a shared file mapping
    prog += when("futex", *_switch(1, [((128,), _ALLOW)], mask=128))
    # NORMAL, RANDOM, SEQUENTIAL, WILLNEED, DONTNEED, FREE, DONTFORK,
    # DOFORK, MERGEABLE, UNMERGEABLE, (NO)HUGEPAGE, DONTDUMP, DODUMP,
    # (KEEP|WIPE)ONFORK; not COLD, PAGEOUT, REMOVE
    madvise = (0, 1, 2, 3, 4, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19)
    prog += when("madvise", *_switch(2, [(madvise, _ALLOW)], _PRETEND))
    # AF_UNIX, and SOCK_STREAM (+ flags)
    prog += when("socketpair",
                 _op(_LD, 16), _op(_JEQ, 1, 1, 0), _op(_RET, _EPERM),
                 *_switch(1, [((1,), _ALLOW)], mask=0xF))
    for name in _PRETENDED.split():
        prog += when(name, _op(_RET, _PRETEND))
    return prog


def seccomp_filter(machine, pid):
    """A classic-BPF seccomp program (bytes) for `machine` (None for an
    unknown one) that lets process `pid` reach nothing outside itself:
    docs/sandbox.md lists what it denies."""
    if machine not in _ARCHES:
        return None
    nr = _syscall_numbers(machine)

    def when(name, *body):   # run `body` (ending in a RET) for call `name`
        if name not in nr:
            return []
        return [_op(_JEQ, nr[name], 0, len(body)), *body]

    # the arch (else kill), then the call's number
    arch = _ARCHES[machine][0]
    prog = [_op(_LD, 4), _op(_JEQ, arch, 1, 0), _op(_RET, _KILL),
            _op(_LD, 0)]
    if machine == "x86_64":
        # x32 calls (nr | 0x40000000) would dodge the numbers below
        prog += [_op(_JGE, 0x40000000, 0, 1), _op(_RET, _KILL)]
    prog += _argument_rules(when, pid)
    last_block = _SYSCALLS[_SYSCALLS.index("\nclone:"):]
    conditional = set(last_block.replace(":", " ").split())
    for name in sorted(set(nr) - conditional, key=nr.get):
        prog += when(name, _op(_RET, _ALLOW))
    return b"".join(prog + [_op(_RET, _EPERM)])


def _lock_down(workdir, timeout, memory_mb):
    """Limits, Landlock, no capabilities, seccomp, in this order: each
    needs the last, each removes rights."""
    # ceil(timeout) + 1 s: the wall clock is the real limit
    cpu = int(-(-timeout // 1)) + 1
    limits = {resource.RLIMIT_AS: memory_mb << 20,
              resource.RLIMIT_CPU: cpu,
              resource.RLIMIT_FSIZE: FILE_SIZE_MB << 20,
              resource.RLIMIT_CORE: 0,
              resource.RLIMIT_NOFILE: OPEN_FILES}
    # RLIMIT_NPROC counts every process of the uid in its user namespace:
    # only bwrap's holds just us (the judge's argv says where it runs)
    if sys.argv[2:] == ["bwrap"]:
        limits[resource.RLIMIT_NPROC] = PROCESSES
    for limit, value in limits.items():
        # a CPU hard limit 1 s above the soft one: SIGXCPU, then SIGKILL
        hard = value + 1 if limit == resource.RLIMIT_CPU else value
        resource.setrlimit(limit, (value, hard))
    # PR_SET_NO_NEW_PRIVS: Landlock and seccomp need it
    _call(_libc.prctl, 38, 1, 0, 0, 0)
    _confine(workdir)
    # no capabilities (header v3), ever
    _call(_libc.capset, struct.pack("=Ii", 0x20080522, 0), bytes(24))
    bpf = seccomp_filter(os.uname().machine, os.getpid())
    if bpf is not None:
        bpf_buffer = ctypes.create_string_buffer(bpf)
        sock_fprog = struct.pack("=H6xQ", len(bpf) // 8,
                                 ctypes.addressof(bpf_buffer))
        fprog = ctypes.create_string_buffer(sock_fprog)
        # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        _call(_libc.prctl, 22, 2, ctypes.addressof(fprog), 0, 0)


# -------------------------------------------------- the program's process

def _one_line(exc):
    """'ValueError: bad input' from an exception: one line, bounded."""
    try:
        text = str(exc).strip().splitlines()
    except BaseException:  # a program's exception may even fail to print
        text = []
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line[:300]


def _plain_text(value):
    """repr(value) when it is plain data: None, bool, int, float, str, and
    lists, tuples, sets and dicts of them, all of exactly these types;
    else TypeError saying what it is."""
    stack = [value]
    seen = set()
    while stack:
        x = stack.pop()
        kind = type(x)
        if kind in (list, tuple, set, dict):
            if id(x) in seen:
                raise TypeError("returned a container that holds itself, "
                                "not plain data")
            seen.add(id(x))
            if kind is dict:
                stack.extend([*x.keys(), *x.values()])
            else:
                stack.extend(x)
        elif x is not None and kind not in (bool, int, float, str):
            raise TypeError(f"returned a {kind.__name__}, not plain data "
                            "(None, bool, int, float, str, list, tuple, "
                            "set, dict of exactly these types)")
    return repr(value)


def _program_process(program, secret, paths):
    """The program's own interpreter: a fresh `python -I -S` that the
    locked-down child became (execve), so nothing of the judge is in its
    memory; this function, _one_line and _plain_text arrive as source on
    its stdin. It runs `program` in a fresh __main__. With a `secret` (a
    program alone) it writes "S", then the secret after the last line, or
    "!reason", to fd 3. Without (a check in a process of its own judges
    it) it writes a ready line to fd 4, "=None" or "!reason", then
    answers each call "(name, args, kwargs)" read on fd 3 with "=" and
    the plain result's repr, or "!reason"."""
    import os
    import sys
    # our own references: the program may reassign os.*
    write = os.write
    exit_now = os._exit
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.path[:] = paths
    sys.set_int_max_str_digits(0)       # results are plain data of any size
    # a fresh __main__ module, as `python program.py` has
    main = type(sys)("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["program.py"]
    if secret is not None:
        write(3, b"S")
    try:
        exec(compile(program, "program.py", "exec"), main.__dict__)
        # reached only when the last line has run
        verdict = secret
        ready = "=None"
    except BaseException as e:   # SystemExit and KeyboardInterrupt fail too
        ready = "!" + _one_line(e)
        verdict = ready.encode("utf-8", "replace")
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass
    if secret is not None:
        write(3, verdict)
        # no atexit hooks, no waiting for the program's threads
        exit_now(0)
    write(4, ready.encode("utf-8", "replace") + b"\n")
    if ready != "=None":
        exit_now(0)
    constants = {"__builtins__": {}, "nan": float("nan"),
                 "inf": float("inf"), "set": set}
    for line in os.fdopen(3, "rb"):
        try:
            # the check's repr of plain data
            name, args, kwargs = eval(line, constants)
            result = main.__dict__[name](*args, **kwargs)
            answer = "=" + _plain_text(result)
        except BaseException as e:
            answer = "!" + _one_line(e)
        write(4, answer.encode("utf-8", "replace") + b"\n")
    exit_now(0)


# -------------------------------------------------- the check's process

class ProgramFailed(Exception):
    """What a check sees when the program's code raised: the program's own
    one-line reason."""


def plain(text):
    """The value written as `text` by _plain_text, built only of plain data
    of exactly the builtin types whatever the text says (a forged answer
    can be wrong, never a custom object); ValueError for anything else."""
    return _plain_node(ast.parse(text, mode="eval").body)


_CONSTANTS = (type(None), bool, int, float, str)
_CONTAINERS = {ast.List: list, ast.Tuple: tuple, ast.Set: set}


def _plain_node(node):
    if isinstance(node, ast.Constant) and type(node.value) in _CONSTANTS:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _plain_node(node.operand)
        if type(value) in (int, float):
            return -value
    if isinstance(node, ast.Name) and node.id in ("nan", "inf"):
        return float(node.id)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        kind = _CONTAINERS[type(node)]
        return kind(_plain_node(element) for element in node.elts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        pairs = zip(node.keys, node.values)
        return {_plain_node(k): _plain_node(v) for k, v in pairs}
    if isinstance(node, ast.Call) and ast.unparse(node) == "set()":
        return set()
    raise ValueError(f"the program's answer is not plain data: "
                     f"{ast.unparse(node)[:80]}")


def _remote(calls, answers):
    """remote(name): a function of the check that calls the program's
    function `name` in the program's process, with plain arguments, and
    returns its plain result."""
    def remote(name):
        def call(*args, **kwargs):
            os.write(calls, repr((name, args, kwargs)).encode() + b"\n")
            return _answer(answers)
        return call
    return remote


def _answer(answers):
    """The program's next answer: its value, or ProgramFailed with its
    reason."""
    line = answers.readline().decode("utf-8", "replace")
    if not line.endswith("\n"):
        raise ProgramFailed("the program's process ended before it answered")
    if line.startswith("="):
        return plain(line[1:])
    raise ProgramFailed(line[1:].strip())


def _check_process(check, secret, calls, answers):
    """In the check's child (a fork of the judge, never running the
    program's code): wait for the program's ready line, run `check` with
    `remote`, write the verdict to fd 3."""
    main = type(sys)("__main__")
    main.remote = _remote(calls, answers)
    sys.modules["__main__"] = main
    sys.argv = ["check.py"]
    sys.set_int_max_str_digits(0)
    os.write(3, b"S")
    try:
        _answer(answers)
        exec(compile(check, "check.py", "exec"), main.__dict__)
        verdict = secret
    except ProgramFailed as e:
        verdict = b"!" + str(e).encode("utf-8", "replace")
    except BaseException as e:
        verdict = b"!" + _one_line(e).encode("utf-8", "replace")
    with contextlib.suppress(BaseException):
        sys.stdout.flush()
    os.write(3, verdict)
    os._exit(0)


# -------------------------------------------------- the children

def _child(check, secret, fds, workdir, timeout, memory_mb):
    """In a forked child of the judge: its own session (no terminal), fds
    0, 1, ... from `fds` (None: /dev/null), locked down; then, without a
    `check`, it becomes the program's fresh interpreter, else it runs the
    check (fd 4: calls, fd 5: answers). Never returns; "?reason" on fd 3
    if the lock-down failed."""
    try:
        os.setsid()                     # own session and group: no terminal
        # PR_SET_PDEATHSIG: die with the judge
        _call(_libc.prctl, 1, signal.SIGKILL)
        null = os.open("/dev/null", os.O_RDWR)
        for target, fd in enumerate(fds):
            # inheritable: they survive execve
            os.dup2(null if fd is None else fd, target)
        # none of the judge's
        most = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        os.closerange(len(fds), most)
        os.chdir(workdir)
        if check is not None:
            # PR_SET_DUMPABLE 0: the program cannot open its /proc
            _call(_libc.prctl, 4, 0)
        _lock_down(workdir, timeout, memory_mb)
        # OMP_NUM_THREADS as openai's guard: one BLAS thread
        env = dict(HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8",
                   PATH=os.defpath, OMP_NUM_THREADS="1")
        if check is None:
            read_stdin = "import sys; exec(sys.stdin.buffer.read())"
            argv = [sys.executable, "-I", "-S", "-c", read_stdin]
            os.execve(sys.executable, argv, env)
        os.environ.clear()
        os.environ.update(env)
        tempfile.tempdir = workdir
    except BaseException as e:
        os.write(3, b"?" + _one_line(e).encode())
        os._exit(1)
    _check_process(check, secret, 4, os.fdopen(5, "rb"))


_PROGRAM_SOURCE = "".join(inspect.getsource(f) + "\n"
                          for f in (_one_line, _plain_text, _program_process))


def _spawn(check, secret, fds, workdir, timeout, memory_mb):
    """Fork a child (_child); its pid and a pidfd (readable once it has
    exited). If this or pidfd_open raises, the evaluating process replaces
    the judge."""
    pid = os.fork()
    if pid == 0:
        try:
            _child(check, secret, fds, workdir, timeout, memory_mb)
        finally:
            os._exit(1)
    return pid, os.pidfd_open(pid)


# -------------------------------------------------- the judge

def _judge(program, check, timeout, memory_mb):
    """The Result fields of one program as a dict; `clean`: its dir is
    gone. Alone, the program's process gives the verdict; with a `check`,
    the check's process does."""
    start = time.monotonic()
    secret = secrets.token_hex(16).encode()
    workdir = tempfile.mkdtemp(prefix="program-")
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    source_r, source_w = os.pipe()
    theirs = [out_w, err_w, verdict_w, source_r]
    limits = (workdir, timeout, memory_mb)
    if check is None:
        program_fds = [source_r, out_w, err_w, verdict_w]
        children = [_spawn(None, None, program_fds, *limits)]
    else:
        calls_r, calls_w = os.pipe()
        answers_r, answers_w = os.pipe()
        theirs += [calls_r, calls_w, answers_r, answers_w]
        check_fds = [None, out_w, err_w, verdict_w, calls_w, answers_r]
        program_fds = [source_r, out_w, err_w, calls_r, answers_w]
        children = [_spawn(check, secret, check_fds, *limits),
                    _spawn(None, None, program_fds, *limits)]
    for fd in theirs:
        os.close(fd)
    program_secret = secret if check is None else None
    request = (f"{_PROGRAM_SOURCE}\n_program_process({program!r}, "
               f"{program_secret!r}, {sys.path!r})\n")
    with contextlib.suppress(BrokenPipeError), open(source_w, "wb") as pipe:
        pipe.write(request.encode("utf-8", "surrogatepass"))
    watched = _watch(children, [out_r, err_r, verdict_r], start, timeout)
    problem, out, err, verdict, exitcode = watched
    for _, pidfd in children:
        os.close(pidfd)
    status, reason = problem or _verdict(verdict, secret, exitcode)
    clean = _remove_tree(workdir) and _tmp_as_it_was()
    return dict(status=status,
                reason=reason,
                stdout=out.decode("utf-8", "replace"),
                stderr=err.decode("utf-8", "replace"),
                seconds=time.monotonic() - start,
                clean=clean)


def _kill_all(pids):
    """SIGKILL each of `pids` that still runs."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _watch(children, fds, start, timeout):
    """Read the children's output and verdict until the first child (the
    one giving the verdict) has exited, then stop the others; SIGKILL all
    past the deadline, the output cap, PROCESSES threads or FILES files.
    (problem or None, stdout, stderr, verdict, exit code)."""
    bufs = {fd: bytearray() for fd in fds}
    caps = {fds[0]: (OUTPUT_CAP, "stdout"),
            fds[1]: (OUTPUT_CAP, "stderr"),
            fds[2]: (4096, "the verdict pipe")}
    pidfds = {pidfd: pid for pid, pidfd in children}
    problem = None
    watched = [*fds, *pidfds]
    first = children[0][1]
    while watched and problem is None:
        remaining = start + timeout - time.monotonic()
        if remaining <= 0:
            limit = f"exceeded the {timeout:g} s wall-clock limit"
            problem = ("timed out", limit)
        problem = problem or _over_limits(list(pidfds.values()))
        if problem is not None:
            break
        ready = select.select(watched, [], [], min(remaining, 0.01))[0]
        for fd in ready:
            chunk = b"" if fd in pidfds else os.read(fd, 65536)
            if fd == first:      # the verdict's child is gone: so are the others
                _kill_all(pidfds.values())
            if not chunk:        # exited (its pipes now drain to EOF), or EOF
                watched.remove(fd)
                continue
            bufs[fd] += chunk
            cap, name = caps[fd]
            if len(bufs[fd]) > cap:
                problem = ("error", f"exceeded the output cap ({cap} bytes "
                                    f"on {name})")
                break
    if problem is not None:
        # no other process to kill: they could not make any
        for pid in pidfds.values():
            os.kill(pid, signal.SIGKILL)
    codes = []
    for pid in pidfds.values():
        status = os.waitpid(pid, 0)[1]
        codes.append(os.waitstatus_to_exitcode(status))
    for fd in fds:
        os.close(fd)
    out, err, verdict = (bytes(bufs[fd][:OUTPUT_CAP]) for fd in fds)
    return problem, out, err, verdict, codes[0]


def _over_limits(pids):
    """A problem when the children together run more than PROCESSES
    threads (RLIMIT_NPROC does not bind root), or (under bwrap, where /tmp
    is the programs' own) hold more than FILES files; else None."""
    if sum(_threads(pid) for pid in pids) > PROCESSES:
        return ("failed", f"started more than {PROCESSES} threads")
    if sys.argv[2:] == ["bwrap"]:
        tmp = os.statvfs("/tmp")
        if tmp.f_files - tmp.f_ffree > FILES:
            return ("failed", f"made more than {FILES} files")
    return None


# under bwrap: what the judge's private /tmp held before any program
_TMP_AT_START = []


def _tmp_as_it_was():
    """False when a program left something in the private /tmp (possible
    without Landlock): the judge is then replaced, and with it /tmp."""
    if sys.argv[2:] != ["bwrap"]:
        return True
    return sorted(os.listdir("/tmp")) == _TMP_AT_START


def _threads(pid):
    """How many threads process `pid` has (0 once it has gone)."""
    with contextlib.suppress(OSError, IndexError):
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
            return int(fields[17])                 # field 20, num_threads
    return 0


def _verdict(verdict, secret, exitcode):
    """(status, reason) of a child that ended by itself; exitcode < 0 is
    -signal."""
    body = verdict[1:]
    if verdict.startswith(b"?"):
        setup = body.decode("utf-8", "replace")
        return "error", "sandbox setup failed: " + setup
    if verdict.startswith(b"S") and body == secret and exitcode == 0:
        return "passed", ""
    if body.startswith(b"!"):
        return "failed", body[1:].decode("utf-8", "replace")
    if exitcode == -signal.SIGXCPU:
        return "timed out", "exceeded the CPU time limit"
    if exitcode < 0:
        name = signal.strsignal(-exitcode)
        return "failed", f"killed by signal {-exitcode} ({name})"
    return "failed", (f"exited with code {exitcode} before the end of the "
                      f"program")


def _remove_tree(path):
    """Delete a tree whatever it holds (any depth, dirs without
    permissions); True when it is gone; never raises. One directory fd at
    a time, names relative to it: PATH_MAX does not matter."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    below = []                                  # the names down to fd
    fd = None
    try:
        fd = os.open(path, flags)
        while True:
            # a program may create directories with mode 0
            os.fchmod(fd, 0o700)
            with os.scandir(fd) as entries:
                names = [(entry.name, entry.is_dir(follow_symlinks=False))
                         for entry in entries]
            subdirs = [name for name, is_dir in names if is_dir]
            for name in {name for name, _ in names} - set(subdirs):
                os.unlink(name, dir_fd=fd)
            if not subdirs and not below:
                break
            previous = fd
            fd = os.open(subdirs[0] if subdirs else "..", flags, dir_fd=fd)
            os.close(previous)
            if subdirs:                         # went down into it
                below.append(subdirs[0])
            else:                               # came up from an emptied one
                os.rmdir(below.pop(), dir_fd=fd)
        os.rmdir(path)
    except OSError:
        pass
    finally:
        if fd is not None:
            os.close(fd)
    return not os.path.lexists(path)


def _serve():
    """The judge's loop: a request on stdin, the answer on stdout (a line
    of JSON each)."""
    # PR_SET_DUMPABLE 0: no process may read or write our memory
    _call(_libc.prctl, 4, 0)
    # PR_SET_PDEATHSIG: die with the evaluating process
    _call(_libc.prctl, 1, signal.SIGKILL)
    # this file's directory: its modules are not the programs'
    del sys.path[0]
    _TMP_AT_START.extend(sorted(os.listdir("/tmp")))
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            reply = _judge(request["program"], request["check"],
                           request["timeout"], request["memory_mb"])
        except Exception as e:
            # e.g. fork failed: this program gets 'error', a new judge the
            # next
            reply = dict(status="error",
                         reason=f"the judge failed: {_one_line(e)}",
                         stdout="", stderr="", seconds=0.0, clean=False)
        sys.stdout.buffer.write(json.dumps(reply).encode() + b"\n")
        sys.stdout.flush()


# -------------------------------------------------- the evaluating process

class _Judge:
    """A judge process, started on first use and replaced if it fails or
    cannot clean up."""

    def __init__(self, use_bwrap):
        self.use_bwrap = use_bwrap
        self.proc = None
        self.last_words = ""

    def _start(self):
        # Without bwrap the programs' dirs go in a dir of ours, removed in
        # close() in any case
        if self.use_bwrap:
            self.tmpdir = "/tmp"
            where = "bwrap"
        else:
            self.tmpdir = tempfile.mkdtemp(prefix="sandbox-")
            where = "host"
        cmd = [sys.executable, "-E", "-s", _THIS_FILE, "--judge", where]
        if self.use_bwrap:
            cmd = _bwrap_command() + cmd
        landlock = os.environ.get("SANDBOX_LANDLOCK", "")
        env = {"LANG": "C.UTF-8", "PATH": os.defpath, "TMPDIR": self.tmpdir,
               "SANDBOX_LANDLOCK": landlock}
        pipe = subprocess.PIPE
        self.proc = subprocess.Popen(cmd, stdin=pipe, stdout=pipe,
                                     stderr=pipe, cwd="/",
                                     start_new_session=True, env=env)

    def run(self, program, timeout, memory_mb):
        """The Result of `program`: source, or (source, check source)."""
        check = None
        if not isinstance(program, str):
            program, check = program
        if self.proc is None:
            self._start()
        start = time.monotonic()
        poll = select.poll()
        request = dict(program=program, check=check, timeout=timeout,
                       memory_mb=memory_mb)
        # if it died, it says nothing and we report why
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            self.proc.stdin.flush()
        poll.register(self.proc.stdout, select.POLLIN)
        reply = None
        if poll.poll((timeout + JUDGE_SLACK) * 1000):
            line = self.proc.stdout.readline()
            if line:
                reply = json.loads(line)
        # a fresh judge (and /tmp) for the next program
        if reply is None or not reply.pop("clean"):
            self.close()
        if reply is not None:
            return Result(**reply)
        why = self.last_words or "no answer"
        return Result("error", f"the judge failed: {why}", "", "",
                      time.monotonic() - start)

    def close(self):
        """Stop the judge (SIGKILL to its group: between programs it has
        nothing to finish)."""
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        with self.proc:                    # then it closes the pipes and waits
            said = self.proc.stderr.read(OUTPUT_CAP)
        lines = said.decode("utf-8", "replace").strip().splitlines()
        self.last_words = lines[-1][:300] if lines else ""
        self.proc = None
        if not self.use_bwrap:
            _remove_tree(self.tmpdir)


# the path programs run on here and why, (path, why), once known
_isolation = None
_warned = False
_isolation_lock = threading.Lock()


def _find_isolation():
    """(path, why): 'bwrap' when it works here, else 'rlimits' and why."""
    if os.environ.get("SANDBOX_ISOLATION") == "rlimits":
        return ("rlimits", "SANDBOX_ISOLATION=rlimits")
    if shutil.which("bwrap") is None:
        return ("rlimits", "bwrap not found")
    # probe it: user namespaces may be off, bwrap too old
    probe = _Judge(use_bwrap=True)
    reason = probe.run("pass", 10.0, 2048).reason
    probe.close()
    if reason:
        return ("rlimits", f"bwrap fails here ({reason})")
    return ("bwrap", "")


def _fallback_gaps():
    """What the fallback path lacks on this machine."""
    gaps = ["namespaces"]
    if landlock_abi() == 0:
        gaps.append("Landlock: files NOT protected")
    if os.uname().machine not in _ARCHES:
        gaps.append(f"seccomp on {os.uname().machine}: processes may fork")
    return gaps


def isolation(allow_fallback=None):
    """'bwrap' or 'rlimits': the path programs run on here. Given
    `allow_fallback`, the fallback raises OSError unless it is true or
    SANDBOX_ISOLATION=rlimits, else warns once per process."""
    global _isolation, _warned
    with _isolation_lock:
        if _isolation is None:
            _isolation = _find_isolation()
        path, why = _isolation
        if path == "bwrap" or allow_fallback is None:
            return path
        chosen = os.environ.get("SANDBOX_ISOLATION") == "rlimits"
        if not (allow_fallback or chosen):
            lost = ""
            if landlock_abi() == 0:
                lost = "; without Landlock it would not even protect files"
            raise OSError(f"the sandbox needs bubblewrap ({why}): "
                          f"{INSTALL_HINT}; or ask for the weaker fallback "
                          f"with SANDBOX_ISOLATION=rlimits (sandbox.py: "
                          f"--allow-fallback){lost}")
        if not _warned:
            _warned = True
            gaps = "; no ".join(_fallback_gaps())
            print(f"sandbox: {why}; programs run less isolated (no {gaps}); "
                  f"for the strong path: {INSTALL_HINT}", file=sys.stderr)
        return path


def run_many(programs, timeout=3.0, workers=None, memory_mb=2048,
             progress=None, allow_fallback=False):
    """Run every program, `workers` at a time (default: the CPU count);
    their Results in input order. A program is Python source, 'passed'
    iff it ran to its end, or (source, check): 'passed' iff the check ran
    to its end, calling the program's functions through
    `remote(name)(*args)`; within `timeout` wall-clock seconds and
    `memory_mb` of address space each. `progress(done, total)` is called
    after each program (one call at a time). Without bubblewrap: OSError,
    unless `allow_fallback`."""
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout ({timeout}) and memory_mb ({memory_mb}) "
                         f"must be positive")
    use_bwrap = isolation(allow_fallback) == "bwrap"
    local = threading.local()
    judges = []
    lock = threading.Lock()
    done = [0]

    def one(program):
        if not hasattr(local, "judge"):          # one judge per worker thread
            local.judge = _Judge(use_bwrap)
            judges.append(local.judge)
        result = local.judge.run(program, timeout, memory_mb)
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(programs))
        return result

    threads = max(1, min(workers or os.cpu_count() or 1, len(programs)))
    try:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(one, programs))
    finally:
        for judge in judges:
            judge.close()


def run(program, timeout=3.0, memory_mb=2048, allow_fallback=False):
    """run_many for a single program."""
    results = run_many([program], timeout, 1, memory_mb,
                       allow_fallback=allow_fallback)
    return results[0]


def _shown(text, prefix):
    """Output safe for a terminal: each line starts with `prefix`; control
    and invisible characters (escape sequences, \\r, bidi overrides) are
    Python escapes: no hiding or faking other lines."""
    lines = text.removesuffix("\n").split("\n") if text else []
    shown = []
    for line in lines:
        chars = [c if c.isprintable() or c == "\t" else repr(c)[1:-1]
                 for c in line]
        shown.append(prefix + "".join(chars) + "\n")
    return "".join(shown)


def main(argv=None):
    parser = common.ArgumentParser(description="Run a Python file in the "
                                   "sandbox: its output, then the verdict.")
    parser.add_argument("file", help="the Python program to run")
    parser.add_argument("--timeout", type=float, default=3.0,
                        help="wall-clock seconds")
    parser.add_argument("--memory-mb", type=int, default=2048,
                        help="address-space limit")
    parser.add_argument("--allow-fallback", action="store_true",
                        help="without bubblewrap, run on the weaker "
                             "fallback path instead of refusing "
                             f"({INSTALL_HINT} for the strong path)")
    args = parser.parse_args(argv)
    try:
        program = pathlib.Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        common.die(f"cannot read {args.file}: {e}")
    result = run(program, args.timeout, args.memory_mb,
                 allow_fallback=args.allow_fallback)
    sys.stdout.write(_shown(result.stdout, "stdout| "))
    sys.stdout.write(_shown(result.stderr, "stderr| "))
    reason = ""
    if result.reason:
        reason = ": " + _shown(result.reason, "").strip()
    print(f"{result.status}{reason} ({result.seconds:.2f} s, isolation: "
          f"{isolation()})", flush=True)
    return 0 if result.status == "passed" else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--judge"]:
        raise SystemExit(_serve())
    raise SystemExit(common.run_main(main))
