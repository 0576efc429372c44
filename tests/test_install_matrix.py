"""The install matrix: tokenmill alone, and with each extra alone, in fresh venvs, each extra's feature run there.

tests/install_matrix.py does the work. `./run_local.sh test` starts it in the background before pytest (the
installs wait on the registry while the suite runs) and names its result file in TOKENMILL_INSTALL_MATRIX; run
without that, this module runs the matrix itself.
"""
from __future__ import annotations

import json
import os
import time
from importlib.metadata import metadata
from pathlib import Path

import pytest

from tests import install_matrix

EXTRAS = [e for e in metadata("tokenmill").get_all("Provides-Extra") or [] if e not in install_matrix.NOT_FEATURES]
DEADLINE = 1500  # seconds: the matrix takes 2 to 5 minutes here


def _wait_for(path: Path, pid: int | None) -> dict:
    """The background matrix's result, waiting with a deadline and noticing a matrix that died without one."""
    start = time.monotonic()
    while not path.exists():
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                time.sleep(1)  # it may have written the file as it exited
                if not path.exists():
                    pytest.fail(f"the install matrix (pid {pid}) ended without writing {path}; see its log beside it")
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"the install matrix wrote no result in {DEADLINE} s")
        time.sleep(2)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    named = os.environ.get("TOKENMILL_INSTALL_MATRIX")
    if named:
        pid = os.environ.get("TOKENMILL_INSTALL_MATRIX_PID")
        return _wait_for(Path(named), int(pid) if pid else None)["results"]
    out = tmp_path_factory.mktemp("matrix") / "matrix.json"
    install_matrix.main(["--out", str(out)])
    return json.loads(out.read_text())["results"]


def test_every_extra_of_setup_py_is_in_the_matrix():
    assert {"hf", "torch", "video", "aws", "gcp", "fit", "fast"} <= set(EXTRAS)
    assert set(EXTRAS) <= set(install_matrix.CHECKS), "an extra without a check in tests/install_matrix.py"


@pytest.mark.parametrize("name", ["base", *EXTRAS])
def test_installed_alone_in_a_fresh_venv_its_feature_runs(matrix, name):
    result = matrix.get(name)
    assert result is not None, f"{name} was not run"
    assert result["ok"], result.get("error")
