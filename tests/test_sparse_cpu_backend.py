"""The C++ sparse-teacher sweeps (`backends/cpu_sparse.py`, csrc/sparse_teacher_kernel.h) against their spec,
`backends/torch_sparse.py` run in float64 on the same inputs upcast, by the tolerance rule of docs/design.md §6
(`oracle.assert_matches_oracle`): the error may be no worse than torch_sparse's own in float32 on the same inputs,
plus ALLOWANCE_ULPS · eps32 · (1 + max|z/T|) · scale, and at most 2 · eps(output dtype) · scale plus that allowance.
Scales: lse, log(V + 1) + 1 (an absolute error in log space); the tail sums, max|sum| + log(V + 1) (the loss
scale); the gradient, max over entries of |row_scale| · (|q·g| + q·|row_shift|), the size of its two terms.

Also: the exact zeros (ignored rows, −inf logits, α = 1), a NaN or +inf row (NaN in that row only), thread-count
determinism, every instruction-set build (ATEN_CPU_CAPABILITY=avx512 / avx2 / default, which also picks the
extension's kernels), and the routing of float64 rows. The session fixture in conftest.py fills every
`torch.empty` with NaN, so an output element the kernels forget to write fails.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from distillm2_kernels.backends import cpu_backend, cpu_sparse, sparse_backend_module, torch_sparse
from oracle import assert_matches_oracle, logit_magnitude

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason() is not None,
    reason=f"the C++ CPU backend is unavailable: {cpu_backend.unavailable_reason()}",
)

ROOT = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100
OPS = {"skl": (False, False), "srkl": (True, False), "srkl_detach": (True, True)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_VOCABS = [1, 17, 1000, 32003]


def make_student(layout: str, rows: int, vocab: int, dtype: torch.dtype, *, scale: float = 3.0, seed: int = 0):
    """Student logits of `rows` rows read in place: "2d" [N, V] contiguous, "2d_strided" [N, V] rows of a wider
    [N, V + 5] tensor, "3d_strided" [B, T, V] = [B, T + 1, V][:, :-1] (rows must then be even)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "2d":
        return (torch.randn(rows, vocab, generator=gen) * scale).to(dtype)
    if layout == "2d_strided":
        return (torch.randn(rows, vocab + 5, generator=gen) * scale).to(dtype)[:, :vocab]
    assert layout == "3d_strided" and rows % 2 == 0
    full = (torch.randn(2, rows // 2 + 1, vocab, generator=gen) * scale).to(dtype)
    return full[:, :-1]


def row_inputs(n: int, vocab: int, *, seed: int = 0, alphas=(0.0, 0.3, 1.0)) -> dict:
    """Per-row inputs: α cycling through `alphas`, a uniform tail log c = log(τ / V) with τ ∈ [0.05, 0.95] (−inf,
    no tail mass, in row 4 where α = 0.3), row scales in [0.5, 1.5], shifts N(0, 1), row 2 ignored."""
    gen = torch.Generator().manual_seed(seed + 1)
    alpha = torch.tensor([alphas[i % len(alphas)] for i in range(n)], dtype=torch.float32)
    log_tail = (torch.rand(n, generator=gen) * 0.9 + 0.05).log() - math.log(vocab)
    if n > 4:
        log_tail[4] = -math.inf
    labels = torch.arange(n) % max(vocab, 1)
    if n > 2:
        labels[2] = IGNORE_INDEX
    return dict(labels=labels, alpha_rows=alpha, log_tail=log_tail,
                row_scale=torch.rand(n, generator=gen) + 0.5, row_shift=torch.randn(n, generator=gen))


def flat_rows(student: torch.Tensor) -> torch.Tensor:
    return student.reshape(-1, student.shape[-1])


def run_sweeps(module, student, inputs, inv_temperature, lse=None, ops=tuple(OPS)) -> dict:
    """Every sweep of `module` on these inputs: "lse" (module's own), then per op the tail sums and the gradient
    without and with the tail, all from `lse` (the cpu lse when None is given and module is cpu_sparse)."""
    args = (inputs["labels"], IGNORE_INDEX, inv_temperature)
    results = {"lse": module.student_logsumexp(student, *args)}
    lse = results["lse"] if lse is None else lse
    for op in ops:
        reverse, detach = OPS[op]
        tail = (inputs["log_tail"], inputs["alpha_rows"], reverse, detach)
        results[op, "sums"] = module.tail_sums(student, *args, lse, *tail)
        for with_tail in (False, True):
            log_tail = inputs["log_tail"] if with_tail else None
            results[op, "grad", with_tail] = module.student_grad(
                student, *args, lse, inputs["row_scale"], inputs["row_shift"], log_tail, inputs["alpha_rows"],
                reverse, detach)
    return results


def upcast(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def check_against_spec(results: dict, student, inputs, inv_temperature, *, what=""):
    """Holds cpu results (from run_sweeps(cpu_sparse, ...)) to the tolerance rule against torch_sparse in float64
    (the oracle) and in float32 (the baseline) on the same inputs, the cpu lse given to both."""
    lse = results["lse"]
    ops = sorted({key[0] for key in results if isinstance(key, tuple)})
    spec64 = run_sweeps(torch_sparse, student.double(), upcast(inputs), inv_temperature, lse.double(), ops)
    spec32 = run_sweeps(torch_sparse, student, inputs, inv_temperature, lse, ops)
    vocab = student.shape[-1]
    magnitude = logit_magnitude(student, temperature=1.0 / inv_temperature)
    kept = inputs["labels"] != IGNORE_INDEX
    assert_matches_oracle(lse, spec64["lse"], spec32["lse"], out_dtype=torch.float32, magnitude=magnitude,
                          scale=math.log(vocab + 1) + 1, what=f"{what} lse")
    assert torch.equal(lse[~kept], torch.zeros_like(lse[~kept])), f"{what}: an ignored row's lse is not 0"
    for op in ops:
        sums64 = spec64[op, "sums"]
        finite = sums64[torch.isfinite(sums64)]
        scale = (finite.abs().max().item() if finite.numel() else 0.0) + math.log(vocab + 1)
        assert_matches_oracle(results[op, "sums"], sums64, spec32[op, "sums"], out_dtype=torch.float32,
                              magnitude=magnitude, scale=scale, what=f"{what} {op} sums")
        assert torch.equal(results[op, "sums"][~kept], torch.zeros(int((~kept).sum()), 2)), f"{what} {op}"
        for with_tail in (False, True):
            grad = results[op, "grad", with_tail]
            assert grad.dtype == student.dtype and grad.is_contiguous() and grad.shape == (kept.numel(), vocab)
            scale = gradient_scale(student, inputs, inv_temperature, lse, op, with_tail)
            assert_matches_oracle(grad, spec64[op, "grad", with_tail], spec32[op, "grad", with_tail],
                                  out_dtype=student.dtype, magnitude=magnitude, scale=scale,
                                  what=f"{what} {op} grad tail={with_tail}")
            assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept])), f"{what} {op}: an ignored row"


