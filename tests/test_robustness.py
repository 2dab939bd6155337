"""Nothing lost on a bad day: torn and non-UTF-8 files, full disks, damaged checkpoints, kills at the worst
moment, moved folders and over-long prompts, for `generate`, `pair`, `train` and the pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from distillm2_kernels.trainer import generation  # noqa: E402
from distillm2_kernels.trainer.generation import generate  # noqa: E402
from distillm2_kernels.trainer.jsonl import DataError, read_jsonl  # noqa: E402
from test_training import kill_after_checkpoint  # noqa: E402
from tiny_models import PROMPTS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

NON_ASCII_PROMPTS = ["Qu'est-ce qu'un été ?", "Wie heißt du?", "日本語で答えて", "¿Dónde está?", "Ça va ?",
                     "Ελληνικά;", "Ünïcödé", "ありがとう"]


def _rows(path):
    return [row for _, row in read_jsonl(path)]


class StandInEngine:
    """A deterministic engine: each response is a function of the prompt, its seed and its batch (as the
    transformers engine's samples are), so tests can tell which rows were drawn together."""

    name = "hf"

    def __init__(self, calls: list):
        self.calls = calls

    def generate(self, prompts, indices, *, temperature, top_p, max_new_tokens, seed):
        self.calls.append(list(indices))
        batch = ",".join(map(str, indices))
        return [(f"{prompt[::-1]} seed {seed} batch [{batch}]", "stop") for prompt in prompts]


@pytest.fixture
def stand_in_engine(monkeypatch):
    calls = []
    monkeypatch.setattr(generation, "_make_engine", lambda *args, **kwargs: StandInEngine(calls))
    return calls


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    return folder


# ---------------------------------------------------------------------------------------------------------
# 1. a partial file torn inside a multi-byte character
# ---------------------------------------------------------------------------------------------------------


def test_a_torn_tail_inside_a_multibyte_character_is_dropped(tmp_path):
    path = tmp_path / "rows.jsonl.partial"
    complete = "".join(json.dumps({"index": i, "prompt": p}, ensure_ascii=False) + "\n"
                       for i, p in enumerate(NON_ASCII_PROMPTS[:3]))
    torn = json.dumps({"index": 3, "prompt": "日本語"}, ensure_ascii=False).encode()
    cut = torn.index("本".encode()) + 1  # inside the 3-byte character
    path.write_bytes(complete.encode() + torn[:cut])
    assert [row["index"] for _, row in read_jsonl(path, allow_torn_tail=True)] == [0, 1, 2]
    with pytest.raises(DataError, match=r"rows\.jsonl\.partial:4: not valid UTF-8"):
        read_jsonl(path)


def test_generation_resumes_from_a_partial_file_torn_inside_a_multibyte_character(stand_in_engine, model_dir,
                                                                                   tmp_path):
    """A disk that filled in the middle of a row of non-ASCII text: the rerun drops the torn row and goes on."""
    options = dict(batch_size=2, progress=False)
    generate(model_dir, NON_ASCII_PROMPTS, tmp_path / "reference.jsonl", **options)
    output = tmp_path / "out.jsonl"
    partial = output.with_name(output.name + ".partial")
    lines = (tmp_path / "reference.jsonl").read_bytes().splitlines(keepends=True)
    torn = lines[4][: lines[4].index("Ça".encode()) + 1]  # the first byte of the two-byte "Ç"
    partial.write_bytes(b"".join(lines[:4]) + torn)
    result = generate(model_dir, NON_ASCII_PROMPTS, output, **options)
    assert (result.num_reused, result.num_generated) == (4, 4)
    assert _rows(output) == _rows(tmp_path / "reference.jsonl")


# ---------------------------------------------------------------------------------------------------------
# 4. errors that say what happened: input that is not UTF-8
# ---------------------------------------------------------------------------------------------------------


def test_input_that_is_not_utf8_is_one_line_naming_the_file_and_the_line(tiny_models, tmp_path, capsys):
    from distillm2_kernels.trainer.cli import main

    teacher, student = tiny_models("llama")
    capsys.readouterr()
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "d"}\n')
    text = tmp_path / "latin1.txt"
    text.write_bytes(b"first prompt\nun caf\xe9\n")
    commands = {
        "generate": (["--model", str(student), "--prompts", str(latin1), "--output", str(tmp_path / "g.jsonl")],
                     f"{latin1}:2: not valid UTF-8"),
        "pair": (["--teacher", str(latin1), "--student", str(latin1), "--output", str(tmp_path / "p.jsonl")],
                 f"{latin1}:2: not valid UTF-8"),
        "train": (["--teacher", str(teacher), "--student", str(student), "--data", str(latin1), "--output",
                   str(tmp_path / "run"), "--no-progress"], f"{latin1}:2: not valid UTF-8"),
    }
    for command, (argv, expected) in commands.items():
        assert main([command] + argv) == 2, command
        err = capsys.readouterr().err
        assert err.startswith(f"distillm2 {command}: error: {expected} (byte 0xe9 at byte 16 of the line)"), err
        assert err.count("\n") == 1, err
    assert main(["generate", "--model", str(student), "--prompts", str(text), "--output", str(tmp_path / "g")]) == 2
    assert f"{text}:2: not valid UTF-8 (byte 0xe9 at byte 7 of the line)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# 2. damaged checkpoints; durable checkpoints
