"""Tests for sandbox.py: each threat is tried on both paths, bubblewrap and the fallback
(skipped, saying why, where a path is not available here). Every hostile program is
bounded (bombs stop at a few hundred, fixed-size memory, floods that end, loopback only),
so a broken sandbox fails its test instead of hurting the machine; canary processes and
files the test creates are checked unchanged, and honest programs after a hostile one
must still pass. Run: python -m pytest tests/test_sandbox.py"""
import fcntl
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import common
import sandbox

REPO = Path(__file__).resolve().parents[1]
BWRAP_PATH = sandbox.isolation()
WHY_NOT_BWRAP = sandbox._isolation[1]
HONEST = ["assert sum(range(10)) == 45", "import json\nprint(json.dumps([1, 2]))",
          "open('f', 'w').write('x' * 1000)\nassert open('f').read() == 'x' * 1000"]
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"


@pytest.fixture(params=["bwrap", "rlimits"])
def path(request, monkeypatch):
    """Run the test once per isolation path; the fallback as explicitly asked for."""
    if request.param == "bwrap" and BWRAP_PATH != "bwrap":
        pytest.skip(f"the bwrap path is not available here: {WHY_NOT_BWRAP}")
    if request.param == "rlimits":
        monkeypatch.setenv("SANDBOX_ISOLATION", "rlimits")
    monkeypatch.setattr(sandbox, "_isolation", (request.param, "chosen by the test"))
    return request.param


@pytest.fixture
def canary():
    """A process of ours for programs to attack; yields its pid, checks it is unharmed."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    before = _process_state(proc.pid)
    yield proc.pid
    try:
        assert proc.poll() is None and _process_state(proc.pid) == before
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def canary_file():
    """A file outside /tmp (bwrap hides /tmp), checked unchanged afterwards."""
    directory = REPO / "tests" / f".sandbox-canary-{secrets.token_hex(4)}"
    directory.mkdir()
    file = directory / "keep.txt"
    file.write_text("precious")
    os.utime(file, (1_000_000, 1_000_000))
    before = (file.stat().st_mode, file.stat().st_mtime, os.listxattr(file), directory.stat().st_mode)
    yield file
    try:
        assert file.read_text() == "precious" and sorted(os.listdir(directory)) == ["keep.txt"]
        assert (file.stat().st_mode, file.stat().st_mtime, os.listxattr(file), directory.stat().st_mode) == before
    finally:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


def _process_state(pid):
    """What a program could change about a process: stopped, nice, affinity, limits."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    stopped_or_dead = fields[0] in "TtZX"
    return stopped_or_dead, fields[16], os.sched_getaffinity(pid), Path(f"/proc/{pid}/limits").read_text()


def _honest_still_pass(hostile, path_name, workers=1):
    """Run the hostile programs, then honest ones, through the same judges."""
    results = sandbox.run_many(hostile + HONEST * 2, timeout=5.0, workers=workers)
    honest = results[len(hostile):]
    assert [r.status for r in honest] == ["passed"] * len(honest), (path_name, honest)
    return results[:len(hostile)]


def test_ordinary_program_passes(path):
    program = """
import asyncio, json, tempfile, threading
from pathlib import Path
Path("data.json").write_text(json.dumps({"a": [1, 2]}))
assert json.loads(Path("data.json").read_text())["a"] == [1, 2]
with tempfile.TemporaryFile() as f:                # TMPDIR is the program's own directory
    f.write(b"x")
out = []
threads = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert sorted(out) == [0, 1, 2, 3]
async def two():
    await asyncio.sleep(0)
    return 2
assert asyncio.run(two()) == 2                     # its event loop makes a socketpair
print("done", __name__)
"""
    r = sandbox.run(program)
    assert (r.status, r.reason, r.stdout, r.stderr) == ("passed", "", "done __main__\n", "")


def test_failures_carry_the_exception_line(path):
    programs = ["assert 1 + 1 == 3, 'arithmetic'", "def f(:\n    pass", "x = input()",
                "import sys\nprint('to stderr', file=sys.stderr)\nraise ValueError('bad\\nsecond line')"]
    r = sandbox.run_many(programs, timeout=3.0, workers=2)
    assert [x.status for x in r] == ["failed"] * 4
    assert r[0].reason == "AssertionError: arithmetic"
    assert r[1].reason.startswith("SyntaxError")
    assert r[2].reason.startswith("EOFError")          # stdin is /dev/null
    assert r[3].reason == "ValueError: bad" and r[3].stderr == "to stderr\n"


