"""Smoke test of `python -m benchmarks.sparse_teacher` at tiny sizes: its CSV and markdown, its synthetic pairs
hit their calibration targets, and a top-k teacher with k = V is the dense teacher (relative error 0, cosine 1)
while a small k is not; and the README quotes the committed results."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from benchmarks import sparse_teacher
from distillm2_kernels import reference

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 48
IMPLS = ["reference"] + (["library"] if sparse_teacher.library_available() else [])


@pytest.mark.parametrize("impl", IMPLS)
def test_tiny_run_writes_csv_and_k_equal_to_v_is_the_dense_teacher(tmp_path, impl, capsys):
    code = sparse_teacher.main(["--V", str(VOCAB), "--N", "12", "--block", "5", "--k", f"4,{VOCAB}", "--T", "1,2",
                                "--impl", impl, "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == sparse_teacher.COLUMNS
        rows = list(reader)
    cases = {(r["loss"], float(r["temperature"]), r["tail"], int(r["k"])) for r in rows}
    assert cases == {(loss, t, tail, k) for loss in sparse_teacher.LOSSES for t in (1.0, 2.0)
                     for tail in sparse_teacher.TAILS for k in (4, VOCAB)}
    assert all(r["impl"] == impl and r["commit"] and r["date"] and int(r["N"]) == 12 for r in rows)
    for row in rows:
        assert float(row["teacher_entropy_mean"]) == pytest.approx(2.0, rel=0.01)  # calibrated on these rows
        assert float(row["kl_pq_mean"]) == pytest.approx(0.5, rel=0.01)
        if int(row["k"]) == VOCAB:  # the whole vocabulary: no tail, both modes are the dense teacher
            assert float(row["coverage_min"]) == pytest.approx(1.0, abs=1e-12)
            assert abs(float(row["loss_rel_err_of_mean"])) < 1e-9, row
            assert float(row["loss_rel_err_token_max"]) < 1e-9, row
            assert float(row["grad_cos_min"]) > 1 - 1e-9, row
            assert float(row["grad_rel_err_mean"]) < 1e-9, row
        else:  # 4 of 48 tokens leave a tail: the benchmark sees the difference
            assert float(row["coverage_mean"]) < 1.0
            assert float(row["loss_rel_err_token_mean"]) > 1e-3, row
            assert float(row["grad_cos_min"]) < 1.0, row
    markdown = (tmp_path / "results.md").read_text()
    assert "Command (from the repository root): `python -m benchmarks.sparse_teacher --V 48" in markdown
    assert f"| {VOCAB} | skl | 1 | renormalize | 4 |" in markdown
    assert "grad cos (min)" in capsys.readouterr().out


def test_top_k_tail_is_the_mass_left_out():
    teacher = torch.randn(3, VOCAB, dtype=torch.float64) * 3
    ids, logprobs, tail = sparse_teacher.top_k_teacher(teacher, 5)
    log_p = torch.log_softmax(teacher, dim=-1)
    assert torch.equal(logprobs, log_p.gather(-1, ids))
    assert torch.allclose(tail.exp(), 1 - logprobs.exp().sum(-1), rtol=1e-12)
    support = torch.zeros(3, VOCAB, dtype=torch.bool).scatter(-1, ids, True)
    renormalized = torch.log_softmax(reference.densify_sparse_teacher(ids, logprobs, VOCAB, "renormalize", tail), dim=-1)
    assert torch.allclose(renormalized.gather(-1, ids), logprobs - torch.logsumexp(logprobs, -1, keepdim=True))
    assert torch.all(renormalized[~support] == float("-inf"))
    uniform = reference.densify_sparse_teacher(ids, logprobs, VOCAB, "uniform", tail)
    assert torch.allclose(uniform.gather(-1, ids), logprobs)
    assert torch.allclose(uniform[~support].view(3, -1), (tail - torch.log(torch.tensor(VOCAB - 5.0))).unsqueeze(-1))


def test_readme_quotes_the_committed_results():
    """The README's sparse-teacher table is the committed run's (benchmarks/results/sparse_teacher/results.md)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Sparse teachers: how much k is enough", 1)[1].split("\n#", 1)[0]
    lines = section.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| V | k |"))
    quoted = []  # the k table (the section's later tables quote other results files)
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        quoted.append(line)
    committed = (sparse_teacher.DEFAULT_OUT / "results.md").read_text(encoding="utf-8").splitlines()
    assert len(quoted) > 2 and not [line for line in quoted if line not in committed]
    assert "benchmarks/results/sparse_teacher/results.md" in section


@pytest.mark.slow
def test_experiment_with_a_cached_teacher_runs_at_toy_sizes(tmp_path):
    """`python -m benchmarks.sparse_teacher_experiment --quick`: the dense-teacher arm and one cache arm per
    tail, each trained the same number of steps."""
    from benchmarks import sparse_teacher_experiment

    out = tmp_path / "out"
    assert sparse_teacher_experiment.main(["--quick", "--no-progress", "--k", "2", "--work", str(tmp_path / "work"),
                                           "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["arm"] for r in rows] == ["dense teacher", "cache K=2 renormalize", "cache K=2 uniform"]
    assert len({r["steps"] for r in rows}) == 1 and int(rows[0]["steps"]) > 0
    for row in rows:
        for metric in sparse_teacher_experiment.METRICS:
            assert row[metric] != "" and float(row[metric]) == float(row[metric])  # set, not NaN
    assert "| cache K=2 uniform |" in (out / "results.md").read_text()
