"""Hugging Face checkpoints: the directory format of the released CodeGen weights, read
and written, so that our checkpoints and theirs are the same thing.

A checkpoint is a directory that transformers' CodeGenForCausalLM loads as it is:

    config.json             the sizes, in CodeGen's field names (config_to_hf)
    model.safetensors       the tensors, in CodeGen's names and the released qkv layout
    tokenizer.json          CodeGen's tokenizer (data.get_tokenizer), so that
    tokenizer_config.json   transformers' AutoTokenizer gives our token ids

`load_hf` also reads what others publish: sharded `*.safetensors` with an index, and
PyTorch's `pytorch_model.bin` (single or sharded), without torch and without running
any code from its pickle (the second half of this file).

    python -c "import hf; config, params = hf.load_hf('codegen-350M-mono'); print(config)"
"""
import json
import os
import pickle
import stat
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import common
import data
import model

# ----------------------------------------------------------------------------- names and layout
# HF CodeGen stores torch Linear weights as [out, in]; ours are JAX kernels [in, out].
# q, k, v are fused into one `qkv_proj` in the TPU-v4 layout the weights were trained
# in (_split_qkv): `load_hf` splits it once into plain `wq`, `wk`, `wv`; `save_hf` puts
# it back.

_PER_LAYER = {  # our stacked name -> HF name inside transformer.h.{i}
    "ln_scale": "ln_1.weight",
    "ln_bias": "ln_1.bias",
    "wo": "attn.out_proj.weight",
    "w_in": "mlp.fc_in.weight",
    "b_in": "mlp.fc_in.bias",
    "w_out": "mlp.fc_out.weight",
    "b_out": "mlp.fc_out.bias",
}
_TOP = {
    "wte": "transformer.wte.weight",
    "lnf_scale": "transformer.ln_f.weight",
    "lnf_bias": "transformer.ln_f.bias",
    "head_w": "lm_head.weight",
    "head_b": "lm_head.bias",
}
_TRANSPOSED = {"wo", "w_in", "w_out", "head_w"}
_QKV = "attn.qkv_proj.weight"


