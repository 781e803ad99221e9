"""The README's sequential training (paper section 2.1: natural language, then six programming
languages with language tags, then Python), its six commands run as written at nano scale:
small corpora (.jsonl.zst records, a tree of six languages' files, a .parquet and a .jsonl.gz
of Python) and two steps of a tiny model per stage, each stage starting from the last.

Run: python -m pytest -q tests/test_recipe.py"""
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import WIDE, run_cli
from test_data import ctrl_c_after

import data
import model
import train

TINY = ["--size", "tiny", "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "1",
        "--val-fraction", "0.3"]  # nano scale: what the README leaves to the preset
SNIPPETS = {  # language: (extension, a line of code with a {i} in it)
    "c": (".c", "int f{i}(int x) {{ return x + {i}; }}\n"),
    "cpp": (".cpp", "auto g{i} = [](int x) {{ return x * {i}; }};\n"),
    "go": (".go", "func H{i}(x int) int {{ return x - {i} }}\n"),
    "java": (".java", "class K{i} {{ int v = {i}; }}\n"),
    "javascript": (".js", "const m{i} = (x) => x % {i};\n"),
    "python": (".py", "def p{i}(x):\n    return x ** {i}\n"),
}


def write_corpora(root: Path):
    """pile/ (.jsonl.zst shards of prose), code/ (files of the six languages and a README),
    python_code/ (.py files) and python.parquet, python.jsonl.gz (the same Python as records)."""
    zstandard = pytest.importorskip("zstandard")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet
    (root / "pile").mkdir()
    for shard in range(2):
        lines = "".join(json.dumps({"text": f"Paragraph {shard}.{i}: the river ran past the old mill {i} times.\n"
                                    * (i % 3 + 1), "meta": {"pile_set_name": "Books"}}) + "\n" for i in range(20))
        (root / "pile" / f"{shard:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    for language, (ext, line) in SNIPPETS.items():
        folder = root / "code" / language
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"f{i}{ext}").write_text("".join(line.format(i=i * 10 + j) for j in range(4)))
    (root / "code" / "README.md").write_text("not a program\n")
    python = ["".join(SNIPPETS["python"][1].format(i=100 + i * 10 + j) for j in range(3)) for i in range(20)]
    (root / "python_code").mkdir()
    for i, text in enumerate(python):
        (root / "python_code" / f"m{i}.py").write_text(text)
    paths = [f"src/m{i}.py" for i in range(20)]
    pyarrow.parquet.write_table(pyarrow.table({"content": python, "max_stars_repo_path": paths}),
                                root / "python.parquet", row_group_size=7)
    with gzip.open(root / "python.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": t, "path": p}) + "\n" for t, p in zip(python, paths))


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    """--size tiny: one layer of 32 with the real vocabulary, the nano schedule."""
    monkeypatch.setitem(model.CONFIGS, "tiny", WIDE)
    monkeypatch.setitem(train.PRESETS, "tiny", train.PRESETS["nano"])


def command(line: str, capsys, root: Path, expect: int = 0) -> str:
    """One README line (`python data.py ...` / `python train.py --size 350M ...`) run in this
    process at nano scale; its stdout."""
    words = line.split()
    script = {"data.py": data, "train.py": train}[words[1]]
    argv = [str(root / w) if re.match(r"(pile|code|python|tok|out)", w) else w for w in words[2:]]
    if script is train:
        argv = [w for w in argv if w not in ("--size", "350M")] + TINY
    code, out, err = run_cli(script.main, argv, capsys)
    assert code == expect, f"{line}: {err}"
    return out


def readme_recipe() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("The paper's sequential training", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return block.strip().splitlines()


@pytest.mark.parametrize("python_source", ["python_code/", "python.parquet", "python.jsonl.gz"])
def test_the_readme_sequential_recipe_runs(tmp_path, capsys, monkeypatch, python_source):
    """The six commands; the first is stopped by Ctrl-C once and run again, as its message says."""
    write_corpora(tmp_path)
    lines = readme_recipe()
    assert len(lines) == 6 and [w.split()[1] for w in lines] == ["data.py", "train.py"] * 3
    with ctrl_c_after(monkeypatch, 5):
        command(lines[0], capsys, tmp_path, expect=130)
    outputs = []
    for line in lines:
        outputs.append(command(line.replace("python_code/", python_source), capsys, tmp_path))
    stats = [json.loads((tmp_path / "tok" / s / "stats.json").read_text()) for s in ("nl", "multi", "mono")]
    assert [s["kept"] for s in stats] == [40, 48, 20]
    tokens = np.fromfile(tmp_path / "tok" / "multi" / "tokens_00000.bin", np.uint16)
    text = data.get_tokenizer().decode(tokens.tolist())
    assert sorted(set(re.findall(r"<\|(\w+)\|>\n", text))) == sorted(SNIPPETS), "every language tagged"
    assert "not a program" not in text
    assert outputs[1].startswith("training tiny from scratch into")
    for stage, source in ((3, "nl"), (5, "multi")):
        assert outputs[stage].startswith(f"fine-tuning {tmp_path / 'out' / source} into a new run")
    for run in ("nl", "multi", "mono"):
        assert (tmp_path / "out" / run / "ckpt-0000002" / "model.safetensors").exists(), run
