"""Smoke test of `python -m benchmarks.teacher_cache_step` at tiny sizes: its CSV and markdown, both fused-linear
variants ran (timed and measured), and with a cache that holds the whole vocabulary (K = V − 1, plus the label)
the cache's step has the teacher model's loss."""

from __future__ import annotations

import csv

import pytest

from benchmarks import teacher_cache_step

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
TINY = ["--vocab", str(VOCAB), "--k", str(VOCAB - 1), "--tokens", "16", "--prompt", "4", "--teacher-layers", "1",
        "--teacher-hidden", "64", "--student-layers", "1", "--student-hidden", "64", "--steps", "2",
        "--variants", "teacher-fused-linear,cache-fused-linear"]


def test_tiny_run_writes_csv_and_a_whole_vocabulary_cache_gives_the_teachers_loss(tmp_path):
    assert teacher_cache_step.main(TINY + ["--out", str(tmp_path)]) == 0
    with open(tmp_path / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == teacher_cache_step.COLUMNS
        rows = {row["variant"]: row for row in reader}
    assert set(rows) == {"teacher-fused-linear", "cache-fused-linear"}
    for variant, row in rows.items():
        assert row["teacher_source"] == variant.split("-")[0] and row["objective"] == "fused-linear"
        assert int(row["V"]) == VOCAB and int(row["K"]) == VOCAB - 1 and int(row["steps"]) == 2
        assert row["commit"] and row["date"] and int(row["threads"]) == 1
        assert 0 < float(row["step_s_min"]) <= float(row["step_s_median"])
        assert float(row["peak_rss_mib"]) > 0 and float(row["step_rss_increase_mib"]) >= 0
    # the same student, batch and teacher; the cache holds every token, so only rounding (float32) differs
    assert float(rows["cache-fused-linear"]["loss"]) == pytest.approx(float(rows["teacher-fused-linear"]["loss"]),
                                                                      rel=1e-4)
    markdown = (tmp_path / "results.md").read_text()
    assert "Command (from the repository root): `python -m benchmarks.teacher_cache_step --vocab 64" in markdown
    assert "| cache-fused-linear |" in markdown and "| teacher-fused-linear |" in markdown
    assert "load average" in markdown


def test_unknown_variant_is_refused():
    with pytest.raises(SystemExit):
        teacher_cache_step.parse_args(["--variants", "teacher-dense"])
