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


# -- a multilingual corpus ------------------------------------------------------------------------------
# Common words of each language (written here, so the corpus needs no download), drawn with Zipf weights
# into sentences; one shard per language, so `compare` shows them per source and per script. The code
# shard holds identifiers such as .DefaultCellStyle that byte-level BPE vocabularies pack into one token.
LANGUAGES = {
    "english": ("the of and to in is that for it as was with be by on not he this are or his from at which but "
                "have an they you were her she there been one all we their has would when if so who will more no "
                "information government development international understanding performance everything "
                "environment experience relationship different important something community"),
    "german": ("der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden "
               "aus er hat dass sie nach wird bei Geschwindigkeitsbegrenzung Bundesregierung Entwicklung "
               "Zusammenarbeit Verantwortung Wissenschaft Unternehmen Gesellschaft Möglichkeiten Straßenbahn"),
    "french": ("de la le et les des en un du une que est pour qui dans par plus pas au sur ne se il sont ce avec "
               "gouvernement développement international aujourd’hui également entreprises problème économique "
               "l’environnement démocratie société"),
    "russian": ("и в не на я что он с как а то все она так его но да ты к у же вы за бы по только ее мне было "
                "правительство развитие информация государство международный экономика предприятие "
                "исследование пространство возможность"),
    "greek": ("και το να η της του τα με που σε οι για από την είναι στο θα δεν τον ένα στην κυβέρνηση ανάπτυξη "
              "πληροφορίες οικονομία διεθνής δημοκρατία επιστήμη κοινωνία"),
    "arabic": ("في من على إلى أن عن مع هذا التي الذي كان هذه ما لا كل بين قد ذلك بعد الحكومة التنمية المعلومات "
               "الاقتصاد الدولية المجتمع الجامعة التكنولوجيا"),
    "hindi": ("के है में की और से को का एक यह कि पर भी नहीं हैं था लिए कर ने तो सरकार विकास जानकारी "
              "अर्थव्यवस्था अंतरराष्ट्रीय समाज विश्वविद्यालय प्रौद्योगिकी"),
    "chinese": "的 一 是 不 了 在 人 有 我 他 这 个 们 中 来 上 大 为 和 国 政府 发展 信息 经济 国际 社会 大学 技术 分词 粒度",
    "japanese": ("の に は を た が で て と し れ さ ある いる も する から な こと として 政府 開発 情報 経済 "
                 "国際 社会 大学 技術 トークン 東京"),
    "korean": "이 그 저 것 수 등 들 및 에서 으로 하다 있다 되다 정부 개발 정보 경제 국제 사회 대학 기술 토큰",
}
CODE_LINES = (
    "dataGridView1.DefaultCellStyle.BackColor = Color.Red;",
    "    return self.tokenizer.encode_batch(texts)",
    "for (int i = 0; i < items.Count; i++) { total += items[i].Value; }",
    "import numpy as np\nimport pyarrow.parquet as pq",
    "public override string ToString() => $\"{Name} ({Id})\";",
    "################################################################",
    "// ----------------------------------------------------------------",
    "\tif err != nil {\n\t\treturn nil, fmt.Errorf(\"read %s: %w\", path, err)\n\t}",
)


def multilingual_documents(language: str, seed: int, target_bytes: int) -> Iterator[str]:
    """Seeded documents of one language from LANGUAGES (or "code"), about target_bytes UTF-8 bytes in all."""
    import numpy as np

    rng = np.random.default_rng([seed, sum(map(ord, language))])
    total = 0
    if language == "code":
        lines = np.array(CODE_LINES, dtype=object)
        while total < target_bytes:
            doc = "\n".join(rng.choice(lines, int(rng.integers(3, 30))))
            total += len(doc.encode())
            yield doc
        return
    words = np.array(LANGUAGES[language].split(), dtype=object)
    probs = 1.0 / np.arange(1, len(words) + 1)
    probs = probs[rng.permutation(len(words))]
    probs /= probs.sum()
    joiner = "" if language in ("chinese", "japanese") else " "
    stop = {"chinese": "。", "japanese": "。", "hindi": "।"}.get(language, ".")
    while total < target_bytes:
        sentences = []
        for _ in range(int(rng.integers(2, 12))):
            picked = rng.choice(words, int(rng.integers(4, 18)), p=probs)
            sentence = joiner.join(picked)
            sentences.append(sentence[:1].upper() + sentence[1:] + stop)
        doc = joiner.join(sentences)
        total += len(doc.encode())
        yield doc


def build_multilingual_corpus(folder: Path, target_mb: float, seed: int = 20) -> list[Path]:
    """One JSON-lines shard per language and one of code ({"text": ...}), target_mb MB of text in all
    (split evenly), written once and reused."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [*LANGUAGES, "code"]
    files = [folder / f"{name}.jsonl" for name in names]
    stamp = folder / "_corpus.json"
    want = {"target_mb": target_mb, "seed": seed, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()).get("spec") == want and all(f.exists() for f in files):
        return files
    per = int(target_mb * 1_000_000 / len(names))
    for name, path in zip(names, files):
        with path.open("w", encoding="utf-8") as f:
            for doc in multilingual_documents(name, seed, per):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    stamp.write_text(json.dumps({"spec": want}))
    return files
