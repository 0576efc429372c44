"""A build that cannot be trusted fails in one line with exit 1 and commits nothing; one bad record does not."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, read_errors, read_rows, run_build, write_jsonl
from tokenmill.schemas.manifest import read_manifest
from tokenmill.transforms import registry


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenmill", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_a_build_whose_records_mostly_fail_exits_1_in_one_line_and_commits_nothing(tmp_path):
    out = tmp_path / "ds"
    argv = ["build", "--input", "samples/text/*", "--output", str(out), "--tokenizer", "bytes",
            "--text-field", "nope", "--progress", "none"]
    proc = _cli(*argv)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (f"tokenmill build: failed: 24 of 25 records failed (96%), more than --max-error-fraction 0.5; "
                         f"nothing committed; first: decode MissingField: record has no text field 'nope' "
                         f"({REPO}/samples/text/mixed.jsonl offset:0)")
    assert len(lines) == 2 and "Traceback" not in proc.stderr  # the runner line, then the cause
    assert not (out / "_manifest.json").exists()
    # --verbose shows what was behind the line.
    verbose = _cli(*argv, "--verbose")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == lines[-1]
    # Accepting the errors commits them as error rows.
    assert _cli(*argv, "--max-error-fraction", "1").returncode == 0
    m = read_manifest(str(out))
    assert (m.rows, m.errors) == (1, 24) and m.spec["run"]["max_error_fraction"] == 1.0
    bad = _cli(*argv, "--max-error-fraction", "1.5")
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "tokenmill build: error: --max-error-fraction must be between 0 and 1, not 1.5"


@pytest.fixture
def needs_missing(monkeypatch):
    monkeypatch.setitem(registry.FAMILIES, "needs-missing", "tests.plugins.needs_missing:FAMILY")
    registry.shared_tokenizer.cache_clear()
    registry._option_defaults.cache_clear()
    yield
    registry.shared_tokenizer.cache_clear()
    registry._option_defaults.cache_clear()


def test_a_tokenizer_that_cannot_run_fails_the_build_instead_of_making_error_rows(tmp_path, needs_missing, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    out = tmp_path / "ds"
    argv = ["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer", "needs-missing",
            "--progress", "none", "--max-error-fraction", "1"]  # not a matter of the error budget
    assert run_build(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tokenmill build: failed: needs-missing cannot run here: ModuleNotFoundError: No module named "
                       "'tokenmill_test_dependency_that_is_not_installed'")
    assert not (out / "_manifest.json").exists()


def _panicking_tokenizer(path):
    """A real tokenizer.json whose pre-tokenizer regex hits Oniguruma's retry limit on one input: a Rust panic."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "fine": 1, "more": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("(a+)+$"), "isolated"),
                                                 pre_tokenizers.WhitespaceSplit()])
    tok.save(str(path))
    return tok


def test_a_tokenizer_panic_is_one_error_row_not_a_dead_build(tmp_path):
    tok = _panicking_tokenizer(tmp_path / "tokenizer.json")
    evil = "a" * 40 + "!"
    with pytest.raises(BaseException) as caught:
        tok.encode(evil)
    assert type(caught.value).__name__ == "PanicException" and not isinstance(caught.value, Exception)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"text": evil}, {"text": "more fine"}])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer",
                      f"hf:{tmp_path / 'tokenizer.json'}", "--progress", "none"]) == 0
    rows = read_rows(out)
    assert sorted(rows.column("tokens").to_pylist()) == [[1], [2, 1]]  # fine; more fine
    [error] = read_errors(out)
    assert (error["stage"], error["error_type"]) == ("tokenize", "PanicException")
    assert "retry-limit" in error["message"]


def test_hf_ids_take_the_width_of_the_largest_id_and_are_never_wrapped(tmp_path):
    """A WordLevel vocabulary of 3 entries whose [UNK] is 70000: a count says uint8, the IDs need uint32."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 70000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == 3
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a zzz b"}])
    out = tmp_path / "ds"
    assert run_build(["--input", str(tmp_path / "a.jsonl"), "--output", str(out), "--tokenizer",
                      f"hf:{tmp_path / 'tokenizer.json'}", "--progress", "none"]) == 0
    m = read_manifest(str(out))
    assert m.token_dtype == "uint32" and m.tokenizer["vocab_size"] == 70001
    assert read_rows(out).column("tokens").to_pylist() == [[0, 70000, 1]]


def test_an_id_beyond_the_declared_vocabulary_is_an_error_row_never_a_wrapped_value(tmp_path, monkeypatch):
    """The cast to the dataset's ID type is checked: a tokenizer that emits an ID past its vocab_size
    (a stale vocab_size, a buggy plug-in) gets an error row for that document, the rest are kept."""
    from tokenmill.transforms.tokenizers.byte_level import ByteTokenizer

    tok = registry.load_tokenizer("bytes", "text")
    assert isinstance(tok, ByteTokenizer)
    real = tok._encode
    monkeypatch.setattr(tok, "_encode", lambda text: real(text).astype("uint32") + (300 if text == "bad" else 0))
    column, failures = tok.encode_batch(["ok", "bad", "fine"])
    assert column.to_pylist() == [list(b"ok"), list(b"fine")]
    assert [(i, str(e)) for i, e in failures] == [(1, "token ID 400 is not below the vocabulary size 258")]


def test_a_runner_named_by_module_path_brings_its_own_options():
    """Options a runner's module declares are known once the runner is named, not only when already imported."""
    from tokenmill.pipelines.cli_errors import UsageError
    from tokenmill.pipelines.runners import pipeline_options

    assert "tests.plugins.own_runner" not in sys.modules
    options = pipeline_options(["--runner=tests.plugins.own_runner.OwnRunner", "--own_runner_address=127.0.0.1:1"])
    assert options.get_all_options()["own_runner_address"] == "127.0.0.1:1"
    with pytest.raises(UsageError, match="unrecognized arguments: --no_such_option=1"):
        pipeline_options(["--runner=tests.plugins.own_runner.OwnRunner", "--no_such_option=1"])
    with pytest.raises(UsageError, match=r"--runner=Nope: Unexpected pipeline runner: Nope"):
        pipeline_options(["--runner=Nope"])
    with pytest.raises(UsageError, match=r"--runner=nowhere.Runner: No module named 'nowhere'"):
        pipeline_options(["--runner=nowhere.Runner"])


