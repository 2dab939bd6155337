"""Every Triton kernel specialization the library launches, compiled ahead of time for sm_80 (A100) and sm_90
(H100, H200) on a machine without a GPU: `python -m benchmarks.aot_compile [--arch 80,90] [--json PATH]`.

`triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))` lowers a
kernel to PTX and runs the `ptxas` that ships inside triton on it; its `-v` log gives the registers, the spill
stores and loads, and triton's metadata the shared memory. A compile error or a spill fails the run (exit 1).
tests/test_aot_compile.py runs this in `make test` (and `make aot-check` alone).

The compile must not run under the interpreter: with TRITON_INTERPRET=1 (set by tests/conftest.py before the
package is imported) the kernels are interpreter functions and `launch_config` picks the interpreter's blocks.
`main` therefore re-runs itself in a child process without TRITON_INTERPRET when it finds it set.

Specializations. Triton compiles one binary per (argument types and attributes, constexprs, num_warps), and
takes an argument's type from its runtime value: a tensor's dtype (and divisibility by 16 of its address), an
int's i32 / i64 (1 becomes a constant, a multiple of 16 gets divisibility), a float's fp32. Here each argument's
runtime value is derived from its NAME by a rule table (`argument_value`; an unknown name stops the run, so
that a new kernel argument gets a rule instead of a guess), and triton's own specializer (the function the
launcher calls) turns the value into the type and attribute, as at launch. The matrix:
- kernels: every `*_kernel` JIT function of `distillm2_kernels.backends.triton_backend` and of
  `triton_sparse` (the sparse-teacher sweeps, which read the student only: one dtype per student dtype);
- launch configurations: every (BLOCK_V, num_warps) that `launch_config(V)` returns for V in 1..262144, each
  with the specializations of V it meets there (V = 1 a constant; V % 16 == 0 with divisibility; other V),
  the row strides equal to V (contiguous rows); a V that is not a multiple of 16 is compiled with the input
  tensors at addresses that are not 16-byte aligned (a view such as `logits[:, 1:]`), a multiple of 16 with
  aligned ones;
- logits dtypes (student, teacher): `DTYPE_PAIRS`, the three same-dtype pairs and two mixed ones (see there);
- constexpr flags: every combination the launchers pass (`CONSTEXPR_VALUES`; DETACH only with REVERSE), and
  the incoming gradient's stride (1, or 0 when broadcast);
- by default a covering subset of that product, `--full` the whole of it (see `specializations`).

Instructions per vocabulary entry (the budget of docs/design.md section 7.1): in the PTX (sm_80 and sm_90), the
static count of the instructions in each loop that loads from global memory (the sweeps over the logits; the
ignored rows' zero-fill loop loads nothing), divided by the entries one thread handles per iteration,
BLOCK_V / (32·num_warps); likewise the special-function instructions (ex2, lg2, rcp, sqrt, rsqrt, sin, cos, tanh:
their `.approx` forms). Branches taken rarely count as if always taken. Software equivalents of SFU ops are added
to the SFU column ("SFU eq"): each PTX `div`, and each op of `SOFTWARE_TRANSCENDENTALS` (libdevice's logf and the
like, a polynomial on the FMA pipes) on a block tensor inside a loop that loads, counted in the TTGIR, where such
an op acts once per entry. The tables are printed for bf16 and fp32 logits at the largest launch configuration,
per kernel and summed per op (fwd = statistics + loss kernels, fwd+bwd adds the backward kernel, and the fused
`_skew_forward_and_grad_kernel`), with the model's HBM traffic (`TRAFFIC`) and what the sums miss of `BUDGET`.
The sparse-teacher sweeps get a table of their own (`sparse_table`), each kernel with its SFU budget
(`sparse_budget`). tests/test_aot_compile.py asserts the instructions within the budget and the SFU ops no
higher than when written, and the sparse sweeps within their SFU budgets.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Optional

ARCHES = (80, 90)
# The modules whose kernels are compiled: the dense SKL / SRKL kernels and the sparse-teacher sweeps (student only)
KERNEL_MODULES = ("triton_backend", "triton_sparse")
# The sparse-teacher sweeps (`triton_sparse`), printed with their SFU budgets by `sparse_table`
SPARSE_KERNELS = ("_student_logsumexp_kernel", "_tail_sums_kernel", "_student_grad_kernel")
MAX_VOCAB = 262144
# (student, teacher) logits dtypes. The kernels load each row in its own dtype and compute in float32, so the
# dtype changes only the loads' width and conversions and the gradient store: the same-dtype pairs cover each
# dtype in both roles and in the store; the mixed pairs cover student and teacher loads of different widths in
# one loop (the widest against the narrowest, both ways round). The full 3 x 3 product: `--all-dtype-pairs`.
DTYPE_PAIRS = (
    ("float16", "float16"),
    ("bfloat16", "bfloat16"),
    ("float32", "float32"),
    ("bfloat16", "float32"),
    ("float32", "float16"),
)
ALL_DTYPES = ("float16", "bfloat16", "float32")
# The values each constexpr flag takes at launch (BLOCK_V, with num_warps, comes from launch_config), and whether
# it changes the vocabulary loop ("loop") or only the code before it ("prologue"; see `specializations`).
CONSTEXPR_VALUES = {
    "REVERSE": ((False, True), "loop"),  # SKL / SRKL
    "DETACH": ((False, True), "loop"),  # SRKL's detached mixture
    "HAS_TAIL": ((False, True), "loop"),  # sparse teacher: the gradient with the tail's g, or g = 0
    "HAS_LABELS": ((False, True), "prologue"),
    "ALPHA_PER_ROW": ((False, True), "prologue"),
}
GRAD_LOSS_STRIDES = (1, 0)  # per-row incoming gradient (1 is a constant at launch), broadcast (0): a prologue load
# Pointer arguments by name: (dtype, or the logits role whose dtype it takes; whether it is an input, which a
# caller may pass as a view at an unaligned address). Outputs are fresh allocations, always aligned.
POINTERS = {
    "student_ptr": ("student", True),
    "teacher_ptr": ("teacher", True),
    "grad_student_ptr": ("student", False),  # the gradient has the student's dtype
    "labels_ptr": ("int64", True),
    "alpha_ptr": ("float32", True),
    "grad_loss_ptr": ("float32", True),
    "row_grad_scale_ptr": ("float32", True),
    "loss_ptr": ("float32", False),
    "stats_ptr": ("float32", False),
    "lse_ptr": ("float32", True),  # the sparse sweeps' per-row inputs
    "log_tail_ptr": ("float32", True),
    "row_scale_ptr": ("float32", True),
    "row_shift_ptr": ("float32", True),
    "lse_out_ptr": ("float32", False),
    "sums_ptr": ("float32", False),
}
SCALARS = {"alpha": 0.1, "inv_temperature": 1.0, "ignore_index": -100}  # fp32, fp32, i32 at launch
HEADLINE = {"arch": 90, "dtypes": ("bfloat16", "bfloat16"), "aligned": True}  # the instruction table's case
HEADLINE_DTYPES = (("bfloat16", "bfloat16"), ("float32", "float32"))  # the tables' logits dtypes (bf16 first)
OPS = OrderedDict([  # op -> the flags of its loss, backward and fused kernels (statistics: no flags but HAS_LABELS)
    ("SKL", {"REVERSE": False, "DETACH": False}),
    ("SRKL", {"REVERSE": True, "DETACH": False}),
    ("SRKL detached", {"REVERSE": True, "DETACH": True}),
])
DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), f"distillm2_kernels_aot_{os.getuid() if hasattr(os, 'getuid') else 0}")
SFU_OPCODES = ("ex2", "lg2", "rcp", "sqrt", "rsqrt", "sin", "cos", "tanh")
# TTGIR ops that lower to a software sequence (libdevice) rather than one SFU instruction: each is counted as
# one special-function equivalent per entry. (math.exp and math.exp2 lower to ex2.approx, counted in the PTX.)
SOFTWARE_TRANSCENDENTALS = ("math.log", "math.log2", "math.log10", "math.log1p", "math.expm1", "math.erf",
                            "math.sin", "math.cos", "math.tan", "math.tanh", "math.pow", "math.sqrt",
                            "math.rsqrt", "tt.extern_elementwise", "tt.precise_divf", "tt.precise_sqrt")
H200 = {"multiprocessors": 132, "registers_per_sm": 65536, "l2_bytes": 50e6}  # for the model's L2 fit
COUNT_VERSION = 2  # part of the cache key: bump when a compile's result gains or changes a field
# The budget of docs/design.md section 7 for fwd+bwd of a scalar reduction, per vocabulary entry.
BUDGET = {"instructions": 90, "sfu": 4, "traffic": 5}
# The model's traffic per entry, in units of one [N, V] input: (read from HBM, written to HBM, re-read that
# may hit L2). The fused kernel re-reads each row twice right after its first read (docs/design.md section 7).
TRAFFIC = {
    "_row_statistics_kernel": (2, 0, 0),
    "_skew_loss_kernel": (2, 0, 0),
    "_skew_backward_kernel": (2, 1, 0),
    "_skew_forward_and_grad_kernel": (2, 1, 4),
}


class UnknownArgument(KeyError):
    """A kernel argument with no rule here: add one to `argument_value` / `CONSTEXPR_VALUES`."""

    def __str__(self):
        return self.args[0]


# --- the matrix -------------------------------------------------------------------------------------------------

def kernels() -> dict:
    """name -> JIT function, every `*_kernel` of the Triton backends (`KERNEL_MODULES`)."""
    found = {}
    for module in KERNEL_MODULES:
        found.update(module_kernels(module))
    return found


def module_kernels(module_name: str) -> dict:
    """name -> JIT function, every `*_kernel` of `distillm2_kernels.backends.<module_name>`."""
    import importlib

    from triton.runtime.jit import JITFunction

    module = importlib.import_module(f"distillm2_kernels.backends.{module_name}")
    found = {name: fn for name, fn in vars(module).items()
             if name.endswith("_kernel") and isinstance(fn, JITFunction)}
    if not found:
        raise RuntimeError(f"no *_kernel JIT functions in distillm2_kernels.backends.{module_name} "
                           "(is TRITON_INTERPRET set? then they are interpreter functions)")
    return found


class _MockTensor:
    """What triton's specializer reads from a tensor argument: its dtype and its address."""

    def __init__(self, dtype, address: int):
        self.dtype, self.address = dtype, address

    def data_ptr(self) -> int:
        return self.address