# ---------------------------------------------------------------------------------------------------------


def _pairs_file(path: Path, count: int = 4) -> Path:
    from distillm2_kernels.trainer.pairing import pair_row

    rows = [pair_row(PROMPTS[i], f"teacher answer {i}", f"student {i}") for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_options(tiny_models, tmp_path, **extra) -> dict:
    teacher, student = tiny_models("llama")
    options = dict(teacher=str(teacher), student=str(student), data=str(_pairs_file(tmp_path / "pairs.jsonl")),
                   max_steps=3, batch_size=2, save_steps=1, lr=1e-3, lora_r=4, progress=False)
    return {**options, **extra}


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("size", [0, 100])
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_resumed(tiny_models, tmp_path, monkeypatch, capsys,
                                                                       size):
    """random_states_0.pkl of the newest checkpoint truncated (a disk that filled, a copy cut short): resuming
    from it would silently draw other dropout masks (accelerate logs the failure at info level only). The
    checkpoint is named as damaged, with the bad file, and the previous one is resumed: the run still ends with
    the uninterrupted run's weights."""
    import torch

    from distillm2_kernels.trainer.training import TrainConfig, train

    options = _train_options(tiny_models, tmp_path)
    train(TrainConfig(output=str(tmp_path / "whole"), **options))
    resumed = tmp_path / "resumed"
    kill_after_checkpoint(monkeypatch, TrainConfig(output=str(resumed), **options), step=2)
    bad = resumed / "checkpoint-2" / "random_states_0.pkl"
    bad.write_bytes(bad.read_bytes()[:size])
    capsys.readouterr()
    result = train(TrainConfig(output=str(resumed), resume=True, **options))
    err = capsys.readouterr().err
    assert f"checkpoint-2 is damaged ({bad} holds {size} bytes" in err and "resuming from checkpoint-1" in err
    assert (resumed / "checkpoint-2.damaged" / "random_states_0.pkl").is_file()
    assert result.global_step == 3 and (resumed / "checkpoint-2" / "trainer_state.json").is_file()
    expected, actual = _adapter(tmp_path / "whole"), _adapter(resumed)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_a_checkpoint_without_a_loadable_rng_state_is_refused_when_it_is_the_only_one(tiny_models, tmp_path,
                                                                                      monkeypatch):
    """A checkpoint written before the file list existed is still checked: its pickles must load."""
    from distillm2_kernels.trainer.training import TrainConfig, train

    options = _train_options(tiny_models, tmp_path)
    run = tmp_path / "run"
    kill_after_checkpoint(monkeypatch, TrainConfig(output=str(run), **options), step=1)
    (run / "checkpoint-1" / "checkpoint_files.json").unlink(missing_ok=True)  # as an older version wrote it
    bad = run / "checkpoint-1" / "random_states_0.pkl"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"every checkpoint is damaged \({bad} does not load"):
        train(TrainConfig(output=str(run), resume=True, **options))