def gradient_scale(student, inputs, inv_temperature, lse, op, with_tail) -> float:
    """max over entries of |row_scale| · (|q·g| + q·|row_shift|), from the float64 spec itself: the gradient with
    row_shift = 0 is row_scale·q·g, the one without a tail and row_shift = −1 is row_scale·q."""
    reverse, detach = OPS[op]
    inputs64 = upcast(inputs)
    args = (student.double(), inputs64["labels"], IGNORE_INDEX, inv_temperature, lse.double(), inputs64["row_scale"])
    zeros, ones = torch.zeros_like(inputs64["row_shift"]), torch.ones_like(inputs64["row_shift"])
    log_tail = inputs64["log_tail"] if with_tail else None
    qg = torch_sparse.student_grad(*args, zeros, log_tail, inputs64["alpha_rows"], reverse, detach)
    q = torch_sparse.student_grad(*args, -ones, None, inputs64["alpha_rows"], reverse, detach)
    terms = qg.abs() + q.abs() * inputs64["row_shift"].abs().unsqueeze(-1)
    terms = terms[torch.isfinite(terms)]
    return terms.max().item() if terms.numel() else 0.0


def check(student, inputs, inv_temperature=1.0, what=""):
    results = run_sweeps(cpu_sparse, student, inputs, inv_temperature)
    check_against_spec(results, student, inputs, inv_temperature, what=what)
    return results


# --- against the spec -------------------------------------------------------------------------------------


def test_outputs_are_poisoned_in_this_session():
    """What makes an unwritten output element fail here (the session fixture of conftest.py)."""
    assert torch.empty(4).isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", ODD_VOCABS)
@pytest.mark.parametrize("layout", ["2d", "2d_strided", "3d_strided"])
def test_matches_spec(layout, vocab, dtype):
    rows = 6 if vocab > 1000 else 10
    student = make_student(layout, rows, vocab, dtype, seed=vocab)
    check(student, row_inputs(rows, vocab, seed=vocab), what=f"{layout} V={vocab} {dtype}")