def argument_value(kernel: str, name: str, case: dict):
    """The runtime value the launcher passes for argument `name` of `kernel` in `case`."""
    import torch

    if name in POINTERS:
        role, is_input = POINTERS[name]
        dtype = getattr(torch, case.get(role, role))
        element = torch.empty((), dtype=dtype).element_size()
        unaligned = is_input and not case["aligned"]
        return _MockTensor(dtype, element if unaligned else 0)  # an address one element past an aligned one
    if name.endswith("_ptr"):
        raise UnknownArgument(f"{kernel}: pointer argument {name!r} has no dtype rule in benchmarks/aot_compile.py "
                              f"(POINTERS); add its role there")
    if name == "grad_loss_stride":
        return case["grad_loss_stride"]
    if name.endswith("_stride"):
        return case["V"]  # rows of a row-major [..., V] tensor: every stride is a multiple of V; contiguous: V
    if name == "V":
        return case["V"]
    if name == "inner_rows":
        # rows per outer index of the [outer, inner, V] layout: N for [N, V] rows, T for a [B, T, V] slice; a
        # general value (not 1, which triton would make a constant, nor a multiple of 16)
        return 1023
    if name in SCALARS:
        return SCALARS[name]
    raise UnknownArgument(f"{kernel}: argument {name!r} has no rule in benchmarks/aot_compile.py "
                          f"(argument_value); add one that gives the value the launcher passes")