def _split_qkv(qkv_w, D):
    """HF qkv_proj.weight [3D, D] -> our (wq, wk, wv), each [D, D].

    Output features come in model.MP_NUM blocks, block m holding [q | v | k] for
    heads m·H/MP_NUM ... (m+1)·H/MP_NUM - 1."""
    M = model.MP_NUM
    blocks = qkv_w.T.reshape(D, M, 3, D // M)  # (in, block, {q,v,k}, features)
    q = blocks[:, :, 0, :].reshape(D, D)
    v = blocks[:, :, 1, :].reshape(D, D)
    k = blocks[:, :, 2, :].reshape(D, D)
    return q, k, v


def _fuse_qkv(q, k, v):
    """Our (wq, wk, wv) -> HF qkv_proj.weight [3D, D], the inverse of _split_qkv."""
    D = q.shape[0]
    M = model.MP_NUM
    parts = [a.reshape(D, M, D // M) for a in (q, v, k)]
    return np.stack(parts, axis=2).reshape(D, 3 * D).T


def _hf_layout(ours, a):
    """One of our arrays as HF stores it (and back: a transpose is its own inverse)."""
    return a.T if ours in _TRANSPOSED else a


def to_hf_state(params, config):
    """Our params -> {HF tensor name: numpy array}."""
    p = jax.tree.map(np.asarray, params)
    state = {}
    for ours, name in _TOP.items():
        state[name] = _hf_layout(ours, p[ours])
    for i in range(config.n_layer):
        layer = {ours: a[i] for ours, a in p["layers"].items()}
        pre = f"transformer.h.{i}."
        for ours, name in _PER_LAYER.items():
            state[pre + name] = _hf_layout(ours, layer[ours])
        qkv = _fuse_qkv(layer["wq"], layer["wk"], layer["wv"])
        state[pre + _QKV] = qkv
    return {name: np.ascontiguousarray(a) for name, a in state.items()}


def _expected_shapes(config):
    """{HF tensor name: shape} of every tensor a CodeGen checkpoint holds."""
    D, F, V = config.n_embd, config.d_ff, config.vocab_size
    per_layer = {
        "ln_1.weight": (D,), "ln_1.bias": (D,),
        "attn.out_proj.weight": (D, D), _QKV: (3 * D, D),
        "mlp.fc_in.weight": (F, D), "mlp.fc_in.bias": (F,),
        "mlp.fc_out.weight": (D, F), "mlp.fc_out.bias": (D,),
    }
    want = {
        "transformer.wte.weight": (V, D),
        "transformer.ln_f.weight": (D,),
        "transformer.ln_f.bias": (D,),
        "lm_head.weight": (V, D),
        "lm_head.bias": (V,),
    }
    for i in range(config.n_layer):
        for name, shape in per_layer.items():
            want[f"transformer.h.{i}.{name}"] = shape
    return want


def from_hf_state(state, config, dtype=np.float32):
    """{HF tensor name: array} -> our params, checking every name and shape."""
    for name, shape in _expected_shapes(config).items():
        if name not in state:
            raise ValueError(f"checkpoint is missing tensor {name!r} (expected shape {shape})")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(state[name].shape)}, expected {shape}")

    def get(ours, name):
        return _hf_layout(ours, np.asarray(state[name], dtype))
    params = {ours: get(ours, name) for ours, name in _TOP.items()}
    each = range(config.n_layer)
    qkv = [_split_qkv(get(_QKV, f"transformer.h.{i}.{_QKV}"), config.n_embd) for i in each]
    layers = {}
    for j, ours in enumerate(("wq", "wk", "wv")):
        layers[ours] = np.stack([per_layer[j] for per_layer in qkv])
    for ours, name in _PER_LAYER.items():
        layers[ours] = np.stack([get(ours, f"transformer.h.{i}.{name}") for i in each])
    params["layers"] = layers
    return jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------------- config.json

def config_to_hf(config):
    """Our Config -> the fields of a HF CodeGen config.json."""
    return {
        "model_type": "codegen",
        "architectures": ["CodeGenForCausalLM"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_ctx,
        "n_ctx": config.n_ctx,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "rotary_dim": config.rotary_dim,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": False,
        "bos_token_id": data.EOS,
        "eos_token_id": data.EOS,
        "torch_dtype": "float32",
    }


def config_from_hf(hf, where="config.json"):
    """Our Config from a HF CodeGen config.json (a dict); what is absent takes transformers'
    CodeGenConfig default (rotary_dim 64, n_positions 2048) except the four sizes."""
    if not isinstance(hf, dict) or hf.get("model_type") != "codegen":
        kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise ValueError(f"{where} has model_type {kind!r}; only 'codegen' checkpoints load here")

    def field(name, default=None, kind=int):
        value = hf.get(name, default)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, kind)):
            raise ValueError(f"{name} is {value!r}, expected a number; a CodeGen config.json gives "
                             f"n_layer, n_embd, n_head, rotary_dim and vocab_size")
        return value
    try:
        ffn = hf.get("n_inner") in (None, 4 * field("n_embd"))  # transformers' defaults
        if not ffn or hf.get("activation_function", "gelu_new") != "gelu_new":
            raise ValueError("n_inner/activation_function other than CodeGen's (4·n_embd, "
                             "gelu_new) are not supported")
        return model.Config(
            n_layer=field("n_layer"), n_embd=field("n_embd"), n_head=field("n_head"),
            rotary_dim=field("rotary_dim", 64), n_ctx=field("n_positions", 2048),
            vocab_size=field("vocab_size"),
            layer_norm_epsilon=field("layer_norm_epsilon", 1e-5, float))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- writing

def save_tensors(tensors, file, metadata=None):
    """safetensors' save_file, the file then given the mode open() gives a new file
    (the umask decides), as for every other file; save_file alone makes it 0600."""
    with open(file, "ab"):
        pass  # created by open(), or an existing file kept with its mode
    mode = stat.S_IMODE(os.stat(file).st_mode)
    save_file(tensors, file, metadata=metadata)
    os.chmod(file, mode)


def _save_tokenizer(config, path):
    """CodeGen's tokenizer as transformers reads it: AutoTokenizer then encodes and
    decodes as data.get_tokenizer() does (tests/test_hf.py checks it)."""
    data.get_tokenizer().save(os.path.join(path, "tokenizer.json"))
    eos = "<|endoftext|>"
    settings = {
        "tokenizer_class": "CodeGenTokenizer",
        "bos_token": eos,
        "eos_token": eos,
        "unk_token": eos,
        "add_prefix_space": False,            # GPT-2's byte-level BPE as trained
        "clean_up_tokenization_spaces": False,  # decode gives the code back exactly
        "model_max_length": config.n_ctx,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(settings, f, indent=2)


def save_hf(params, config, path, dtype=np.float32):
    """Write config.json, model.safetensors and the tokenizer files into `path`, a
    directory transformers loads as it is (CodeGenForCausalLM, AutoTokenizer)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        fields = config_to_hf(config) | {"torch_dtype": np.dtype(dtype).name}
        json.dump(fields, f, indent=2)
    state = {name: a.astype(dtype) for name, a in to_hf_state(params, config).items()}
    weights = os.path.join(path, "model.safetensors")
    save_tensors(state, weights, metadata={"format": "pt"})
    _save_tokenizer(config, path)


# ----------------------------------------------------------------------------- reading

def load_hf(path, dtype=np.float32):
    """(config, params) from a HF CodeGen directory: `model.safetensors`, sharded
    `*.safetensors` + index, or `pytorch_model.bin` (single or sharded, read without
    torch); fp32/fp16/bf16. A train.py output directory (holding `ckpt-*`
    subdirectories) loads its newest checkpoint. A missing, truncated or mismatched
    file is one ValueError line naming it."""
    path = common.checkpoint_dir(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path!r} is not a CodeGen checkpoint directory (no config.json); "
                         f"pass a Hugging Face CodeGen directory or one written by train.py")
    try:
        with open(cfg_path, "rb") as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"cannot read {cfg_path}: {e}") from None
    config = config_from_hf(hf, cfg_path)
    state = read_hf_tensors(path)
    tied = hf.get("tie_word_embeddings") and "transformer.wte.weight" in state
    if tied:  # the head shares the embedding
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    try:
        return config, from_hf_state(state, config, dtype)
    except ValueError as e:
        raise ValueError(f"{path}: {e}; config.json and the weights disagree") from None


def read_hf_tensors(path):
    """All tensors of a HF checkpoint directory as numpy arrays, whichever file layout
    it uses: one weights file, or shards listed by an index's weight_map."""
    files = set(os.listdir(path))
    readers = {"model.safetensors": load_file, "pytorch_model.bin": read_torch_bin}
    for single, reader in readers.items():
        index = single + ".index.json"
        if single in files:
            return _read_or_explain(reader, os.path.join(path, single))
        if index in files:
            shards = _shards(os.path.join(path, index))
            state = {}
            for shard in shards:
                state |= _read_or_explain(reader, os.path.join(path, shard))
            return state
    raise ValueError(f"no weights in {path!r}: expected model.safetensors, sharded "
                     f"*.safetensors with model.safetensors.index.json, or pytorch_model.bin "
                     f"(single or sharded with pytorch_model.bin.index.json)")


def _shards(index):
    """The shard file names an index's weight_map lists, each once."""
    try:
        with open(index, "rb") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"cannot read {index} ({type(e).__name__}: {e}); copy or save it again") from None
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise ValueError(f"{index} lists {name!r}, not a file name beside it")
    return names


def _read_or_explain(reader, file):
    """reader(file), any failure one ValueError line naming the file."""
    try:
        return reader(file)
    except RefusedPickle:
        raise
    except (OSError, ValueError, EOFError, SafetensorError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        why = common.first_line(e)
        raise ValueError(f"cannot read {file} ({why}): truncated or corrupt; copy or save it again") from None


# ----------------------------------------------------------------------------- pytorch_model.bin
# torch.save pickles the object (a state dict: an OrderedDict of name -> tensor) and
# stores each tensor's data apart, as a raw "storage". In the pickle a tensor is a call
# torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...): a strided view of
# its storage, so views and tied weights share one storage. The storage itself is a
# persistent id ('storage', torch.FloatStorage, key, device, numel) that the loader
# resolves. Two file layouts:
#   zip (torch >= 1.6): NAME/data.pkl is the pickle, NAME/data/<key> each storage's
#       bytes, NAME/byteorder "little" or "big".
#   legacy (torch.save(..., _use_new_zipfile_serialization=False)): five things one
#       after the other: pickles of a magic number, a protocol version and sys info,
#       the object's pickle, a pickle of the storage keys; then each storage as an
#       8-byte little-endian element count and its bytes.
# A pickle can call any function it names. Ours names only what a state dict needs
# (find_class below); anything else is refused before it runs.

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
_LEGACY_PROTOCOL = 1001


class _Storage:
    """A storage the pickle refers to; its bytes are read after the pickle."""

    def __init__(self, key, dtype, numel):
        self.key = key
        self.dtype = dtype
        self.numel = numel


class _Tensor:
    """A strided view of a _Storage, made into a numpy array once storages are read."""

    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)


class _StateDict(dict):
    """What an OrderedDict in the pickle becomes: a dict that takes the attributes torch
    gives a state dict (its `_metadata`, module versions) in pickle's BUILD step."""

    def __setstate__(self, state):
        self.attributes = state


class RefusedPickle(ValueError):
    """A pickle that names a class or function a checkpoint has no use for."""


class _Unpickler(pickle.Unpickler):
    """Builds only dicts, tensors and storages; every other class or function is refused.

    What find_class hands the pickle cannot be changed by it: storage types become their
    names (strings), functions this unpickler's own methods, OrderedDict a class whose
    BUILD step only stores what it is given."""

    ALLOWED = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_tensor_v2"): "rebuild_tensor",
        ("torch._utils", "_rebuild_tensor"): "rebuild_tensor",
        ("torch._utils", "_rebuild_parameter"): "rebuild_parameter",
    }

    def __init__(self, f, file):
        super().__init__(f)
        self.file = file
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise RefusedPickle(f"{self.file} asks to run {module}.{name}, refused: a checkpoint "
                                f"holds only tensors and dicts; load only files you trust")
        return getattr(self, found) if isinstance(found, str) else found

    def rebuild_tensor(self, storage, offset, size, stride, *unused):
        """torch._utils._rebuild_tensor_v2 (and v1); requires_grad, hooks, metadata unused."""
        return _Tensor(storage, offset, size, stride)

    def rebuild_parameter(self, tensor, *unused):
        """torch._utils._rebuild_parameter: an nn.Parameter is its tensor here."""
        return tensor

    def persistent_load(self, pid):
        """('storage', storage type, key, device, numel[, view]) -> a _Storage, one per key."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.60}")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views of torch < 1.0 files are not read")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if kind not in _STORAGE_DTYPES or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage {pid!r:.60}")
        storage = _Storage(key, _STORAGE_DTYPES[kind], numel)
        return self.storages.setdefault(key, storage)


def _as_array(tensor, buffers):
    """A _Tensor -> numpy array: its view of the storage's bytes, bounds checked."""
    storage = tensor.storage
    if not isinstance(storage, _Storage):
        raise ValueError("a tensor without a storage")
    flat = buffers[storage.key]
    numbers = (tensor.offset, *tensor.size, *tensor.stride)
    if not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise ValueError(f"tensor offset, size or stride {numbers} out of range")
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if 0 not in tensor.size and last >= flat.size:
        raise ValueError(f"a tensor reaches element {last} of a storage of {flat.size}")
    if 0 in tensor.size:
        return np.zeros(tensor.size, flat.dtype)
    strides = tuple(s * flat.itemsize for s in tensor.stride)
    start = flat[tensor.offset:]
    return np.lib.stride_tricks.as_strided(start, tensor.size, strides, writeable=False)


