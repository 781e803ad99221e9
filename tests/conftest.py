"""What the test files share: the repo on sys.path, a few tiny configs, random parameters
whose norms and biases are perturbed away from 1 and 0 (so a wrong mapping cannot hide behind
them and logits are far from uniform), and `run_cli`, a script's main run in the test's own
process as `python script.py` would run it, and `run_processes`, one script as the n processes
of a multi-host JAX job. Import with `from conftest import ...`."""
import atexit
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Tests run on CPU. With libtpu installed (test_tpu.py compiles for TPU topologies with it),
# JAX would otherwise look for a TPU first: warnings, a second per process, and libtpu's lock
# file, which makes a second test process fail to load it. JAX_PLATFORMS=... overrides.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compiling, not running, is most of the suite's time: the programs are tiny. So XLA:CPU's
# code generator runs at -O0, and compiled programs are kept in a cache for this session
# only (a fresh directory; the script and signal tests' processes inherit it), so the many
# runs of the same tiny train step or decode loop compile once.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # a level given stays
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanocodegen-tests-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import common  # noqa: E402
import model  # noqa: E402

# Token-id tests: a small vocabulary is enough.
TINY = model.Config(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_ctx=128, vocab_size=256)
# Text tests: the real padded vocabulary, so every tokenizer id exists.
WIDE = model.Config(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, n_ctx=128, vocab_size=51200)

NOISY = ("ln_scale", "ln_bias", "b_in", "b_out", "lnf_scale", "lnf_bias", "head_b")


def random_params(config, seed=0):
    """init_params, then norms and biases perturbed by N(0, 0.3^2)."""
    params = model.init_params(config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)

    def perturb(path, a):
        return a + 0.3 * rng.standard_normal(a.shape).astype(np.float32) if path[-1].key in NOISY else a
    return jax.tree_util.tree_map_with_path(perturb, params)


def random_tokens(shape, seed, config=TINY):
    """Token ids of `shape`, uniform over config's vocabulary."""
    key = jax.random.PRNGKey(seed)
    return jax.random.randint(key, shape, 0, config.vocab_size)


def run_cli(main, argv, capsys):
    """common.run_main(main, argv) in this process: (exit status, stdout, stderr). The script's
    own process is needed only where the process is the point (signals, kills, XLA_FLAGS)."""
    try:
        common.run_main(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def free_port():
    """A loopback TCP port no one listens on (the coordinator's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(argv, count, devices=4, timeout=600, env=None):
    """`python *argv` (in the repo) as `count` processes of one JAX job, as a cluster starts
    them: JAX_COORDINATOR_ADDRESS on a free loopback port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    (count 1: one plain process). Each has devices // count simulated CPU devices, so that every
    job has `devices` in all; CPU collectives join them. -> [(exit status, stdout, stderr)] in
    process order. All must end within `timeout` seconds; else the processes started here are
    killed and the test fails with their output. `env` adds to this process's environment
    (its XLA_FLAGS replace this one's, the device count added)."""
    port = free_port()
    base = os.environ | (env or {})
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", base.get("XLA_FLAGS", ""))
    flags += f" --xla_force_host_platform_device_count={devices // count}"
    base |= {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}
    started = []
    for i in range(count):
        job = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(count),
               "JAX_PROCESS_ID": str(i)}
        out = tempfile.TemporaryFile("w+")  # files, not pipes: a full pipe would stall a process
        err = tempfile.TemporaryFile("w+")
        p = subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, stdout=out, stderr=err,
                             text=True, env=base | job if count > 1 else base)
        started.append((p, out, err))
    deadline = time.monotonic() + timeout
    late = False
    for p, _, _ in started:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            late = True
            break
    for p, _, _ in started:
        if p.poll() is None:
            p.kill()
            p.wait()
    results = []
    for p, out, err in started:
        out.seek(0)
        err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close()
        err.close()
    if late:
        pytest.fail(f"{count} processes of {argv[0]} did not end within {timeout}s: {results}")
    return results
