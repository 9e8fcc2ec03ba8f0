"""Preprocessing under abuse: BOMs, zero documents, SIGKILL of the main process, concurrent runs, flipped
token ids, and bad files that must give one `error:` line (naming the file and the fix), never a traceback."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pyarrow as pa
import pytest

from megatron_narrow.data import preprocess as preprocess_module
from megatron_narrow.data.preprocess import output_lock
from megatron_narrow.data.shards import DataError, IndexedDocuments, is_temp_file, temp_path
from megatron_narrow.data.tokenizer import load_tokenizer

from .conftest import REPO, write_jsonl
from .runs import run_tool
from .test_preprocess import run_preprocess as preprocess_with_wordpiece

KILL_SHARD_MB = 0.25


@pytest.fixture(scope="session")
def vocab(minilm_dir) -> Path:
    return minilm_dir / "vocab.txt"


run_preprocess = partial(preprocess_with_wordpiece, shard_size_bytes=16 << 10)  # several shards from small inputs


def tree_bytes(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, hidden ones and subdirectories included, by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def error_line(stderr: str) -> str:
    """The one `error:` line of a refusal; anything else on stderr may only be the --debug hint."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert all(line.startswith("(run with --debug") for line in lines if line not in errors), stderr
    return errors[0]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, stdlib_documents) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("small") / "docs.jsonl", stdlib_documents[:200])


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, small_corpus, vocab) -> Path:
    """A finished dataset of several shards; tests that damage it work on a copy (see `dataset_copy`)."""
    out = tmp_path_factory.mktemp("small_dataset") / "data"
    manifest = run_preprocess([small_corpus], out, vocab)
    assert manifest["totals"]["shards"] >= 3
    return out


@pytest.fixture()
def dataset_copy(tmp_path, small_dataset) -> Path:
    return Path(shutil.copytree(small_dataset, tmp_path / "data"))


# --- 1. a UTF-8 byte order mark at the start of a file ---------------------------------------------------

def test_a_byte_order_mark_does_not_cost_the_first_document(tmp_path, vocab, stdlib_documents):
    texts = stdlib_documents[:20]
    plain = write_jsonl(tmp_path / "plain.jsonl", texts)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    bom_gz = tmp_path / "bom2.jsonl.gz"
    bom_gz.write_bytes(gzip.compress(bom.read_bytes()))
    text = tmp_path / "lines.txt"
    text.write_bytes(b"\xef\xbb\xbfFirst line document.\nSecond line document.\n")

    reference = run_preprocess([plain, plain], tmp_path / "reference", vocab)
    manifest = run_preprocess([bom, bom_gz], tmp_path / "bom_out", vocab)
    assert manifest["rejected_total"] == 0
    assert manifest["totals"]["documents"] == 40
    assert manifest["totals"]["tokens"] == reference["totals"]["tokens"]
    shards = [entry["file"] for entry in reference["shards"]]
    assert [(tmp_path / "bom_out" / name).read_bytes() for name in shards] == [
        (tmp_path / "reference" / name).read_bytes() for name in shards]

    text_manifest = run_preprocess([text], tmp_path / "text_out", vocab)
    documents = IndexedDocuments(tmp_path / "text_out")
    assert text_manifest["totals"]["documents"] == 2 and text_manifest["rejected_total"] == 0
    expected = load_tokenizer("wordpiece", vocab).encode_batch(["First line document."])[0]
    assert documents.tokens(0).tolist() == expected  # no [UNK] or stray token for the mark


# --- 2. zero valid documents ---------------------------------------------------------------------------------

def test_zero_valid_documents_is_an_error_and_writes_no_manifest(tmp_path, small_corpus, vocab, capsys):
    out = tmp_path / "out"
    code = run_tool("preprocess_data", ["--input", str(small_corpus), "--output-dir", str(out), "--tokenizer-type",
                                          "wordpiece", "--tokenizer-model", str(vocab), "--json-keys", "body",
                                          "--quiet"])
    line = error_line(capsys.readouterr().err)
    assert code == 1
    assert str(small_corpus) in line and "missing_key 200" in line and "--json-keys (now: body)" in line
    assert not (out / "index.json").exists()


