"""The training reader: splitting, shuffling, packing, exact resume, identity checks, interop."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.loaders import (DatasetMismatchError, LatentFormat, TokenReader, TorchTokenDataset,
                               collate_variable, latents_to_array, latents_to_arrays)
from tokenmill.schemas.manifest import read_manifest, write_manifest
from tokenmill.schemas.tables import dataset_schema, table_from_columns
from tokenmill.schemas.validate import validate
from tests.conftest import read_rows, run_build, write_jsonl
from tokenmill.transforms.records import TokenBlock, row_ids
from tokenmill.transforms.write import build_manifest, write_block


WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "tokenizers", "count",
         "characters"]


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    """About 600 documents of varied length in 20+ shards, cl100k without EOS."""
    src = tmp_path_factory.mktemp("src")
    for k in range(3):
        write_jsonl(src / f"s{k}.jsonl", [{"text": " ".join(WORDS[(i + j) % len(WORDS)]
                                                            for j in range(1 + (i * 7 + k) % 60))}
                                          for i in range(200)])
    out = tmp_path_factory.mktemp("ds") / "text"
    assert run_build(["--input", str(src / "*.jsonl"), "--output", str(out), "--tokenizer",
                      "tiktoken:cl100k_base", "--block-size", "3k"]) == 0
    return out


def all_ids(reader) -> list[str]:
    return [s["id"] for s in reader]


def test_ranks_and_workers_split_rows_without_overlap_or_gap(text_dataset):
    everything = sorted(read_rows(text_dataset).column("id").to_pylist())
    assert len(TokenReader(str(text_dataset)).units) > 10
    for world in (1, 2, 3):
        parts = [all_ids(TokenReader(str(text_dataset), rank=r, world_size=world, seed=3)) for r in range(world)]
        joined = [i for p in parts for i in p]
        assert sorted(joined) == everything
        assert len(set(joined)) == len(joined)


def test_shuffle_is_deterministic_per_seed_and_differs_by_epoch(text_dataset):
    a = all_ids(TokenReader(str(text_dataset), seed=1))
    assert a == all_ids(TokenReader(str(text_dataset), seed=1))
    assert a != all_ids(TokenReader(str(text_dataset), seed=2))
    reader = TokenReader(str(text_dataset), seed=1)
    first, second = all_ids(reader), all_ids(reader)  # a finished pass moves to the next epoch
    assert first == a and second != first and sorted(second) == sorted(first)
    plain = all_ids(TokenReader(str(text_dataset), shuffle=False))
    in_file_order = [i for f in read_manifest(str(text_dataset)).files
                     for i in pq.read_table(text_dataset / f, columns=["id"]).column("id").to_pylist()]
    assert plain == in_file_order


def test_packing_joins_documents_with_eos_into_overlapping_windows(text_dataset):
    docs = [s["tokens"] for s in TokenReader(str(text_dataset), seed=5)]
    stream = np.concatenate([np.append(d, 100257) for d in docs])
    L = 64
    windows = list(TokenReader(str(text_dataset), seed=5, seq_len=L))
    assert all(w.dtype == np.int64 and len(w) == L + 1 for w in windows)
    assert len(windows) == (len(stream) - 1) // L
    for j, w in enumerate(windows):
        assert np.array_equal(w, stream[j * L: j * L + L + 1])
    padded = list(TokenReader(str(text_dataset), seed=5, seq_len=L, remainder="pad", pad_id=0))
    assert len(padded) == len(windows) + 1
    tail = stream[len(windows) * L:]
    assert np.array_equal(padded[-1][: len(tail)], tail) and not padded[-1][len(tail):].any()


@pytest.mark.parametrize("seq_len", [None, 50])
@pytest.mark.parametrize("stop", [1, 17, 200])
def test_resume_mid_epoch_equals_an_uninterrupted_pass(text_dataset, seq_len, stop):
    def key(s):
        return s.tobytes() if isinstance(s, np.ndarray) else s["id"]

    full = [key(s) for s in TokenReader(str(text_dataset), seed=9, seq_len=seq_len, shuffle_buffer=64)]
    first = TokenReader(str(text_dataset), seed=9, seq_len=seq_len, shuffle_buffer=64)
    head = []
    for s in first:
        head.append(key(s))
        if len(head) == stop:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    second = TokenReader(str(text_dataset), seed=9, seq_len=seq_len, shuffle_buffer=64)
    second.load_state_dict(state)
    second.set_epoch(0)  # as a resumed training loop does before each epoch
    assert head + [key(s) for s in second] == full


def test_resume_with_two_dataloader_workers(text_dataset):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def loader():
        return StatefulDataLoader(TorchTokenDataset(str(text_dataset), seed=4, seq_len=32),
                                  batch_size=4, num_workers=2)

    full = [b.clone() for b in loader()]
    assert len(full) > 20 and full[0].dtype.is_floating_point is False and full[0].shape == (4, 33)
    dl = loader()
    it = iter(dl)
    head = [next(it).clone() for _ in range(7)]
    state = dl.state_dict()
    del it, dl
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.clone() for b in resumed]
    got = head + rest
    assert len(got) == len(full)
    assert all((a == b).all() for a, b in zip(got, full))


@pytest.fixture(scope="module")
def resume_pool(tmp_path_factory) -> dict[str, Path]:
    """Small cl100k text datasets built by the real pipeline: 1, 3, 9 and 59 row groups of uneven sizes."""
    pool = {}
    for name, docs, row_group in [("one", [12], "1M"), ("three", [20, 27, 34], "1M"),
                                  ("nine", [20, 27, 34], "2k"), ("fifty-nine", [40, 55, 47, 12], "400")]:
        src = tmp_path_factory.mktemp(f"{name}-src")
        for k, n in enumerate(docs):  # each input its own spread of document lengths
            write_jsonl(src / f"s{k}.jsonl", [{"text": " ".join(WORDS[(i + j) % len(WORDS)]
                                                                for j in range(1 + (i * 7 + k) % (8 + 24 * k)))}
                                              for i in range(n)])
        pool[name] = tmp_path_factory.mktemp("pool") / name
        assert run_build(["--input", str(src / "*.jsonl"), "--output", str(pool[name]), "--tokenizer",
                          "tiktoken:cl100k_base", "--row-group-size", row_group, "--progress", "none"]) == 0
    units = [len(TokenReader(str(pool[n])).units) for n in pool]
    # The fourth has 59 row groups in a serial run and 63 under pytest-xdist: row groups hold --row-group-size
    # bytes of the Arrow table, whose `source` column is each row's input path, and xdist's temporary folders
    # (.../pytest-N/popen-gwK/...) are longer. The same inputs give the same shards; the property needs ~60.
    assert units[:3] == [1, 3, 9] and 50 <= units[3] <= 70, units
    return pool


def batch_value(batch) -> object:
    """A batch as plain Python values, to compare runs element for element."""
    if isinstance(batch, dict):
        return {k: batch_value(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [batch_value(v) for v in batch]
    return batch.tolist() if hasattr(batch, "tolist") else batch


def train(make_loader, epochs: int = 2, resume: tuple[int, dict] | None = None):
    """A training loop as users write it, over `epochs` epochs: set_epoch, iterate, checkpoint at every moment.

    Returns the batches and, per moment (before epoch 0, after each batch, after each epoch's loop), the
    number of batches seen, the epoch a resumed run starts with, and the loader's state (pickled, as a
    checkpoint file would hold it). `resume` = (epoch, state) starts from a checkpoint instead.
    """
    import pickle

    dataset, loader = make_loader()
    first = 0
    if resume:
        first = resume[0]
        loader.load_state_dict(pickle.loads(resume[1]))
    batches, moments = [], []

    def checkpoint(next_epoch):
        moments.append((len(batches), next_epoch, pickle.dumps(loader.state_dict())))

    if not resume:
        checkpoint(0)
    for epoch in range(first, epochs):
        dataset.set_epoch(epoch)
        for batch in loader:
            batches.append(batch_value(batch))
            checkpoint(epoch)
        checkpoint(epoch + 1)
    return batches, moments


def stateful_loader(root: Path, *, num_workers: int, batch_size: int, persistent: bool = False, collate=None,
                    snapshot_every: int = 1, **kwargs):
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make():
        dataset = TorchTokenDataset(str(root), **kwargs)
        return dataset, StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                           persistent_workers=persistent and num_workers > 0, collate_fn=collate,
                                           snapshot_every_n_steps=snapshot_every)
    return make


@pytest.mark.parametrize("name", ["three", "fifty-nine"])
def test_checkpoint_at_the_end_of_an_epoch_with_two_workers_resumes_exactly(resume_pool, name):
    # The bug this pins: a worker that had finished its share was saved as "next epoch, 0 yielded", and a
    # resume replayed a whole new share (455 batches instead of 453, 683 instead of 452).
    make = stateful_loader(resume_pool[name], num_workers=2, batch_size=2, seed=4, seq_len=8)
    full, moments = train(make)
    per_epoch = len(full) // 2
    assert per_epoch > 20 and full[:per_epoch] != full[per_epoch:]
    ends = [m for m in moments if per_epoch - 3 <= m[0] <= per_epoch + 1]
    assert len(ends) == 6  # three batches before the end, the last batch, after the loop, the next epoch's first
    for seen, epoch, state in ends:
        rest, _ = train(make, resume=(epoch, state))
        assert len(full[:seen]) + len(rest) == len(full)
        assert full[:seen] + rest == full


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_resume_from_any_checkpoint_equals_an_uninterrupted_run(resume_pool, data):
    world = data.draw(st.integers(1, 2), label="world_size")
    seq_len = data.draw(st.sampled_from([None, 8, 24]), label="seq_len")
    make = stateful_loader(
        resume_pool[data.draw(st.sampled_from(sorted(resume_pool)), label="dataset")],
        num_workers=data.draw(st.integers(0, 3), label="num_workers"),
        persistent=data.draw(st.booleans(), label="persistent_workers"),
        batch_size=data.draw(st.integers(1, 5), label="batch_size"),
        snapshot_every=data.draw(st.sampled_from([1, 3]), label="snapshot_every_n_steps"),
        collate=None if seq_len else list,  # unpacked samples differ in length: keep them as a list
        rank=data.draw(st.integers(0, world - 1), label="rank"), world_size=world, seq_len=seq_len,
        shuffle=data.draw(st.booleans(), label="shuffle"),
        shuffle_buffer=data.draw(st.sampled_from([1, 7, 100]), label="shuffle_buffer"),
        seed=data.draw(st.integers(0, 2), label="seed"))
    full, moments = train(make)
    seen, epoch, state = data.draw(st.sampled_from(moments), label="checkpoint")
    rest, _ = train(make, resume=(epoch, state))
    assert (seen, len(rest)) == (seen, len(full) - seen)
    assert full[:seen] + rest == full


def test_reader_refuses_another_tokenizer(text_dataset):
    with pytest.raises(DatasetMismatchError, match="not tokenized with bytes"):
        TokenReader(str(text_dataset), expect_tokenizer="bytes")
    with pytest.raises(DatasetMismatchError, match="vocab_size is 100277"):
        TokenReader(str(text_dataset), expect_vocab_size=50257)
    with pytest.raises(DatasetMismatchError, match="expected fingerprint"):
        TokenReader(str(text_dataset), expect_fingerprint="0" * 64)
    fp = read_manifest(str(text_dataset)).tokenizer["fingerprint"]
    TokenReader(str(text_dataset), expect_tokenizer="tiktoken:cl100k_base", expect_fingerprint=fp,
                expect_vocab_size=100277)


def test_validate_accepts_a_build_and_reports_each_kind_of_damage(tmp_path, text_dataset):
    import shutil

    assert validate(str(text_dataset)) == []
    bad = tmp_path / "bad"
    shutil.copytree(text_dataset, bad)
    m = read_manifest(str(bad))
    first = bad / m.files[0]
    table = pq.read_table(first)
    ids = table.column("tokens").combine_chunks()
    values = ids.values.to_numpy().copy()
    values[0] = 200_000  # above cl100k's vocabulary
    table = table.set_column(table.schema.get_field_index("tokens"), table.schema.field("tokens"),
                             pa.ListArray.from_arrays(ids.offsets, pa.array(values, pa.uint32()),
                                                      type=table.schema.field("tokens").type))
    pq.write_table(table, first)
    (bad / m.files[1]).unlink()
    problems = validate(str(bad))
    assert any("sha256" in p and m.files[0] in p for p in problems)
    assert any(p == f"{m.files[1]}: missing" for p in problems)
    # With the checksum fixed up, the content checks speak.
    import hashlib

    raw = json.loads((bad / "_manifest.json").read_text())
    raw["shards"][0]["sha256"] = hashlib.sha256(first.read_bytes()).hexdigest()
    (bad / "_manifest.json").write_text(json.dumps(raw))
    assert any("token ID 200000 is not below vocab_size 100277" in p for p in validate(str(bad)))
    assert validate(str(tmp_path / "nothing"))[0].endswith("no _manifest.json (not a tokenmill dataset, "
                                                           "or its build did not finish)")


def test_validate_cli_exit_codes(tmp_path, text_dataset):
    from tests.conftest import run_cli

    ok = run_cli("tokenmill.pipelines.cli", "validate", str(text_dataset))
    assert ok.returncode == 0 and "ok" in ok.stdout
    missing = run_cli("tokenmill.pipelines.cli", "validate", str(tmp_path))
    assert missing.returncode == 1 and "no _manifest.json" in missing.stderr


def write_soft_dataset(root: Path, latent_dtype: str, dim: int, rows: list[tuple[np.ndarray, tuple]]) -> None:
    """An image/soft dataset written with tokenmill's own writer and manifest code."""
    tok = {"spec": "test:soft", "name": "soft", "kind": "soft", "modality": "image", "dim": dim,
           "latent_dtype": latent_dtype, "fingerprint": "f" * 64, "token_dtype": latent_dtype}
    schema = dataset_schema("image", "soft", latent_dtype=latent_dtype, dim=dim, metadata=tok)
    locs = [f"member:{i}.jpg" for i in range(len(rows))]
    latents = pa.array([np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes() for a, _ in rows],
                       pa.binary())
    table = table_from_columns(schema, {
        "id": row_ids("shard.tar", locs), "source": ["shard.tar"] * len(rows), "locator": locs,
        "modality": ["image"] * len(rows), "latents": latents, "num_tokens": [len(a) for a, _ in rows],
        "grid": [list(g) for _, g in rows]}, len(rows))
    results = write_block(str(root), TokenBlock("shard.tar", 0, table, []))
    write_manifest(str(root), build_manifest(results, [], modality="image", tokenizer=tok, options={}))