def _specializer(arch: int):
    """value -> (type, attribute), triton's own launch-time specialization for `arch`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError as error:  # pragma: no cover - another triton layout
        raise RuntimeError(f"this triton ({_triton_version()}) has no native_specialize_impl: "
                           f"benchmarks/aot_compile.py needs its launch-time specializer") from error
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return lambda value: native_specialize_impl(backend, value, False, True, True)


def launch_configs(max_vocab: int = MAX_VOCAB) -> dict:
    """(BLOCK_V, num_warps) -> {V specialization: a representative V}, over V in 1..max_vocab."""
    from distillm2_kernels.backends.triton_backend import interpreter_enabled, launch_config

    if interpreter_enabled():
        raise RuntimeError("TRITON_INTERPRET is set: launch_config would give the interpreter's blocks")
    specialize = _specializer(ARCHES[0])
    configs: dict = {}
    for v in range(1, max_vocab + 1):
        classes = configs.setdefault(tuple(launch_config(v)), {})
        classes.setdefault(specialize(v), v)
    return configs


def _flag_combinations(kernel: str, constexprs: list, kind: str) -> list:
    """The combinations of the `kind` ("loop" or "prologue") constexpr flags the launchers pass."""
    unknown = [name for name in constexprs if name != "BLOCK_V" and name not in CONSTEXPR_VALUES]
    if unknown or "BLOCK_V" not in constexprs:
        raise UnknownArgument(f"{kernel}: constexpr(s) {unknown or ['BLOCK_V missing']} have no values in "
                              f"benchmarks/aot_compile.py (CONSTEXPR_VALUES); add the values the launcher passes")
    flags = [name for name in constexprs if name != "BLOCK_V" and CONSTEXPR_VALUES[name][1] == kind]
    combos = []
    for values in itertools.product(*(CONSTEXPR_VALUES[name][0] for name in flags)):
        combo = dict(zip(flags, values))
        if combo.get("DETACH") and not combo.get("REVERSE", False):
            continue  # the launchers pass detach only with reverse (SKL has no mixture to detach)
        if combo.get("HAS_TAIL") is False and combo.get("REVERSE"):
            continue  # without a tail g = 0: the launcher passes reverse = detach = False
        combos.append(combo)
    return combos


def specializations(arches=ARCHES, dtype_pairs=DTYPE_PAIRS, max_vocab: int = MAX_VOCAB, full: bool = False) -> list:
    """The compiles: dicts of kernel, arch, num_warps, signature, constexprs, attrs and the case.

    full=True: the whole product of kernels × loop flags × launch configurations × V specializations × dtype
    pairs × prologue factors. The default is a covering set of about a tenth of it (two minutes on two cores):
    - every kernel × loop-flag combination (REVERSE, DETACH) × launch configuration × V specialization;
    - every dtype pair at the configurations where a thread handles the most entries per iteration (the
      largest register pressure), with the fewest and with the most warps; elsewhere the pairs take turns;
    - the prologue factors (HAS_LABELS, ALPHA_PER_ROW and `grad_loss_stride` 1 or 0, which change only code
      before the loop) take turns over a kernel's compiles, so that each combination is compiled at several
      sizes.
    """
    found = kernels()
    configs = launch_configs(max_vocab)
    widest = max(block / (32 * warps) for block, warps in configs)
    widest_warps = sorted(warps for block, warps in configs if block / (32 * warps) == widest)
    every_pair = {(block, warps) for block, warps in configs
                  if block / (32 * warps) == widest and warps in (widest_warps[0], widest_warps[-1])}
    specs = []
    for arch in arches:
        specialize = _specializer(arch)
        for kernel_name, fn in found.items():
            constexpr_names = [p.name for p in fn.params if p.is_constexpr]
            kernel_pairs = kernel_dtype_pairs(fn, dtype_pairs)
            prologue = [dict(flags, grad_loss_stride=stride)
                        for flags in _flag_combinations(kernel_name, constexpr_names, "prologue")
                        for stride in (GRAD_LOSS_STRIDES if "grad_loss_stride" in fn.arg_names else (None,))]
            turn = itertools.count()
            for loop_flags in _flag_combinations(kernel_name, constexpr_names, "loop"):
                pair_turn = itertools.count()
                for (block, warps), v_classes in configs.items():
                    for v_class, v in v_classes.items():
                        aligned = v_class[0] == "constexpr" or v_class[1] == "D"
                        if full or (block, warps) in every_pair:
                            pairs = kernel_pairs
                        else:
                            pairs = [kernel_pairs[next(pair_turn) % len(kernel_pairs)]]
                        for student, teacher in pairs:
                            for extra in prologue if full else [prologue[next(turn) % len(prologue)]]:
                                extra = dict(extra)
                                case = {"V": v, "aligned": aligned, "grad_loss_stride": extra.pop("grad_loss_stride"),
                                        "student": student, "teacher": teacher}
                                specs.append(_one(fn, kernel_name, arch, block, warps, dict(loop_flags, **extra),
                                                  case, specialize))
                # the instruction tables' cases (prologue flags off), whatever the turns gave
                block, warps = max(every_pair)
                v = next(v for v_class, v in configs[(block, warps)].items() if v_class[1] == "D")
                for student, teacher in HEADLINE_DTYPES:
                    if (student, teacher) not in kernel_pairs:
                        continue
                    headline = {"V": v, "aligned": True, "grad_loss_stride": prologue[0].get("grad_loss_stride"),
                                "student": student, "teacher": teacher}
                    flags = dict(loop_flags, **{k: x for k, x in prologue[0].items() if k != "grad_loss_stride"})
                    spec = _one(fn, kernel_name, arch, block, warps, flags, headline, specialize)
                    if all(_key(spec) != _key(other) for other in specs[-80:]):
                        specs.append(spec)
    return specs


def kernel_dtype_pairs(fn, dtype_pairs) -> list:
    """The (student, teacher) logits dtypes a kernel is compiled for: `dtype_pairs`, or for a kernel that reads
    no teacher (the sparse sweeps) one pair per student dtype, (s, s)."""
    if "teacher_ptr" in fn.arg_names:
        return list(dtype_pairs)
    students = list(OrderedDict.fromkeys(student for student, _ in dtype_pairs))
    return [(student, student) for student in students]


def _key(spec: dict) -> str:
    return json.dumps([spec[k] for k in ("kernel", "arch", "num_warps", "signature", "constants", "attrs")],
                      sort_keys=True)


def _one(fn, kernel_name, arch, block, warps, flags, case, specialize) -> dict:
    signature, attrs, constants = {}, {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            constants[name] = block if name == "BLOCK_V" else flags[name]
            continue
        kind, attr = specialize(argument_value(kernel_name, name, case))
        signature[name] = kind
        if kind == "constexpr":  # an int equal to 1
            constants[name] = attr
        elif attr:
            attrs[index] = attr
    return {"kernel": kernel_name, "arch": arch, "num_warps": warps, "BLOCK_V": block, "flags": flags,
            "case": case, "signature": signature, "constants": constants, "attrs": attrs}


# --- one compile ------------------------------------------------------------------------------------------------

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(spec: dict, cache_dir: Optional[str] = None) -> dict:
    """Compiles `spec`; its registers, spills, shared memory and the PTX's loop counts, or its error. With
    `cache_dir`, a result found there under the same key (the kernel's source hash with its signature,
    constexprs and attributes, the target, num_warps, triton's version, ptxas and the environment variables
    that change triton's output) is returned instead, and a new successful result is stored there."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    fn = kernels()[spec["kernel"]]
    backend = make_backend(GPUTarget("cuda", spec["arch"], 32))
    attrs = {(index,): backend.parse_attr(attr) for index, attr in spec["attrs"].items()}
    source = ASTSource(fn, spec["signature"], spec["constants"], attrs)
    result = {k: spec[k] for k in ("kernel", "arch", "num_warps", "BLOCK_V", "flags", "case")}
    cached = None
    if cache_dir:
        ptxas = _ptxas(spec["arch"])
        try:
            from triton._C.libtriton import get_cache_invalidating_env_vars

            env_vars = get_cache_invalidating_env_vars()
        except ImportError:  # pragma: no cover - older triton
            env_vars = {k: v for k, v in os.environ.items() if k.startswith("TRITON_")}
        key = hashlib.sha256(json.dumps([COUNT_VERSION, source.hash(), spec["arch"], spec["num_warps"], triton.__version__,
                                         ptxas.path, ptxas.version, env_vars],
                                        sort_keys=True, default=str).encode()).hexdigest()
        cached = Path(cache_dir) / f"{key}.json"
        if cached.exists():
            try:
                return dict(result, **json.loads(cached.read_text()), cached=True)
            except (OSError, ValueError):
                pass  # a torn or unreadable entry: compile again
    measured = _compile(source, spec)
    if cached is not None and "error" not in measured:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(measured))
        partial.replace(cached)
    return dict(result, **measured, cached=False)


