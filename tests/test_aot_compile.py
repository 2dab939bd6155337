"""Every Triton kernel specialization the library launches compiles for sm_80 and sm_90 with no register
spills, without a GPU (benchmarks/aot_compile.py; about two minutes on two cores, seconds when its cache of
earlier results, keyed by the kernels' source hash, has them).

The compile runs in a child process: tests/conftest.py sets TRITON_INTERPRET=1 before the package is imported,
which makes the kernels interpreter functions in this process (and launch_config the interpreter's); the child
starts without TRITON_INTERPRET and imports the package afresh."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import aot_compile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """The run's exit code, output and JSON report."""
    out = tmp_path_factory.mktemp("aot") / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "benchmarks.aot_compile", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    report = json.loads(out.read_text()) if out.exists() else None
    return done, report, time.time() - started


@pytest.mark.slow
def test_every_kernel_specialization_compiles_for_sm80_and_sm90_without_spills(compiled, capsys):
    done, report, seconds = compiled
    with capsys.disabled():  # the registers and instructions tables, also with pytest -q
        print(f"\n{done.stdout}\n# benchmarks.aot_compile: {seconds:.0f} s")
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    assert report is not None and report["failures"] == []
    results = report["results"]
    assert all("error" not in r and r["spill_stores"] == 0 and r["spill_loads"] == 0 for r in results)
    # the matrix is what the module documents: every kernel, target, launch configuration and flag value
    from distillm2_kernels.backends import triton_backend, triton_sparse

    kernel_names = {name for module in (triton_backend, triton_sparse) for name in vars(module)
                    if name.endswith("_kernel")}
    sparse_names = {name for name in vars(triton_sparse) if name.endswith("_kernel")}
    assert set(aot_compile.SPARSE_KERNELS) == sparse_names
    assert {r["kernel"] for r in results} == kernel_names
    assert {r["arch"] for r in results} == set(aot_compile.ARCHES)
    blocks = {(b, w) for b, w in [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (32, 1), (64, 1), (128, 1), (256, 1),
                                   (512, 1), (1024, 2), (2048, 4), (4096, 8)]}
    for arch in aot_compile.ARCHES:
        for kernel in kernel_names:
            mine = [r for r in results if r["arch"] == arch and r["kernel"] == kernel]
            assert {(r["BLOCK_V"], r["num_warps"]) for r in mine} == blocks, (arch, kernel)
            if kernel in sparse_names:  # the student only: every student dtype once
                students = {student for student, _ in aot_compile.DTYPE_PAIRS}
                assert {(r["case"]["student"], r["case"]["teacher"]) for r in mine} == {(d, d) for d in students}
            else:
                assert {(r["case"]["student"], r["case"]["teacher"]) for r in mine} == set(aot_compile.DTYPE_PAIRS)
            assert {r["case"]["aligned"] for r in mine} == {True, False}
            flags = {name for r in mine for name in r["flags"]}
            for name in flags:
                assert {r["flags"][name] for r in mine} == {False, True}, (arch, kernel, name)
            assert all(r["registers"] > 0 for r in mine)
    # the per-entry counts come from real vocabulary loops
    for arch in aot_compile.ARCHES:
        for dtypes in aot_compile.HEADLINE_DTYPES:
            sums = aot_compile.op_sums(aot_compile.headline_results(results, arch, dtypes))
            assert list(sums) == list(aot_compile.OPS)
            for op in sums.values():
                assert op["fwd_bwd_instructions"] > op["fwd_instructions"] > 0 and op["fwd_bwd_sfu"] >= 2
                assert op["fused_instructions"] > op["fwd_instructions"]
    check_budget(results)
    check_sparse_budget(results)


def check_sparse_budget(results):
    """The sparse-teacher sweeps: one vocabulary loop each, every variant compiled, within `sparse_budget`
    (docs/design.md section 7.1: the log-sum-exp 1 ex2, the gradient 1 ex2 without a tail and at most
    1 ex2 + 1 lg2 + 1 rcp with one) at both targets, bf16 and fp32."""
    variants = {"_student_logsumexp_kernel": 1, "_tail_sums_kernel": 3, "_student_grad_kernel": 4}
    for arch in aot_compile.ARCHES:
        for dtypes in aot_compile.HEADLINE_DTYPES:
            chosen = aot_compile.headline_results(results, arch, dtypes)
            for kernel, count in variants.items():
                assert len(chosen[kernel]) == count, (arch, dtypes, kernel, sorted(chosen[kernel]))
                for r in chosen[kernel].values():
                    e = aot_compile.per_entry(r)
                    assert e["sweeps"] == 1 and e["by_op"].get("ex2", 0) >= 1 and e["instructions"] > 0
            assert aot_compile.sparse_budget_gaps(chosen) == [], (arch, dtypes)


