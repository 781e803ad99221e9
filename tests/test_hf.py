"""hf.py: checkpoint directories written and read back exactly; the released qkv layout;
every file layout that transformers and torch write (safetensors single and sharded;
pytorch_model.bin from torch.save in the zip and the legacy format, fp32/fp16/bf16,
views sharing a storage, shards with an index) against transformers' logits; hostile and
corrupt pickles refused in one line; the tokenizer files, which make AutoTokenizer give
our ids; and the files' modes. Tests that need torch or transformers skip without them."""
import ast
import json
import os
import pickle
import stat
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import TINY, random_params, run_cli
from test_model import forward, reference_logits, reference_model

import data
import hf
import model
import sample


def assert_same_logits(m, config, params, seed=0):
    """Our logits equal those of the transformers model m on random tokens."""
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (2, 20))
    ours = np.asarray(forward(params, jnp.asarray(tokens), config))
    assert np.abs(ours - reference_logits(m, tokens)).max() <= 1e-4


def test_model_does_not_import_hf():
    """hf.py imports model.py (for Config), so the other way round would be a circle."""
    tree = ast.parse((Path(hf.__file__).parent / "model.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert "hf" not in imported and "data" not in imported


# ----------------------------------------------------------------------------- layout

def test_qkv_layout_is_four_blocks_of_q_v_k():
    """Row r of the fused HF weight belongs to block r // (3D/4); inside it q, then v, then k."""
    D = 16
    q, k, v = (np.full((D, D), c, np.float32) for c in (1.0, 2.0, 3.0))
    q += np.arange(D)[None, :] / 100  # output feature index, to check head order inside a block
    fused = hf._fuse_qkv(q, k, v)  # [3D, D]
    L = D // 4
    for block in range(4):
        rows = fused[block * 3 * L:(block + 1) * 3 * L, 0]
        np.testing.assert_allclose(rows[:L], 1 + np.arange(block * L, (block + 1) * L) / 100)
        assert (rows[L:2 * L] == 3.0).all() and (rows[2 * L:] == 2.0).all()  # v before k
    for ours, back in zip((q, k, v), hf._split_qkv(fused, D)):
        np.testing.assert_array_equal(ours, back)


# ----------------------------------------------------------------------------- our own checkpoints

def test_save_load_round_trip_is_exact(tmp_path):
    params = random_params(TINY)
    hf.save_hf(params, TINY, tmp_path)
    config, loaded = hf.load_hf(tmp_path)
    assert config == TINY
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(x, y)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json",
                                            "tokenizer_config.json"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_gets_the_mode_the_umask_gives(tmp_path, umask):
    """safetensors creates its file 0600; the weights get what open() gives any file."""
    old = os.umask(umask)
    try:
        hf.save_hf(random_params(TINY), TINY, tmp_path / "ckpt")
    finally:
        os.umask(old)
    for name in os.listdir(tmp_path / "ckpt"):
        mode = stat.S_IMODE(os.stat(tmp_path / "ckpt" / name).st_mode)
        assert mode == 0o666 & ~umask, name


def test_bad_checkpoints_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        hf.load_hf(tmp_path)
    hf.save_hf(random_params(TINY), TINY, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "gptj"}))
    with pytest.raises(ValueError, match="model_type 'gptj'"):
        hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"n_layer": 4}))
    with pytest.raises(ValueError, match=r"missing tensor 'transformer\.h\.2\.ln_1\.weight'"):
        hf.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"n_embd": 64}))
    with pytest.raises(ValueError, match="has shape"):
        hf.load_hf(tmp_path)