@pytest.mark.parametrize("argv, message", [
    (["decode", "{image}", "--id", "x", "--out", "x.jpgg"], "--out x.jpgg: cannot write .jpgg images"),
    (["decode", "{image}", "--id", "x", "--out", "/no/such/folder/x.png"], "--out /no/such/folder/x.png: no folder"),
    (["inspect", "{multi}"], "this is the root of a multi-source build; its datasets are the folders a, b"),
    (["report", "{multi}", "--out", "r.html"], "this is the root of a multi-source build"),
    (["decode", "{multi}", "--id", "x", "--out", "x.png"], "this is the root of a multi-source build"),
])
def test_misuse_of_any_command_is_one_line_and_exit_2(tmp_path, argv, message):
    multi = tmp_path / "multi"
    multi.mkdir()
    (multi / "_manifest.json").write_text(json.dumps({"datasets": {"a": {}, "b": {}}}))
    proc = _cli(*[a.format(image=tmp_path, multi=multi) for a in argv])
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"tokenmill {argv[0]}: error: ") and message in line


def test_small_things_users_tripped_on(tmp_path):
    """No Beam tag warning on an image build; an up-to-date rerun prints no throughput."""
    import numpy as np
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((32, 48, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    argv = ["build", "--input", str(tmp_path / "*.png"), "--output", str(tmp_path / "ds"), "--tokenizer", "patch:16",
            "--progress", "none"]
    first = _cli(*argv)
    assert first.returncode == 0 and "throughput:" in first.stdout
    assert "requested in with_outputs()" not in first.stderr and "WARNING" not in first.stderr, first.stderr
    again = _cli(*argv)
    assert again.returncode == 0 and "up to date" in again.stdout and "throughput" not in again.stdout


@pytest.mark.parametrize("arrays, message", [
    ({"kind": "vq", "patch": 4, "codes": np.zeros((0, 48), np.float32)}, "codes must be (K, 48) with K >= 1"),
    ({"kind": "vq", "patch": 4}, "a vq file needs patch, codes; it has no codes"),
    ({"kind": "vq", "patch": 4, "codes": np.full((8, 48), np.nan, np.float32)}, "codes holds NaN or infinite"),
    ({"kind": "vq", "patch": 0, "codes": np.zeros((8, 0), np.float32)}, "patch must be one positive integer"),
    ({"kind": "pca", "patch": 4, "mean": np.zeros(48, np.float32)}, "it has no components"),
    ({"kind": "pca", "patch": 4, "mean": np.zeros(47, np.float32), "components": np.eye(3, 48, dtype=np.float32)},
     "mean (48,)"),
])
def test_a_broken_codebook_is_one_line_and_exit_2(tmp_path, arrays, message):
    from tokenmill.transforms.tokenizers.codebook import save_npz

    kind = arrays["kind"]
    (tmp_path / f"{kind}.npz").write_bytes(save_npz({k: np.asarray(v) for k, v in arrays.items()}))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    proc = _cli("build", "--input", str(tmp_path / "a.png"), "--output", str(tmp_path / "ds"), "--tokenizer",
                f"{kind}:{tmp_path / (kind + '.npz')}")
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("tokenmill build: error: ") and message in line, line


@pytest.mark.parametrize("verbose", [False, True])
def test_damaged_videos_decoded_in_the_launcher_print_no_native_log_lines_unless_verbose(tmp_path, verbose):
    """FFmpeg's "[mov,mp4,... @ 0x...] moov atom not found" and decord's "video_reader.cc: ERROR opening" were
    printed on the terminal by a build that decodes in its own process; the reasons are in the error rows."""
    from tests.test_video import make_video

    good = make_video(tmp_path / "good.mp4", n=20)
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    args = ["build", "--input", str(tmp_path / "*.mp4"), "--output", str(tmp_path / "ds"), "--tokenizer",
            "patch:2,16", "--progress", "none", "--max-error-fraction", "0.9", "--runner=FnApiRunner",
            "--direct_num_workers=1", "--direct_running_mode=in_memory", *(["--verbose"] if verbose else [])]
    proc = _cli(*args)
    assert proc.returncode == 0, proc.stderr
    native = [ln for ln in proc.stderr.splitlines() if "moov atom" in ln or "video_reader.cc" in ln]
    assert bool(native) == verbose, proc.stderr
    if not verbose:
        assert proc.stderr.strip().splitlines() == ["tokenmill build: runner FnApiRunner (in_memory, 1 worker)"]
    assert {e["source"].rsplit("/", 1)[-1] for e in read_errors(tmp_path / "ds")} == {"cut.mp4", "junk.mp4"}