# The fwd+bwd figures per vocabulary entry (sm_90, BLOCK_V = 4096, 8 warps) where the budget of docs/design.md
# section 7 is not met yet: they may not grow. Measured when written (the three kernels summed; the fused kernel
# within 1 instruction of it). Before the base-2 redesign: SKL 163.1 instructions and 11.1 SFU ops (software logf
# included) in bf16, SRKL 162.1 / 10.1, detached SRKL 148.0 / 8.1.
SFU_TODAY = {"SKL": 9.125, "SRKL": 10.125, "SRKL detached": 8.125}


def check_budget(results):
    """Instructions: the budget (met). SFU ops: no more than today's (the budget of 4 is not met: the gap is
    printed). HBM units by the model: the budget with the fused kernel while the rows in flight fit L2."""
    budget = aot_compile.BUDGET
    gaps = []
    for dtypes in aot_compile.HEADLINE_DTYPES:
        sums = aot_compile.op_sums(aot_compile.headline_results(results, 90, dtypes))
        for op, figures in sums.items():
            for kind in ("fwd_bwd", "fused"):
                assert figures[f"{kind}_instructions"] <= budget["instructions"], (dtypes, op, kind, figures)
                assert figures[f"{kind}_sfu"] <= SFU_TODAY[op] + 1e-6, (dtypes, op, kind, figures)
                if figures[f"{kind}_sfu"] > budget["sfu"]:
                    gaps.append(f"{dtypes[0]} {op} {kind}: {figures[f'{kind}_sfu']:.2f} SFU ops per entry, "
                                f"budget {budget['sfu']}")
            assert figures["fused_traffic"] <= budget["traffic"] < figures["fwd_bwd_traffic"]
    print("\n# budget gap (docs/design.md section 7), asserted not to grow:\n# " + "\n# ".join(gaps))


def test_an_unknown_argument_name_fails_loudly():
    case = {"V": 32000, "aligned": True, "grad_loss_stride": 1, "student": "bfloat16", "teacher": "float32"}
    for name in ("weights_ptr", "softcap", "row"):
        with pytest.raises(aot_compile.UnknownArgument, match=name):
            aot_compile.argument_value("_some_kernel", name, case)
    with pytest.raises(aot_compile.UnknownArgument, match="CHUNKED"):
        aot_compile._flag_combinations("_some_kernel", ["BLOCK_V", "REVERSE", "CHUNKED"], "loop")


def test_argument_rules_give_the_launchers_values():
    import torch

    case = {"V": 50257, "aligned": False, "grad_loss_stride": 0, "student": "bfloat16", "teacher": "float32"}
    value = aot_compile.argument_value
    assert value("k", "student_ptr", case).dtype == torch.bfloat16
    assert value("k", "teacher_ptr", case).dtype == torch.float32
    assert value("k", "grad_student_ptr", case).dtype == torch.bfloat16  # the gradient has the student's dtype
    assert value("k", "labels_ptr", case).dtype == torch.int64
    assert value("k", "stats_ptr", case).dtype == torch.float32
    for name in ("lse_ptr", "log_tail_ptr", "row_scale_ptr", "row_shift_ptr", "lse_out_ptr", "sums_ptr"):
        assert value("k", name, case).dtype == torch.float32  # the sparse sweeps' per-row values
    assert value("k", "log_tail_ptr", case).data_ptr() % 16 != 0 and value("k", "sums_ptr", case).data_ptr() == 0
    assert value("k", "student_ptr", case).data_ptr() % 16 != 0  # an input view at an unaligned address
    assert value("k", "grad_student_ptr", case).data_ptr() % 16 == 0  # outputs are fresh allocations
    assert value("k", "student_row_stride", case) == 50257 and value("k", "student_batch_stride", case) == 50257
    assert value("k", "grad_loss_stride", case) == 0 and value("k", "V", case) == 50257
    combos = aot_compile._flag_combinations("k", ["BLOCK_V", "REVERSE", "DETACH", "HAS_LABELS"], "loop")
    assert combos == [{"REVERSE": False, "DETACH": False}, {"REVERSE": True, "DETACH": False},
                      {"REVERSE": True, "DETACH": True}]
    combos = aot_compile._flag_combinations("k", ["BLOCK_V", "HAS_TAIL", "REVERSE", "DETACH"], "loop")
    assert combos == [{"HAS_TAIL": False, "REVERSE": False, "DETACH": False},  # no tail: g = 0, one variant
                      {"HAS_TAIL": True, "REVERSE": False, "DETACH": False},
                      {"HAS_TAIL": True, "REVERSE": True, "DETACH": False},
                      {"HAS_TAIL": True, "REVERSE": True, "DETACH": True}]
    with pytest.raises(aot_compile.UnknownArgument, match="sparse_budget"):
        aot_compile.sparse_budget("_some_kernel", {})


