"""The built wheel, installed into a fresh virtual environment, beside a project with its own `schemas/`."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import write_jsonl

ONE_WORKER = ["--runner=FnApiRunner", "--direct_num_workers=1", "--direct_running_mode=in_memory"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout's files, built as the install matrix builds it."""
    from tests.install_matrix import build_wheel

    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_adds_one_top_level_import_name(wheel):
    with zipfile.ZipFile(wheel) as z:
        tops = {name.split("/", 1)[0] for name in z.namelist()}
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tokenmill"}
    assert "tokenmill/transforms/tokenizers/data/o200k_base.tiktoken.gz" in names
    assert "tokenmill/pipelines/local/_worker_client.py" in names
    assert "tokenmill = tokenmill.pipelines.cli:main" in entry_points


def test_wheel_in_a_fresh_venv_reads_and_builds_beside_a_project_with_its_own_schemas(wheel, tmp_path):
    """A training repository's `schemas/` and `transforms/` stay its own; tokenmill's come from the wheel.

    The venv is new and holds only the wheel; its dependencies are this
    environment's, reached through a .pth line (no network here, and an
    install of Beam and torch would take minutes). A .pth line adds a folder
    but runs none of the .pth files in it, so the editable install of the
    source tree stays out of sight.
    """
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-index", "--target", str(site), str(wheel)], check=True, capture_output=True, timeout=300)
    console = env_dir / "bin" / "tokenmill"
    console.write_text(f"#!{python}\nimport sys\nfrom tokenmill.pipelines.cli import main\nsys.exit(main())\n")
    console.chmod(0o755)

    project = tmp_path / "trainer"
    for name in ("schemas", "transforms", "loaders"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text("OWNER = 'trainer'\n")
    write_jsonl(project / "docs.jsonl", [{"text": "hello world"}, {"text": ".DefaultCellStyle"}])
    built = subprocess.run([str(console), "build", "--input", "docs.jsonl", "--output", "ds", "--tokenizer",
                            "tiktoken:o200k_base", "--eos", "--progress", "none", *ONE_WORKER],
                           cwd=project, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr

    code = ("import schemas, transforms, loaders, tokenmill\n"
            "from tokenmill import TokenReader, read_manifest\n"
            "assert schemas.OWNER == transforms.OWNER == loaders.OWNER == 'trainer'\n"
            "m = read_manifest('ds')\n"
            "rows = sorted((r['tokens'].tolist() for r in TokenReader('ds', shuffle=False)), key=len)\n"
            "print(tokenmill.__file__); print(m.rows, m.tokenizer['spec']); print(rows)\n")
    done = subprocess.run([str(python), "-c", code], cwd=project, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    where, summary, rows = done.stdout.splitlines()
    assert where.startswith(str(site)) and summary == "2 tiktoken:o200k_base"
    assert rows.startswith("[[24912, 2375, 199999], [") and rows.count("[") == 3
