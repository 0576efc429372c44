"""The training reader: a tokenmill dataset as a resumable, shardable stream of samples.

`TokenReader` is plain Python (numpy out); `TorchTokenDataset` is the same
stream as a torch IterableDataset (tensors out). No Beam anywhere.

How a pass over the data is laid out, for `num_slots` = ranks x DataLoader
workers and slot = rank * workers + worker:

1. Work units are the (shard, row group) pairs of the manifest. Each epoch they
   are permuted from (seed, epoch); slot s takes units s, s + num_slots, ...:
   every unit goes to exactly one slot, no overlap and no gap.
2. Within a slot, rows pass through a shuffle buffer of `shuffle_buffer` rows
   whose random draws come from (seed, epoch, slot).
3. Text may be packed: documents are joined (EOS between them unless the
   dataset already ends each with EOS) and cut into windows of seq_len + 1
   tokens with stride seq_len, so every token is a target exactly once. The
   remainder at the end of a pass is dropped, or padded with `pad_id`.

The order depends only on the data, the seed, the epoch and the slot, so a
position is just "n samples into epoch e", plus whether the pass is done.
`state_dict()` records that; `load_state_dict()` makes the next pass skip ahead
by replaying the order from the tiny `num_tokens` column alone, without reading
token data. With torchdata's StatefulDataLoader each worker's reader saves and
restores itself; a worker that finished its share before the checkpoint was
saved as done and stays finished until the epoch ends.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenmill.loaders.latents import LatentFormat, flat_latents
from tokenmill.schemas.manifest import MANIFEST_NAME, Manifest, dataset_path
from tokenmill.schemas.storage import join, read_bytes
from tokenmill.schemas.tables import schema_for_manifest
from tokenmill.transforms.fs import open_binary


class DatasetMismatchError(ValueError):
    """The dataset is not what the caller expects (tokenizer, vocabulary, kind)."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """One row group of one shard: the unit of work split across slots."""

    path: str
    row_group: int
    rows: int


def list_units(root: str, manifest: Manifest, verify_sha256: bool = False) -> list[Unit]:
    """The row groups of the manifest's shards; paths stay inside `root` (schemas.manifest.dataset_path).

    verify_sha256 reads every shard once, whole, and refuses one whose sha256
    is not the manifest's: as costly as reading the dataset's bytes once more.
    """
    units = []
    for shard in manifest.shards:
        uri = dataset_path(root, shard["path"])
        if verify_sha256:
            import hashlib

            with open_binary(uri) as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != shard.get("sha256"):
                raise DatasetMismatchError(f"{uri}: sha256 {digest[:12]} is not the manifest's "
                                           f"{str(shard.get('sha256'))[:12]}: the shard changed after its commit")
        groups = shard.get("row_groups")
        if groups is None:  # older manifests: read the footer
            with open_binary(uri) as f:
                md = pq.ParquetFile(f).metadata
                groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        units += [Unit(uri, i, n) for i, n in enumerate(groups)]
    return units


def _slot() -> tuple[int, int]:
    """(worker id, number of workers) of the torch DataLoader worker we run in, else (0, 1)."""
    if "torch" not in sys.modules:  # no torch loaded, so no DataLoader worker; importing it costs ~1 s
        return 0, 1
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _rank() -> tuple[int, int]:
    if "torch" not in sys.modules:
        return 0, 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TokenReader:
    """Samples of a tokenmill dataset, for a training loop.

    Yields, per sample:
      - packed text (seq_len set): an int64 array of seq_len + 1 token IDs
      - otherwise a dict: "id", and "tokens" (int64 array) or "latents"
        ((num_tokens, dim) array; bfloat16 as uint16 bits), plus "grid" for
        image and video, plus the columns named in `fields` as Python values
        (e.g. "source", "locator", "num_tokens", "orig_height", "fps"; "meta"
        as a dict whether stored as a JSON string or a struct). Only those
        columns are read.

    The current commit is read unless `version` names an older version that
    `tokenmill gc` has not removed yet. Either way the reader sees one
    complete commit: the manifest it opens names every file it reads.

    Shard paths must stay inside the dataset, and every row group read must
    hold the rows the manifest says (DatasetMismatchError otherwise);
    `verify_sha256` also checks each shard's bytes once, up front, at the cost
    of reading the whole dataset once more.

    expect_fingerprint / expect_vocab_size / expect_tokenizer (a spec) make the
    reader refuse a dataset built with another tokenizer. With `normalize` (the
    default), latents stored as uint8 with a recorded normalization (patch:P)
    come back as float32 x * scale + offset, i.e. in [-1, 1].
    """

    def __init__(self, root: str, *, seq_len: int | None = None, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1024, remainder: str = "drop", pad_id: int | None = None,
                 eos_id: int | str | None = "auto", rank: int | None = None, world_size: int | None = None,
                 expect_fingerprint: str | None = None, expect_vocab_size: int | None = None,
                 expect_tokenizer: str | None = None, epoch: int = 0, normalize: bool = True,
                 version: str | None = None, fields: Sequence[str] = (), verify_sha256: bool = False):
        self.root = root.rstrip("/")
        path = join(self.root, MANIFEST_NAME) if not version else join(self.root, "versions", version, MANIFEST_NAME)
        try:
            self.manifest = Manifest.from_json(read_bytes(path).decode())
        except FileNotFoundError:
            raise DatasetMismatchError(f"{root}: no {MANIFEST_NAME}" + (f" for version {version}" if version else "")
                                       + "; not a finished tokenmill dataset") from None
        tok = self.manifest.tokenizer
        self.kind = tok.get("kind", "hard")
        self._check(tok, expect_fingerprint, expect_vocab_size, expect_tokenizer)
        if seq_len is not None and (self.manifest.modality, self.kind) != ("text", "hard"):
            raise DatasetMismatchError("packing (seq_len) needs a text dataset of hard tokens")
        if remainder not in ("drop", "pad"):
            raise ValueError("remainder must be 'drop' or 'pad'")
        if remainder == "pad" and pad_id is None:
            raise ValueError("remainder='pad' needs pad_id")
        self.seq_len, self.shuffle, self.seed = seq_len, shuffle, seed
        self.shuffle_buffer, self.remainder, self.pad_id = max(1, shuffle_buffer), remainder, pad_id
        self.separator = self._separator(tok, eos_id) if seq_len else None
        self.rank, self.world_size = rank, world_size
        norm = tok.get("normalization") if normalize else None
        self.normalization = (float(norm["scale"]), float(norm["offset"])) if norm else None
        self.units = list_units(self.root, self.manifest, verify_sha256)
        self.fields = self._fields(fields)
        self.epoch = epoch
        self._yielded = 0  # samples of this epoch's pass yielded so far
        self._done = False  # the pass of `epoch` has ended
        self._resume = False  # the next pass continues a loaded position

    # -- identity ------------------------------------------------------------
    def _check(self, tok: dict, fingerprint: str | None, vocab_size: int | None, spec: str | None) -> None:
        where = f"dataset {self.root} (tokenizer {tok.get('spec')}, fingerprint {str(tok.get('fingerprint'))[:12]})"
        if spec is not None:
            from tokenmill.transforms.tokenizers.spec import load_text_tokenizer

            policy = tok.get("special_token_policy") or {}
            want = load_text_tokenizer(spec, bos=policy.get("bos_id") is not None,
                                       eos=policy.get("eos_id") is not None).fingerprint()
            if want != tok.get("fingerprint"):
                raise DatasetMismatchError(f"{where} was not tokenized with {spec} (fingerprint {want[:12]})")
        if fingerprint is not None and fingerprint != tok.get("fingerprint"):
            raise DatasetMismatchError(f"{where}: expected fingerprint {fingerprint[:12]}")
        if vocab_size is not None and vocab_size != tok.get("vocab_size"):
            raise DatasetMismatchError(f"{where}: vocab_size is {tok.get('vocab_size')}, expected {vocab_size}")

    def _fields(self, fields: Sequence[str]) -> tuple[str, ...]:
        """The extra columns a sample carries; each must be a column of the dataset's shards."""
        if isinstance(fields, str):
            fields = [fields]
        if not fields:
            return ()
        if self.seq_len is not None:
            raise ValueError("fields= needs unpacked samples: with seq_len a sample is a window of several "
                             "documents, so per-row columns have no place in it")
        if self.units:  # what the shards hold, columns added since a build included (meta of --keep-fields)
            with open_binary(self.units[0].path) as f:
                names = pq.ParquetFile(f).schema_arrow.names
        else:
            names = schema_for_manifest(self.manifest).names
        unknown = [f for f in fields if f not in names]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}: dataset {self.root} has "
                             + ", ".join(names))
        return tuple(dict.fromkeys(f for f in fields if f not in ("id", "tokens", "latents", "grid")))

    @staticmethod
    def _separator(tok: dict, eos_id: int | str | None) -> np.ndarray:
        if (tok.get("special_token_policy") or {}).get("eos_id") is not None or eos_id is None:
            return np.zeros(0, np.int64)  # documents already end with EOS, or no separator wanted
        if eos_id == "auto":
            specials = tok.get("special_tokens") or {}
            if "<|endoftext|>" not in specials:
                raise DatasetMismatchError("no <|endoftext|> in the vocabulary: pass eos_id (or None)")
            eos_id = specials["<|endoftext|>"]
        return np.array([int(eos_id)], np.int64)

    # -- position ------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Make the next pass read `epoch` from its start (DataLoader workers that are not persistent need it),
        unless a position loaded for that same epoch is waiting: a loop that resumes calls set_epoch too."""
        if not (self._resume and epoch == self.epoch):
            self.epoch, self._yielded, self._done, self._resume = epoch, 0, False, False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self._yielded, "done": self._done, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue the saved one: skip its `yielded` samples, or yield nothing if it was done."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, this reader has seed {self.seed}")
        self.epoch, self._yielded = int(state["epoch"]), int(state["yielded"])
        self._done, self._resume = bool(state.get("done", False)), True

    # -- the stream ------------------------------------------------------------
    def slot(self) -> tuple[int, int]:
        worker, workers = _slot()
        rank, world = (self.rank, self.world_size) if self.rank is not None else _rank()
        return rank * workers + worker, world * workers

    def my_units(self, epoch: int) -> list[int]:
        slot, slots = self.slot()
        order = np.arange(len(self.units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.units))
        return [int(u) for u in order[slot::slots]]

    def _lengths(self, unit: Unit) -> np.ndarray:
        with open_binary(unit.path) as f:
            t = pq.ParquetFile(f).read_row_group(unit.row_group, columns=["num_tokens"])
        if t.num_rows != unit.rows:  # a shard replaced after its commit: positions would silently shift
            raise DatasetMismatchError(f"{unit.path} row group {unit.row_group} holds {t.num_rows} rows; the "
                                       f"manifest says {unit.rows}")
        return t.column(0).to_numpy()

    def _refs(self, epoch: int) -> Iterator[tuple[int, int, int]]:
        """(unit, row, num_tokens) of this slot's rows in this epoch's order."""
        slot, _ = self.slot()
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        buffer: list[tuple[int, int, int]] = []
        for u in self.my_units(epoch):
            lengths = self._lengths(self.units[u])
            for r in range(len(lengths)):
                ref = (u, r, int(lengths[r]))
                if not self.shuffle:
                    yield ref
                    continue
                buffer.append(ref)
                if len(buffer) >= self.shuffle_buffer:
                    i = int(rng.integers(len(buffer)))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        while buffer:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()

    def __iter__(self) -> Iterator[Any]:
        """One pass over this slot's share: the rest of a loaded position; after a finished pass, the next
        epoch; else the current epoch from its start.

        The pass is chosen when iter() is called, not at the first next(): after load_state_dict,
        StatefulDataLoader calls iter() at once and, for a checkpoint taken at the end of an epoch,
        drops that iterator unused and calls iter() again for the next epoch.
        """
        if not self._resume:
            if self._done:
                self.epoch += 1
            self._yielded, self._done = 0, False
        self._resume = False
        return iter(()) if self._done else self._pass(self.epoch, self._yielded)

    def _pass(self, epoch: int, skip: int) -> Iterator[Any]:
        refs = self._refs(epoch)
        rows = _RowCache(self)
        samples = self._windows(refs, rows, skip) if self.seq_len else self._rows(refs, rows, skip)
        for sample in samples:
            self._yielded += 1
            yield sample
        self._done = True

    def _rows(self, refs, rows: "_RowCache", skip: int) -> Iterator[dict[str, Any]]:
        for i, (u, r, _) in enumerate(refs):
            if i < skip:
                rows.skip(u)
                continue
            yield rows.get(u, r)

    def _windows(self, refs, rows: "_RowCache", skip: int) -> Iterator[np.ndarray]:
        L, W, sep = self.seq_len, self.seq_len + 1, self.separator
        start = skip * L  # stream offset of the first window to yield
        pos = 0  # stream offset of the next document
        # Documents are copied into one reusable int64 staging buffer and each
        # window is copied out of it: fresh large buffers per document would
        # cost a page-faulting allocation each time.
        stage = np.empty(max(4 * W, 1 << 16), np.int64)
        have = 0
        for u, r, n in refs:
            size = n + len(sep)
            if pos + size <= start:  # fast-forward: wholly before the resume point
                pos += size
                rows.skip(u)
                continue
            doc = rows.get(u, r)["tokens"]
            cut = max(0, start - pos)  # only the first document after a resume is cut
            pos += size
            if have + size > len(stage):
                grown = np.empty(max(have + size, 2 * len(stage)), np.int64)
                grown[:have] = stage[:have]
                stage = grown
            for piece in (doc, sep):
                if cut >= len(piece):
                    cut -= len(piece)
                    continue
                stage[have: have + len(piece) - cut] = piece[cut:]
                have += len(piece) - cut
                cut = 0
            if have >= W:
                k = (have - 1) // L
                for j in range(k):
                    yield stage[j * L: j * L + W].copy()
                rest = stage[k * L: have].copy()
                stage[: len(rest)] = rest
                have = len(rest)
        if have > 1 and self.remainder == "pad":
            window = np.full(W, self.pad_id, np.int64)
            window[:have] = stage[:have]
            yield window


class _RowCache:
    """Token data of the units that rows in flight come from; a unit is dropped once all its rows are out."""

    def __init__(self, reader: TokenReader):
        self.reader = reader
        self.tables: dict[int, dict[str, Any]] = {}
        self.left: dict[int, int] = {}

    def _done_one(self, u: int) -> None:
        self.left[u] = self.left.get(u, self.reader.units[u].rows) - 1
        if self.left[u] == 0:
            self.tables.pop(u, None)
            del self.left[u]

    def skip(self, u: int) -> None:
        self._done_one(u)

    def get(self, u: int, r: int) -> dict[str, Any]:
        if u not in self.tables:
            self.tables[u] = self._load(self.reader.units[u])
        t = self.tables[u]
        sample: dict[str, Any] = {"id": t["id"][r]} if "id" in t else {}
        a, b = t["offsets"][r], t["offsets"][r + 1]
        if "tokens" in t:
            # Packing converts to int64 once, when it joins documents.
            sample["tokens"] = t["tokens"][a:b] if self.reader.seq_len else t["tokens"][a:b].astype(np.int64)
        else:
            norm = self.reader.normalization
            latents = t["latents"][a:b]
            # One vectorised pass (or memcpy): Arrow buffers are read-only and shared.
            sample["latents"] = (latents * np.float32(norm[0]) + np.float32(norm[1])) if norm else latents.copy()
        if "grid" in t:
            sample["grid"] = tuple(int(x) for x in t["grid"][r])
        for name in self.reader.fields:
            sample[name] = t[name][r]
        self._done_one(u)
        return sample

    def _load(self, unit: Unit) -> dict[str, Any]:
        kind = self.reader.kind
        payload = "tokens" if kind == "hard" else "latents"
        columns = ([] if self.reader.seq_len else ["id"]) + [payload] + (
            ["grid"] if self.reader.manifest.modality != "text" else []) + list(self.reader.fields)
        with open_binary(unit.path) as f:
            table = pq.ParquetFile(f).read_row_group(unit.row_group, columns=columns)
        col = table.column(payload).combine_chunks()
        out: dict[str, Any] = {"offsets": col.offsets.to_numpy()} if kind == "hard" else {}
        if "id" in columns:
            out["id"] = table.column("id").to_pylist()
        if kind == "hard":
            out["tokens"] = col.values.to_numpy()
        else:  # one binary value per row: view the data buffer as (total tokens, dim) values
            tok = self.reader.manifest.tokenizer
            out["latents"], out["offsets"] = flat_latents(col, LatentFormat(tok["latent_dtype"], int(tok["dim"])))
        if "grid" in columns:
            g = table.column("grid").combine_chunks()
            out["grid"] = g.values.to_numpy().reshape(len(g), -1)
        for name in self.reader.fields:
            out[name] = _python_values(name, table.column(name))
        return out


def _python_values(name: str, column: pa.ChunkedArray) -> list[Any]:
    """A column's values as Python objects; `meta` stored as a JSON string is parsed, so it is a dict as
    when stored as a struct."""
    values = column.to_pylist()
    if name == "meta" and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return [None if v is None else json.loads(v) for v in values]
    return values
