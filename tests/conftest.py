"""What the test files share: the repo on sys.path, a few tiny configs, random parameters
whose norms and biases are perturbed away from 1 and 0 (so a wrong mapping cannot hide behind
them and logits are far from uniform), and `run_cli`, a script's main run in the test's own
process as `python script.py` would run it. Import with `from conftest import ...`."""
import atexit
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
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
