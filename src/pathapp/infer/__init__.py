"""Run a model over whole slides: `pipeline` takes one slide from tiles to a SlideResult, `planner`
decides which inputs run where and skips what is done, `options.InferOptions` is what the CLI fills.

The package imports torch through the pipeline: import it only where a model runs."""

from pathapp.infer.options import InferOptions
from pathapp.infer.pipeline import PRECISIONS, InferenceError, Runtime, check_tile_size, infer_slide, prepare_model
from pathapp.infer.planner import Job, RunSummary, expand_inputs, report_failure, run_inference, run_qc

__all__ = ["PRECISIONS", "InferOptions", "InferenceError", "Job", "RunSummary", "Runtime", "check_tile_size",
           "expand_inputs", "infer_slide", "prepare_model", "report_failure", "run_inference", "run_qc"]