def _state_dict(obj, buffers, file):
    """The unpickled object -> {name: numpy array} (tensors only: a state dict)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{file} holds a {type(obj).__name__}, not a state dict")
    return {name: _as_array(t, buffers) for name, t in obj.items() if isinstance(t, _Tensor)}


def _expect_bytes(storage, nbytes):
    """Checked before a storage is read: its file stores what its numel calls for."""
    want = storage.numel * storage.dtype.itemsize
    if nbytes != want:
        raise ValueError(f"storage {storage.key} has {nbytes} bytes, expected {want}")


def _storage_bytes(raw, storage, little_endian):
    """Raw bytes -> the storage's 1-D array in native byte order."""
    _expect_bytes(storage, len(raw))
    flat = np.frombuffer(raw, storage.dtype)
    return flat if little_endian else flat.byteswap()


def _read_zip(file):
    with zipfile.ZipFile(file) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n == "data.pkl" or n.endswith("/data.pkl")), None)
        if pkl is None:
            raise ValueError("a zip without data.pkl, not a torch checkpoint")
        root = pkl[: -len("data.pkl")]
        order = zf.read(root + "byteorder") if root + "byteorder" in names else b"little"
        with zf.open(pkl) as f:
            unpickler = _Unpickler(f, file)
            obj = unpickler.load()
        buffers = {}
        for key, storage in unpickler.storages.items():
            name = f"{root}data/{key}"
            _expect_bytes(storage, zf.getinfo(name).file_size)  # before a zip bomb inflates
            buffers[key] = _storage_bytes(zf.read(name), storage, order == b"little")
    return _state_dict(obj, buffers, file)