@pytest.mark.parametrize("name, text, message", [
    ("config.json", None, r"config\.json: n_head is None"),
    ("config.json", {"n_layer": "2"}, "n_layer is '2'"),
    ("config.json", {"n_embd": 32.5}, "n_embd is 32.5"),
    ("config.json", '{"model_type": "codegen", ', r"cannot read .*config\.json"),
    ("config.json", "[1]", "has model_type 'list'"),
    ("config.json", {"rotary_dim": 6, "n_head": 8}, "n_head=8"),
    ("model.safetensors", 3000, r"model\.safetensors \(.*\): truncated or corrupt"),
    ("model.safetensors", b"\x00" * 5, "truncated or corrupt"),
])
def test_corrupt_checkpoint_files_are_one_line_naming_the_file(tmp_path, name, text, message):
    hf.save_hf(random_params(TINY), TINY, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    file = tmp_path / name
    if text is None:
        del cfg["n_head"]
        file.write_text(json.dumps(cfg))
    elif isinstance(text, dict):
        file.write_text(json.dumps(cfg | text))
    elif isinstance(text, int):
        file.write_bytes(file.read_bytes()[:text])
    elif isinstance(text, bytes):
        file.write_bytes(text)
    else:
        file.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        hf.load_hf(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_a_torn_pytorch_model_bin_is_one_line(tmp_path):
    hf.save_hf(random_params(TINY), TINY, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")  # not a torch file at all
    with pytest.raises(ValueError, match=r"pytorch_model\.bin .*truncated or corrupt") as e:
        hf.load_hf(tmp_path)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- safetensors from transformers

@pytest.mark.parametrize("sharded", [False, True])
def test_save_pretrained_safetensors_give_transformers_logits(tmp_path, sharded):
    m = reference_model(TINY)
    m.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "5GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    config, params = hf.load_hf(tmp_path)
    assert_same_logits(m, config, params)


def test_save_hf_loads_in_transformers_without_warnings(tmp_path):
    reference_model(TINY)  # skips without torch and transformers
    import transformers
    params = random_params(TINY)
    hf.save_hf(params, TINY, tmp_path)
    m, info = transformers.CodeGenForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert_same_logits(m.eval(), TINY, params, seed=1)


def test_config_without_rotary_dim_loads_as_transformers_does(tmp_path):
    """transformers' CodeGenConfig defaults rotary_dim to 64 (not head_dim); with head_dim 64
    it loads and matches; with a smaller head_dim, transformers cannot run it and we say why."""
    wide_heads = model.Config(n_layer=1, n_embd=256, n_head=4, rotary_dim=64, n_ctx=64, vocab_size=256)
    m = reference_model(wide_heads)
    import transformers
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rotary_dim"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = transformers.CodeGenForCausalLM.from_pretrained(tmp_path).eval()
    assert m.config.rotary_dim == 64
    config, params = hf.load_hf(tmp_path)
    assert config == wide_heads
    assert_same_logits(m, config, params, seed=2)
    hf.save_hf(random_params(TINY), TINY, tmp_path)  # head_dim 8
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rotary_dim"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"rotary_dim=64.*rotary_dim must be even and in \(0, head_dim=8\]"):
        hf.load_hf(tmp_path)


def test_tied_embeddings_saved_as_safetensors_load(tmp_path):
    m = reference_model(TINY)
    import transformers
    hf_config = transformers.CodeGenConfig(**hf.config_to_hf(TINY) | {"tie_word_embeddings": True})
    m = transformers.CodeGenForCausalLM(hf_config).eval()
    m.save_pretrained(tmp_path)
    from safetensors.numpy import load_file
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")  # the tied copy is not stored
    config, params = hf.load_hf(tmp_path)
    assert_same_logits(m, config, params, seed=3)


# ----------------------------------------------------------------------------- pytorch_model.bin from torch

def torch_save(obj, file, legacy):
    import torch
    torch.save(obj, file, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_save_of_a_state_dict_loads(tmp_path, dtype, legacy):
    """model.state_dict() is an OrderedDict with a `_metadata` attribute, which the pickle
    sets in a BUILD step: the most common pytorch_model.bin there is."""
    m = reference_model(TINY)
    import torch
    m = m.to(getattr(torch, dtype))
    state = m.state_dict()
    assert hasattr(state, "_metadata")
    m.config.save_pretrained(tmp_path)
    torch_save(state, tmp_path / "pytorch_model.bin", legacy)
    read = hf.read_torch_bin(tmp_path / "pytorch_model.bin")
    assert read.keys() == state.keys()
    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    for name, t in state.items():
        assert read[name].dtype == want and read[name].shape == tuple(t.shape)
        np.testing.assert_array_equal(read[name].astype(np.float32), t.float().numpy())
    config, params = hf.load_hf(tmp_path)
    assert_same_logits(m.float(), config, params)  # the same rounded weights on both sides


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_views_sharing_one_storage_read_as_torch_sees_them(tmp_path, legacy):
    torch = pytest.importorskip("torch", reason="the files are written by torch.save")
    t = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    views = {"whole": t, "rows": t[1:], "strided": t[1:, ::3], "transposed": t.T,
             "row": t[4], "scalar": t[2, 3], "empty": t[:0], "column": t[:, 7]}
    torch_save(views, tmp_path / "views.bin", legacy)
    if not legacy:  # one storage for all of them
        names = zipfile.ZipFile(tmp_path / "views.bin").namelist()
        assert len([n for n in names if "/data/" in n]) == 1
    read = hf.read_torch_bin(tmp_path / "views.bin")
    assert read.keys() == views.keys()
    for name, v in views.items():
        assert read[name].shape == tuple(v.shape), name
        np.testing.assert_array_equal(read[name], v.numpy())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tied_weights_in_a_bin_share_one_storage_and_load(tmp_path, legacy):
    reference_model(TINY)  # skips without torch and transformers
    import torch
    import transformers
    hf_config = transformers.CodeGenConfig(**hf.config_to_hf(TINY) | {"tie_word_embeddings": True})
    torch.manual_seed(1)
    m = transformers.CodeGenForCausalLM(hf_config).eval()
    state = m.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    m.config.save_pretrained(tmp_path)
    torch_save(state, tmp_path / "pytorch_model.bin", legacy)
    config, params = hf.load_hf(tmp_path)
    assert_same_logits(m, config, params, seed=4)


def test_sharded_bin_with_its_index_gives_transformers_logits(tmp_path):
    """Shards named pytorch_model-0000x-of-0000y.bin with pytorch_model.bin.index.json, as
    transformers 4 wrote them with save_pretrained(safe_serialization=False); since
    transformers 5 writes only safetensors, huggingface_hub's writer (torch.save per shard)
    makes them here."""
    m = reference_model(TINY)
    hub = pytest.importorskip("huggingface_hub", reason="its save_torch_state_dict writes the shards")
    m.config.save_pretrained(tmp_path)
    hub.save_torch_state_dict(m.state_dict(), tmp_path, safe_serialization=False, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("pytorch_model-*.bin"))
    assert len(shards) >= 2 and shards[0] == f"pytorch_model-00001-of-{len(shards):05d}.bin"
    assert (tmp_path / "pytorch_model.bin.index.json").exists()
    config, params = hf.load_hf(tmp_path)
    assert_same_logits(m, config, params, seed=5)


# ----------------------------------------------------------------------------- hostile and corrupt pickles

class _RunsCode:
    """Unpickled by a careless reader, this runs a shell command (pickle's REDUCE)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _legacy_file(payload):
    """torch's legacy layout around a pickle: magic, protocol, sys info, object, keys."""
    header = [hf._LEGACY_MAGIC, hf._LEGACY_PROTOCOL, {"little_endian": True}]
    return b"".join(pickle.dumps(x, protocol=2) for x in header) + payload + pickle.dumps([], protocol=2)


@pytest.mark.parametrize("writer", ["zip", "legacy", "torch.save"])
def test_a_pickle_that_would_run_code_is_refused_in_one_line(tmp_path, writer):
    marker = tmp_path / "it-ran"
    hostile = {"transformer.wte.weight": _RunsCode(marker)}
    file = tmp_path / "pytorch_model.bin"
    if writer == "torch.save":
        pytest.importorskip("torch", reason="the file is written by torch.save")
        torch_save(hostile, file, legacy=False)
    elif writer == "zip":
        with zipfile.ZipFile(file, "w") as zf:
            zf.writestr("archive/data.pkl", pickle.dumps(hostile, protocol=2))
    else:
        file.write_bytes(_legacy_file(pickle.dumps(hostile, protocol=2)))
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(TINY)))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin asks to run (posix|os)\.system, refused") as e:
        hf.load_hf(tmp_path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
    pickle.loads(pickle.dumps(hostile))  # the payload does run when unpickled carelessly
    assert marker.exists()


@pytest.mark.parametrize("target", [b"ccollections\nOrderedDict\n", b"ctorch._utils\n_rebuild_tensor_v2\n",
                                    b"ctorch\nFloatStorage\n"])
def test_a_pickle_cannot_change_what_the_reader_hands_it(tmp_path, target):
    """BUILD with a slot state sets attributes on the object before it: here on the very
    class or function the reader allows, which would change the next file's reading."""
    slots = b"N}" + _text("__setstate__") + _int(1) + b"s\x86"  # (None, {"__setstate__": 1})
    with zipfile.ZipFile(tmp_path / "pytorch_model.bin", "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + target + slots + b"b.")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin \((AttributeError|TypeError)") as e:
        hf.read_hf_tensors(tmp_path)
    assert "\n" not in str(e.value)
    test_a_tensor_outside_its_storage_is_refused(tmp_path, 1, (2, 2), (1, 2), 6, 6, None)  # still reads


def _text(s):
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()  # BINUNICODE


def _int(n):
    return b"J" + n.to_bytes(4, "little", signed=True)  # BININT


def _tuple(items):
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _tensor_file(file, offset, size, stride, numel, stored):
    """A zip pytorch_model.bin written opcode by opcode, as torch writes one tensor `w` of
    a float32 storage of `numel` elements holding `stored` of them: {w: view}."""
    storage = _tuple([_text("storage"), b"ctorch\nFloatStorage\n", _text("0"), _text("cpu"), _int(numel)])
    args = [storage + b"Q", _int(offset), _tuple([_int(n) for n in size]),
            _tuple([_int(n) for n in stride]), b"\x89", b"}"]  # ..., requires_grad False, hooks {}
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n" + _tuple(args) + b"R"
    with zipfile.ZipFile(file, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}" + _text("w") + tensor + b"s.")
        zf.writestr("archive/data/0", np.arange(stored, dtype="<f4").tobytes())


@pytest.mark.parametrize("offset, size, stride, numel, stored, message", [
    (1, (2, 2), (1, 2), 6, 6, None),
    (0, (100,), (1,), 6, 6, "reaches element 99 of a storage of 6"),
    (5, (2,), (1,), 6, 6, "reaches element 6"),
    (0, (1 << 20, 1 << 20), (0, 0), 6, 6, None),
    (-1, (2,), (1,), 6, 6, "out of range"),
    (0, (2,), (-1,), 6, 6, "out of range"),
    (0, (2,), (1,), 6, 5, "has 20 bytes, expected 24"),
])
def test_a_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride, numel, stored, message):
    """Views are read where the file says they are, never past their storage's end."""
    _tensor_file(tmp_path / "w.bin", offset, size, stride, numel, stored)
    if message is None:
        got = hf.read_torch_bin(tmp_path / "w.bin")["w"]
        want = np.lib.stride_tricks.as_strided(np.arange(6, dtype=np.float32)[offset:], size,
                                               tuple(4 * s for s in stride))
        assert got.shape == want.shape and got[:2, :2].tolist() == want[:2, :2].tolist()
        return
    with pytest.raises(ValueError, match=message) as e:
        hf.read_torch_bin(tmp_path / "w.bin")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["truncated zip", "truncated legacy", "garbled pickle", "missing storage"])
def test_a_corrupt_bin_is_one_line_and_exit_status_2(tmp_path, capsys, damage):
    """python sample.py --init-from DIR with a damaged pytorch_model.bin."""
    m = reference_model(TINY)
    file = tmp_path / "pytorch_model.bin"
    m.config.save_pretrained(tmp_path)
    torch_save(m.state_dict(), file, legacy=damage == "truncated legacy")
    whole = file.read_bytes()
    if damage.startswith("truncated"):
        file.write_bytes(whole[:len(whole) // 2])
    else:
        with zipfile.ZipFile(file) as zf:
            entries = {name: zf.read(name) for name in zf.namelist()}
        pkl = next(name for name in entries if name.endswith("data.pkl"))
        if damage == "garbled pickle":
            entries[pkl] = entries[pkl][:40] + b"\xff" * 40 + entries[pkl][80:]
        else:
            del entries[next(name for name in entries if "/data/" in name)]
        with zipfile.ZipFile(file, "w") as zf:
            for name, content in entries.items():
                zf.writestr(name, content)
    capsys.readouterr()   # what transformers printed while writing the file is not the CLI's
    code, out, err = run_cli(sample.main, ["--init-from", tmp_path, "--max-new-tokens", 1], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and "pytorch_model.bin" in err


# ----------------------------------------------------------------------------- the tokenizer files

TEXTS = [
    "def f():\n    return 1\n",
    "class A:\n\tdef g(self):\n\t\t\tpass   \n        x  =  1\n\n\n",
    "s = 'héllo wörld 日本語 😀'  # ünïcode ß\n",
    "print(1)<|endoftext|>def h():  \n",
    "   leading and trailing   ",
    "\r\n\x00\x7f tabs\t \t " + " " * 40 + "\t" * 12 + "end",
]


def test_transformers_tokenizer_from_a_checkpoint_gives_our_ids(tmp_path):
    transformers = pytest.importorskip("transformers", reason="its AutoTokenizer reads the files")
    hf.save_hf(random_params(TINY), TINY, tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = data.get_tokenizer()
    assert type(theirs).__name__ == "CodeGenTokenizer"
    assert theirs.eos_token_id == data.EOS and theirs("def f():")["input_ids"] == [4299, 277, 33529]
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert theirs(text)["input_ids"] == ids, text
        assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False) == text
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