def _compile(source, spec: dict) -> dict:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    result = {}
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v and prints its log: catch it
    knobs.compilation.always_compile = True  # a hit in triton's own cache would run no ptxas
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            compiled = triton.compile(source, target=GPUTarget("cuda", spec["arch"], 32),
                                      options={"num_warps": spec["num_warps"]})
    except Exception as error:  # noqa: BLE001 - every compile error is a result to report
        result["error"] = f"{type(error).__name__}: {error}"[-3000:] + "\n" + log.getvalue()[-2000:]
        return result
    text = log.getvalue()
    if "registers" not in text:  # a triton that does not print the ptxas log: run ptxas -v on the PTX here
        text = _ptxas_log(compiled.asm["ptx"], spec["arch"])
    registers, spills = _PTXAS_REGISTERS.search(text), _PTXAS_SPILLS.search(text)
    if registers is None or spills is None:
        result["error"] = "could not read registers / spills from the ptxas -v log:\n" + text[-2000:]
        return result
    result.update(registers=int(registers.group(1)), stack_bytes=int(spills.group(1)),
                  spill_stores=int(spills.group(2)), spill_loads=int(spills.group(3)),
                  shared_bytes=int(compiled.metadata.shared), loops=ptx_loops(compiled.asm["ptx"]),
                  software_transcendentals=ttgir_software_transcendentals(compiled.asm["ttgir"]))
    return result


def _ptxas(arch: int):
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch)
    except TypeError:  # triton releases whose get_ptxas takes no architecture
        return get_ptxas()