def test_an_old_dataset_of_zero_documents_fails_verification(tmp_path, vocab, capsys, monkeypatch):
    corpus = write_jsonl(tmp_path / "docs.jsonl", ["one document", "another"])
    out = tmp_path / "old"
    monkeypatch.setattr(preprocess_module, "_refuse_empty", lambda config, results: None)  # as before the fix
    run_preprocess([corpus], out, vocab, json_keys=["body"])
    monkeypatch.undo()
    assert json.loads((out / "index.json").read_text())["totals"]["documents"] == 0

    assert run_tool("verify_data", [str(out)]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(out) in line and "0 documents" in line and "missing_key 2" in line
    with pytest.raises(DataError, match="holds 0 documents"):
        IndexedDocuments(out)
    with pytest.raises(DataError, match="no valid documents"):  # a rerun does not take it as finished
        run_preprocess([corpus], out, vocab, json_keys=["body"])


# --- 3. SIGKILL of the main process; one run per output directory ---------------------------------------------

@pytest.fixture(scope="session")
def kill_corpus(tmp_path_factory, stdlib_documents) -> Path:
    """About 3.3 MB of JSONL (the docstrings twice): 13 shards of 0.25 MiB, about two seconds to preprocess."""
    return write_jsonl(tmp_path_factory.mktemp("kill") / "docs.jsonl", stdlib_documents * 2)


@pytest.fixture(scope="session")
def kill_reference(tmp_path_factory, kill_corpus, vocab) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("kill_reference") / "out"
    run_preprocess([kill_corpus], out, vocab, workers=2, shard_size_bytes=int(KILL_SHARD_MB * 2**20))
    return tree_bytes(out)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := proc_stat(int(entry.name))) is not None and int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")  # an unreaped zombie is dead


