"""Evaluation: inference timing and perplexity."""

from optipfair.evaluation.benchmarks import compare_models_inference, time_inference, time_prefill
from optipfair.evaluation.perplexity import perplexity

__all__ = ["compare_models_inference", "perplexity", "time_inference", "time_prefill"]
