"""A benchmark corpus of real text that every machine can rebuild: Python sources.

Documents are the .py files of the standard library, then of the installed
packages (pinned by requirements/constraints.txt, so the same on every machine
that ran ./run_local.sh), then their docstrings, in sorted order, until the
target size is reached. Written as JSON-lines shards of {"text": ...}.
"""
from __future__ import annotations

import ast
import json
import site
import sysconfig
from pathlib import Path
from typing import Iterator


def _sources() -> Iterator[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    for sp in sorted(set(site.getsitepackages())):
        yield from sorted(Path(sp).rglob("*.py"))


def _documents() -> Iterator[str]:
    seen: set[Path] = set()
    paths = []
    for path in _sources():
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        paths.append(path)
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    for path in paths:  # then docstrings, if still short of the target
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except Exception:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def build_corpus(folder: Path, target_mb: int, shards: int = 8) -> list[Path]:
    """Write (or reuse) `shards` jsonl files holding at least target_mb MB of text."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "_corpus.json"
    want = {"target_mb": target_mb, "shards": shards, "version": 1}
    files = [folder / f"shard-{i:02d}.jsonl" for i in range(shards)]
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want and all(f.exists() for f in files):
        return files
    target = target_mb * 1_000_000
    texts, total = [], 0
    for doc in _documents():
        texts.append(doc)
        total += len(doc.encode("utf-8"))
        if total >= target:
            break
    if total < target:
        raise RuntimeError(f"only {total / 1e6:.0f} MB of text found, {target_mb} MB asked")
    per_shard = total / shards
    handles = [f.open("w", encoding="utf-8") for f in files]
    size, k = 0, 0
    for doc in texts:
        handles[k].write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        size += len(doc.encode("utf-8"))
        if size >= per_shard * (k + 1) and k < shards - 1:
            k += 1
    for h in handles:
        h.close()
    stamp.write_text(json.dumps({"spec": want, "documents": len(texts), "text_bytes": total}))
    return files


def load_texts(files: list[Path]) -> list[str]:
    texts = []
    for f in files:
        with f.open("rb") as fh:
            texts.extend(json.loads(line)["text"] for line in fh if line.strip())
    return texts