@pytest.mark.parametrize("latent_dtype,np_dtype", [("float16", np.float16), ("float32", np.float32),
                                                   ("bfloat16", np.uint16)])
def test_soft_latents_come_back_as_num_tokens_by_dim(tmp_path, latent_dtype, np_dtype):
    import torch

    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 60000, size=(h * w, 6)).astype(np_dtype), (h, w)) for h, w in [(2, 3), (4, 4), (1, 5)]]
    write_soft_dataset(tmp_path, latent_dtype, 6, rows)
    assert validate(str(tmp_path)) == []
    got = {tuple(s["grid"].tolist()): s for s in TorchTokenDataset(str(tmp_path), shuffle=False)}
    for array, grid in rows:
        lat = got[grid]["latents"]
        assert tuple(lat.shape) == (grid[0] * grid[1], 6)
        if latent_dtype == "bfloat16":
            assert lat.dtype == torch.bfloat16
            assert np.array_equal(lat.view(torch.uint16).numpy(), array)
        else:
            assert np.array_equal(lat.numpy(), array)
        assert got[grid]["grid"].tolist() == list(grid)


def test_validate_catches_a_grid_that_does_not_match_num_tokens(tmp_path):
    write_soft_dataset(tmp_path, "float32", 4, [(np.ones((6, 4), np.float32), (2, 2))])
    assert any("grid [2, 2] holds 4 tokens, num_tokens says 6" in p for p in validate(str(tmp_path)))