def test_checkpoints_and_the_final_model_are_fsynced_before_they_are_renamed_into_place(tiny_models, tmp_path,
                                                                                      monkeypatch):
    import os

    from distillm2_kernels.trainer.training import TrainConfig, train

    synced, renamed = [], []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return real_fsync(descriptor)

    def rename(self, target):
        renamed.append((str(self), set(synced)))
        return real_rename(self, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    run = tmp_path / "run"
    train(TrainConfig(output=str(run), **_train_options(tiny_models, tmp_path, max_steps=1)))
    durable = dict(renamed)
    for temporary, final in ((run / ".checkpoint-1.tmp", run / "checkpoint-1"), (run / ".final.tmp", run / "final")):
        files = [p for p in final.rglob("*") if p.is_file()]
        assert files and str(temporary) in durable
        for path in files + [p for p in final.rglob("*") if p.is_dir()] + [final]:
            assert str(temporary / path.relative_to(final)).rstrip("/.") in {
                s.rstrip("/.") for s in durable[str(temporary)]
            }, path
    assert str(run) in synced  # the renames themselves made durable


# ---------------------------------------------------------------------------------------------------------
# 3. a resumed generation writes what the uninterrupted one would have
# ---------------------------------------------------------------------------------------------------------


def test_an_interruption_inside_a_batch_write_still_resumes_to_the_uninterrupted_samples(tiny_models, tmp_path):
    """A crash (or a full disk) in the middle of a batch's append keeps 6 of 8 rows: the resumed run samples
    the interrupted batch whole again, so every later row is the uninterrupted run's, not a new draw."""
    teacher, _ = tiny_models("llama")
    options = dict(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=3, batch_size=4, progress=False)
    reference = generate(teacher, PROMPTS, tmp_path / "reference.jsonl", **options).output_path
    output = tmp_path / "out.jsonl"
    lines = reference.read_bytes().splitlines(keepends=True)
    output.with_name(output.name + ".partial").write_bytes(b"".join(lines[:6]))  # rows 4, 5 of batch [4, 8)
    result = generate(teacher, PROMPTS, output, **options)
    assert (result.num_reused, result.num_generated) == (6, 2)
    assert _rows(output) == _rows(reference)


@pytest.mark.parametrize("changed", [dict(batch_size=2), dict(dtype="float16"), dict(engine="vllm")])
def test_resuming_with_a_setting_that_changes_the_samples_is_refused(stand_in_engine, model_dir, tmp_path,
                                                                     monkeypatch, changed):
    monkeypatch.setattr(generation, "vllm_installed", lambda: True)
    monkeypatch.setattr(generation, "gpu_available", lambda: True)
    options = dict(engine="hf", batch_size=4, progress=False)
    output = tmp_path / "out.jsonl"
    generate(model_dir, PROMPTS[:3], output, **options)
    name = next(iter(changed))
    with pytest.raises(ValueError, match=rf"'{name}': .* resume with the same settings"):
        generate(model_dir, PROMPTS, output, **{**options, **changed})


def test_the_vllm_batch_size_does_not_change_the_samples_and_may_change_on_resume(tiny_models, tmp_path,
                                                                                monkeypatch):
    """vLLM seeds every prompt on its own: its batch size is not a setting of the rows (on the strict stand-in,
    whose samples depend only on the prompt and its seed; real vLLM's may also depend on the batch, unless
    VLLM_BATCH_INVARIANT=1)."""
    import vllm_stand_in

    vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    model, _ = tiny_models("llama")
    options = dict(max_new_tokens=6, progress=False)
    generate(model, PROMPTS, tmp_path / "reference.jsonl", batch_size=3, **options)
    generate(model, PROMPTS[:4], tmp_path / "out.jsonl", batch_size=3, **options)
    result = generate(model, PROMPTS, tmp_path / "out.jsonl", batch_size=5, **options)
    assert (result.num_reused, result.num_generated) == (4, 4)
    assert _rows(tmp_path / "out.jsonl") == _rows(tmp_path / "reference.jsonl")
    assert _rows(tmp_path / "out.jsonl")[0]["generation"]["batch_size"] is None


# ---------------------------------------------------------------------------------------------------------
# 5. a model named by another path to the same folder
# ---------------------------------------------------------------------------------------------------------


def test_a_model_is_identified_by_its_resolved_path(stand_in_engine, tmp_path, monkeypatch):
    """The same model folder given as an absolute path, a relative one from another directory, or through a
    symbolic link: the rows of the interrupted run are reused, not refused as "other settings"."""
    model = tmp_path / "models" / "teacher"
    model.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    output = tmp_path / "out.jsonl"
    generate(model, PROMPTS[:4], output, batch_size=2, progress=False)
    monkeypatch.chdir(tmp_path / "models")
    result = generate("teacher", PROMPTS[:6], output, batch_size=2, progress=False)
    assert (result.num_reused, result.num_generated) == (4, 2)
    result = generate(tmp_path / "link" / "teacher", PROMPTS, output, batch_size=2, progress=False)
    assert (result.num_reused, result.num_generated) == (6, 2)
    assert {row["generation"]["model"] for row in _rows(output)} == {str(model.resolve())}


# ---------------------------------------------------------------------------------------------------------
# 8. over-long prompts
# ---------------------------------------------------------------------------------------------------------


def test_an_over_long_prompt_keeps_its_end_on_transformers_and_the_row_says_so(tiny_models, tmp_path):
    """The tiny model's context is 256 positions: with 4 new tokens a prompt's rendered conversation keeps its
    last 252 tokens (the template's 3 special tokens and the prompt's last 249 characters, one token each)."""
    teacher, _ = tiny_models("llama")
    long_prompt = "".join(f"{i} " for i in range(700))  # 2590 characters
    options = dict(temperature=0, max_new_tokens=4, progress=False)
    generate(teacher, [PROMPTS[0], long_prompt], tmp_path / "out.jsonl", **options)
    short, long = _rows(tmp_path / "out.jsonl")
    assert short["prompt_truncated"] is False and "prompt_tokens" not in short
    assert long["prompt"] == long_prompt and long["prompt_truncated"] is True
    assert long["prompt_tokens"] == len(long_prompt) + 3 and long["generation"]["max_prompt_tokens"] == 252
    generate(teacher, [PROMPTS[0], long_prompt[-249:]], tmp_path / "cut.jsonl", **options)
    assert long["response"] == _rows(tmp_path / "cut.jsonl")[1]["response"]
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        generate(teacher, PROMPTS, tmp_path / "x.jsonl", max_new_tokens=256, progress=False)


def test_an_over_long_prompt_keeps_its_end_on_vllm(tiny_models, tmp_path, monkeypatch):
    """On the strict stand-in (which refuses a prompt of max_model_len tokens or more, as vLLM does): the
    tiny model's context is 256, so with 56 new tokens the rendered conversation keeps its last 200 tokens."""
    import vllm_stand_in

    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    teacher, _ = tiny_models("llama")
    long_prompt = "x" * 1000 + "the end"
    generate(teacher, [long_prompt, PROMPTS[0]], tmp_path / "out.jsonl", max_new_tokens=56, progress=False)
    (call,) = vllm.CALLS
    assert call["conversations"] == [[{"role": "user", "content": long_prompt[-(200 - 3):]}],
                                     [{"role": "user", "content": PROMPTS[0]}]]
    assert len(call["prompt_token_ids"][0]) == 200
    rows = _rows(tmp_path / "out.jsonl")
    assert [r["prompt_truncated"] for r in rows] == [True, False] and rows[0]["prompt"] == long_prompt


# ---------------------------------------------------------------------------------------------------------
# 4. errors that say what happened: a full disk, an output that cannot be written
# ---------------------------------------------------------------------------------------------------------


def _torch_writer_on_a_full_disk(monkeypatch):
    """torch.save as it fails on a full disk: part of the file written, then torch's own message, which does
    not say why; and the file system left with no free space."""
    import shutil

    import torch

    from distillm2_kernels.trainer import checkpoint

    real_save, real_usage = torch.save, shutil.disk_usage

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, Path)) and "checkpoint-2" in str(f):
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 60)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4054")
        return real_save(obj, f, *args, **kwargs)

    def usage(path):
        total, used, free = real_usage(path)
        return type(real_usage(path))(total, total, 0)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)


