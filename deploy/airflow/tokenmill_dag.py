"""Airflow DAG: rebuild tokenmill datasets nightly from a build spec, then collect old versions.

Needs apache-airflow with apache-airflow-providers-apache-beam (and -google for
Dataflow), and tokenmill installed where the task runs. Settings come from the
environment of the Airflow workers (or edit the defaults below):

    TOKENMILL_CONFIG   the build spec (gs:// or a path)           default gs://my-bucket/tokenmill/build.yaml
    TOKENMILL_RUNNER   DataflowRunner, or FnApiRunner for local    default DataflowRunner
    TOKENMILL_PROJECT, TOKENMILL_REGION, TOKENMILL_TEMP            Dataflow project, region, gs:// temp location
    TOKENMILL_GC       datasets to gc, space-separated             default: none

Each run is incremental: only inputs that arrived or changed since the last
commit are tokenized, and a run with nothing new commits nothing.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow import DAG
from airflow.providers.apache.beam.operators.beam import BeamRunPythonPipelineOperator

try:  # Airflow 3
    from airflow.providers.standard.operators.bash import BashOperator
except ImportError:  # Airflow 2
    from airflow.operators.bash import BashOperator

CONFIG = os.environ.get("TOKENMILL_CONFIG", "gs://my-bucket/tokenmill/build.yaml")
RUNNER = os.environ.get("TOKENMILL_RUNNER", "DataflowRunner")
PROJECT = os.environ.get("TOKENMILL_PROJECT", "my-project")
REGION = os.environ.get("TOKENMILL_REGION", "us-central1")
TEMP = os.environ.get("TOKENMILL_TEMP", "gs://my-bucket/tmp")
GC = os.environ.get("TOKENMILL_GC", "").split()
SETUP_FILE = os.environ.get("TOKENMILL_SETUP_FILE", os.path.join(os.path.dirname(__file__), "..", "..", "setup.py"))


def pipeline_options() -> dict[str, object]:
    options: dict[str, object] = {"config": CONFIG}
    if RUNNER == "DataflowRunner":
        options.update({"project": PROJECT, "region": REGION, "temp_location": TEMP,
                        "setup_file": SETUP_FILE, "experiments": "use_runner_v2"})
    return options


with DAG(
    dag_id="tokenmill_nightly",
    description="Incremental tokenmill build of a build spec, then gc of old versions",
    schedule="15 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # tokenmill refuses to commit over a concurrent run anyway; this avoids the wasted work
    default_args={"retries": 1, "retry_delay": timedelta(minutes=10)},
    tags=["tokenmill"],
) as dag:
    build = BeamRunPythonPipelineOperator(
        task_id="tokenmill_build",
        runner=RUNNER,
        py_file="tokenmill.pipelines.build",
        py_options=["-m"],
        pipeline_options=pipeline_options(),  # the worker's own Python, where tokenmill is installed
    )
    for dataset in GC:
        name = dataset.rstrip("/").rsplit("/", 1)[-1]
        build >> BashOperator(task_id=f"tokenmill_gc_{name}", bash_command=f"tokenmill gc {dataset} --keep 2")