def test_a_missing_ptxas_is_an_error(monkeypatch):
    from triton.backends.nvidia import compiler

    def missing(*args):
        raise RuntimeError("Cannot find ptxas")

    monkeypatch.setattr(compiler, "get_ptxas", missing)
    with pytest.raises(RuntimeError, match="found no ptxas for sm_80"):
        aot_compile.check_ptxas()


PTX = """
// %bb.0:
	@%p1 bra 	$L__BB0_3;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	.loc	1 2 3
	@%p2 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ex2.approx.f32 	%r5, %r4;
	ex2.approx.ftz.f32 	%r6, %r3;
	@%p3 bra 	$L__BB0_5;
// %bb.4:                               // %slow
                                        //   in Loop: Header=BB0_2 Depth=1
	rcp.approx.f32 	%r7, %r6;
$L__BB0_5:                              // %join
                                        //   in Loop: Header=BB0_2 Depth=1
	lg2.approx.f32 	%r8, %r7;
	@%p4 bra 	$L__BB0_2;
$L__BB0_3:                              // %exit
	add.f32 	%r9, %r8, %r8;
$L__BB0_6:                              // =>This Inner Loop Header: Depth=1
	st.global.b32 	[ %rd2 + 0 ], %r9;
	@%p5 bra 	$L__BB0_6;
// %bb.7:                               // %end
	ret;
"""


TTGIR = """
    %a = math.log %alpha : f32 loc(#loc1)
    %c:2 = scf.for %start = %c0 to %V step %c4096 iter_args(%x = %cst) -> (tensor<4096xf32, #blocked>)  : i32 {
      %z = tt.load %ptrs, %mask : tensor<4096x!tt.ptr<bf16>, #blocked> loc(#loc2)
      %l = math.log %z : tensor<4096xf32, #blocked> loc(#loc3)
      %e = math.exp %l : tensor<4096xf32, #blocked> loc(#loc4)
      %w = scf.if %flag -> (tensor<4096xf32, #blocked>) {
        %m = math.log1p %e : tensor<4096xf32, #blocked> loc(#loc5)
        scf.yield %m : tensor<4096xf32, #blocked> loc(#loc6)
      } else {
        scf.yield %e : tensor<4096xf32, #blocked> loc(#loc7)
      } loc(#loc8)
      scf.yield %w : tensor<4096xf32, #blocked> loc(#loc9)
    } loc(#loc10)
    scf.for %start = %c0 to %V step %c4096  : i32 {
      %l2 = math.log %cst : tensor<4096xf32, #blocked> loc(#loc11)
      tt.store %out, %l2 : tensor<4096x!tt.ptr<f32>, #blocked> loc(#loc12)
    } loc(#loc13)
"""


def test_ttgir_software_transcendentals_counts_the_loops_that_load():
    # the scalar log before the loop and the loop that only stores are left out; math.exp is an SFU ex2
    assert aot_compile.ttgir_software_transcendentals(TTGIR) == {"math.log": 1, "math.log1p": 1}


def test_ptx_loops_counts_the_instructions_of_each_loop():
    loops = aot_compile.ptx_loops(PTX)
    assert [loop["header"] for loop in loops] == ["BB0_2", "BB0_6"]
    sweep, fill = loops
    assert sweep["instructions"] == 7 and sweep["loads_global"]
    assert sweep["sfu"] == {"ex2": 2, "rcp": 1, "lg2": 1}
    assert fill["instructions"] == 2 and not fill["loads_global"] and fill["sfu"] == {}
    result = {"BLOCK_V": 512, "num_warps": 4, "loops": loops}  # 4 entries per thread per iteration
    entry = aot_compile.per_entry(result)
    assert entry["sweeps"] == 1 and entry["instructions"] == 7 / 4 and entry["sfu"] == 1.0
    assert entry["sfu_equivalents"] == 1.0
    entry = aot_compile.per_entry(dict(result, software_transcendentals={"math.log": 1}))
    assert entry["sfu"] == 1.0 and entry["sfu_equivalents"] == 2.0


def test_l2_fit_of_the_rows_in_flight():
    # 78 registers -> 80 a thread, 20480 a program of 8 warps: 3 programs an SM, 396 rows on 132 SMs; bf16 rows:
    # 4 bytes an entry for the two, 50 MB / (396 x 4) entries
    r = {"registers": 78, "num_warps": 8, "case": {"student": "bfloat16", "teacher": "bfloat16"}}
    assert aot_compile.l2_max_vocab(r) == 31565
    assert aot_compile.l2_max_vocab(dict(r, case={"student": "float32", "teacher": "float32"})) == 31565 // 2