def test_a_full_disk_during_a_checkpoint_says_no_space_left_on_device(tiny_models, tmp_path, monkeypatch, capsys):
    from distillm2_kernels.trainer.cli import main

    options = _train_options(tiny_models, tmp_path)
    _torch_writer_on_a_full_disk(monkeypatch)
    run = tmp_path / "run"
    argv = ["train", "--teacher", options["teacher"], "--student", options["student"], "--data", options["data"],
            "--output", str(run), "--max-steps", "3", "--batch-size", "2", "--save-steps", "1", "--lora-r", "4",
            "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"distillm2 train: error: [Errno 28] writing checkpoint {run / 'checkpoint-2'} failed: "
                          "No space left on device"), err
    assert "unexpected pos" in err  # torch's own message is kept
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]  # the partial one gone


def _mount_small_tmpfs(size: str):
    """A fresh folder outside pytest's tmp_path (which pytest moves and deletes) with a tmpfs of `size`
    mounted on it, or None where this machine does not allow mounting (not root)."""
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="distillm2-small-disk-"))
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode == 0:
        return folder
    folder.rmdir()
    return None


def test_a_really_full_tmpfs_during_a_checkpoint_says_no_space_left_on_device(tiny_models, tmp_path, monkeypatch):
    """The same on a real full file system, where this machine allows mounting one (root); the test above,
    with torch's writer patched, runs everywhere."""
    import subprocess

    from distillm2_kernels.trainer import training
    from distillm2_kernels.trainer.training import TrainConfig, train

    disk = _mount_small_tmpfs("16m")
    if disk is None:
        pytest.skip("cannot mount a tmpfs here; test_a_full_disk_during_a_checkpoint_... covers the message")
    try:
        options = _train_options(tiny_models, tmp_path)
        real_save = training.save_checkpoint

        def fill_then_save(accelerator, output, state, *args, **kwargs):
            if state.global_step == 2:  # leave 4 KiB: the checkpoint's first large file cannot be written
                import shutil

                free = shutil.disk_usage(disk).free
                with open(disk / "filler", "wb") as handle:
                    handle.write(b"\0" * (free - 4096))
            return real_save(accelerator, output, state, *args, **kwargs)

        monkeypatch.setattr(training, "save_checkpoint", fill_then_save)
        with pytest.raises(OSError, match=r"writing checkpoint .*checkpoint-2 failed: No space left on device"):
            train(TrainConfig(output=str(disk / "run"), **options))
        assert not (disk / "run" / ".checkpoint-2.tmp").exists()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)
        disk.rmdir()