def _ptxas_log(ptx: str, arch: int) -> str:
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        done = subprocess.run([_ptxas(arch).path, "-v", f"--gpu-name={gpu}", str(source), "-o", str(source) + ".o"],
                              capture_output=True, text=True)
        return done.stdout + done.stderr


def ptx_loops(ptx: str) -> list:
    """Per loop of the PTX (LLVM's loop comments): its instruction count, whether it loads from global
    memory, and its special-function and division instructions by opcode."""
    loops: dict = OrderedDict()
    current = None  # the loop the current basic block belongs to
    last_label = None
    for raw in ptx.splitlines():
        line = raw.strip()
        block_label = re.match(r"^\$L__(BB\d+_\d+):", line)
        unlabelled_block = line.startswith("// %bb.")
        if block_label or unlabelled_block:  # a basic block begins; its loop comment may follow on this line
            last_label, current = (block_label.group(1) if block_label else None), None
        if re.search(r"=>This Inner Loop Header: Depth=\d+", line):
            current = last_label
        else:
            member = re.search(r"in Loop: Header=(BB\d+_\d+) Depth=\d+", line)
            if member:
                current = member.group(1)
        if block_label or unlabelled_block:
            continue
        code = line.split("//", 1)[0].strip()
        if current is None or not code.endswith(";") or code.startswith("."):
            continue
        opcode = re.sub(r"^@!?%\w+\s+", "", code).split()[0]
        loop = loops.setdefault(current, {"instructions": 0, "loads_global": False, "sfu": {}, "div": 0})
        loop["instructions"] += 1
        base = opcode.split(".")[0]
        if opcode.startswith("ld.global"):
            loop["loads_global"] = True
        if base in SFU_OPCODES and ".approx" in opcode:
            loop["sfu"][base] = loop["sfu"].get(base, 0) + 1
        if base == "div":
            loop["div"] += 1
    return [dict(loop, header=name) for name, loop in loops.items()]


def ttgir_software_transcendentals(ttgir: str) -> dict:
    """op -> how many per vocabulary entry: the `SOFTWARE_TRANSCENDENTALS` on tensors inside the `scf.for`
    loops that load (`tt.load`), one per entry each (a tensor op acts on every entry of the block once)."""
    counts: dict = {}
    depth, loop_depths, body, loads = 0, [], [], []
    for line in ttgir.splitlines():
        code = line.strip()
        if re.search(r"\bscf\.for\b", code) and code.endswith("{"):
            loop_depths.append(depth)
            body.append({})
            loads.append(False)
        if loop_depths:
            if "tt.load" in code:
                loads[-1] = True
            op = re.search(r"=\s*([\w.]+)\s", code)
            if op and op.group(1) in SOFTWARE_TRANSCENDENTALS and ": tensor<" in code:
                body[-1][op.group(1)] = body[-1].get(op.group(1), 0) + 1
        depth += code.count("{") - code.count("}")
        if loop_depths and depth <= loop_depths[-1]:
            loop_depths.pop()
            ops, loaded = body.pop(), loads.pop()
            if loop_depths:  # a nested loop's ops belong to its parent's body too
                for name, count in ops.items():
                    body[-1][name] = body[-1].get(name, 0) + count
                loads[-1] = loads[-1] or loaded
            elif loaded:
                for name, count in ops.items():
                    counts[name] = counts.get(name, 0) + count
    return counts


# --- the run ----------------------------------------------------------------------------------------------------

def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def check_ptxas(arches=ARCHES) -> list:
    """The ptxas binaries triton uses for `arches` (paths), or RuntimeError naming what is missing."""
    found = []
    for arch in arches:
        try:
            tool = _ptxas(arch)
        except Exception as error:  # noqa: BLE001
            raise RuntimeError(f"triton {_triton_version()} found no ptxas for sm_{arch}: {error}") from error
        if not tool.path or not os.access(tool.path, os.X_OK):
            raise RuntimeError(f"triton {_triton_version()}'s ptxas for sm_{arch} is missing or not executable: "
                               f"{tool.path!r} (triton's wheels ship it; set TRITON_PTXAS_PATH to a CUDA ptxas)")
        found.append(f"sm_{arch}: {tool.path} ({tool.version})")
    return found


def run(specs: list, jobs: int, cache_dir: Optional[str] = None) -> list:
    compile_cached = functools.partial(compile_one, cache_dir=cache_dir)
    if jobs <= 1:
        return [compile_cached(spec) for spec in specs]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return list(pool.map(compile_cached, specs, chunksize=4))


def failures(results: list) -> list:
    bad = []
    for r in results:
        if "error" in r:
            bad.append(f"{describe(r)}: compile error: {r['error']}")
        elif r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{describe(r)}: {r['registers']} registers, {r['spill_stores']} bytes spill stores, "
                       f"{r['spill_loads']} bytes spill loads")
    return bad


def describe(r: dict) -> str:
    case = r["case"]
    flags = ",".join(f"{k}={int(v)}" for k, v in r["flags"].items())
    return (f"sm_{r['arch']} {r['kernel']} BLOCK_V={r['BLOCK_V']} num_warps={r['num_warps']} {flags} "
            f"{case['student']}/{case['teacher']} V={case['V']}{'' if case['aligned'] else ' unaligned'}")