def test_forged_verdicts_do_not_pass(path):
    forgeries = [
        "import sys; sys.exit(0)", "raise SystemExit", "exit()", "import os; os._exit(0)",
        "raise KeyboardInterrupt", "print('passed', flush=True); assert False",
        "import sys; sys.stdout.write('passed'); sys.stdout.flush(); import os; os._exit(0)",
        "import os, signal; os.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal; os.killpg(0, signal.SIGKILL)",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
        "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'Spassed')\n    except OSError: pass\nos._exit(0)",
        "import os, signal; os.kill(-1, signal.SIGKILL)",
        "import os; open(f'/proc/{os.getppid()}/fd/0', 'rb').read(1)",   # steal the judge's next request
    ]
    results = _honest_still_pass(forgeries, path)
    for program, r in zip(forgeries, results):
        assert r.status == "failed", (program, r)


def test_processes_and_threads_are_bounded(path):
    bomb = "import os, time\nfor i in range(300):\n    if os.fork() == 0:\n        time.sleep(30)\n        os._exit(0)"
    threads = ("import threading, time\nthreading.stack_size(32768)\nfor i in range(300):\n"   # small stacks:
               "    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\n"  # not memory-bound
               "    print(i, flush=True)\ntime.sleep(1)")                                    # still running
    others = ["import subprocess; subprocess.run(['true'])", "import os; assert os.system('true') == 0",
              "import os; os.posix_spawn('/bin/true', ['true'], {})",
              "import multiprocessing as mp; p = mp.Process(target=print); p.start(); p.join()",
              "import os; os.setsid()"]
    results = _honest_still_pass([bomb, threads] + others, path)
    assert [r.status for r in results] == ["failed"] * 7, results
    assert "PermissionError" in results[0].reason and "thread" in results[1].reason   # NPROC, or counted
    # as root no rlimit binds threads: the judge counts them every 10 ms and stops the program,
    # which on a loaded machine may have made all 300 by then (it sleeps 1 s after them)
    assert 60 <= int(results[1].stdout.split()[-1])


def test_signals_without_kill_reach_nothing(path, canary):
    """F_SETOWN / F_SETOWN_EX / FIOSETOWN + O_ASYNC make the kernel signal the owner."""
    attacks = []
    for target in (canary, "os.getppid()", "-os.getpgid(os.getppid())"):
        attacks += [f"""{LIBC}import fcntl, signal
r, w = os.pipe()
fcntl.fcntl(r, fcntl.F_SETSIG, signal.SIGKILL) if hasattr(fcntl, 'F_SETSIG') else None
fcntl.fcntl(r, 8, {target})                                   # F_SETOWN
fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
os.write(w, b'x')""",
                    f"""import fcntl, os, struct
r, w = os.pipe()
fcntl.ioctl(r, 0x8901, struct.pack('i', {target}))            # FIOSETOWN
fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)
os.write(w, b'x')""",
                    f"""import fcntl, os, struct
r, w = os.pipe()
fcntl.fcntl(r, 15, struct.pack('ii', 1, {target}))           # F_SETOWN_EX, F_OWNER_PID
fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)
os.write(w, b'x')"""]
    results = _honest_still_pass(attacks, path)
    assert all(r.status == "failed" for r in results), results


def test_judge_and_canary_cannot_be_poisoned(path, canary):
    """prlimit, setpriority, sched_setaffinity, oom_score_adj of the judge, the canary, the user."""
    attacks = []
    for target in (canary, "os.getppid()"):
        attacks += [f"import os, resource\nresource.prlimit({target}, resource.RLIMIT_NOFILE, (4, 4))",
                    f"import os, resource\nresource.prlimit({target}, resource.RLIMIT_AS, (1 << 20, 1 << 20))",
                    f"import os, resource\nresource.prlimit({target}, resource.RLIMIT_CPU, (1, 1))",
                    f"import os\nos.setpriority(os.PRIO_PROCESS, {target}, 19)",
                    f"import os\nos.sched_setaffinity({target}, {{0}})",
                    f"import os\nopen(f'/proc/{{{target}}}/oom_score_adj', 'w').write('1000')"]
    attacks += ["import os\nos.setpriority(os.PRIO_USER, 0, 19)",
                "import os\nos.setpriority(os.PRIO_PGRP, 0, 19)"]
    results = _honest_still_pass(attacks * 2, path, workers=2)   # a second round against fresh judges
    assert all(r.status == "failed" and r.reason.split(":")[0] in ("PermissionError", "FileNotFoundError", "OSError")
               for r in results), results                  # not found: under bwrap it cannot see the canary


