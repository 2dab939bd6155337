"""Installing the strict stand-in `vllm` of `stand_in_packages/` (see its docstring) for a test: in this process
(`sys.modules`) and for the subprocesses the test starts (`PYTHONPATH`, whose `sitecustomize` gives them a
"GPU"), with a fresh simulated device of `total_gib` GiB shared by all of them."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

PACKAGES = Path(__file__).resolve().parent / "stand_in_packages"
REPOSITORY = Path(__file__).resolve().parents[1]


def install(monkeypatch, device_file: Path, total_gib: float = 80.0, gpus: int = 1):
    """The stand-in `vllm` module, installed for this test; `engine="auto"` then picks it."""
    from distillm2_kernels.trainer import generation

    device_file.write_text(json.dumps({"total_bytes": int(total_gib * (1 << 30)), "held": {}}))
    monkeypatch.setenv("VLLM_STAND_IN_DEVICE", str(device_file))
    monkeypatch.setenv("VLLM_STAND_IN_GPUS", str(gpus))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(PACKAGES), str(REPOSITORY), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(PACKAGES))
    module = importlib.import_module("vllm")
    module.CALLS.clear()
    monkeypatch.setattr(generation, "gpu_available", lambda: True)
    return module


def held_bytes(device_file: Path) -> dict:
    """The device's reservations by process id (those of ended processes included)."""
    return json.loads(device_file.read_text())["held"]