def register_table(results: list) -> str:
    """One line per (arch, kernel, launch configuration): registers and shared memory over the rest."""
    groups: dict = OrderedDict()
    for r in sorted((r for r in results if "error" not in r),
                    key=lambda r: (r["arch"], r["kernel"], r["BLOCK_V"])):
        groups.setdefault((r["arch"], r["kernel"], r["BLOCK_V"], r["num_warps"]), []).append(r)
    lines = [f"{'arch':<6} {'kernel':<24} {'BLOCK_V':>7} {'warps':>5} {'compiles':>8} {'registers':>10} "
             f"{'smem B':>7} {'spill B':>7}"]
    for (arch, kernel, block, warps), rows in groups.items():
        regs = sorted(r["registers"] for r in rows)
        shared = max(r["shared_bytes"] for r in rows)
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in rows)
        span = f"{regs[0]}" if regs[0] == regs[-1] else f"{regs[0]}-{regs[-1]}"
        lines.append(f"sm_{arch:<3} {kernel:<24} {block:>7} {warps:>5} {len(rows):>8} {span:>10} {shared:>7} "
                     f"{spills:>7}")
    return "\n".join(lines)


def per_entry(r: dict) -> dict:
    """Instructions and special-function ops per vocabulary entry over the loops that read the logits.
    `sfu` counts the SFU instructions (ex2, lg2, rcp, ... `.approx`); `sfu_equivalents` adds a divide
    (`div` in the PTX: a reciprocal and its refinement) and each software transcendental of the TTGIR
    (libdevice's logf and the like, a polynomial on the FMA pipes standing in for one SFU op)."""
    entries_per_thread = r["BLOCK_V"] / (32 * r["num_warps"])
    sweeps = [loop for loop in r["loops"] if loop["loads_global"]]
    sfu: dict = {}
    for loop in sweeps:
        for op, count in loop["sfu"].items():
            sfu[op] = sfu.get(op, 0) + count
    by_op = {op: count / entries_per_thread for op, count in sorted(sfu.items())}
    div = sum(loop["div"] for loop in sweeps) / entries_per_thread
    software = dict(sorted(r.get("software_transcendentals", {}).items()))
    return {"sweeps": len(sweeps), "entries_per_thread": entries_per_thread,
            "instructions": sum(loop["instructions"] for loop in sweeps) / entries_per_thread,
            "sfu": sum(by_op.values()), "by_op": by_op, "div": div, "software": software,
            "sfu_equivalents": sum(by_op.values()) + div + sum(software.values())}


def headline_results(results: list, arch: int = HEADLINE["arch"], dtypes: tuple = HEADLINE["dtypes"]) -> dict:
    """kernel -> {flags key: result} at the largest launch configuration, `dtypes` logits, aligned,
    HAS_LABELS and ALPHA_PER_ROW off (they change only code outside the loops)."""
    ok = [r for r in results if "error" not in r and r["arch"] == arch and r["case"]["aligned"]
          and (r["case"]["student"], r["case"]["teacher"]) == tuple(dtypes)]
    if not ok:
        return {}
    block = max(r["BLOCK_V"] for r in ok)
    chosen: dict = {}
    for r in ok:
        if r["BLOCK_V"] == block and not r["flags"].get("HAS_LABELS") and not r["flags"].get("ALPHA_PER_ROW"):
            key = tuple(sorted((k, v) for k, v in r["flags"].items() if k in ("REVERSE", "DETACH", "HAS_TAIL")))
            chosen.setdefault(r["kernel"], {})[key] = r
    return chosen


def instruction_table(results: list, arch: int = HEADLINE["arch"], dtypes: tuple = HEADLINE["dtypes"]) -> str:
    chosen = headline_results(results, arch, dtypes)
    name = "bf16" if dtypes == ("bfloat16", "bfloat16") else "/".join(dtypes)
    if not chosen:
        return f"(no sm_{arch} {name} results)"
    any_result = next(iter(next(iter(chosen.values())).values()))
    lines = [f"sm_{arch} PTX, BLOCK_V={any_result['BLOCK_V']}, num_warps={any_result['num_warps']} "
             f"({any_result['BLOCK_V'] // (32 * any_result['num_warps'])} entries per thread per iteration), "
             f"{name} logits, per vocabulary entry (static count of the loops that read the logits):",
             f"{'kernel':<30} {'flags':<19} {'sweeps':>6} {'instr/entry':>11} {'SFU':>5} {'SFU eq':>6}  SFU ops"]
    for kernel, by_flags in chosen.items():
        if kernel in SPARSE_KERNELS:
            continue  # `sparse_table`
        for key, r in sorted(by_flags.items()):
            lines.append(_kernel_row(kernel, key, r))
    lines.append("")
    lines.append(f"{'op':<14} {'fwd instr':>9} {'fwd SFU':>7} {'fwd+bwd instr':>13} {'fwd+bwd SFU':>11} "
                 f"{'HBM units':>9} {'fused instr':>11} {'fused SFU':>9} {'fused HBM':>9}")
    for op, sums in op_sums(chosen).items():
        fused = (f"{sums['fused_instructions']:>11.1f} {sums['fused_sfu']:>9.2f} "
                 f"{sums['fused_traffic']:>4g} ({sums['fused_traffic'] + sums['fused_l2_reads']:g})  "
                 f"L2 fit for V <= {sums['fused_l2_max_vocab']}"
                 if "fused_instructions" in sums else "")
        lines.append(f"{op:<14} {sums['fwd_instructions']:>9.1f} {sums['fwd_sfu']:>7.2f} "
                     f"{sums['fwd_bwd_instructions']:>13.1f} {sums['fwd_bwd_sfu']:>11.2f} {sums['fwd_bwd_traffic']:>9g} "
                     f"{fused}")
    lines.append("(fwd = statistics + loss kernels; fwd+bwd adds the backward kernel; fused = "
                 "_skew_forward_and_grad_kernel, the scalar reductions' fwd+bwd in one kernel. SFU = special-function "
                 "ops and their software equivalents per entry. HBM units: the model's traffic in units of one "
                 "[N, V] input; fused: when the rows in flight fit L2 (on an H200, by the kernel's registers: up to the V "
                 "shown), else the value in brackets)")
    gaps = budget_gaps(chosen)
    lines.append(f"budget (docs/design.md section 7), fwd+bwd per entry: at most {BUDGET['instructions']} instructions, "
                 f"{BUDGET['sfu']} SFU ops, {BUDGET['traffic']} HBM units: "
                 + ("met" if not gaps else "NOT met: " + "; ".join(gaps)))
    return "\n".join(lines)


