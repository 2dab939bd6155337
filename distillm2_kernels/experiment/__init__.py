"""A built-in miniature distillation experiment: `python -m distillm2_kernels.experiment` (see `run`)."""

from .run import QUICK, ExperimentConfig, ExperimentResult, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "QUICK", "run_experiment"]
