"""The public API, pinned: the names of `distillm2_kernels` and of the entry points the README documents.

A name added to or removed from an `__all__` below fails here until this list says so: a change to the API
is a decision, made in the open. The order of an `__all__` is not part of the API: the top level's is compared
sorted. Every module of the package that declares `__all__` is also checked to
define each name it lists.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import tomllib
from pathlib import Path

import pytest

import distillm2_kernels

ROOT = Path(__file__).resolve().parents[1]
TRAINER_EXTRA = ("transformers", "peft", "accelerate")

TOP_LEVEL = [  # sorted: the order of `__all__` is not part of the API
    "DistiLLM2Loss",
    "FusedLinearSKLFunction",
    "FusedLinearSRKLFunction",
    "FusedLinearTokenOutputs",
    "FusedSKLFunction",
    "FusedSRKLFunction",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "SparseTeacher",
    "TokenStatistics",
    "__version__",
    "distillm2_loss",
    "distillm2_loss_from_hidden",
    "fused_linear_skl",
    "fused_linear_srkl",
    "fused_linear_token_statistics",
    "fused_skl",
    "fused_srkl",
    "token_statistics",
]

# module -> its `__all__`, for the modules the README documents by name
DOCUMENTED_MODULES = {
    "distillm2_kernels.hf": ["LMHeadInputs", "lm_head_inputs", "lm_head_of", "unwrap_peft"],
    "distillm2_kernels.reference": [
        "skl_reference", "srkl_reference", "skew_kl_rows", "skew_reverse_kl_rows", "naive_skl", "naive_srkl",
        "densify_sparse_teacher",
    ],
    "distillm2_kernels.env": ["report", "main"],
    "distillm2_kernels.measure": [
        "measure", "Measurement", "CpuProbe", "CudaProbe", "probe_for", "peak_rss_in_subprocess", "resident_bytes",
        "reset_peak_rss", "peak_rss_bytes",
    ],
    "distillm2_kernels.experiment": ["ExperimentConfig", "ExperimentResult", "QUICK", "run_experiment"],
}
TRAINER_MODULES = {  # need the `train` extra
    "distillm2_kernels.trainer.cli": ["main", "build_parser"],
    "distillm2_kernels.trainer.generation": ["generate", "select_engine", "GenerationResult", "ENGINES",
                                             "user_conversation"],
    "distillm2_kernels.trainer.pairing": ["pair", "PairReport", "pair_row"],
    "distillm2_kernels.trainer.training": ["TrainConfig", "TrainResult", "train", "distillation_loss",
                                           "read_final_state"],
    "distillm2_kernels.trainer.pipeline": ["PipelineConfig", "PipelineResult", "run_pipeline"],
}
# `python -m <module>` commands of the README and the Makefile
COMMANDS = ["distillm2_kernels.env", "distillm2_kernels.demo", "distillm2_kernels.trainer", "distillm2_kernels.experiment"]


def _needs_trainer_extra() -> None:
    for name in TRAINER_EXTRA:
        pytest.importorskip(name, reason=f"{name} (the `train` extra) is not installed")


def test_top_level_all_is_pinned_and_resolves():
    assert sorted(distillm2_kernels.__all__) == TOP_LEVEL
    assert len(set(distillm2_kernels.__all__)) == len(TOP_LEVEL)
    for name in TOP_LEVEL:
        assert getattr(distillm2_kernels, name) is not None, name


@pytest.mark.parametrize("module_name", sorted(DOCUMENTED_MODULES))
def test_documented_module_all_is_pinned(module_name):
    if module_name == "distillm2_kernels.experiment":
        _needs_trainer_extra()
    module = importlib.import_module(module_name)
    assert module.__all__ == DOCUMENTED_MODULES[module_name]
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name}"


@pytest.mark.parametrize("module_name", sorted(TRAINER_MODULES))
def test_trainer_module_all_is_pinned(module_name):
    _needs_trainer_extra()
    module = importlib.import_module(module_name)
    assert module.__all__ == TRAINER_MODULES[module_name]
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name}"


def test_the_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"distillm2": "distillm2_kernels.trainer.cli:main"}
    _needs_trainer_extra()
    module_name, _, attribute = scripts["distillm2"].partition(":")
    assert callable(getattr(importlib.import_module(module_name), attribute))


@pytest.mark.parametrize("module_name", COMMANDS)
def test_every_documented_command_is_runnable_as_a_module(module_name):
    """`python -m <module>` finds code to run: a package's `__main__`, or a module with a `__main__` guard."""
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin, module_name
    origin = Path(spec.origin)
    if origin.name == "__init__.py":
        assert (origin.parent / "__main__.py").is_file(), module_name
    else:
        tree = ast.parse(origin.read_text())
        guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
        assert guards, f"{module_name} has no `if __name__ == '__main__':`"


def _modules_declaring_all():
    for path in sorted((ROOT / "distillm2_kernels").rglob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
               for node in tree.body):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts)


@pytest.mark.parametrize("module_name", list(_modules_declaring_all()))
def test_every_all_names_what_its_module_defines(module_name):
    if module_name.startswith(("distillm2_kernels.trainer", "distillm2_kernels.experiment")):
        _needs_trainer_extra()
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{module_name}.__all__ names what it does not define: {missing}"
    assert len(set(module.__all__)) == len(module.__all__), f"{module_name}.__all__ repeats a name"