@pytest.mark.skipif(sys.platform != "linux", reason="needs /proc and PR_SET_PDEATHSIG")
def test_sigkill_of_the_main_process_kills_its_workers_and_the_rerun_is_identical(
        tmp_path, kill_corpus, kill_reference, vocab):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(kill_corpus),
               "--output-dir", str(out), "--tokenizer-type", "wordpiece", "--tokenizer-model", str(vocab),
               "--workers", "2", "--shard-size-mb", str(KILL_SHARD_MB), "--quiet"]
    shards = sum(name.endswith(".arrow") for name in kill_reference)
    assert shards >= 10

    def records() -> int:
        return len(list((out / ".progress").glob("*.json"))) if (out / ".progress").is_dir() else 0

    moments: list[tuple[str, Callable[[float], bool]]] = [
        ("after 0.3 s", lambda started: time.monotonic() - started >= 0.3),
        ("at the first shard", lambda started: any(out.glob("shard_*.arrow"))),
        ("mid-way", lambda started: records() >= shards // 2),
    ]
    for moment, due in moments:
        process = subprocess.Popen(command)
        started, workers = time.monotonic(), set()
        # past the moment, and (but at 0.3 s) with both workers seen: a rerun that resumes from the earlier kills'
        # records may be past "mid-way" before its workers have started
        while not due(started) or (moment != "after 0.3 s" and len(workers) < 2):
            assert process.poll() is None, f"the run ended before the kill {moment}"
            workers |= children_of(process.pid)
            time.sleep(0.01)
        workers |= children_of(process.pid)
        os.kill(process.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        process.wait()
        deadline = time.monotonic() + 2
        while (survivors := {pid for pid in workers if alive(pid)}) and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in survivors:  # leave no orphan behind when the test fails
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"workers {survivors} outlived the main process killed {moment}"
        if moment != "after 0.3 s":
            assert len(workers) == 2, f"expected the 2 workers to be running {moment}, saw {workers}"
        assert not (out / "index.json").exists()

    subprocess.run(command, check=True, timeout=120)
    assert tree_bytes(out) == kill_reference  # every file, index.json included; no .lock, .progress or temp file


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path, small_corpus, vocab,
                                                                          capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / "shard_00000.arrow.4242.0123abcd.tmp", out / ".progress" / "shard_00001.arrow.json.7.deadbeef.tmp"]
    stale[1].parent.mkdir()
    for path in stale:
        path.write_bytes(b"half-written by a killed run")
    argv = ["--input", str(small_corpus), "--output-dir", str(out), "--tokenizer-type", "wordpiece",
            "--tokenizer-model", str(vocab), "--shard-size-mb", "0.05", "--quiet"]
    with output_lock(out):
        assert (out / ".lock").read_text() == f"{os.getpid()}\n"
        assert run_tool("preprocess_data", argv) == 2
    line = error_line(capsys.readouterr().err)
    assert f"pid {os.getpid()}" in line and str(out) in line
    assert all(path.exists() for path in stale), "the refused run must not touch the directory"

    assert run_tool("preprocess_data", argv) == 0  # the lock is released, not left stale
    assert not any(path.exists() for path in stale) and not (out / ".lock").exists()
    assert len(IndexedDocuments(out)) == 200


def test_temp_files_have_unique_names_that_cleanup_recognises(tmp_path):
    target = tmp_path / "shard_00000.arrow"
    names = {temp_path(target).name for _ in range(100)}
    assert len(names) == 100
    assert all(name.startswith(f"shard_00000.arrow.{os.getpid()}.") and name.endswith(".tmp") for name in names)
    assert all(is_temp_file(Path(name)) for name in names)
    assert not is_temp_file(Path("notes.tmp")) and not is_temp_file(target)


# --- 4. a token id outside the vocabulary ----------------------------------------------------------------------

def corrupt_one_token_id(data_dir: Path, shard_index: int, token: int) -> tuple[Path, int]:
    """Write 0x7f into the high byte of one int32 id of a shard (found via the shard's first tokens)."""
    entry = json.loads((data_dir / "index.json").read_text())["shards"][shard_index]
    shard = data_dir / entry["file"]
    table = pa.ipc.open_stream(pa.memory_map(str(shard))).read_all()
    ids = table.column("input_ids").chunk(0).values.to_numpy()
    data = bytearray(shard.read_bytes())
    start = data.find(ids[:16].astype("<i4").tobytes())
    assert start > 0 and data.count(ids[:16].astype("<i4").tobytes()) == 1
    data[start + 4 * token + 3] = 0x7F
    shard.write_bytes(bytes(data))
    return shard, 0x7F000000 | int(ids[token])


def test_an_out_of_range_token_id_is_refused_at_open_naming_the_shard(dataset_copy, capsys):
    shard, bad_id = corrupt_one_token_id(dataset_copy, 1, token=5)
    with pytest.raises(DataError) as raised:
        IndexedDocuments(dataset_copy)
    message = str(raised.value)
    assert "\n" not in message
    assert f"shard {shard.name}" in message and f"token id {bad_id} (at token 5; 1 ids out of range)" in message
    assert "30522" in message and "tools/verify_data.py" in message and "preprocess" in message

    assert run_tool("verify_data", [str(dataset_copy)]) == 1
    assert shard.name in error_line(capsys.readouterr().err)

    # a shard corrupted before its checksum was taken: verify_data still names it, for its ids
    manifest = json.loads((dataset_copy / "index.json").read_text())
    manifest["shards"][1]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (dataset_copy / "index.json").write_text(json.dumps(manifest))
    assert run_tool("verify_data", [str(dataset_copy)]) == 1
    line = error_line(capsys.readouterr().err)
    assert f"shard {shard.name}" in line and f"token id {bad_id}" in line


# --- 5. one-line errors naming the file and the fix ------------------------------------------------------------

@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, small_corpus, small_dataset, vocab) -> dict[str, Path]:
    """One of each bad input (made once), beside the good corpus and vocabulary they are used with."""
    root = tmp_path_factory.mktemp("bad_files")
    files = {"corpus": small_corpus, "vocab_ok": vocab, "dir": root / "a_directory", "file_out": root / "not_a_dir"}
    files["dir"].mkdir()
    files["file_out"].write_text("I am a file\n")
    files["spm"] = root / "random.model"
    files["spm"].write_bytes(random.Random(0).randbytes(2000))
    files["tokjson"] = root / "tokenizer.json"
    files["tokjson"].write_text('{"version": "1.0", "model": ')
    files["vocab"] = root / "vocab.txt"
    files["vocab"].write_text("hello\nworld\n")
    compressed = gzip.compress(small_corpus.read_bytes())
    files["truncated"] = root / "truncated.jsonl.gz"
    files["truncated"].write_bytes(compressed[: len(compressed) // 2])
    files["not_gzip"] = root / "plain.jsonl.gz"
    files["not_gzip"].write_bytes(small_corpus.read_bytes()[:5000].rsplit(b"\n", 1)[0] + b"\n")
    files["tiny"] = write_jsonl(root / "tiny.jsonl", ["a few words", "and a few more words"])
    for name, content in (("invalid_json", '{"format": "megatron_narrow.documents", '),
                          ("missing_keys", None)):
        files[name] = Path(shutil.copytree(small_dataset, root / name))
        manifest = json.loads((files[name] / "index.json").read_text())
        if content is None:
            del manifest["tokenizer"]["vocab_size"], manifest["shards"][0]["sha256"]
            content = json.dumps(manifest)
        (files[name] / "index.json").write_text(content)
    return files


def preprocess_argv(files: dict[str, Path], out: Path, *, input_key: str = "corpus",
                    tokenizer: tuple[str, str] = ("wordpiece", "vocab_ok")) -> list[str]:
    return ["--input", str(files[input_key]), "--output-dir", str(out), "--tokenizer-type", tokenizer[0],
            "--tokenizer-model", str(files[tokenizer[1]]), "--quiet"]


ERROR_CASES = [
    # (id, tool, argv from (files, tmp_path), exit code, what the error line must contain: text or a regex)
    ("random_sentencepiece_model", "preprocess_data",
     lambda f, tmp: preprocess_argv(f, tmp / "out", tokenizer=("sentencepiece", "spm")), 2,
     ["random.model is not a valid sentencepiece model", "tools/train_tokenizer.py"]),
    ("broken_tokenizer_json", "preprocess_data",
     lambda f, tmp: preprocess_argv(f, tmp / "out", tokenizer=("wordpiece", "tokjson")), 2,
     ["tokenizer.json cannot be loaded", "give a tokenizer.json"]),
    ("vocab_txt_without_specials", "preprocess_data",
     lambda f, tmp: preprocess_argv(f, tmp / "out", tokenizer=("wordpiece", "vocab")), 2,
     ["vocab.txt cannot be loaded", "[SEP]"]),
    ("truncated_gzip", "preprocess_data", lambda f, tmp: preprocess_argv(f, tmp / "out", input_key="truncated"), 1,
     ["truncated.jsonl.gz is a truncated or corrupt gzip file", "compress it again"]),
    ("not_gzip", "preprocess_data", lambda f, tmp: preprocess_argv(f, tmp / "out", input_key="not_gzip"), 1,
     ["plain.jsonl.gz is not gzip-compressed", "rename it without .gz"]),
    ("output_dir_is_a_file", "preprocess_data", lambda f, tmp: preprocess_argv(f, f["file_out"]), 2,
     ["not_a_dir is an existing file, not a directory"]),
    ("input_is_a_directory", "preprocess_data", lambda f, tmp: preprocess_argv(f, tmp / "out", input_key="dir"), 2,
     ["a_directory is a directory; give the files in it"]),
    ("vocab_too_large", "train_tokenizer",
     lambda f, tmp: ["--input", str(f["tiny"]), "--model-prefix", str(tmp / "x"), "--vocab-size", "5000"], 2,
     ["--vocab-size 5000 is too large", "tiny.jsonl", re.compile(r"\(at most \d+ for it\)"), "lower --vocab-size"]),
    ("no_training_text", "train_tokenizer",
     lambda f, tmp: ["--input", str(f["tiny"]), "--model-prefix", str(tmp / "x"), "--json-keys", "body"], 1,
     ["no training text in", "tiny.jsonl", "--json-keys"]),
    ("tokenizer_input_is_a_directory", "train_tokenizer",
     lambda f, tmp: ["--input", str(f["dir"]), "--model-prefix", str(tmp / "x")], 2,
     ["a_directory is a directory"]),
    ("index_json_not_json", "verify_data", lambda f, tmp: [str(f["invalid_json"])], 1,
     ["invalid_json/index.json is not valid JSON", "preprocess"]),
    ("index_json_missing_keys", "verify_data", lambda f, tmp: [str(f["missing_keys"])], 1,
     ["missing_keys/index.json lacks tokenizer.vocab_size, shards[0].sha256", "preprocess"]),
]


@pytest.mark.parametrize(("tool", "make_argv", "code", "expected"), [case[1:] for case in ERROR_CASES],
                         ids=[case[0] for case in ERROR_CASES])
def test_bad_files_give_one_error_line_naming_the_file(tool, make_argv, code, expected, bad_files, tmp_path,
                                                       capsys):
    assert run_tool(tool, make_argv(bad_files, tmp_path)) == code
    line = error_line(capsys.readouterr().err)
    for pattern in expected:
        assert (pattern.search(line) if isinstance(pattern, re.Pattern) else pattern in line), (pattern, line)
    if tool == "preprocess_data":
        assert not (tmp_path / "out" / "index.json").exists()
    assert bad_files["file_out"].read_text() == "I am a file\n", "an output path that is a file is left alone"


@pytest.mark.parametrize("tool", ["preprocess_data", "train_tokenizer", "verify_data"])
def test_debug_shows_the_traceback(tool, bad_files, tmp_path, capsys):
    argv = {"preprocess_data": preprocess_argv(bad_files, tmp_path / "out", input_key="dir"),
            "train_tokenizer": ["--input", str(bad_files["dir"]), "--model-prefix", "unused"],
            "verify_data": [str(bad_files["invalid_json"])]}[tool]
    assert run_tool(tool, [*argv, "--debug"]) in (1, 2)
    stderr = capsys.readouterr().err
    assert stderr.startswith("Traceback") and stderr.strip().splitlines()[-1].startswith("error: ")


def test_verify_data_checks_every_directory_and_reports_each_bad_one(tmp_path, small_dataset, bad_files,
                                                                      capsys):
    truncated = Path(shutil.copytree(small_dataset, tmp_path / "truncated"))
    shard = sorted(truncated.glob("shard_*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    dirs = [bad_files["invalid_json"], small_dataset, truncated, tmp_path / "missing"]
    assert run_tool("verify_data", [str(d) for d in dirs]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 1 and captured.out.startswith(f"OK {small_dataset}: ")
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 3 and "Traceback" not in captured.err
    assert "invalid_json/index.json is not valid JSON" in errors[0]
    assert f"shard {shard.name} in {truncated}" in errors[1] and "truncated" in errors[1]
    assert f"{tmp_path / 'missing' / 'index.json'} does not exist" in errors[2]
    assert run_tool("verify_data", [str(small_dataset), str(small_dataset)]) == 0
    assert capsys.readouterr().out.count("OK ") == 2

