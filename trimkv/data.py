"""`python -m trimkv data fetch|verify|list`: download the evaluation and training sets, pinned and checked.

`fetch NAME --out DIR` downloads the files of one registered source at its revision (Hugging Face Hub
datasets through `huggingface_hub`; LongProc as a GitHub archive), converts JSON / JSONL / CSV tables
to parquet where the schema allows it, and writes `DIR/manifest.json` with the source, the requested
and the resolved revision, and the size, sha256 and row count of every file. Everything is written to
a temporary sibling directory that is renamed to DIR only when complete, so a download that dies
leaves nothing that looks finished. `verify DIR` recomputes the hashes and reports changed,
truncated, missing and unexpected files.

Revisions: where we know a commit we pin it; the rest (marked `main` or a branch) are resolved at
fetch time and the commit is recorded in the manifest as `resolved_revision` — copy it into the
registry or pass `--revision` to pin it. Notes per source say what was chosen and why.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Source:
    name: str
    repo: str  # Hub dataset id, or "github:owner/name"
    revision: str  # commit (pinned) or branch (resolved at fetch time and recorded)
    patterns: tuple[str, ...]  # fnmatch globs over repository paths (`*` crosses folders)
    fallback: tuple[str, ...] = ()  # used only when `patterns` match nothing
    convert: bool = False  # tables in JSON / JSONL / CSV are written as parquet
    role: str = "eval"  # eval | train
    note: str = ""

    @property
    def github(self) -> bool:
        return self.repo.startswith("github:")


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("gsm8k", "openai/gsm8k", "740312add88f781978c0658806c59bc2815b9866", ("main/*.parquet",),
           note="parquet since the loading script was deleted (e53f048); config main, splits train/test"),
    Source("math500", "HuggingFaceH4/MATH-500", "6e4ed1a2a79af7d8630a6b768ec859cb5af4d3be", ("*.parquet",),
           fallback=("*test*.jsonl",), convert=True, note="500 problems, split test"),
    Source("aime24", "HuggingFaceH4/aime_2024", "2fe88a2f1091d5048c0f36abc874fb997b3dd99a", ("*.parquet",),
           note="30 problems, split named train"),
    Source("longbench", "THUDM/LongBench", "refs/convert/parquet", ("*/test/*.parquet",),
           note="main holds a loading script + data.zip that datasets>=4 refuses; the Hub's parquet export branch "
                "keeps the raw schema, <task>/test/0000.parquet, LongBench-E `_e` tasks included"),
    Source("longbench_v2", "THUDM/LongBench-v2", "main", ("data.json",), convert=True,
           note="one JSON array, 503 rows, converted to data.parquet"),
    Source("scbench", "microsoft/SCBench", "main", ("scbench_*/test-*.parquet",),
           note="native parquet per subset; older revisions name the split train / the configs multi_turn_*"),
    Source("longmemeval", "xiaowu0162/longmemeval-cleaned", "98d7416c24c778c2fee6e6f3006e7a073259d48f",
           ("longmemeval_s_cleaned.json", "longmemeval_oracle.json"),
           note="kept as JSON: heterogeneous sessions (empty ones, has_answer on some turns) do not fit one parquet "
                "schema; the ~2.7 GB _m file is left out (fetch it with --pattern longmemeval_m_cleaned.json)"),
    Source("longproc", "github:princeton-pli/LongProc", "78e873a", ("data/*",),
           note="not on the Hub: the repository's data/ folder (task JSON files, prompts.yaml, html pages)"),
    Source("openr1_math", "open-r1/OpenR1-Math-220k", "main", ("data/*.parquet",), fallback=("*.parquet",),
           role="train", note="default config (93,733 rows) used for the Qwen3-*-Math and R1-Distill-Llama gates"),
    Source("longalpaca", "Yukang/LongAlpaca-12k", "main", ("LongAlpaca-12k.json",), convert=True, role="train",
           note="one JSON array (instruction, output[, file]); the Phi-3-mini-128k gates"),
    Source("booksum", "kmfoda/booksum", "main", ("*.parquet",), fallback=("*.csv",), convert=True, role="train",
           note="chapter-level summaries; part of the Qwen3-4B-Instruct-2507 mixture"),
    Source("buddhi", "aiplanet/buddhi-dataset", "main", ("*.parquet",), fallback=("*.json", "*.jsonl", "*.csv"),
           convert=True, role="train", note="long-context QA; part of the Qwen3-4B-Instruct-2507 mixture"),
    Source("synthlong", "", "", (), role="train",
           note="Synth-Long: named in the TRIM-KV README only; no public dataset id is known"),
)}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    if not source.repo:
        raise ValueError(f"dataset {name!r} has no known public source ({source.note})")
    return source


# ---- the network boundary (tests replace these four) ----

def _hub_resolve(repo: str, revision: str) -> str:
    """The commit sha `revision` (branch, tag or sha) of a Hub dataset points to."""
    from huggingface_hub import HfApi

    return HfApi().dataset_info(repo, revision=revision).sha


def _hub_list(repo: str, revision: str) -> list[str]:
    from huggingface_hub import HfApi

    return HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)


def _hub_download(repo: str, filename: str, revision: str, local_dir: Path) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision, local_dir=local_dir))


def _github_archive(repo: str, revision: str, dest: Path) -> Path:
    """Download github.com/<repo> at `revision` as a .tar.gz to `dest`."""
    import urllib.request

    url = f"https://codeload.github.com/{repo}/tar.gz/{revision}"
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)
    return dest


# ---- fetch ----

def select(paths: list[str], source: Source) -> list[str]:
    chosen = sorted(p for p in paths if any(fnmatch.fnmatch(p, g) for g in source.patterns))
    if not chosen and source.fallback:
        chosen = sorted(p for p in paths if any(fnmatch.fnmatch(p, g) for g in source.fallback))
    return chosen


def fetch(name: str, out: Path, revision: str | None = None, patterns: tuple[str, ...] | None = None,
          force: bool = False) -> dict[str, Any]:
    """Download one source into `out` (atomically) and return its manifest."""
    source = get_source(name)
    if patterns:
        source = Source(**{**source.__dict__, "patterns": tuple(patterns), "fallback": ()})
    revision = revision or source.revision
    out = Path(out)
    if (out / "manifest.json").exists() and not force:
        raise ValueError(f"{out} already holds a fetched dataset; `data verify {out}` checks it, --force replaces it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if source.github:
            resolved = _fetch_github(source, revision, tmp)
        else:
            resolved = _fetch_hub(source, revision, tmp)
        if source.convert:
            for path in sorted(p for p in tmp.rglob("*") if p.suffix in (".json", ".jsonl", ".csv")):
                _to_parquet(path)
        manifest = {"name": name, "source": _source_url(source), "repo": source.repo, "role": source.role,
                    "revision": revision, "resolved_revision": resolved, "note": source.note,
                    "files": {rel: _describe(tmp / rel) for rel in _listing(tmp)}}
        manifest["rows"] = sum(f["rows"] or 0 for f in manifest["files"].values())
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _source_url(source: Source) -> str:
    if source.github:
        return f"https://github.com/{source.repo.removeprefix('github:')}"
    return f"https://huggingface.co/datasets/{source.repo}"


def _fetch_hub(source: Source, revision: str, tmp: Path) -> str:
    resolved = _hub_resolve(source.repo, revision)
    files = select(_hub_list(source.repo, resolved), source)
    if not files:
        raise ValueError(f"no files of {source.repo}@{resolved} match {source.patterns + source.fallback}")
    for filename in files:
        _hub_download(source.repo, filename, resolved, tmp)
    shutil.rmtree(tmp / ".cache", ignore_errors=True)  # huggingface_hub's local_dir bookkeeping
    return resolved


def _fetch_github(source: Source, revision: str, tmp: Path) -> str:
    archive = _github_archive(source.repo.removeprefix("github:"), revision, tmp / ".archive.tar.gz")
    resolved = revision
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/" in m.name]
        if members:
            top = members[0].name.split("/", 1)[0]  # "<repo>-<full commit sha>"
            resolved = top.rsplit("-", 1)[-1] if "-" in top else revision
        wanted = [m for m in members if any(fnmatch.fnmatch(m.name.split("/", 1)[1], g) for g in source.patterns)]
        if not wanted:
            raise ValueError(f"no files of {source.repo}@{revision} match {source.patterns}")
        for member in wanted:
            target = tmp / member.name.split("/", 1)[1]
            if ".." in Path(member.name).parts:
                raise ValueError(f"unsafe path in archive: {member.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    archive.unlink()
    return resolved


def _to_parquet(path: Path) -> Path:
    """Rewrite a JSON array / JSONL / CSV table as parquet beside it (same stem) and delete the original."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    else:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f) if path.suffix == ".json" else [json.loads(line) for line in f if line.strip()]
        if isinstance(rows, dict):
            rows = [rows]
        table = pa.Table.from_pylist(rows)
    target = path.with_suffix(".parquet")
    pq.write_table(table, target)
    path.unlink()
    return target


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(path: Path) -> int | None:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
        if path.suffix == ".jsonl":
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return len(data) if isinstance(data, list) else None
    except (OSError, ValueError):
        return None
    return None


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path), "rows": _rows(path)}


