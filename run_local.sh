#!/usr/bin/env bash
# tokenmill on this machine:
#   ./run_local.sh            set up .venv, build the sample dataset into ./out/sample
#                             (extra arguments go to `tokenmill build`)
#   ./run_local.sh test       set up .venv, run the whole test suite (extra args go to pytest)
#   ./run_local.sh bench      set up .venv, run the benchmarks under bench/
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi
VENV=.venv
EXTRAS="hf,sentencepiece,fast,fit,torch,diffusers,gcp,aws,test,bench,report,video"

if [ ! -x "$VENV/bin/python" ]; then
  echo "run_local.sh: creating $VENV with $($PYTHON --version 2>&1)" >&2
  "$PYTHON" -m venv "$VENV"
fi
# Reinstall only when the package definition or the pins change.
stamp="$VENV/.tokenmill-install"
want=$(cat setup.py requirements/constraints.txt <(echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "run_local.sh: installing tokenmill[$EXTRAS] with pinned constraints" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -c requirements/constraints.txt -e ".[$EXTRAS]"
  echo "$want" > "$stamp"
fi

mode=${1:-build}
case "$mode" in
  test)
    shift
    # Airflow, in a venv of its own, only to import the example DAG (tests skip it if this fails).
    af_want=$(sha256sum requirements/airflow.txt | cut -d' ' -f1)
    if [ "$(cat .venv-airflow/.tokenmill-install 2>/dev/null)" != "$af_want" ]; then
      echo "run_local.sh: installing Airflow into .venv-airflow (for the DAG example test)" >&2
      if "$PYTHON" -m venv .venv-airflow && .venv-airflow/bin/python -m pip install -q --disable-pip-version-check \
          -r requirements/airflow.txt; then
        echo "$af_want" > .venv-airflow/.tokenmill-install
      else
        echo "run_local.sh: could not install Airflow; the DAG test will be skipped" >&2
      fi
    fi
    # The report test renders pages in a real browser: Debian's chromium, installed
    # here when missing and we may (root, apt); elsewhere that test skips and says why.
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "run_local.sh: installing chromium (apt) for the report's browser test" >&2
      apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
        || echo "run_local.sh: could not install chromium; the browser test will skip" >&2
    fi
    # The install matrix (tests/install_matrix.py: a fresh venv per extra) runs beside the suite, which reads
    # its result in tests/test_install_matrix.py; a run of chosen tests (arguments given) leaves it to that test.
    matrix_pid=
    if [ $# -eq 0 ] && [ -z "${TOKENMILL_INSTALL_MATRIX:-}" ]; then
      matrix_dir=$(mktemp -d -t tokenmill-matrix-XXXXXX)
      "$VENV/bin/python" -m tests.install_matrix --out "$matrix_dir/result.json" >"$matrix_dir/log" 2>&1 &
      matrix_pid=$!
      export TOKENMILL_INSTALL_MATRIX="$matrix_dir/result.json" TOKENMILL_INSTALL_MATRIX_PID=$matrix_pid
    fi
    # The whole suite runs its test files on as many pytest-xdist workers as there are cores
    # (TOKENMILL_TEST_WORKERS overrides; 0 runs them in this one process); chosen tests run in one.
    parallel=()
    if [ $# -eq 0 ] && [ "${TOKENMILL_TEST_WORKERS:-auto}" != 0 ]; then
      parallel=(-n "${TOKENMILL_TEST_WORKERS:-auto}" --dist loadfile)
    fi
    rc=0
    "$VENV/bin/python" -m pytest -q ${parallel[@]+"${parallel[@]}"} tests "$@" || rc=$?
    if [ -n "$matrix_pid" ]; then kill "$matrix_pid" 2>/dev/null || true; fi  # done already, normally
    exit $rc
    ;;
  bench)
    shift
    exec "$VENV/bin/python" -m bench "$@"
    ;;
  *)
    [ "$mode" = build ] && [ $# -gt 0 ] && shift
    defaults=()
    [[ " $* " == *" --input"* ]] || defaults+=(--input 'samples/text/*')
    [[ " $* " == *" --output"* ]] || defaults+=(--output out/sample --overwrite)
    [[ " $* " == *" --tokenizer"* ]] || defaults+=(--tokenizer tiktoken:cl100k_base --eos)
    exec "$VENV/bin/tokenmill" build "${defaults[@]}" "$@"
    ;;
esac
