"""The C++ CPU backend compiled on first use, for installs that did not build it (an isolated build has no torch).

The sources ship inside the package (csrc/). `load()` compiles them with `cpu_build.py` in a subprocess (the
same flags and instruction-set builds as setup.py, against the running torch) into

    <cache>/<key>/distillm2_kernels/_C*.so
    <cache> = $DISTILLM2_KERNELS_CACHE, else $XDG_CACHE_HOME/distillm2_kernels, else ~/.cache/distillm2_kernels
    <key>   = <torch version>-<instruction sets>-<Python tag>-<hash of the sources and build flags>

once, printing one line that says so and how long it took; later processes load the cached module. Concurrent
first use (DDP ranks import together) is safe: the compiling process holds an exclusive lock on
<cache>/<key>.lock and builds into a temporary folder that is renamed to <key>/ only when complete; the others
wait for the lock and then load that module. Without a C++ compiler ($CXX, else `c++`), or when the compile
fails (its log is kept in <cache>/<key>.failed.log, and not retried while that file exists), `load()` says why.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from . import cpu_build

CACHE_ENV = "DISTILLM2_KERNELS_CACHE"
COMPILER_HINT = (
    "install one (e.g. `apt install g++`, `dnf install gcc-c++`, `conda install gxx`) or point the CXX "
    "environment variable at one, then start Python again"
)


def cache_root() -> Path:
    """The folder that holds the compiled extensions, one subfolder per key."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distillm2_kernels"


def build_key() -> str:
    """<torch version>-<instruction sets>-<Python tag>-<source hash>: what the compiled module depends on."""
    digest = hashlib.sha256()
    for path in [*cpu_build.all_source_files(), Path(cpu_build.__file__)]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    isas = "+".join(isa.lower() for isa in cpu_build.instruction_sets())
    return f"{torch.__version__}-{isas}-{sys.implementation.cache_tag}-{digest.hexdigest()[:12]}"


def build_dir() -> Path:
    return cache_root() / build_key()


def compiler() -> tuple[Optional[list[str]], str]:
    """(the C++ compiler command, ""), or (None, why there is none)."""
    spec = os.environ.get("CXX") or "c++"
    command = shlex.split(spec)
    if not command or shutil.which(command[0]) is None:
        source = f"CXX={spec!r} is not an executable" if os.environ.get("CXX") else "`c++` is not on PATH"
        return None, f"no C++ compiler found ({source}): {COMPILER_HINT}"
    return command, ""


def _module_path(folder: Path) -> Optional[Path]:
    module_file = cpu_build.FIRST_USE_EXTENSION_NAME.rsplit(".", 1)[1]
    found = sorted((folder / "distillm2_kernels").glob(module_file + ".*"))
    return found[0] if found else None


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(cpu_build.FIRST_USE_EXTENSION_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[cpu_build.FIRST_USE_EXTENSION_NAME] = module
    return module


class _FileLock:
    """An exclusive lock on a file (flock where available), released when the process ends."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: the rename below still keeps the cache whole
            return self
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def _compile(final: Path, command: list[str]) -> None:
    """Builds into a temporary sibling of `final` and renames it into place; raises RuntimeError on failure."""
    failed_log = final.with_name(final.name + ".failed.log")
    for leftover in final.parent.glob(final.name + ".tmp*"):  # from a process killed mid-compile
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    env = dict(os.environ, CC=shlex.join(command), CXX=shlex.join(command))
    script = "import runpy, sys; runpy.run_path(sys.argv.pop(1), run_name='__main__')"
    print(f"distillm2_kernels: compiling the C++ CPU backend for torch {torch.__version__} into {final} "
          "(once; a few minutes on one core)...", end="", file=sys.stderr, flush=True)
    start = time.monotonic()
    log_path = staging / "build.log"
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-c", script, cpu_build.__file__, str(staging)], cwd=staging,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - start
    if result.returncode != 0 or _module_path(staging) is None:
        print(f" failed after {elapsed:.0f} s", file=sys.stderr, flush=True)
        shutil.copyfile(log_path, failed_log)
        shutil.rmtree(staging, ignore_errors=True)
        tail = " | ".join(failed_log.read_text(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(f"compiling it failed (log: {failed_log}; delete it to retry): {tail}")
    shutil.rmtree(staging / "objects", ignore_errors=True)
    os.rename(staging, final)
    print(f" done in {elapsed:.0f} s", file=sys.stderr, flush=True)


def load() -> tuple[Optional[ModuleType], str]:
    """(the compiled module, where it came from), compiling it first if the cache has none; or (None, why not)."""
    try:
        final = build_dir()
        path = _module_path(final)
        if path is None:
            failed_log = final.with_name(final.name + ".failed.log")
            if failed_log.exists():
                return None, f"compiling it failed before (log: {failed_log}; delete it to retry)"
            command, why_not = compiler()
            if command is None:
                return None, why_not
            final.parent.mkdir(parents=True, exist_ok=True)
            with _FileLock(final.with_name(final.name + ".lock")):
                if _module_path(final) is None:  # another process may have built it while we waited
                    _compile(final, command)
            path = _module_path(final)
        return _import(path), f"compiled on first use, cached in {final}"
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
        return None, f"it could not be compiled on first use: {error}"
