"""`distillm2 score` and `train --teacher-cache`: the cached top-K + label and tail against the teacher's dense
log-probabilities, the batch layout, resuming an interrupted score, the refusals, the vLLM path on the strict
stand-in, and score → train end to end on CPU with no teacher model loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")
pytest.importorskip("safetensors")

from distillm2_kernels import fused_skl, fused_srkl  # noqa: E402
from distillm2_kernels.trainer import training  # noqa: E402
from distillm2_kernels.trainer.cli import main  # noqa: E402
from distillm2_kernels.trainer.data import collate_pairs, read_pairs, tokenize_pairs  # noqa: E402
from distillm2_kernels.trainer.jsonl import file_sha256  # noqa: E402
from distillm2_kernels.trainer.metrics_log import read_metrics  # noqa: E402
from distillm2_kernels.trainer.models import load_tokenizer  # noqa: E402
from distillm2_kernels.trainer.objectives import TrainingObjective  # noqa: E402
from distillm2_kernels.trainer.pairing import pair_row  # noqa: E402
from distillm2_kernels.trainer.scoring import score, sparse_rows  # noqa: E402
from distillm2_kernels.trainer.teacher_cache import (  # noqa: E402
    CacheMismatch,
    SparseTeacher,
    TeacherCache,
    label_positions,
)
from tiny_models import PROMPTS, save_tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER_RESPONSES = ["5", "Blue, like the sky.", "Hi!", "1 2 3 4", "c-a-t", "Yes."]
STUDENT_RESPONSES = ["4?", "red", "hello there", "one two", "kat", "No, it is warm and dry"]
K = 4
MAX_LENGTH = 48


def _write_pairs(path: Path, count: int = 6, change: int = -1) -> Path:
    rows = [pair_row(PROMPTS[i], TEACHER_RESPONSES[i] + ("!" if i == change else ""), STUDENT_RESPONSES[i])
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _score(teacher, pairs, cache, **options):
    defaults = dict(top_k=K, batch_size=2, max_length=MAX_LENGTH, pairs_per_shard=2, progress=False, engine="hf")
    return score(teacher, pairs, cache, **{**defaults, **options})


def _dense_teacher_logprobs(teacher_dir: Path, rows, vocab_size: int) -> list[torch.Tensor]:
    """The teacher's float64 log-probabilities `[T, V]` of each row, from its full logits (the oracle)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0, :, :vocab_size].double().log_softmax(-1) for ids, _ in rows]


@pytest.fixture(scope="module")
def scored(tiny_models, tmp_path_factory):
    teacher, student = tiny_models("llama")
    root = tmp_path_factory.mktemp("scored")
    pairs = _write_pairs(root / "pairs.jsonl")
    result = _score(teacher, pairs, root / "cache")
    return teacher, student, pairs, root / "cache", result


def test_sparse_rows_keep_the_label_and_compute_the_exact_tail():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 4
    labels = torch.randint(0, 50, (64,))
    labels[:8] = logits[:8].argmax(-1)  # labels among the top K
    ids, logprobs, tail = sparse_rows(logits, labels, K)
    dense = logits.double().log_softmax(-1)
    assert ids.shape == (64, K + 1) and (ids == labels[:, None]).any(-1).all()
    assert all(len(set(row)) == K + 1 for row in ids.tolist())
    top = dense.topk(K + 1, dim=-1).indices
    for r in range(64):
        in_top = labels[r] in top[r, :K]
        expected = top[r] if in_top else torch.cat([top[r, :K], labels[r:r + 1]])
        assert ids[r].tolist() == expected.tolist()
    torch.testing.assert_close(logprobs.double(), dense.gather(1, ids), rtol=0, atol=1e-5)
    off = dense.scatter(1, ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail.double(), off, rtol=1e-5, atol=1e-6)
    # a near-one-hot row: the tail is tiny and still exact (1 − Σ p would round to 0)
    peaked = torch.full((1, 50), -40.0)
    peaked[0, 3] = 40.0
    _, _, tiny_tail = sparse_rows(peaked, torch.tensor([3]), K)
    assert tiny_tail.item() == pytest.approx(-80.0 + torch.tensor(45.0).log().item(), abs=1e-4)