def _kernel_row(kernel: str, key: tuple, r: dict) -> str:
    e = per_entry(r)
    flags = ",".join(f"{k}={int(v)}" for k, v in key) or "-"
    return (f"{kernel:<30} {flags:<19} {e['sweeps']:>6} {e['instructions']:>11.1f} {e['sfu']:>5.2f} "
            f"{e['sfu_equivalents']:>6.2f}  {_sfu_ops(e)}")


def _sfu_ops(e: dict) -> str:
    return " ".join(f"{op} {count:g}" for op, count in e["by_op"].items()) + (
        f" div {e['div']:g}" if e["div"] else "") + "".join(
        f" {op} {count:g} (software)" for op, count in e["software"].items())


def sparse_budget(kernel: str, flags: dict) -> dict:
    """SFU op -> the most per entry for a sparse-teacher sweep (`SPARSE_KERNELS`) with `flags` (docs/design.md
    section 7.1): the log-sum-exp 1 ex2; the gradient 1 ex2 without a tail, at most 1 ex2 + 1 lg2 + 1 rcp with
    one; the tail sums (no budget set) their count by design, SKL ex2 + lg2 + rcp, SRKL one more ex2 (for q).
    No divide and no software transcendental in any of them."""
    if kernel == "_student_logsumexp_kernel":
        return {"ex2": 1}
    if kernel == "_student_grad_kernel":
        return {"ex2": 1, "lg2": 1, "rcp": 1} if flags.get("HAS_TAIL") else {"ex2": 1}
    if kernel == "_tail_sums_kernel":
        return {"ex2": 2 if flags.get("REVERSE") else 1, "lg2": 1, "rcp": 1}
    raise UnknownArgument(f"{kernel}: no SFU budget in benchmarks/aot_compile.py (sparse_budget)")


def sparse_budget_gaps(chosen: dict) -> list:
    """What each sparse sweep's per-entry SFU ops miss of `sparse_budget` (divides and software ops count)."""
    gaps = []
    for kernel in SPARSE_KERNELS:
        for key, r in sorted(chosen.get(kernel, {}).items()):
            e = per_entry(r)
            budget = sparse_budget(kernel, dict(key))
            over = [f"{op} {count:g} > {budget.get(op, 0)}" for op, count in e["by_op"].items()
                    if count > budget.get(op, 0) + 1e-9]
            if e["div"] or e["software"]:
                over.append(f"divides / software ops {e['sfu_equivalents'] - e['sfu']:g}")
            if over:
                flags = ",".join(f"{k}={int(v)}" for k, v in key) or "-"
                gaps.append(f"{kernel} {flags}: " + ", ".join(over))
    return gaps


def sparse_table(results: list, arch: int = HEADLINE["arch"], dtypes: tuple = HEADLINE["dtypes"]) -> str:
    """The sparse-teacher sweeps per vocabulary entry (as `instruction_table`), each with its SFU budget."""
    chosen = headline_results(results, arch, dtypes)
    name = "bf16" if dtypes == ("bfloat16", "bfloat16") else "/".join(dtypes)
    found = [(kernel, key, r) for kernel in SPARSE_KERNELS for key, r in sorted(chosen.get(kernel, {}).items())]
    if not found:
        return f"(no sm_{arch} {name} sparse-teacher results)"
    r0 = found[0][2]
    lines = [f"sparse-teacher sweeps, sm_{arch} PTX, BLOCK_V={r0['BLOCK_V']}, num_warps={r0['num_warps']}, {name} "
             f"student logits, per vocabulary entry:",
             f"{'kernel':<30} {'flags':<19} {'sweeps':>6} {'instr/entry':>11} {'SFU':>5} {'SFU eq':>6}  SFU ops"
             f"  | budget"]
    for kernel, key, r in found:
        budget = " ".join(f"{op} {count}" for op, count in sparse_budget(kernel, dict(key)).items())
        lines.append(f"{_kernel_row(kernel, key, r)}  | {budget}")
    gaps = sparse_budget_gaps(chosen)
    lines.append("sparse SFU budget (docs/design.md section 7.1): " + ("met" if not gaps else "NOT met: " + "; ".join(gaps)))
    return "\n".join(lines)