@pytest.mark.parametrize("command", ["generate", "pair", "train", "pipeline"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_model_is_loaded(tiny_models, tmp_path,
                                                                                 monkeypatch, capsys, command):
    from distillm2_kernels.trainer import training
    from distillm2_kernels.trainer.cli import main

    teacher, student = tiny_models("llama")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(generation, "_make_engine", no_loading)
    monkeypatch.setattr(training, "load_student", no_loading)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    output = blocker / "out"
    argv = {
        "generate": ["--model", str(student), "--prompts", str(prompts), "--output", str(output / "g.jsonl"),
                     "--max-new-tokens", "8"],
        "pair": ["--teacher", str(responses), "--student", str(responses), "--output", str(output / "p.jsonl")],
        "train": ["--teacher", str(teacher), "--student", str(student), "--data", str(_pairs_file(tmp_path / "d.jsonl")),
                  "--output", str(output)],
        "pipeline": ["--prompts", str(prompts), "--teacher", str(teacher), "--student", str(student),
                     "--output", str(output), "--max-new-tokens", "8"],
    }[command]
    capsys.readouterr()
    assert main([command] + argv + (["--no-progress"] if command != "pair" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distillm2 {command}: error: ") and err.count("\n") == 1, err
    assert "cannot write there (a file is in the way" in err and str(output) in err


def test_a_read_only_output_folder_is_one_line_with_status_2(tmp_path, monkeypatch, capsys, stand_in_engine):
    """chmod where the tests do not run as root (root writes anywhere), a read-only tmpfs where they do."""
    import os
    import subprocess
    import tempfile

    from distillm2_kernels.trainer.cli import main

    model = tmp_path / "model"
    model.mkdir()
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        unmount = None
    else:
        folder = Path(tempfile.mkdtemp(prefix="distillm2-read-only-"))
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            folder.rmdir()
            pytest.skip("root, but cannot mount a read-only tmpfs here")
        unmount = folder
    try:
        for command, argv in (
            ("generate", ["--model", str(model), "--prompts", str(responses), "--output", str(folder / "g.jsonl")]),
            ("pair", ["--teacher", str(responses), "--student", str(responses), "--output", str(folder / "p.jsonl")]),
        ):
            assert main([command] + argv) == 2
            err = capsys.readouterr().err
            assert err == f"distillm2 {command}: error: output {folder / argv[-1].split('/')[-1]}: folder {folder}: " \
                          f"cannot write there ({os.strerror(30 if unmount else 13)})\n", err
        assert stand_in_engine == []
    finally:
        if unmount is not None:
            subprocess.run(["umount", "--lazy", str(unmount)], check=True)
            unmount.rmdir()


def test_a_full_disk_while_generating_names_the_file_and_the_rerun_resumes(stand_in_engine, model_dir, tmp_path,
                                                                           monkeypatch, capsys):
    """The partial file's writes fail as on a full disk after 3 rows and a half: one line naming the file,
    status 1; the rerun (space freed) drops the torn row and writes the uninterrupted run's rows."""
    import errno

    from distillm2_kernels.trainer import jsonl
    from distillm2_kernels.trainer.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(NON_ASCII_PROMPTS) + "\n")
    argv = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--generation-batch-size", "2",
            "--no-progress"]
    assert main(argv + ["--output", str(tmp_path / "reference.jsonl")]) == 0
    real_open = open
    budget = len(b"".join((tmp_path / "reference.jsonl").read_bytes().splitlines(keepends=True)[:3])) + 7

    class FullDisk:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, text):
            data = text.encode()
            room = budget - self.written
            if len(data) > room:  # a short write, then the error (as write(2) on a file system that fills)
                self.handle.flush()
                self.handle.buffer.write(data[:max(room, 0)])
                self.handle.buffer.flush()
                self.written = budget
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.handle.write(text)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    import os

    monkeypatch.setattr(jsonl, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    output = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(argv + ["--output", str(output)]) == 1
    assert capsys.readouterr().err == (f"distillm2 generate: error: [Errno 28] writing {output}.partial: "
                                       "No space left on device\n")
    monkeypatch.undo()
    monkeypatch.setattr(generation, "_make_engine", lambda *args, **kwargs: StandInEngine([]))
    assert main(argv + ["--output", str(output)]) == 0, capsys.readouterr().err
    assert _rows(output) == _rows(tmp_path / "reference.jsonl")


# ---------------------------------------------------------------------------------------------------------
# 6. final/ replaced atomically
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("killed_at", [".final.tmp", "final"])
def test_a_kill_while_final_is_replaced_never_loses_the_model(tiny_models, tmp_path, monkeypatch, killed_at):
    """A finished run saves final/ again when rerun. Killed at either rename of that swap, a complete model
    is left (final/ itself, or .final.old, which the next run of train or the pipeline puts back)."""
    from transformers import AutoModelForCausalLM

    from distillm2_kernels.trainer.training import TrainConfig, read_final_state, train

    options = _train_options(tiny_models, tmp_path, max_steps=1)
    run = tmp_path / "run"
    train(TrainConfig(output=str(run), **options))
    real_rename = Path.rename

    def rename(self, target):
        if self.name == killed_at:
            raise KeyboardInterrupt("killed between the renames")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    real_rmtree = __import__("shutil").rmtree

    def rmtree(path, *args, **kwargs):  # the old code's deletion of final/ before the rename
        real_rmtree(path, *args, **kwargs)
        if Path(path) == run / "final" and killed_at == ".final.tmp":
            raise KeyboardInterrupt("killed after deleting final/")

    monkeypatch.setattr("shutil.rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(output=str(run), resume=True, **options))
    monkeypatch.undo()
    saved = run / "final" if (run / "final").is_dir() else run / ".final.old"
    assert read_final_state(saved) == {"global_step": 1, "epochs_completed": 0, "total_steps": 1}
    AutoModelForCausalLM.from_pretrained(saved)
    train(TrainConfig(output=str(run), resume=True, **options))  # the next run puts it back and goes on
    assert read_final_state(run / "final")["global_step"] == 1 and not (run / ".final.old").exists()


# ---------------------------------------------------------------------------------------------------------
# 7. temporary files left by a kill before a rename
# ---------------------------------------------------------------------------------------------------------

KILLED_BEFORE_RENAME = """
import os, signal, sys
from pathlib import Path
real_replace, real_rename = os.replace, Path.rename
def replace(source, target):
    if str(target).endswith(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(source, target)
def rename(self, target):
    if str(target).endswith(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(self, target)
os.replace, Path.rename = replace, rename
from distillm2_kernels.trainer.cli import main
main(sys.argv[2:])
"""


def _killed_before_rename(tmp_path, target_suffix: str, argv: list) -> None:
    import os
    import signal
    import subprocess

    script = tmp_path / "killed.py"
    script.write_text(KILLED_BEFORE_RENAME)
    repository = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(repository), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.run([sys.executable, str(script), target_suffix] + argv, env=env, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith(".tmp"))


def test_temporary_files_left_by_a_kill_before_the_rename_are_removed_by_the_next_run(tiny_models, tmp_path):
    from distillm2_kernels.trainer.cli import main

    teacher, student = tiny_models("llama")
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"prompt": p, "response": p[::-1]}) + "\n" for p in PROMPTS))
    pair_argv = ["pair", "--teacher", str(responses), "--student", str(responses), "--output",
                 str(tmp_path / "out" / "pairs.jsonl")]
    _killed_before_rename(tmp_path, "pairs.jsonl", pair_argv)
    assert [name.startswith(".pairs.jsonl.") for name in _temporaries(tmp_path / "out")] == [True]
    assert main(pair_argv) == 0
    assert _temporaries(tmp_path / "out") == [] and len(_rows(tmp_path / "out" / "pairs.jsonl")) == len(PROMPTS)

    run = tmp_path / "run"
    train_argv = ["train", "--teacher", str(teacher), "--student", str(student), "--data",
                  str(tmp_path / "out" / "pairs.jsonl"), "--output", str(run), "--max-steps", "2", "--batch-size",
                  "4", "--lora-r", "4", "--save-steps", "1", "--no-progress"]
    _killed_before_rename(tmp_path, "checkpoint-2", train_argv)
    assert _temporaries(run) == [".checkpoint-2.tmp"]
    _killed_before_rename(tmp_path, "final", train_argv + ["--resume"])
    assert _temporaries(run) == [".final.tmp"]  # the stale checkpoint was removed by the second run
    assert main(train_argv + ["--resume"]) == 0
    assert _temporaries(run) == [] and (run / "final" / "config.json").is_file()