def test_same_values_in_pyarrow_hf_datasets_and_duckdb(text_dataset):
    import duckdb
    import pyarrow.dataset as pads
    from datasets import load_dataset

    m = read_manifest(str(text_dataset))
    files = [str(text_dataset / f) for f in m.files]
    ours = {r["id"]: r["tokens"] for r in read_rows(text_dataset).to_pylist()}
    via_pyarrow = pads.dataset(files, format="parquet").to_table(columns=["id", "tokens"]).to_pylist()
    assert {r["id"]: r["tokens"] for r in via_pyarrow} == ours
    hf = load_dataset("parquet", data_files=files, split="train")
    assert {r["id"]: r["tokens"] for r in hf} == ours
    con = duckdb.connect()
    rows = con.execute("SELECT id, tokens, len(tokens) = num_tokens FROM read_parquet(?)", [files]).fetchall()
    assert {i: list(t) for i, t, _ in rows} == ours and all(ok for *_, ok in rows)
    total = con.execute("SELECT sum(num_tokens) FROM read_parquet(?)", [files]).fetchone()[0]
    assert total == m.tokens


def test_image_codes_come_back_with_their_grid(tmp_path):
    tok = {"spec": "test:vq", "name": "vq", "kind": "hard", "modality": "image", "vocab_size": 1024,
           "fingerprint": "c" * 64, "token_dtype": "uint16"}
    schema = dataset_schema("image", "hard", token_dtype="uint16", metadata=tok)
    grids = [(2, 3), (3, 3)]
    codes = [np.arange(h * w, dtype=np.uint16) * 7 + i for i, (h, w) in enumerate(grids)]
    locs = ["member:a.jpg", "member:b.jpg"]
    table = table_from_columns(schema, {
        "id": row_ids("s.tar", locs), "source": ["s.tar"] * 2, "locator": locs, "modality": ["image"] * 2,
        "tokens": [c.tolist() for c in codes], "num_tokens": [len(c) for c in codes],
        "grid": [list(g) for g in grids], "orig_height": [480, 512], "orig_width": [640, 512]}, 2)
    results = write_block(str(tmp_path), TokenBlock("s.tar", 0, table, []))
    write_manifest(str(tmp_path), build_manifest(results, [], modality="image", tokenizer=tok, options={}))
    assert validate(str(tmp_path)) == []
    got = {s["grid"]: s["tokens"] for s in TokenReader(str(tmp_path), shuffle=False)}
    for c, g in zip(codes, grids):
        assert got[g].dtype == np.int64 and got[g].tolist() == c.tolist()