def test_nothing_outlives_the_run(path):
    name = f"sb{secrets.token_hex(6)}"
    program = f"""{LIBC}import signal, time
libc.prctl(15, {name.encode()!r})                   # PR_SET_NAME: how the test finds it
cleared = libc.prctl(1, 0)                          # PR_SET_PDEATHSIG 0
try:
    os.kill(os.getppid(), signal.SIGKILL)
except OSError:
    pass
print(cleared, flush=True)
time.sleep(60)"""
    r = sandbox.run(program, timeout=1.0)
    assert r.status == "timed out" and r.stdout == "-1\n", r
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == name]


def _comm(pid):
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_ipc_keys_and_memfd_are_refused(path):
    calls = {"shmget": "libc.shmget(0, 1 << 30, 0o1666)", "msgget": "libc.msgget(0, 0o1666)",
             "semget": "libc.semget(0, 1, 0o1666)",
             "add_key": "libc.syscall(248 if os.uname().machine == 'x86_64' else 217, b'user', b'x', b'v', 1, -4)",
             "keyctl": "libc.syscall(250 if os.uname().machine == 'x86_64' else 219, 0, -4, 0)",
             "memfd": "libc.syscall(319 if os.uname().machine == 'x86_64' else 279, b'm', 0)"}
    before = _ipc_and_keys()
    programs = [f"{LIBC}print({call}, ctypes.get_errno())" for call in calls.values()]
    results = _honest_still_pass(programs, path)
    assert [r.stdout for r in results] == ["-1 1\n"] * len(calls), dict(zip(calls, results))
    assert _ipc_and_keys() == before


def _ipc_and_keys():
    return [Path(f).read_text() for f in ("/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem",
                                          "/proc/keys") if os.path.exists(f)]


def test_files_outside_the_temp_dir_are_untouched(path, canary_file):
    if path == "rlimits" and sandbox.landlock_abi() < 3:
        pytest.skip("without Landlock ABI 3 the fallback path cannot protect files")
    v, d = str(canary_file), str(canary_file.parent)
    attacks = [f"import os; os.remove({v!r})", f"open({v!r}, 'w').write('gone')",
               f"import os; os.truncate({v!r}, 0)", f"import os; os.rename({v!r}, {v!r} + '.moved')",
               f"import shutil; shutil.rmtree({d!r})",
               f"open({d + '/new.txt'!r}, 'w').write('new')", f"import io; io.FileIO({v!r}, 'w')",
               f"import _io; _io.open({v!r}, 'a').write('x')",
               f"import posix; posix.open({v!r}, posix.O_WRONLY | posix.O_TRUNC)",
               f"import sqlite3; sqlite3.connect({d + '/db'!r}).execute('create table t (x)')",
               f"import os; os.setxattr({v!r}, 'user.x', b'1')",
               f"import os; os.setxattr({v!r}, 'system.posix_acl_access', bytes.fromhex('02000000010007000000000004000700000000001000070000000000200007000000'))",
               f"import os; os.link({v!r}, 'hard'); open('hard', 'w').write('x')"]
    results = _honest_still_pass(attacks, path, workers=2)
    assert [r.status for r in results] == ["failed"] * len(attacks), results
    pretended = [f"import os; os.utime({v!r}, (0, 0))", f"import os; os.chmod({v!r}, 0o777)",
                 f"import os; os.chmod({d!r}, 0o777)", f"import shutil; shutil.copystat('/dev/null', {v!r})"]
    assert [r.status for r in sandbox.run_many(pretended)] == ["passed"] * 4    # and change nothing


def test_file_locks_are_pretended(path):
    with open(os.__file__) as f:                    # a host file both paths show
        fcntl.flock(f, fcntl.LOCK_SH)               # a real lock, held by the test
        r = sandbox.run(f"import fcntl\nf = open({os.__file__!r})\n"
                        "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nfcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB)")
    assert r.status == "passed", r                  # it never reached the kernel's lock