def test_a_pipeline_folder_moved_with_its_model_inside_still_resumes(stand_in_engine, tmp_path):
    """The pipeline's student after epoch e-1 lies in pipe/train/final and its responses in
    pipe/epoch-e/student.jsonl: moved together, the rows are still this model's (same path relative to the
    output, same config.json); another model at that place is not. (The config names an architecture that
    transformers does not know, so that no context length applies: the stand-in engine has no tokenizer.)"""
    import shutil

    pipe = tmp_path / "old" / "pipe"
    model = pipe / "train" / "final"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "stand-in", "hidden_size": 64}))
    output = pipe / "epoch-1" / "student.jsonl"
    generate(model, PROMPTS[:4], output, max_new_tokens=8, batch_size=2, progress=False)
    moved = tmp_path / "new" / "pipe"
    moved.parent.mkdir()
    shutil.move(pipe, moved)
    result = generate(moved / "train" / "final", PROMPTS, moved / "epoch-1" / "student.jsonl", max_new_tokens=8,
                      batch_size=2, progress=False)
    assert (result.num_reused, result.num_generated) == (4, 4)
    (moved / "train" / "final" / "config.json").write_text(json.dumps({"model_type": "stand-in", "hidden_size": 96}))
    shutil.move(moved, pipe)
    with pytest.raises(ValueError, match="resume with the same settings"):
        generate(model, PROMPTS, output, max_new_tokens=8, batch_size=2, progress=False)


