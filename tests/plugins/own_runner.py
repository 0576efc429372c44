"""A Beam runner in a module of its own, with options of its own (as Beam's DaskRunner has)."""
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineRunner


class OwnRunnerOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--own_runner_address", default=None, help="where the runner's cluster listens")


class OwnRunner(PipelineRunner):
    def run_pipeline(self, pipeline, options):
        raise NotImplementedError("only its options are tested")
