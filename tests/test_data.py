"""The data step: fetch (Hub and GitHub boundaries mocked) writes atomically with a manifest; verify
catches changed, truncated, missing and unexpected files; unknown names list the valid ones."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from trimkv import data
from trimkv.cli import main as trimkv_main

FIXTURES = Path(__file__).parent / "fixtures"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch):
    """A fake Hub: openai/gsm8k holds our gsm8k fixture plus files the registry must skip."""
    calls = []
    files = {"main/test-00000-of-00001.parquet": FIXTURES / "gsm8k/main/test-00000-of-00001.parquet",
             "main/train-00000-of-00001.parquet": FIXTURES / "gsm8k/main/test-00000-of-00001.parquet",
             "socratic/test-00000-of-00001.parquet": FIXTURES / "gsm8k/main/test-00000-of-00001.parquet",
             "README.md": None}

    def download(repo, filename, revision, local_dir):
        calls.append((repo, filename, revision))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(files[filename], target)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)  # what hf_hub_download leaves
        return target

    monkeypatch.setattr(data, "_hub_resolve", lambda repo, revision: SHA)
    monkeypatch.setattr(data, "_hub_list", lambda repo, revision: sorted(files))
    monkeypatch.setattr(data, "_hub_download", download)
    return calls


def test_fetch_writes_files_and_manifest(hub, tmp_path):
    out = tmp_path / "resources" / "gsm8k"
    manifest = data.fetch("gsm8k", out)
    assert [c[1] for c in hub] == ["main/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet"]
    assert all(c[2] == SHA for c in hub)  # downloads use the resolved commit
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["revision"] == data.SOURCES["gsm8k"].revision and manifest["resolved_revision"] == SHA
    assert manifest["source"] == "https://huggingface.co/datasets/openai/gsm8k"
    assert set(manifest["files"]) == {"main/test-00000-of-00001.parquet", "main/train-00000-of-00001.parquet"}
    entry = manifest["files"]["main/test-00000-of-00001.parquet"]
    assert entry["rows"] == 3 and len(entry["sha256"]) == 64 and manifest["rows"] == 6
    assert not (out / ".cache").exists() and data.verify(out) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["gsm8k"]  # no temporary directory left


def test_a_dying_download_leaves_nothing_that_looks_finished(hub, tmp_path, monkeypatch):
    real = data._hub_download

    def dies_on_second(repo, filename, revision, local_dir):
        if "train" in filename:
            raise ConnectionError("network down")
        return real(repo, filename, revision, local_dir)

    monkeypatch.setattr(data, "_hub_download", dies_on_second)
    with pytest.raises(ConnectionError):
        data.fetch("gsm8k", tmp_path / "gsm8k")
    assert list(tmp_path.iterdir()) == []


def test_refetch_needs_force_and_replaces_atomically(hub, tmp_path):
    out = tmp_path / "gsm8k"
    data.fetch("gsm8k", out)
    with pytest.raises(ValueError, match="already holds a fetched dataset"):
        data.fetch("gsm8k", out)
    (out / "stale.txt").write_text("old")
    data.fetch("gsm8k", out, force=True)
    assert not (out / "stale.txt").exists() and data.verify(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsm8k"]


def test_verify_detects_changed_truncated_missing_and_unexpected_files(hub, tmp_path):
    out = tmp_path / "gsm8k"
    data.fetch("gsm8k", out)
    test_file, train_file = out / "main/test-00000-of-00001.parquet", out / "main/train-00000-of-00001.parquet"
    raw = bytearray(test_file.read_bytes())
    raw[100] ^= 0xFF  # same size, one byte changed
    test_file.write_bytes(bytes(raw))
    assert any("sha256 differs" in p for p in data.verify(out))
    train_file.write_bytes(train_file.read_bytes()[:-10])
    assert any("truncated or changed" in p for p in data.verify(out))
    train_file.unlink()
    (out / "extra.parquet").write_bytes(b"x")
    problems = data.verify(out)
    assert any(p.endswith("missing") for p in problems) and any("unexpected file" in p for p in problems)
    absent = tmp_path / "nothing"
    assert data.verify(absent) == [f"{absent}: no manifest.json (not fetched, or the fetch did not finish)"]


def test_verify_cli_exit_codes(hub, tmp_path, capsys):
    out = tmp_path / "gsm8k"
    data.fetch("gsm8k", out)
    assert trimkv_main(["data", "verify", str(out)]) == 0
    (out / "main/test-00000-of-00001.parquet").write_bytes(b"tampered")
    assert trimkv_main(["data", "verify", str(out)]) == 1
    assert "truncated or changed" in capsys.readouterr().err


def test_unknown_name_lists_the_valid_ones(capsys):
    assert trimkv_main(["data", "fetch", "nope", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'; valid datasets:" in err
    for name in ("gsm8k", "math500", "aime24", "longproc", "scbench", "longmemeval", "longbench", "longbench_v2",
                 "openr1_math", "longalpaca", "booksum", "buddhi", "synthlong"):
        assert name in err
    with pytest.raises(ValueError, match="no known public source"):
        data.fetch("synthlong", Path("x"))


def test_json_tables_are_converted_to_parquet(monkeypatch, tmp_path):
    rows = [{"_id": "a", "question": "q?", "answer": "A"}, {"_id": "b", "question": "r?", "answer": "B"}]

    def download(repo, filename, revision, local_dir):
        (Path(local_dir) / filename).write_text(json.dumps(rows))
        return Path(local_dir) / filename

    monkeypatch.setattr(data, "_hub_resolve", lambda repo, revision: SHA)
    monkeypatch.setattr(data, "_hub_list", lambda repo, revision: ["README.md", "data.json"])
    monkeypatch.setattr(data, "_hub_download", download)
    manifest = data.fetch("longbench_v2", tmp_path / "lb2")
    assert list(manifest["files"]) == ["data.parquet"] and manifest["files"]["data.parquet"]["rows"] == 2
    assert pq.read_table(tmp_path / "lb2" / "data.parquet").to_pylist() == rows


def test_github_archive_source_extracts_data_and_records_the_commit(monkeypatch, tmp_path):
    def archive(repo, revision, dest):
        assert repo == "princeton-pli/LongProc"
        with tarfile.open(dest, "w:gz") as tar:
            for name, text in ((f"LongProc-{SHA}/data/countdown/prompts.yaml", "USER_PROMPT: x"),
                               (f"LongProc-{SHA}/README.md", "readme")):
                blob = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return dest

    monkeypatch.setattr(data, "_github_archive", archive)
    manifest = data.fetch("longproc", tmp_path / "longproc")
    assert list(manifest["files"]) == ["data/countdown/prompts.yaml"]
    assert manifest["resolved_revision"] == SHA and manifest["source"] == "https://github.com/princeton-pli/LongProc"
    assert data.verify(tmp_path / "longproc") == []


def test_every_benchmark_has_a_data_source():
    from trimkv.eval import BENCHMARKS

    for name, cls in BENCHMARKS.items():
        if name in ("synthetic", "fixture_words"):
            continue
        source = data.get_source(name)
        assert source.repo.removeprefix("github:") == cls.dataset.removeprefix("github:")
        assert source.revision == cls.revision