def test_the_pipeline_resumes_a_torn_partial_file_from_another_directory(tiny_models, tmp_path, monkeypatch):
    """Items 1 and 5 through the pipeline: its teacher responses interrupted by a full disk inside a multi-byte
    character (written with absolute model paths), the command rerun from another directory with relative
    ones: it goes on, and the teacher's rows are the uninterrupted run's."""
    import os

    from distillm2_kernels.trainer.cli import main
    from distillm2_kernels.trainer.training import read_final_state

    teacher, student = tiny_models("llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(NON_ASCII_PROMPTS[:4]) + "\n")
    reference = generate(teacher, prompts, tmp_path / "reference.jsonl", max_new_tokens=6, seed=42,
                         progress=False).output_path
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    lines = reference.read_bytes().splitlines(keepends=True)
    cut = lines[2].index("日".encode()) + 2
    (pipe / "teacher.jsonl.partial").write_bytes(b"".join(lines[:2]) + lines[2][:cut])
    monkeypatch.chdir(tmp_path)
    argv = ["pipeline", "--prompts", "prompts.txt", "--teacher", os.path.relpath(teacher),
            "--student", os.path.relpath(student), "--output", "pipe", "--epochs", "1", "--max-new-tokens", "6",
            "--batch-size", "2", "--lora-r", "4", "--no-progress"]
    assert main(argv) == 0

    def located_elsewhere(rows):  # the model's path relative to each output differs
        return [{**row, "generation": {k: v for k, v in row["generation"].items() if k != "model_relative"}}
                for row in rows]

    assert located_elsewhere(_rows(pipe / "teacher.jsonl")) == located_elsewhere(_rows(reference))
    assert read_final_state(pipe / "train" / "final")["epochs_completed"] == 1


def test_a_metrics_row_torn_by_a_crash_is_dropped_on_resume(tmp_path):
    """Rows 1-12 logged, checkpoint 11, killed while writing row 13 ("1" of it written): the torn row must not
    come back as a second step 1."""
    from distillm2_kernels.trainer.metrics_log import COLUMNS, MetricsLog, read_metrics

    path = tmp_path / "metrics.csv"
    rows = [",".join([str(step), "0"] + ["0.5"] * (len(COLUMNS) - 2)) for step in range(1, 13)]
    path.write_text(",".join(COLUMNS) + "\n" + "\n".join(rows) + "\n1")
    MetricsLog(path, resume_step=11).close()
    assert [row["step"] for row in read_metrics(path)] == [str(step) for step in range(1, 12)]