def test_unix_sockets_reach_nothing(path, tmp_path):
    named = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = str(REPO / "tests" / f".sandbox-sock-{secrets.token_hex(4)}")
    named.bind(address)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0sandbox-{secrets.token_hex(4)}")
    try:
        attacks = []
        for target in (address, abstract.getsockname()):
            attacks += [f"import socket\na, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                        f"a.sendto(b'hi', {target!r})",
                        f"import socket\na, b = socket.socketpair()\na.sendto(b'hi', {target!r})",
                        f"import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\ns.sendto(b'hi', {target!r})"]
        results = _honest_still_pass(attacks, path)
        assert [r.status for r in results] == ["failed"] * len(attacks), results
        for s in (named, abstract):
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(10)
    finally:
        named.close(), abstract.close(), os.unlink(address)


def test_network_is_denied(path):
    with socket.socket() as server:          # reachable from this process, so only the sandbox can stop it
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        r = sandbox.run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()")
    assert r.status == "failed" and "PermissionError" in r.reason, r


def test_memory_hog_is_stopped(path):
    r = sandbox.run("x = bytearray(3 << 30)\nx[-1] = 1", memory_mb=512)
    assert (r.status, r.reason) == ("failed", "MemoryError")


def test_output_flood_is_cut(path):
    flood = "import sys\nfor _ in range(50):\n    sys.{}.write('x' * 1_000_000)"   # 50 MB, then it ends
    out, err = sandbox.run_many([flood.format("stdout"), flood.format("stderr")], workers=2)
    assert out.status == err.status == "error"
    assert "output cap" in out.reason and "stdout" in out.reason and "stderr" in err.reason
    assert len(out.stdout) == len(err.stderr) == sandbox.OUTPUT_CAP


def test_disk_fill_and_deep_trees_are_cleaned_up(path):
    """A tree deeper than PATH_MAX with 40 MB in it, dirs with mode 0, a big file: the next
    programs still get the whole private /tmp (64 MiB) and nothing is left on disk."""
    deep = """import os
os.mkdir('locked', 0)
for i in range(60):
    os.mkdir('d' * 100)
    os.chdir('d' * 100)
    if i % 15 == 0:
        with open('fill', 'wb') as f:
            f.write(b'x' * 10_000_000)
os.mkdir('empty', 0o500)
print(len(os.getcwd()))"""
    big = "with open('big', 'wb') as f:\n    for _ in range(100):\n        f.write(b'x' * 1_000_000)"
    refill = "for i in range(3):\n    with open(f'again{i}', 'wb') as f:\n        f.write(b'x' * 10_000_000)"
    before = set(Path(sandbox.tempfile.gettempdir()).glob("sandbox-*"))
    results = _honest_still_pass([deep, big, refill, deep, refill], path)
    assert results[0].status == "passed" and int(results[0].stdout) > 4096
    assert results[1].status == "failed" and "File too large" in results[1].reason   # RLIMIT_FSIZE, 16 MiB
    assert results[2].status == results[4].status == "passed"          # 30 MB: the space is free again
    assert set(Path(sandbox.tempfile.gettempdir()).glob("sandbox-*")) == before