def test_reader_reads_an_fsspec_uri(text_dataset):
    import fsspec

    mem = fsspec.filesystem("memory")
    try:
        for path in text_dataset.rglob("*"):
            if path.is_file():
                mem.pipe(f"memory://ds/{path.relative_to(text_dataset)}", path.read_bytes())
        remote = [s["id"] for s in TokenReader("memory://ds", seed=2)]
        assert remote == all_ids(TokenReader(str(text_dataset), seed=2))
        assert validate("memory://ds") == []
    finally:
        mem.rm("memory://ds", recursive=True)


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory) -> Path:
    """patch:16 (uint8 latents, normalized to [-1, 1]) over four PNGs of different sizes and a tar of two
    PNGs with JSON captions, built by the real pipeline."""
    import io
    import tarfile

    from PIL import Image

    def png(h: int, w: int, k: int) -> bytes:
        y, x = np.mgrid[0:h, 0:w]
        buf = io.BytesIO()
        Image.fromarray(np.stack([x * 3, y * 5, np.full_like(x, 40 * k)], -1).astype(np.uint8)).save(buf, "PNG")
        return buf.getvalue()

    src = tmp_path_factory.mktemp("images")
    for k, (h, w) in enumerate([(16, 16), (40, 24), (33, 70), (64, 48)]):
        (src / f"im{k}.png").write_bytes(png(h, w, k))
    with tarfile.open(src / "captioned.tar", "w") as tar:
        for k in range(2):
            for name, data in ((f"c{k}.png", png(20, 30, 5 + k)),
                               (f"c{k}.json", json.dumps({"caption": f"picture {k}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = tmp_path_factory.mktemp("image-ds") / "patch"
    assert run_build(["--input", str(src / "*"), "--output", str(out), "--tokenizer", "patch:16",
                      "--progress", "none"]) == 0
    return out


def image_latents(root: Path):
    """The manifest, shard paths, TokenReader's samples and the raw rows (by id) of a soft image dataset."""
    m = read_manifest(str(root))
    reader = {s["id"]: s for s in TokenReader(str(root), shuffle=False)}
    raw = {r["id"]: r for r in read_rows(root).to_pylist()}
    assert len(reader) == len(raw) == 6
    return m, [f"{root}/{f}" for f in m.files], reader, raw


# The next three run the one-liners of docs/user-guide.md, "Reading latents with other tools".
def test_latents_read_by_hf_datasets_match_the_reader(image_dataset):
    import datasets

    m, files, reader, _ = image_latents(image_dataset)
    hf = datasets.load_dataset("parquet", data_files=files, split="train").with_transform(
        lambda batch: {**batch, "latents": latents_to_arrays(batch["latents"], m, float32=True)})
    assert len(hf) == 6
    for row in hf:
        assert row["latents"].dtype == np.float32 and np.array_equal(row["latents"], reader[row["id"]]["latents"])
        assert row["latents"].min() >= -1 and row["latents"].max() <= 1


def test_latents_read_by_polars_are_the_stored_bytes(image_dataset):
    pl = pytest.importorskip("polars")
    m, files, _, raw = image_latents(image_dataset)
    frame = pl.read_parquet(files)
    arrays = latents_to_arrays(frame["latents"], m)
    assert len(arrays) == 6
    for i, a in zip(frame["id"], arrays):
        assert a.dtype == np.uint8 and a.shape == (raw[i]["num_tokens"], 768) and a.tobytes() == raw[i]["latents"]


def test_latents_read_by_duckdb_match_the_reader_and_one_row_converts_alone(image_dataset):
    import duckdb

    m, files, reader, raw = image_latents(image_dataset)
    table = duckdb.sql(f"select id, latents from read_parquet({files})").to_arrow_table()
    arrays = latents_to_arrays(table["latents"], m, float32=True)
    assert len(arrays) == 6
    for i, a in zip(table["id"].to_pylist(), arrays):
        assert np.array_equal(a, reader[i]["latents"])
    one = next(iter(raw.values()))
    assert latents_to_array(one["latents"], str(image_dataset)).shape == (one["num_tokens"], 768)
    assert np.array_equal(latents_to_array(one["latents"], m, float32=True), reader[one["id"]]["latents"])


@pytest.mark.parametrize("latent_dtype", ["bfloat16", "float16", "float32"])
def test_latents_to_arrays_gives_stored_values_or_float32(tmp_path, latent_dtype):
    import torch

    rng = np.random.default_rng(1)
    values = [rng.normal(size=(h * w, 4)).astype(np.float32) for h, w in [(1, 3), (2, 2), (1, 1)]]
    if latent_dtype == "bfloat16":  # stored as the high 16 bits of each float32
        stored = [(v.view(np.uint32) >> 16).astype(np.uint16) for v in values]
    else:
        stored = [v.astype(latent_dtype) for v in values]
    write_soft_dataset(tmp_path, latent_dtype, 4, list(zip(stored, [(1, 3), (2, 2), (1, 1)])))
    column = pq.read_table(tmp_path / read_manifest(str(tmp_path)).files[0], columns=["latents"])["latents"]
    for form in (column, column.to_pylist(), column.to_numpy(zero_copy_only=False)):
        got = latents_to_arrays(form, str(tmp_path))
        assert all(g.dtype == s.dtype and np.array_equal(g, s) for g, s in zip(got, stored))
    widened = latents_to_arrays(column, LatentFormat.of(str(tmp_path)), float32=True)
    by_torch = [t.to(torch.float32).numpy() for t in (s["latents"] for s in TorchTokenDataset(str(tmp_path),
                                                                                              shuffle=False))]
    assert all(w.dtype == np.float32 and np.array_equal(w, t) for w, t in zip(widened, by_torch))
    if latent_dtype == "float32":
        assert all(np.array_equal(w, v) for w, v in zip(widened, values))


def test_latent_helpers_refuse_a_dataset_of_hard_tokens(resume_pool):
    with pytest.raises(ValueError, match="holds hard tokens"):
        latents_to_arrays([], str(resume_pool["one"]))


def test_fields_add_the_columns_asked_for_and_nothing_by_default(resume_pool):
    root = resume_pool["nine"]
    rows = {r["id"]: r for r in read_rows(root).to_pylist()}
    plain = list(TokenReader(str(root), seed=2))
    assert all(set(s) == {"id", "tokens"} for s in plain)
    got = list(TokenReader(str(root), seed=2, fields=["source", "locator", "num_tokens", "id"]))
    assert [s["id"] for s in got] == [s["id"] for s in plain] and len(got) == len(rows) == 81
    for s in got:
        r = rows[s["id"]]
        assert set(s) == {"id", "tokens", "source", "locator", "num_tokens"}
        assert (s["source"], s["locator"], s["num_tokens"]) == (r["source"], r["locator"], len(r["tokens"]))
        assert s["tokens"].tolist() == r["tokens"]
    assert {Path(s["source"]).name for s in got} == {"s0.jsonl", "s1.jsonl", "s2.jsonl"}


def test_image_fields_come_with_meta_as_a_dict(image_dataset):
    names = ["source", "locator", "orig_height", "orig_width", "height", "width", "meta", "num_tokens"]
    got = {(Path(s["source"]).name, s["locator"]): s
           for s in TorchTokenDataset(str(image_dataset), shuffle=False, fields=names)}
    assert len(got) == 6
    im2 = got[("im2.png", "file")]
    assert (im2["orig_height"], im2["orig_width"], im2["height"], im2["width"]) == (33, 70, 33, 70)
    assert im2["grid"].tolist() == [3, 5] and im2["num_tokens"] == 15 == len(im2["latents"])
    assert im2["meta"] is None
    assert got[("captioned.tar", "member:c1.png")]["meta"] == {"json": {"caption": "picture 1"}}
    rows = {r["id"]: r for r in read_rows(image_dataset).to_pylist()}
    for s in got.values():
        assert [s[n] for n in names[:6]] == [rows[s["id"]][n] for n in names[:6]]


def test_video_fields_carry_clip_timing(tmp_path):
    pytest.importorskip("av")
    from tests.test_video import make_video

    (tmp_path / "in").mkdir()
    make_video(tmp_path / "in" / "bar.mp4", n=24, fps=25)
    out = tmp_path / "out"
    assert run_build(["--input", str(tmp_path / "in"), "--output", str(out), "--tokenizer", "patch:2,16",
                      "--clip-frames", "8", "--modality", "video", "--progress", "none"]) == 0
    got = {s["locator"]: s for s in TokenReader(str(out), fields=["locator", "clip_start", "clip_end", "fps",
                                                                   "frame_indices", "orig_width"])}
    assert sorted(got) == ["clip:0", "clip:1", "clip:2"]
    clip = got["clip:1"]
    assert clip["clip_start"] == pytest.approx(0.32) and clip["clip_end"] == pytest.approx(0.64)
    assert clip["fps"] == pytest.approx(25) and clip["frame_indices"] == list(range(8, 16))
    assert clip["orig_width"] == 64 and clip["grid"] == (4, 3, 4)


def test_meta_stored_as_a_struct_comes_back_as_a_dict(tmp_path, resume_pool):
    """Text datasets may carry `meta` as an Arrow struct (kept input fields): the reader yields the same dicts."""
    import shutil

    root = tmp_path / "with-meta"
    shutil.copytree(resume_pool["three"], root)
    for name in read_manifest(str(root)).files:  # each shard rewritten row group by row group, plus `meta`
        shard = pq.ParquetFile(root / name)
        groups = [shard.read_row_group(i) for i in range(shard.num_row_groups)]
        with pq.ParquetWriter(root / name, groups[0].schema.append(
                pa.field("meta", pa.struct([("url", pa.string()), ("stars", pa.int64())])))) as writer:
            for g in groups:
                meta = [{"url": f"https://example.org/{i}", "stars": len(i)} for i in g.column("id").to_pylist()]
                writer.write_table(g.append_column("meta", pa.array(meta, writer.schema.field("meta").type)))
    got = list(TokenReader(str(root), fields=["meta"]))
    assert len(got) == 81
    assert all(s["meta"] == {"url": f"https://example.org/{s['id']}", "stars": len(s["id"])} for s in got)


def test_unknown_fields_and_fields_with_packing_are_refused(resume_pool):
    with pytest.raises(ValueError, match=r"unknown field\(s\) 'caption', 'fps': dataset .* has id, source, "
                                         r"locator, modality, tokens, num_tokens$"):
        TokenReader(str(resume_pool["one"]), fields=["caption", "source", "fps"])
    with pytest.raises(ValueError, match="fields= needs unpacked samples"):
        TorchTokenDataset(str(resume_pool["one"]), seq_len=16, fields=["source"])


def test_collate_variable_pads_tokens_and_latents_in_a_dataloader(resume_pool, image_dataset):
    import functools

    import torch
    from torch.utils.data import DataLoader

    root = str(resume_pool["nine"])
    docs = {s["id"]: s["tokens"].tolist() for s in TokenReader(root)}
    batches = list(DataLoader(TorchTokenDataset(root, seed=1, fields=["num_tokens"]), batch_size=4, num_workers=2,
                              collate_fn=functools.partial(collate_variable, pad_id=-1)))
    assert sorted(i for b in batches for i in b["id"]) == sorted(docs)
    for b in batches:
        size, longest = b["tokens"].shape
        assert b["tokens"].dtype == torch.int64 and b["lengths"].tolist() == b["num_tokens"]
        assert longest == max(b["num_tokens"]) and len(b["id"]) == size
        for i, doc_id in enumerate(b["id"]):
            n = b["num_tokens"][i]
            assert b["tokens"][i, :n].tolist() == docs[doc_id] and (b["tokens"][i, n:] == -1).all()
            assert b["attention_mask"][i].tolist() == [True] * n + [False] * (longest - n)

    images = {s["id"]: s for s in TorchTokenDataset(str(image_dataset), shuffle=False)}
    b = next(iter(DataLoader(TorchTokenDataset(str(image_dataset), shuffle=False), batch_size=6,
                             collate_fn=collate_variable)))
    assert b["latents"].shape == (6, max(len(s["latents"]) for s in images.values()), 768)
    for i, doc_id in enumerate(b["id"]):
        n = len(images[doc_id]["latents"])
        assert torch.equal(b["latents"][i, :n], images[doc_id]["latents"]) and not b["latents"][i, n:].any()
        assert b["lengths"][i] == n and b["attention_mask"][i].sum() == n
        assert torch.equal(b["grid"][i], images[doc_id]["grid"])