# ---- verify ----

def verify(directory: Path) -> list[str]:
    """Problems found in a fetched directory (empty when every file matches its manifest)."""
    directory = Path(directory)
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return [f"{directory}: no manifest.json (not fetched, or the fetch did not finish)"]
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return [f"{manifest_path}: unreadable manifest ({e})"]
    problems = []
    for rel, info in sorted(files.items()):
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != info["bytes"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {info['bytes']} (truncated or changed)")
        elif _sha256(path) != info["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (changed)")
    for rel in _listing(directory):
        if rel not in files:
            problems.append(f"{directory / rel}: not in the manifest (unexpected file)")
    return problems


# ---- command line ----

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="download (pinned) and verify evaluation and training datasets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    f = sub.add_parser("fetch", help="download one dataset into a directory with a manifest",
                       description="Download NAME at its pinned revision into --out, atomically, with manifest.json.")
    f.add_argument("name", help=f"dataset: {', '.join(sorted(SOURCES))}")
    f.add_argument("--out", type=Path, default=None, help="target directory (default: resources/data/NAME)")
    f.add_argument("--revision", default=None, help="override the registry's revision (branch, tag or commit)")
    f.add_argument("--pattern", action="append", default=None,
                   help="download these repository paths (glob) instead of the registry's; repeatable")
    f.add_argument("--force", action="store_true", help="replace an existing fetched directory")
    f.set_defaults(func=_fetch_cmd)
    v = sub.add_parser("verify", help="check a fetched directory against its manifest (exit 1 on any problem)",
                       description="Recompute sizes and sha256 of every file listed in DIR/manifest.json.")
    v.add_argument("directory", type=Path, help="a directory written by `data fetch`")
    v.set_defaults(func=_verify_cmd)
    ls = sub.add_parser("list", help="list the registered datasets with their sources and revisions")
    ls.set_defaults(func=_list_cmd)
    return p


def _fetch_cmd(args) -> int:
    out = args.out or Path("resources/data") / args.name
    manifest = fetch(args.name, out, revision=args.revision, patterns=tuple(args.pattern) if args.pattern else None,
                     force=args.force)
    print(f"fetched {args.name} ({manifest['repo']}@{manifest['resolved_revision']}): {len(manifest['files'])} files, "
          f"{manifest['rows']} rows -> {out}")
    return 0


def _verify_cmd(args) -> int:
    problems = verify(args.directory)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    files = json.loads((args.directory / "manifest.json").read_text())["files"]
    print(f"ok: {args.directory} ({len(files)} files match the manifest)")
    return 0


def _list_cmd(args) -> int:
    for s in sorted(SOURCES.values(), key=lambda s: (s.role, s.name)):
        print(f"{s.name:14} {s.role:5} {s.repo or '-'}@{s.revision or '-'}  {s.note}")
    return 0