def test_remove_tree_never_raises(tmp_path):
    top = tmp_path / "top"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(80):                              # 80 x 101 characters: beyond PATH_MAX
        os.mkdir("e" * 100, dir_fd=fd)
        fd, parent = os.open("e" * 100, os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.mkfifo("fifo", dir_fd=fd)
    os.symlink("/etc/passwd", "link", dir_fd=fd)
    os.mkdir("locked", 0, dir_fd=fd)
    os.close(fd)
    assert sandbox._remove_tree(top) is True and not top.exists()
    assert sandbox._remove_tree(top) is True and os.path.exists("/etc/passwd")


def test_sleep_and_sigterm_ignoring_loop_time_out(path):
    start = time.monotonic()
    r = sandbox.run_many(["import time\ntime.sleep(10 ** 6)",
                          "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass"],
                         timeout=1.0, workers=2)
    assert [x.status for x in r] == ["timed out"] * 2 and time.monotonic() - start < 1.0 + 3.0


def test_run_many_keeps_order_and_reports_progress(path):
    programs = [f"import time\ntime.sleep({0.05 * (i % 3)})\nprint({i})" for i in range(12)]
    calls = []
    results = sandbox.run_many(programs, workers=3, progress=lambda done, total: calls.append((done, total)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(12)]
    assert calls == [(i, 12) for i in range(1, 13)]


def test_a_killed_judge_is_replaced_and_leaves_no_files():
    judge = sandbox._Judge(use_bwrap=False)
    assert judge.run("pass", 3.0, 512).status == "passed"
    base = Path(judge.tmpdir)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(judge.run, "open('f', 'w').write('x')\nimport time\ntime.sleep(60)", 30.0, 512)
        deadline = time.monotonic() + 10
        while not list(base.glob("program-*/f")) and time.monotonic() < deadline:
            pass                                # the program is running and has written its file
        os.killpg(judge.proc.pid, 9)            # the judge dies in the middle of the program
        assert pending.result().status == "error"
    assert not base.exists()
    assert judge.run("print(1)", 3.0, 512).stdout == "1\n"   # a new judge takes over
    judge.close()


def test_seccomp_filter_is_well_formed():
    assert sandbox.seccomp_filter("sparc", 2) is None
    for machine in sandbox._ARCHES:
        bpf = sandbox.seccomp_filter(machine, 1234)
        assert len(bpf) % 8 == 0 and len(bpf) // 8 < 4096           # BPF_MAXINSNS
        column = [entry.split(":")[list(sandbox._ARCHES).index(machine) + 1] for entry in sandbox._SYSCALLS.split()]
        numbers = [n for n in column if n != "-"]
        assert len(set(numbers)) == len(numbers)                     # no number twice


def test_bad_arguments():
    with pytest.raises(ValueError, match="positive"):
        sandbox.run_many(["pass"], timeout=0)


@pytest.mark.parametrize("landlock", ["", "off"])
def test_fallback_refuses_unless_asked(monkeypatch, capsys, tmp_path, landlock):
    monkeypatch.setenv("SANDBOX_LANDLOCK", landlock)       # off: as on a kernel without Landlock
    monkeypatch.delenv("SANDBOX_ISOLATION", raising=False)
    monkeypatch.setattr(sandbox, "_isolation", ("rlimits", "bwrap not found"))
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.raises(OSError, match="apt-get install bubblewrap") as refusal:
        sandbox.run("print('model-written code')")
    assert ("without Landlock it would not even protect files" in str(refusal.value)) == (landlock == "off")
    assert sandbox.run("print(1)", allow_fallback=True).stdout == "1\n"
    assert sandbox.run("print(2)", allow_fallback=True).stdout == "2\n"
    with pytest.raises(OSError, match="apt-get install bubblewrap"):
        sandbox.run_many(["print('still refused without asking')"])
    err = capsys.readouterr().err
    assert err.count("sandbox:") == 1 and "less isolated" in err and "apt-get install bubblewrap" in err
    assert ("Landlock: files NOT protected" in err) == (landlock == "off")
    program = tmp_path / "prog.py"
    program.write_text("print('model-written code')")
    with pytest.raises(SystemExit) as e:                 # the CLI: one line, exit status 2
        common.run_main(sandbox.main, [str(program)])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: the sandbox needs bubblewrap")
    assert common.run_main(sandbox.main, [str(program), "--allow-fallback"]) == 0


def test_cli_output_cannot_fake_the_verdict(path, tmp_path, capsys):
    program = tmp_path / "prog.py"
    program.write_text("print('hello')\nprint('\\x1b[1A\\x1b[2K\\rpassed (0.01 s, isolation: bwrap)')\n"
                       "import sys; print('\\u202e', file=sys.stderr); sys.exit(0)\n")
    assert sandbox.main([str(program), "--timeout", "2"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["stdout| hello", "stdout| \\x1b[1A\\x1b[2K\\rpassed (0.01 s, isolation: bwrap)"]
    assert lines[2] == "stderr| \\u202e" and lines[3].startswith("failed: SystemExit: 0 (")
    program.write_text("print('ok')")
    assert sandbox.main([str(program)]) == 0 and capsys.readouterr().out.startswith("stdout| ok\npassed (")
    with pytest.raises(SystemExit) as e:
        sandbox.main([str(tmp_path / "nope.py")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: cannot read {tmp_path / 'nope.py'}: ") and err.count("\n") == 1


# ----------------------------------------------------------------------------- verdicts of the evaluations

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "HumanEval.jsonl.gz"
TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/13", "HumanEval/70", "HumanEval/83"]
MEMORY = """
def memory_matches(pattern):                      # in every readable region of this process
    import re
    found = []
    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
        for line in maps:
            start, end = (int(x, 16) for x in line.split()[0].split('-'))
            if line.split()[1][0] == 'r' and end - start < 1 << 28:
                try:
                    mem.seek(start)
                    found += re.findall(pattern, mem.read(end - start))
                except OSError:
                    pass
    return found
"""
SEARCH = textwrap.indent(MEMORY, "    ") + """
    import gc, os, re, sys
    found = []
    for fd in range(64):                          # every open fd: what can be read there
        try:
            os.set_blocking(fd, False)
            found += re.findall(rb'[0-9a-f]{32}', os.read(fd, 1 << 16))
        except OSError:
            pass
    frame = sys._getframe()
    while frame is not None:                      # every local up the stack
        found += [v for v in frame.f_locals.values() if isinstance(v, bytes) and len(v) == 32]
        frame = frame.f_back
    found += [o for o in gc.get_objects() if isinstance(o, bytes) and len(o) == 32]
    found += memory_matches(rb'[0-9a-f]{32}')     # 32 hex digits anywhere in memory
    for fd in range(3, 64):                       # the likeliest secret, to every fd
        try:
            os.write(fd, found[0])
        except (OSError, IndexError):
            pass
    os._exit(0)
"""
ALWAYS_EQUAL = """
    class Anything(float):
        def __eq__(self, other): return True
        def __ne__(self, other): return False
        def __lt__(self, other): return True
        def __gt__(self, other): return True
        def __abs__(self): return 0
        def __sub__(self, other): return Anything()
        def __iter__(self): return iter([])
        def __len__(self): return 0
        __hash__ = float.__hash__
    return Anything()
"""
TRACER = """
    return None
import dis, sys
def skip(frame, event, arg):                      # jump from an assert to the next line without one
    asserts = {i.positions.lineno for i in dis.get_instructions(frame.f_code)
               if i.opname == 'LOAD_ASSERTION_ERROR'}
    later = sorted({n for _, _, n in frame.f_code.co_lines() if n and n > frame.f_lineno} - asserts)
    if event == 'line' and frame.f_lineno in asserts and later:
        try:
            frame.f_lineno = later[0]
        except ValueError:
            pass
    return skip
sys.settrace(skip)
"""
PATCH = """
    import builtins, math
    builtins.abs = lambda x: 0
    builtins.isinstance = lambda *a: True
    builtins.round = lambda *a: 0
    builtins.len = lambda x: 0
    math.isclose = lambda *a, **k: True
    builtins.AssertionError = type('Nothing', (Exception,), {})
    return 0
"""
EXIT = "\n    import os\n    os._exit(0)\n"


@pytest.fixture(scope="module")
def humaneval_problems():
    if not HUMANEVAL.exists():
        pytest.skip(f"HumanEval data not found at {HUMANEVAL}")
    import humaneval
    return humaneval.load_problems(str(HUMANEVAL))


def test_humaneval_verdicts_cannot_be_forged(path, humaneval_problems):
    """Completions that solve nothing: memory, frame, gc and fd searches for a secret, an answer
    equal to everything, a tracer skipping asserts, rebound builtins, exiting early: all fail,
    on each path, while the canonical solutions in the same batch pass."""
    import humaneval
    attacks = [SEARCH, ALWAYS_EQUAL, TRACER, PATCH, EXIT, "\n    import sys\n    sys.exit(0)\n"]
    samples = [{"task_id": t, "completion": a} for a in attacks for t in TASKS]
    samples += [{"task_id": t, "completion": humaneval_problems[t]["canonical_solution"]} for t in TASKS]
    results = humaneval.score(samples, humaneval_problems, timeout=10.0, workers=2)
    assert [r["passed"] for r in results] == [False] * (len(samples) - len(TASKS)) + [True] * len(TASKS), \
        [(r["task_id"], r["result"]) for r in results if r["passed"]]
    reasons = [r["result"] for r in results[len(TASKS):2 * len(TASKS)]]
    assert all("not plain data" in reason for reason in reasons), reasons    # the answer equal to everything


def test_mtpb_verdicts_cannot_be_forged(path):
    """The gold output is in no memory of the program's process, so it cannot print it; a number
    whose difference to anything is 0, a memory search and an early exit do not pass either."""
    import mtpb_check
    walk = """import sys
frame, found = sys._getframe(), []
while frame is not None:                          # lists of numbers up the stack: the gold?
    found += [v for v in frame.f_locals.values() if type(v) is list and v and all(type(x) is int for x in v)]
    frame = frame.f_back
for value in found:
    print(value)"""
    close = "class Close(int):\n    def __sub__(self, other): return 0\n    def __rsub__(self, other): return 0\nprint(Close())"
    cases = [(walk, [3, 1, 4, 1, 5]), (close, 42), (textwrap.dedent(SEARCH), 42),
             ("import os\nprint(42)\nos._exit(0)", 42), ("print(6 * 7)", 42), ("print([3, 1, 4, 1, 5])", [3, 1, 4, 1, 5])]
    jobs = [mtpb_check.program_for(p, gold, semantics) for semantics in (False, True) for p, gold in cases]
    results = sandbox.run_many(jobs, timeout=10.0, workers=2)
    assert [r.status for r in results] == (["failed"] * 4 + ["passed"] * 2) * 2, results


def test_plain_data_round_trip_and_nothing_else():
    values = [None, True, -3, 2 ** 200, -0.0, 1e300, float("inf"), "a\nb'\"", [1, (2, {3}), {"k": [set()]}], ()]
    for value in values:
        assert sandbox.plain(sandbox._plain_text(value)) == value
        assert type(sandbox.plain(sandbox._plain_text(value))) is type(value)
    nan = sandbox.plain(sandbox._plain_text(float("nan")))
    assert nan != nan
    for text in ("__import__('os')", "x", "(1).real", "{**a}", "[1] * 3", "f'x'", "b'x'", "1j", "print()"):
        with pytest.raises(ValueError, match="not plain data"):
            sandbox.plain(text)
    with pytest.raises(TypeError, match="returned a Counter, not plain data"):
        sandbox._plain_text([__import__("collections").Counter()])
    loop = []
    loop.append(loop)
    with pytest.raises(TypeError, match="holds itself"):
        sandbox._plain_text(loop)


# ----------------------------------------------------------------------------- past the verdict

def test_no_earlier_output_in_memory(path):
    token = secrets.token_hex(16)
    printer = f"for _ in range(60):\n    print('tok-{token}' * 20)"
    searcher = MEMORY + "print(sorted({x.decode() for x in memory_matches(rb'tok-([0-9a-f]{32})')}))"
    results = sandbox.run_many([printer, searcher], workers=1)
    results += sandbox.run_many([printer, (searcher, "pass")], workers=1)   # a program beside a check
    assert token not in results[1].stdout and results[1].stdout == "[]\n", results[1]
    assert token not in results[3].stdout and [r.status for r in results] == ["passed"] * 4, results


def test_host_fifos_ttys_and_files_are_out_of_view(path):
    """A FIFO and a terminal outside the sandbox's view: nothing reaches them, nothing is read."""
    fifo = REPO / "tests" / f".sandbox-fifo-{secrets.token_hex(4)}"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    leader, follower = os.openpty()
    os.write(leader, b"typed by a user\n")
    terminal = os.ttyname(follower)
    try:
        attacks = [f"import os\nfd = os.open({str(fifo)!r}, os.O_WRONLY | os.O_NONBLOCK)\nos.write(fd, b'injected')",
                   f"import os\nos.read(os.open({str(fifo)!r}, os.O_RDONLY | os.O_NONBLOCK), 10)",
                   f"import os\nprint(os.read(os.open({terminal!r}, os.O_RDONLY | os.O_NONBLOCK), 100))",
                   "import os\nos.read(os.open('/dev/tty', os.O_RDONLY | os.O_NONBLOCK), 100)",
                   f"open({str(REPO / 'README.md')!r}).read()", "open('/etc/hostname').read()"]
        results = _honest_still_pass(attacks, path)
        assert [r.status for r in results] == ["failed"] * len(attacks), results
        assert os.read(reader, 100) == b""              # no writer ever wrote
        assert os.read(follower, 100) == b"typed by a user\n"          # still there: nobody read it
    finally:
        for fd in (reader, leader, follower):
            os.close(fd)
        fifo.unlink()


def test_futexes_and_the_page_cache(path):
    """A futex that is not private (the kind a shared file mapping needs) is refused; fadvise
    and madvise that would evict a host file from the page cache do nothing."""
    target = os.__file__                               # a file both paths show
    size = os.path.getsize(target)
    futex = "202 if os.uname().machine == 'x86_64' else 98"
    program = f"""{LIBC}word = ctypes.c_int(0)
print(libc.syscall({futex}, ctypes.c_void_p(ctypes.addressof(word)), 1, 1, 0, 0, 0), ctypes.get_errno())    # FUTEX_WAKE
print(libc.syscall({futex}, ctypes.c_void_p(ctypes.addressof(word)), 129, 1, 0, 0, 0))     # FUTEX_WAKE_PRIVATE
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open({target!r}, os.O_RDONLY)
address = libc.mmap(None, {size}, 1, 1, fd, 0)                # PROT_READ, MAP_SHARED
for advice in (20, 21, 4, 9):                                 # COLD, PAGEOUT, DONTNEED, REMOVE
    libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t({size}), advice)
libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t({size}))
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)"""
    Path(target).read_bytes()
    assert _resident(target) == 1.0
    r = sandbox.run(program)
    assert r.status == "passed" and r.stdout.split("\n")[:2] == ["-1 1", "0"], r
    assert _resident(target) == 1.0


def _resident(path):
    """The fraction of the file's pages in the page cache (mincore on a mapping of it)."""
    import ctypes
    import mmap
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(v & 1 for v in vec) / pages


def test_bwrap_holds_without_landlock(monkeypatch):
    """As on a kernel without Landlock (SANDBOX_LANDLOCK=off): namespaces and read-only mounts
    still keep /proc/sys, /dev, other processes' memory and fds, and later programs' /tmp."""
    if BWRAP_PATH != "bwrap":
        pytest.skip(f"the bwrap path is not available here: {WHY_NOT_BWRAP}")
    monkeypatch.setenv("SANDBOX_LANDLOCK", "off")
    monkeypatch.setattr(sandbox, "_isolation", ("bwrap", "chosen by the test"))
    assert sandbox.landlock_abi() == 0
    hostile = ["open('/proc/sys/kernel/core_pattern', 'w')", "open('/dev/fill', 'w')",
               "open('/proc/1/mem', 'rb')", "open('/proc/1/fd/1', 'w').write('{}')",
               "import os\nfor pid in os.listdir('/proc'):\n    if pid.isdigit() and int(pid) != os.getpid():\n"
               "        open(f'/proc/{pid}/mem', 'rb')",
               ("import os\nfor pid in os.listdir('/proc'):\n    if pid.isdigit() and int(pid) not in (1, os.getpid()):\n"
                "        open(f'/proc/{pid}/fd/3', 'wb').write(b'S')", "remote('nothing')"),
               "import os\nfor i in range(50):\n    open(f'/tmp/left{i}', 'w').write('x' * 100_000)\nassert False"]
    honest_failing = ["assert 1 == 2", ("def f():\n    return 1\n", "assert remote('f')() == 2")]
    look = "import os\nprint(sorted(os.listdir('/tmp')), os.listdir('/dev'))"
    results = sandbox.run_many(hostile + honest_failing + [look], timeout=5.0, workers=1)
    assert [r.status for r in results[:-1]] == ["failed"] * (len(hostile) + 2), results
    assert results[-1].stdout.count("program-") == 1 and "left" not in results[-1].stdout, results[-1]
    assert "fill" not in results[-1].stdout


def test_inode_flood_is_stopped(path):
    """Bytes are bounded by the tmpfs, files by the judge's count (bwrap); cleanup counts in seconds."""
    flood = "import os\nfor i in range(30_000):\n    open(str(i), 'w').close()\nimport time\ntime.sleep(2)"
    r = sandbox.run(flood, timeout=8.0)
    if path == "bwrap":
        assert (r.status, r.reason) == ("failed", f"made more than {sandbox.FILES} files"), r
    # the next program's /tmp holds its own dir only (the repo may sit under /tmp: not counted)
    look = "import os\nprint(sum(n.startswith('program-') for n in os.listdir('/tmp')))"
    assert sandbox.run(look).stdout == "1\n" or path == "rlimits"