def test_the_cache_holds_the_teachers_top_k_the_label_and_the_tail_of_every_response_token(scored):
    teacher, _, pairs, cache_dir, result = scored
    assert (result.num_pairs, result.num_scored, result.num_reused, result.engine) == (6, 6, 0, "hf")
    cache = TeacherCache(cache_dir)
    tokenizer = load_tokenizer(teacher)
    tokenized = tokenize_pairs(read_pairs(pairs), tokenizer, max_length=MAX_LENGTH)
    rows = [(p.chosen_ids, p.chosen_labels) for p in tokenized] + [(p.rejected_ids, p.rejected_labels) for p in tokenized]
    dense = _dense_teacher_logprobs(teacher, rows, cache.vocab_size)
    assert result.tokens == sum(len(label_positions(labels)[1]) for _, labels in rows)
    for r, (ids, labels) in enumerate(rows):
        stored = cache.side(r % 6, r // 6)
        first, tokens = label_positions(labels)
        assert stored.position == first and stored.labels.tolist() == tokens
        oracle = dense[r][first - 1: first - 1 + len(tokens)]
        assert (stored.ids == stored.labels[:, None]).any(-1).all()  # the label is always stored
        top = oracle.topk(K, dim=-1).indices
        for row, best in zip(stored.ids.tolist(), top.tolist()):
            assert row[:K] == best
        torch.testing.assert_close(stored.logprobs.double(), oracle.gather(1, stored.ids), rtol=0, atol=2e-5)
        tail = oracle.scatter(1, stored.ids, float("-inf")).logsumexp(-1)
        torch.testing.assert_close(stored.tail_logprob.double(), tail, rtol=1e-4, atol=2e-5)


def test_chunking_over_positions_does_not_change_the_entries(scored, tmp_path):
    teacher, _, pairs, cache_dir, _ = scored
    _score(teacher, pairs, tmp_path / "small", memory_budget=1)  # one position per chunk
    small, default = TeacherCache(tmp_path / "small"), TeacherCache(cache_dir)
    for pair in range(6):
        a, b = small.side(pair, 1), default.side(pair, 1)
        assert torch.equal(a.ids, b.ids)
        # the matmul of one row and of many rounds alike up to a few float32 ulps
        ulps = 16 * torch.finfo(torch.float32).eps
        torch.testing.assert_close(a.logprobs, b.logprobs, rtol=ulps, atol=ulps)
        torch.testing.assert_close(a.tail_logprob, b.tail_logprob, rtol=ulps, atol=ulps)


def test_a_batch_gets_its_sparse_teacher_unshifted_like_the_hidden_states(scored):
    teacher, _, pairs, cache_dir, _ = scored
    cache = TeacherCache(cache_dir)
    tokenized = tokenize_pairs(read_pairs(pairs), load_tokenizer(teacher), max_length=MAX_LENGTH)
    indices = [4, 1, 3]
    batch = collate_pairs([tokenized[i] for i in indices], 0, with_rejected=True)
    sparse = cache.sparse_teacher(indices, batch)
    assert isinstance(sparse, SparseTeacher)
    rows, length = batch.input_ids.shape
    assert sparse.ids.shape == sparse.logprobs.shape == (rows, length, K + 1) and sparse.tail_logprob.shape == (rows, length)
    for r in range(rows):
        stored = cache.side(indices[r % 3], r // 3)
        predicting = (batch.labels[r, 1:] != -100).nonzero().flatten()  # hidden position j predicts label j+1
        assert torch.equal(sparse.ids[r, predicting], stored.ids)
        assert torch.equal(sparse.logprobs[r, predicting], stored.logprobs)
        assert torch.equal(sparse.tail_logprob[r, predicting], stored.tail_logprob)
        others = torch.ones(length, dtype=torch.bool)
        others[predicting] = False
        assert torch.equal(sparse.ids[r, others], torch.arange(K + 1).expand(int(others.sum()), K + 1))
        assert sparse.logprobs[r, others, 0].eq(0).all() and sparse.logprobs[r, others, 1:].eq(float("-inf")).all()
        assert sparse.tail_logprob[r, others].eq(float("-inf")).all()
    # rows whose tokens differ from the cached ones are refused
    batch.labels[0, :] = torch.where(batch.labels[0] != -100, (batch.labels[0] + 1) % 90, batch.labels[0])
    with pytest.raises(CacheMismatch, match="does not match the chosen side of pair 4"):
        cache.sparse_teacher(indices, batch)
    with pytest.raises(CacheMismatch, match="no chosen side of pair 9"):
        cache.side(9, 0)


def test_an_interrupted_score_resumes_to_the_uninterrupted_cache_byte_for_byte(scored, tmp_path):
    teacher, _, pairs, cache_dir, _ = scored
    interrupted = tmp_path / "interrupted"
    first = _score(teacher, pairs, interrupted, stop_after_shards=1)
    assert first.num_scored == 2
    with pytest.raises(ValueError, match="incomplete .2 of 6 pairs"):
        TeacherCache(interrupted)
    # killed after renaming shard 1 in but before listing it, and while writing shard 2
    shutil.copy(interrupted / "shard-00000.safetensors", interrupted / "shard-00001.safetensors")
    (interrupted / ".shard-00002.safetensors.abc.tmp").write_bytes(b"torn")
    second = _score(teacher, pairs, interrupted)
    assert (second.num_scored, second.num_reused) == (4, 2)
    files = sorted(p.name for p in cache_dir.iterdir())
    assert sorted(p.name for p in interrupted.iterdir()) == files
    for name in files:
        if name.endswith(".safetensors"):
            assert (interrupted / name).read_bytes() == (cache_dir / name).read_bytes(), name
    manifest = json.loads((interrupted / "manifest.json").read_text())
    assert manifest == json.loads((cache_dir / "manifest.json").read_text())
    from safetensors.torch import load_file

    sides = [tuple(row[:2]) for name in files if name.endswith(".safetensors")
             for row in load_file(str(interrupted / name))["rows"].tolist()]
    assert sorted(sides) == [(p, s) for p in range(6) for s in (0, 1)]  # every side once
    assert _score(teacher, pairs, interrupted).num_scored == 0  # complete: nothing to do


def test_a_cache_of_other_pairs_another_tokenizer_or_other_settings_is_refused(scored, tmp_path):
    teacher, student, pairs, cache_dir, _ = scored
    cache = TeacherCache(cache_dir)
    tokenizer = load_tokenizer(student)
    good = dict(pairs_sha256=file_sha256(pairs), tokenizer=tokenizer, max_length=MAX_LENGTH, num_pairs=6,
                need_rejected=True)
    cache.check(**good)
    other_pairs = _write_pairs(tmp_path / "other.jsonl", change=2)
    with pytest.raises(CacheMismatch, match="the pairs file"):
        cache.check(**{**good, "pairs_sha256": file_sha256(other_pairs)})
    with pytest.raises(CacheMismatch, match="max_length: cache 48, here 64"):
        cache.check(**{**good, "max_length": 64})
    other_tokenizer = load_tokenizer(student)
    other_tokenizer.add_tokens(["<extra>"])
    with pytest.raises(CacheMismatch, match="the tokenizer"):
        cache.check(**{**good, "tokenizer": other_tokenizer})
    templated = load_tokenizer(student)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(CacheMismatch, match="chat_template_sha256"):
        cache.check(**{**good, "tokenizer": templated})
    # resuming into the folder with another K, pairs file or length
    with pytest.raises(CacheMismatch, match="K"):
        _score(teacher, pairs, cache_dir, top_k=K + 1)
    with pytest.raises(CacheMismatch, match="the pairs file"):
        _score(teacher, other_pairs, cache_dir)
    with pytest.raises(CacheMismatch, match="max_length"):
        _score(teacher, pairs, cache_dir, max_length=40)
    chosen_only = tmp_path / "chosen"
    _score(teacher, pairs, chosen_only, with_rejected=False)
    with pytest.raises(CacheMismatch, match="chosen sides only"):
        TeacherCache(chosen_only).check(**good)
    TeacherCache(chosen_only).check(**{**good, "need_rejected": False})
    # and through the command line, on one line with exit status 2
    argv = ["train", "--teacher-cache", str(cache_dir), "--student", str(student), "--data", str(other_pairs),
            "--output", str(tmp_path / "run"), "--max-length", str(MAX_LENGTH), "--no-progress"]
    assert main(argv) == 2
    assert main(argv[:-3] + ["--data", str(pairs), "--max-length", "64", "--no-progress"]) == 2
    assert main(["train", "--teacher", str(teacher), "--teacher-cache", str(cache_dir), "--student", str(student),
                 "--data", str(pairs), "--output", str(tmp_path / "run")]) == 2
    assert main(["score", "--teacher", str(teacher), "--data", str(pairs), "--output", str(cache_dir),
                 "--top-k", "200", "--no-progress"]) == 2  # K + 1 > V


def test_the_vllm_path_maps_prompt_logprobs_to_the_same_entries(tiny_models, tmp_path, monkeypatch):
    import vllm_stand_in

    pairs = _write_pairs(tmp_path / "pairs.jsonl", 4)
    unpadded = save_tiny_model(tmp_path / "unpadded", "llama", 48, seed=3)
    _score(unpadded, pairs, tmp_path / "hf", engine="hf")
    stand_in = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    result = _score(unpadded, pairs, tmp_path / "vllm", engine="vllm")
    assert result.engine == "vllm"
    call = stand_in.CALLS[0]
    assert call["params"][0].prompt_logprobs == K + 1 and call["params"][0].max_tokens == 1
    hf, vl = TeacherCache(tmp_path / "hf"), TeacherCache(tmp_path / "vllm")
    for pair in range(4):
        for side in (0, 1):
            a, b = hf.side(pair, side), vl.side(pair, side)
            assert torch.equal(a.labels, b.labels) and a.position == b.position
            assert torch.equal(a.ids, b.ids)
            torch.testing.assert_close(b.logprobs, a.logprobs, rtol=0, atol=1e-5)
            # 1 − Σ p there, the exact tail here
            torch.testing.assert_close(b.tail_logprob, a.tail_logprob, rtol=0, atol=1e-4)
    # a teacher whose lm_head pads rows beyond the tokenizer: vLLM ranks them too; they are never stored
    padded, _ = tiny_models("llama")
    _score(padded, pairs, tmp_path / "padded", engine="vllm", top_k=8)
    cache = TeacherCache(tmp_path / "padded")
    for pair in range(4):
        stored = cache.side(pair, 1)
        assert stored.ids.max() < cache.vocab_size and (stored.ids == stored.labels[:, None]).any(-1).all()
        assert all(len(set(row)) == 9 for row in stored.ids.tolist())
    # K + 1 beyond an explicit max_logprobs is refused as vLLM refuses it
    with pytest.raises(ValueError, match="greater than max allowed: 4"):
        _score(unpadded, pairs, tmp_path / "refused", engine="vllm", engine_args={"max_logprobs": 4})


class DensifyingObjective(TrainingObjective):
    """A stand-in objective for the trainer path: the cached teacher densified (renormalize: log_softmax of
    its K+1 log-probabilities, −inf elsewhere) and the dense DistiLLM-2 loss on materialised student logits.
    Records every teacher it is given."""

    seen: list = []

    def __init__(self, *args, teacher_tail="renormalize", **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_tail = teacher_tail

    def __call__(self, student_hidden, teacher, labels, num_pairs, student_head, teacher_head):
        assert teacher_head is None and isinstance(teacher, SparseTeacher)
        DensifyingObjective.seen.append(teacher)
        vocab = student_head.weight.shape[0]
        dense = torch.full(teacher.ids.shape[:-1] + (vocab,), float("-inf")).scatter(-1, teacher.ids, teacher.logprobs)
        teacher_logits = dense.log_softmax(-1)[:, :-1]
        student_logits = (student_hidden @ student_head.weight.T)[:, :-1]
        labels = labels[:, 1:]
        t, s = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
        if self.loss == "distillm2":
            loss, metrics = self.curriculum(student_logits[t], teacher_logits[t], labels[t], student_logits[s],
                                            teacher_logits[s], labels[s])
            return loss, {"skl": metrics["skl"].mean(), "srkl": metrics["srkl"].mean()}
        config = self.curriculum.config
        half = s if self.loss == "srkl" else t
        op = fused_srkl if self.loss == "srkl" else fused_skl
        extra = {"detach_mixture": config.detach_mixture} if self.loss == "srkl" else {}
        loss = op(student_logits[half], teacher_logits[half], self.alpha, labels=labels[half],
                  ignore_index=config.ignore_index, temperature=config.temperature, reduction=config.reduction,
                  **extra)
        return loss, {}


def _no_teacher_model(monkeypatch):
    real = training.load_model

    def load_model(path, role, dtype):
        assert role != "teacher", "a teacher model was loaded"
        return real(path, role, dtype)

    monkeypatch.setattr(training, "load_model", load_model)


def test_score_then_train_with_the_teacher_cache_loads_no_teacher(scored, tmp_path, monkeypatch, capsys):
    teacher, student, pairs, _, _ = scored
    cache = tmp_path / "cache"
    assert main(["score", "--teacher", str(teacher), "--data", str(pairs), "--output", str(cache), "--top-k",
                 str(K), "--batch-size", "2", "--max-length", str(MAX_LENGTH), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 pairs in" in printed and "(6 scored now, 0 from an earlier run)" in printed and "tokens/s" in printed
    _no_teacher_model(monkeypatch)
    monkeypatch.setattr(training, "TrainingObjective", DensifyingObjective)
    DensifyingObjective.seen.clear()
    run = tmp_path / "run"
    assert main(["train", "--teacher-cache", str(cache), "--student", str(student), "--data", str(pairs), "--output",
                 str(run), "--batch-size", "2", "--max-steps", "2", "--lr", "1e-3", "--max-length", str(MAX_LENGTH),
                 "--no-progress"]) == 0
    rows = read_metrics(run / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2"] and all(float(r["loss"]) > 0 for r in rows)
    assert (run / "final" / "config.json").is_file()
    # the first batch's teacher is the teacher model's distribution at the positions that predict each label
    plan = training.BatchPlan(6, 2, 1, 1, 42)
    indices = plan.micro_batches(0, 0)[0]
    tokenized = tokenize_pairs(read_pairs(pairs), load_tokenizer(student), max_length=MAX_LENGTH)
    batch = collate_pairs([tokenized[i] for i in indices], 0, with_rejected=True)
    first = DensifyingObjective.seen[0]
    rows_ = [(tokenized[i].chosen_ids, None) for i in indices] + [(tokenized[i].rejected_ids, None) for i in indices]
    dense = _dense_teacher_logprobs(teacher, rows_, TeacherCache(cache).vocab_size)
    for r, oracle in enumerate(dense):
        predicting = (batch.labels[r, 1:] != -100).nonzero().flatten()
        ids = first.ids[r, predicting]
        assert (ids == batch.labels[r, predicting + 1][:, None]).any(-1).all()
        torch.testing.assert_close(first.logprobs[r, predicting].double(), oracle[predicting].gather(1, ids),
                                   rtol=0, atol=2e-5)


@pytest.mark.parametrize("tail", ["renormalize", "uniform"])
def test_train_with_the_teacher_cache_on_the_fused_objective(scored, tmp_path, monkeypatch, tail):
    _, student, pairs, cache, _ = scored
    _no_teacher_model(monkeypatch)
    run = tmp_path / "run"
    assert main(["train", "--teacher-cache", str(cache), "--student", str(student), "--data", str(pairs), "--output",
                 str(run), "--batch-size", "2", "--max-steps", "2", "--max-length", str(MAX_LENGTH),
                 "--teacher-tail", tail, "--no-progress"]) == 0
    rows = read_metrics(run / "metrics.csv")
    assert all(float(r["loss"]) > 0 and float(r["skl"]) > 0 and float(r["srkl"]) > 0 for r in rows)


def test_the_pipeline_scores_each_epoch_and_trains_on_the_cache(tiny_models, tmp_path, monkeypatch):
    from distillm2_kernels.trainer.pipeline import PipelineConfig, run_pipeline
    from tiny_models import write_prompts

    teacher, student = tiny_models("llama")
    _no_teacher_model(monkeypatch)
    out = tmp_path / "pipe"
    result = run_pipeline(PipelineConfig(
        prompts=str(write_prompts(tmp_path / "prompts.jsonl")), teacher=str(teacher), student=str(student),
        output=str(out), epochs=1, n=4, max_new_tokens=6, engine="hf", progress=False, score_top_k=K,
        train={"batch_size": 2, "max_length": MAX_LENGTH},
    ))
    assert result.epochs_completed == 1
    manifest = json.loads((out / "epoch-0" / "teacher-cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["top_k"] == K
    assert manifest["pairs_sha256"] == file_sha256(out / "epoch-0" / "pairs.jsonl")
    rows = read_metrics(out / "train" / "metrics.csv")
    assert len(rows) == 2 and all(float(r["skl"]) > 0 and float(r["srkl"]) > 0 for r in rows)


def test_the_pipeline_scores_in_a_subprocess_under_a_launcher_with_trains_settings(monkeypatch, tmp_path):
    from distillm2_kernels.trainer import pipeline
    from distillm2_kernels.trainer.cli import build_parser

    commands = []
    monkeypatch.setattr(pipeline, "_run", commands.append)
    config = pipeline.PipelineConfig(prompts="p.jsonl", teacher="T/", student="S/", output=str(tmp_path), engine="hf",
                                     launcher=["accelerate", "launch"], score_top_k=16, dtype="bfloat16",
                                     train={"batch_size": 3, "max_length": 512, "loss": "skl"}, progress=False)
    pipeline._score(config, Path("pairs.jsonl"), Path("cache"))
    (command,) = commands
    assert command[1:4] == ["-m", "distillm2_kernels.trainer", "score"]
    args = build_parser().parse_args(command[3:])
    assert (args.teacher, args.data, args.output, args.top_k, args.batch_size, args.max_length, args.chosen_only,
            args.engine, args.dtype, args.progress) == ("T/", "pairs.jsonl", "cache", 16, 3, 512, True, "hf",
                                                        "bfloat16", False)
    with pytest.raises(ValueError, match="teacher_tail applies to a teacher cache"):
        pipeline.PipelineConfig(prompts="p", teacher="T/", student="S/", output="o", train={"teacher_tail": "uniform"})
    with pytest.raises(ValueError, match="set by the pipeline"):
        pipeline.PipelineConfig(prompts="p", teacher="T/", student="S/", output="o", train={"teacher_cache": "c"})


@pytest.mark.parametrize("loss", ["distillm2", "skl", "srkl"])
def test_a_cached_step_equals_the_dense_objective_on_the_densified_cached_teacher(scored, loss):
    """The trainer's step on the cache (fused-linear sparse ops) against the dense objective on materialised
    logits with the cached teacher densified (renormalize): same loss, same lm_head gradient."""
    from distillm2_kernels.trainer.models import HiddenStates, load_model, shared_vocab_size

    _, student_dir, pairs, cache_dir, _ = scored
    tokenizer = load_tokenizer(student_dir)
    tokenized = tokenize_pairs(read_pairs(pairs), tokenizer, max_length=MAX_LENGTH)
    indices = [0, 3, 5]
    batch = collate_pairs([tokenized[i] for i in indices], tokenizer.pad_token_id, with_rejected=True)
    sparse = TeacherCache(cache_dir).sparse_teacher(indices, batch)
    student = load_model(student_dir, "student", torch.float32)
    vocab = shared_vocab_size(student, student, tokenizer)
    forward = HiddenStates(student)
    results = []
    for make in (TrainingObjective, DensifyingObjective):
        student.zero_grad()
        value, _ = training.distillation_loss(forward, student, sparse, make(loss, "distillm2"), batch, vocab)
        value.backward()
        results.append((value.detach(), student.lm_head.weight.grad.clone()))
    (fused, fused_grad), (dense, dense_grad) = results
    assert fused.item() > 0
    torch.testing.assert_close(fused, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_grad, dense_grad, rtol=1e-4, atol=1e-6)