@pytest.mark.parametrize("temperature", [0.7, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_temperature(temperature, dtype):
    student = make_student("3d_strided", 8, 1031, dtype, seed=3)
    check(student, row_inputs(8, 1031, seed=3), 1.0 / temperature, what=f"T={temperature} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_and_extreme_logits(dtype):
    """−inf entries (a zero q: exact zeros; SKL at α = 0 gives +inf, as the spec), ±1e4 logits (most q underflow,
    in float64 too), a row of −inf but one entry. SKL's rows with ±1e4 logits take α ∈ {0.3, 1}: at α = 0 the
    spec's linear mixture underflows in float64 and gives +inf where the loss is finite (see
    test_skl_underflowing_q_keeps_log_space_accuracy)."""
    vocab, rows = 1500, 9
    student = make_student("2d", rows, vocab, torch.float32, seed=7)
    student[0, 100:400] = -math.inf
    student[1, :] = -math.inf
    student[1, 1234] = 2.0
    student[3, 5] = 1e4 if dtype != torch.float16 else 6e4
    student[5, 7:] = -1e4
    student[6, ::3] = 1e4
    student[7, 1000:1300] = -math.inf
    student = student.to(dtype)
    inputs = row_inputs(rows, vocab, seed=7)
    results = run_sweeps(cpu_sparse, student, inputs, 1.0, ops=("srkl", "srkl_detach"))
    check_against_spec(results, student, inputs, 1.0, what=f"extreme srkl {dtype}")
    skl_inputs = row_inputs(rows, vocab, seed=7, alphas=(0.3, 1.0))
    results = run_sweeps(cpu_sparse, student, skl_inputs, 1.0, ops=("skl",))
    check_against_spec(results, student, skl_inputs, 1.0, what=f"extreme skl {dtype}")
    masked = make_student("2d", rows, vocab, torch.float32, seed=8)
    masked[:, 200:260] = -math.inf
    results = run_sweeps(cpu_sparse, masked.to(dtype), inputs, 1.0, ops=("skl",))
    check_against_spec(results, masked.to(dtype), inputs, 1.0, what=f"masked skl {dtype}")
    assert torch.isinf(results["skl", "sums"][0, 0]) and results["skl", "sums"][0, 0] > 0, "SKL α = 0, q = 0"


def test_skl_underflowing_q_keeps_log_space_accuracy():
    """At α = 0 a student q far below float32's (and float64's) range still gives SKL's finite
    f = c·(log c − log q) and q·g = −c: the mixture is formed in log space from log q. Against the same formulas
    in float64 from log q (logaddexp), where the spec's linear mixture would give +inf."""
    vocab = 777
    student = make_student("2d", 4, vocab, torch.float32, seed=9)
    student[:, 10:300] = -900.0
    alpha = torch.tensor([0.0, 1e-30, 0.3, 0.0])
    log_tail = torch.full((4,), math.log(0.2 / vocab))
    lse = cpu_sparse.student_logsumexp(student, None, IGNORE_INDEX, 1.0)
    sums = cpu_sparse.tail_sums(student, None, IGNORE_INDEX, 1.0, lse, log_tail, alpha, False, False)
    log_q = student.double() - lse.double().unsqueeze(-1)
    a, log_c = alpha.double().unsqueeze(-1), log_tail.double().unsqueeze(-1)
    log_m = torch.logaddexp(a.log() + log_c, torch.log1p(-a) + log_q)
    f = (log_c.exp() * (log_c - log_m)).sum(-1)
    qg = -(log_c.exp() * torch.exp(torch.log1p(-a) + log_q - log_m)).sum(-1)
    expected = torch.stack([f, qg], -1)
    magnitude = 900.0
    scale = expected.abs().max().item() + math.log(vocab + 1)
    assert_matches_oracle(sums, expected, expected.float(), out_dtype=torch.float32, magnitude=magnitude, scale=scale,
                          what="underflowing q")
    grad = cpu_sparse.student_grad(student, None, IGNORE_INDEX, 1.0, lse, torch.ones(4), torch.zeros(4), log_tail,
                                   alpha, False, False)
    assert torch.allclose(grad[0, 10:300].double(), -log_c[0].exp().expand(290), rtol=1e-5, atol=0)


@given(
    rows=st.integers(1, 9),
    vocab=st.one_of(st.integers(1, 70), st.sampled_from([255, 1023, 1025, 2049])),
    layout=st.sampled_from(["2d", "2d_strided", "3d_strided"]),
    dtype=st.sampled_from(DTYPES),
    temperature=st.sampled_from([0.5, 1.0, 1.7]),
    scale=st.sampled_from([0.1, 3.0, 20.0]),
    seed=st.integers(0, 2**16),
)
def test_shapes_property(rows, vocab, layout, dtype, temperature, scale, seed):
    if layout == "3d_strided":
        rows = 2 * max(1, rows // 2)
    student = make_student(layout, rows, vocab, dtype, scale=scale, seed=seed)
    check(student, row_inputs(rows, vocab, seed=seed), 1.0 / temperature,
          what=f"{layout} N={rows} V={vocab} {dtype} T={temperature}")


# --- exact values -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_zeros(dtype):
    """α = 1: SKL's sums are exactly 0 and its gradient with the tail is the one without, bit for bit; SRKL's
    Σ f is exactly 0, non-detached Σ q·g too, and its gradient is the one without a tail (detached: g = 1, the
    one without a tail and row_shift − 1). −inf logits: exactly 0 in every gradient, even with an infinite shift.
    Ignored rows: 0 everywhere, whatever the row holds (here NaN)."""
    vocab, rows = 1029, 6
    student = make_student("2d", rows, vocab, torch.float32, seed=11)
    student[:, 50:90] = -math.inf
    student[2, 7] = math.nan
    student = student.to(dtype)
    inputs = row_inputs(rows, vocab, seed=11, alphas=(1.0,))
    labels, alpha, log_tail = inputs["labels"], inputs["alpha_rows"], inputs["log_tail"]
    scale, shift = inputs["row_scale"], inputs["row_shift"]
    args = (student, labels, IGNORE_INDEX, 1.0)
    lse = cpu_sparse.student_logsumexp(*args)
    assert lse[2] == 0 and torch.isfinite(lse).all()
    for op, (reverse, detach) in OPS.items():
        sums = cpu_sparse.tail_sums(*args, lse, log_tail, alpha, reverse, detach)
        assert torch.equal(sums[:, 0], torch.zeros(rows)), op
        if not detach:
            assert torch.equal(sums[:, 1], torch.zeros(rows)), op
        with_tail = cpu_sparse.student_grad(*args, lse, scale, shift, log_tail, alpha, reverse, detach)
        no_tail_shift = shift - 1.0 if detach else shift
        without = cpu_sparse.student_grad(*args, lse, scale, no_tail_shift, None, alpha, reverse, detach)
        assert torch.equal(with_tail, without), op
        assert torch.equal(with_tail[2], torch.zeros(vocab, dtype=dtype)), op
        assert torch.equal(with_tail[:, 50:90], torch.zeros(rows, 40, dtype=dtype)), op
    infinite_shift = torch.full((rows,), math.inf)
    inputs_03 = row_inputs(rows, vocab, seed=11, alphas=(0.3, 0.0))
    for op, (reverse, detach) in OPS.items():
        for log_tail in (None, inputs_03["log_tail"]):
            grad = cpu_sparse.student_grad(*args, lse, scale, infinite_shift, log_tail, inputs_03["alpha_rows"],
                                           reverse, detach)
            assert torch.equal(grad[:, 50:90], torch.zeros(rows, 40, dtype=dtype)), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_non_finite_row_is_nan_in_that_row_only(poison, dtype):
    """A NaN or +inf logit (first entry, second block, or the scalar tail of V = 1500) makes its row's lse, sums
    and whole gradient row NaN; the other rows are bit for bit those of the same inputs without it; an ignored
    poisoned row is 0."""
    vocab, rows = 1500, 8
    finite = make_student("2d", rows, vocab, torch.float32, seed=12)
    poisoned = finite.clone()
    spots = {0: 0, 3: 1100, 5: vocab - 3, 2: 9}  # row 2 is ignored
    for row, column in spots.items():
        poisoned[row, column] = poison
    inputs = row_inputs(rows, vocab, seed=12)
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[[0, 3, 5]] = True
    clean = ~bad & (inputs["labels"] != IGNORE_INDEX)
    got = run_sweeps(cpu_sparse, poisoned.to(dtype), inputs, 1.0)
    # The poisoned rows' lse is NaN; the finite run is given the same lse so that the clean rows compare exactly.
    expected = run_sweeps(cpu_sparse, finite.to(dtype), inputs, 1.0, lse=got["lse"].nan_to_num(0.0))
    assert got["lse"][bad].isnan().all() and got["lse"][2] == 0
    assert torch.equal(got["lse"][clean], expected["lse"][clean])
    for key, value in got.items():
        if key == "lse":
            continue
        assert value[bad].isnan().all(), f"{key}: a poisoned row is not all NaN"
        assert torch.equal(value[2], torch.zeros_like(value[2])), f"{key}: the ignored row"
        assert torch.equal(value[clean], expected[key][clean]), f"{key}: a finite row changed"


def test_thread_counts_give_identical_results():
    student = make_student("3d_strided", 16, 4099, torch.bfloat16, seed=13)
    inputs = row_inputs(16, 4099, seed=13)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_sweeps(cpu_sparse, student, inputs, 0.8)
        torch.set_num_threads(max(2, threads))
        many = run_sweeps(cpu_sparse, student, inputs, 0.8)
    finally:
        torch.set_num_threads(threads)
    for key in one:
        assert torch.equal(one[key], many[key]), key


def test_float64_rows_route_to_the_torch_sweeps():
    assert sparse_backend_module("cpu", torch.float64) is torch_sparse
    assert sparse_backend_module("cpu", torch.float32) is cpu_sparse
    assert cpu_sparse.unavailable_reason is cpu_backend.unavailable_reason
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cpu_sparse.student_logsumexp(torch.zeros(2, 3, dtype=torch.float64), None, IGNORE_INDEX, 1.0)


# --- every instruction-set build --------------------------------------------------------------------------

ISA_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    import test_sparse_cpu_backend as t
    from distillm2_kernels.backends import cpu_backend, cpu_sparse
    inputs = torch.load(sys.argv[1])
    results = {"isa": cpu_backend.kernel_isa()}
    for name in ("finite", "poisoned"):
        results[name] = t.run_sweeps(cpu_sparse, inputs[name], inputs["rows"], 1 / 1.3)
    torch.save(results, sys.argv[2])
    """
)


@pytest.mark.parametrize("capability", ["DEFAULT", "AVX2", "AVX512"])
def test_every_instruction_set_build_matches_the_spec(capability, tmp_path):
    """ATEN_CPU_CAPABILITY forces each build of the kernels (the extension follows ATen's choice); AVX512 only
    where the CPU has it (elsewhere the case is skipped). V = 1500: whole vectors, a partial block and a scalar
    tail. The poisoned input has a NaN in row 0 and +inf in row 5."""
    vocab, rows = 1500, 8
    finite = make_student("3d_strided", rows, vocab, torch.bfloat16, seed=14)
    finite[1, 2, 40:90] = -math.inf
    poisoned = finite.clone()
    poisoned[0, 0, 3] = math.nan
    poisoned[1, 1, vocab - 2] = math.inf
    inputs = row_inputs(rows, vocab, seed=14)
    torch.save(dict(finite=finite, poisoned=poisoned, rows=inputs), tmp_path / "in.pt")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               ATEN_CPU_CAPABILITY=capability.lower())
    env.pop("TRITON_INTERPRET", None)
    subprocess.run([sys.executable, "-c", ISA_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt"),
                    str(ROOT / "tests")], env=env, check=True, timeout=300)
    results = torch.load(tmp_path / "out.pt")
    if results["isa"] != capability:
        pytest.skip(f"this CPU or build runs {results['isa']} when {capability} is requested")
    check_against_spec(results["finite"], finite, inputs, 1 / 1.3, what=capability)
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[[0, 5]] = True
    clean = ~bad & (inputs["labels"] != IGNORE_INDEX)
    for key, value in results["poisoned"].items():
        assert value[bad].isnan().all(), f"{capability} {key}: a poisoned row is not all NaN"
        assert not value[clean].isnan().any(), f"{capability} {key}: NaN outside the poisoned rows"


def test_the_rule_rejects_a_wrong_term():
    """The checks above can fail: the detached SRKL results offered as the non-detached ones (the α·q/r term
    missing from g), and the sums of a tail with a 1% larger c."""
    student = make_student("2d", 6, 1000, torch.float32, seed=15)
    inputs = row_inputs(6, 1000, seed=15, alphas=(0.3, 0.6))
    results = run_sweeps(cpu_sparse, student, inputs, 1.0, ops=("srkl", "srkl_detach"))
    swapped = {"lse": results["lse"], **{("srkl",) + key[1:]: value for key, value in results.items()
                                         if key[0] == "srkl_detach"}}
    with pytest.raises(AssertionError, match="srkl"):
        check_against_spec(swapped, student, inputs, 1.0)
    shifted = dict(inputs, log_tail=inputs["log_tail"] + math.log(1.01))
    wrong = run_sweeps(cpu_sparse, student, shifted, 1.0, ops=("skl",))
    with pytest.raises(AssertionError, match="skl sums"):
        check_against_spec(wrong, student, inputs, 1.0)