def _read_legacy(file):
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        header = [_Unpickler(f, file).load() for _ in range(3)]  # magic, protocol, sys info
        if header[0] != _LEGACY_MAGIC or header[1] != _LEGACY_PROTOCOL:
            raise ValueError("neither a zip nor torch's legacy format: not a torch.save file")
        little_endian = isinstance(header[2], dict) and header[2].get("little_endian", True)
        unpickler = _Unpickler(f, file)
        obj = unpickler.load()
        keys = _Unpickler(f, file).load()
        if not isinstance(keys, list):
            raise ValueError("no list of storage keys after the pickle")
        buffers = {}
        for key in keys:
            storage = unpickler.storages[str(key)]
            count = int.from_bytes(f.read(8), "little")
            nbytes = count * storage.dtype.itemsize
            _expect_bytes(storage, nbytes)
            if nbytes > size - f.tell():
                raise ValueError(f"storage {key} runs past the end of the file")
            buffers[str(key)] = _storage_bytes(f.read(nbytes), storage, little_endian)
    return _state_dict(obj, buffers, file)


def read_torch_bin(file):
    """{name: numpy array} of a `torch.save`d state dict, without torch. Any failure
    is a ValueError (or UnpicklingError) line; nothing from the pickle runs."""
    reader = _read_zip if zipfile.is_zipfile(file) else _read_legacy
    try:
        return reader(file)
    except (ValueError, OSError, EOFError, pickle.UnpicklingError):
        raise
    except Exception as e:  # noqa: BLE001 (only the functions allowed above ran: bad data)
        raise ValueError(f"{type(e).__name__}: {e}") from None