def op_sums(chosen: dict) -> dict:
    """op -> per-entry instructions, SFU ops (with software equivalents) and the model's HBM units of fwd
    (statistics + loss), fwd+bwd (+ backward) and, where compiled, the fused kernel."""
    sums = OrderedDict()
    for op, flags in OPS.items():
        key = tuple(sorted(flags.items()))
        parts = {"statistics": _pick(chosen, "_row_statistics_kernel", ()),
                 "loss": _pick(chosen, "_skew_loss_kernel", key),
                 "backward": _pick(chosen, "_skew_backward_kernel", key)}
        if any(p is None for p in parts.values()):
            continue
        e = {name: per_entry(r) for name, r in parts.items()}
        fwd_i = e["statistics"]["instructions"] + e["loss"]["instructions"]
        fwd_s = e["statistics"]["sfu_equivalents"] + e["loss"]["sfu_equivalents"]
        traffic = sum(sum(TRAFFIC[r["kernel"]]) for r in parts.values())
        sums[op] = {"fwd_instructions": fwd_i, "fwd_sfu": fwd_s,
                    "fwd_bwd_instructions": fwd_i + e["backward"]["instructions"],
                    "fwd_bwd_sfu": fwd_s + e["backward"]["sfu_equivalents"], "fwd_bwd_traffic": traffic}
        fused = _pick(chosen, "_skew_forward_and_grad_kernel", key)
        if fused is not None:
            f = per_entry(fused)
            read, written, l2 = TRAFFIC[fused["kernel"]]
            sums[op].update(fused_instructions=f["instructions"], fused_sfu=f["sfu_equivalents"],
                            fused_traffic=read + written, fused_l2_reads=l2,
                            fused_l2_max_vocab=l2_max_vocab(fused))
    return sums


def l2_max_vocab(r: dict, machine: dict = H200) -> int:
    """The largest V at which the rows a kernel has in flight (programs per SM by its registers, one row each)
    fit `machine`'s L2, both logits rows of each (the model of docs/design.md section 7.1)."""
    import torch

    per_warp = -(-r["registers"] // 8) * 8 * 32  # registers are allocated 8 a thread (256 a warp) at a time
    programs = max(1, machine["registers_per_sm"] // (per_warp * r["num_warps"])) * machine["multiprocessors"]
    entry_bytes = sum(torch.empty((), dtype=getattr(torch, r["case"][role])).element_size()
                      for role in ("student", "teacher"))
    return int(machine["l2_bytes"] // (programs * entry_bytes))


def budget_gaps(chosen: dict) -> list:
    """What the best fwd+bwd of each op (three kernels or the fused one, by instructions) misses of BUDGET."""
    gaps = []
    for op, sums in op_sums(chosen).items():
        best_i = min(sums["fwd_bwd_instructions"], sums.get("fused_instructions", float("inf")))
        best_s = min(sums["fwd_bwd_sfu"], sums.get("fused_sfu", float("inf")))
        traffic = min(sums["fwd_bwd_traffic"], sums.get("fused_traffic", float("inf")))
        for what, value, limit in (("instructions", best_i, BUDGET["instructions"]), ("SFU ops", best_s, BUDGET["sfu"]),
                                   ("HBM units (rows in flight fitting L2)", traffic, BUDGET["traffic"])):
            if value > limit + 1e-9:
                gaps.append(f"{op} {what} {value:.2f} > {limit}")
        if traffic <= BUDGET["traffic"] < sums["fwd_bwd_traffic"] and "fused_l2_max_vocab" in sums:
            gaps.append(f"{op} HBM units {sums['fwd_bwd_traffic']:g} > {BUDGET['traffic']} for V above "
                        f"{sums['fused_l2_max_vocab']}")
    return gaps


def _pick(chosen: dict, kernel: str, key: tuple) -> Optional[dict]:
    by_flags = chosen.get(kernel, {})
    if key in by_flags:
        return by_flags[key]
    return by_flags.get((), None) if len(by_flags) == 1 else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=",".join(map(str, ARCHES)), help="compute capabilities, e.g. 80,90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    parser.add_argument("--all-dtype-pairs", action="store_true", help="all 9 (student, teacher) dtype pairs")
    parser.add_argument("--full", action="store_true",
                        help="the whole product of the matrix (about 10x the default covering set)")
    parser.add_argument("--max-vocab", type=int, default=MAX_VOCAB, help="launch configurations for V up to this")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                        help="results of earlier compiles, by kernel source hash and specialization (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="compile everything, read and write no cache")
    parser.add_argument("--json", type=Path, default=None, help="write every compile's result here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the kernels would be interpreter functions: compile in a child without the interpreter
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        args = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "benchmarks.aot_compile", *args], env=env)
    args = parse_args(argv)
    started = time.time()
    arches = tuple(int(a) for a in args.arch.split(","))
    try:
        tools = check_ptxas(arches)
    except RuntimeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    pairs = tuple(itertools.product(ALL_DTYPES, ALL_DTYPES)) if args.all_dtype_pairs else DTYPE_PAIRS
    try:
        specs = specializations(arches, pairs, args.max_vocab, args.full)
    except UnknownArgument as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print(f"# triton {_triton_version()}; ptxas " + "; ".join(tools))
    print(f"# {len(specs)} specializations ({len(kernels())} kernels, sm_{'/sm_'.join(map(str, arches))}, "
          f"{len(pairs)} dtype pairs), {args.jobs} processes", flush=True)
    with tempfile.TemporaryDirectory(prefix="distillm2_aot_triton_") as triton_cache:
        os.environ["TRITON_CACHE_DIR"] = triton_cache  # triton's artefacts go here (and away), not to ~/.triton
        results = run(specs, args.jobs, None if args.no_cache else args.cache_dir)
    elapsed = time.time() - started
    hits = sum(1 for r in results if r.get("cached"))
    print(register_table(results))
    print()
    for arch in arches:
        for dtypes in HEADLINE_DTYPES:
            print(instruction_table(results, arch, dtypes))
            print()
            print(sparse_table(results, arch, dtypes))
            print()
    bad = failures(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": _triton_version(), "elapsed_s": elapsed, "failures": bad,
                                         "results": results}, default=str))
    print(f"# {len(results)} specializations in {elapsed:.0f} s ({len(results) - hits} compiled, {hits} from the cache "
          f"{'(none)' if args.no_cache else args.cache_dir}), {len(bad)} failures")
    for line in bad[:50]:
        print("FAILED: " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
