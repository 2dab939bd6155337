"""`distillm2_kernels.trainer.pairing.pair`: the released data format, and rows missing on one side."""

from __future__ import annotations

import json

import pytest

from distillm2_kernels.trainer.jsonl import DataError, read_jsonl
from distillm2_kernels.trainer.pairing import pair


def _write(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _responses(path, pairs):
    return _write(path, [{"index": i, "prompt": p, "response": r} for i, (p, r) in enumerate(pairs)])


def test_pairs_join_on_the_prompt_in_the_released_format(tmp_path):
    teacher = _responses(tmp_path / "t.jsonl", [("a", "T-a"), ("b", "T-b"), ("c", "T-c")])
    student = _responses(tmp_path / "s.jsonl", [("c", "S-c"), ("a", "S-a"), ("b", "S-b")])
    report = pair(teacher, student, tmp_path / "pairs.jsonl")
    assert report.complete and report.num_pairs == 3
    rows = [row for _, row in read_jsonl(tmp_path / "pairs.jsonl")]
    assert rows[0] == {
        "prompt": "a",
        "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "T-a"}],
        "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "S-a"}],
    }
    assert [(r["prompt"], r["rejected"][1]["content"]) for r in rows] == [("a", "S-a"), ("b", "S-b"), ("c", "S-c")]


def test_written_files_have_the_permissions_of_any_new_file(tmp_path):
    """The atomic write goes through a temporary file; the result must not keep its private mode (0600)."""
    import os

    teacher = _responses(tmp_path / "t.jsonl", [("a", "T-a")])
    umask = os.umask(0o022)
    try:
        pair(teacher, teacher, tmp_path / "pairs.jsonl")
    finally:
        os.umask(umask)
    assert (tmp_path / "pairs.jsonl").stat().st_mode & 0o777 == 0o644


def test_rows_missing_on_either_side_are_reported_not_silently_dropped(tmp_path):
    teacher = _responses(tmp_path / "t.jsonl",
                         [("a", "T-a"), ("b", "T-b"), ("x", "T-x"), ("dup", "T-1"), ("dup", "T-2")])
    student = _responses(tmp_path / "s.jsonl", [("a", "S-a"), ("b", "S-b"), ("y", "S-y"), ("dup", "S-1")])
    report = pair(teacher, student, tmp_path / "pairs.jsonl")
    assert report.num_pairs == 3 and not report.complete
    assert report.missing_student == ["x", "dup"]  # the second "dup" has no student row left
    assert report.missing_teacher == ["y"]
    summary = report.summary()
    assert "2 prompt(s) have no student response" in summary and "1 prompt(s) have no teacher response" in summary
    rows = [row for _, row in read_jsonl(tmp_path / "pairs.jsonl")]
    assert [(r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"]) for r in rows] == [
        ("a", "T-a", "S-a"), ("b", "T-b", "S-b"), ("dup", "T-1", "S-1")
    ]
    with pytest.raises(ValueError, match="no student response") as error:
        pair(teacher, student, tmp_path / "strict.jsonl", strict=True)
    assert not (tmp_path / "strict.jsonl").exists()
    message = str(error.value)  # says that nothing was written, never "3 pairs written"
    assert "nothing written to" in message and "pairs written" not in message, message


def test_strict_pair_on_the_command_line_exits_2_and_says_nothing_was_written(tmp_path, capsys):
    from distillm2_kernels.trainer.cli import main

    teacher = _responses(tmp_path / "t.jsonl", [("a", "T-a"), ("x", "T-x")])
    student = _responses(tmp_path / "s.jsonl", [("a", "S-a")])
    output = tmp_path / "pairs.jsonl"
    assert main(["pair", "--teacher", str(teacher), "--student", str(student), "--output", str(output), "--strict"]) == 2
    err = capsys.readouterr().err
    assert not output.exists()
    assert err.startswith("distillm2 pair: error: not every prompt has both responses (strict): nothing written")
    assert "pairs written" not in err and "1 prompt(s) have no student response" in err


def test_a_malformed_line_is_reported_with_the_file_and_line_number(tmp_path):
    teacher = _responses(tmp_path / "t.jsonl", [("a", "T-a")])
    student = tmp_path / "s.jsonl"
    student.write_text('{"prompt": "a", "response": "S-a"}\n\n{"prompt": "b", "response": 3}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:3: expected string fields 'prompt' and 'response'"):
        pair(teacher, student, tmp_path / "pairs.jsonl")
    student.write_text('{"prompt": "a", "response": "S-a"}\n{"prompt": "b", "response": \n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: not valid JSON"):
        pair(teacher, student, tmp_path / "pairs.jsonl")
