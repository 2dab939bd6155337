"""The miniature experiment: task, split, tokenizer, metrics, statistics, and one quick end-to-end run."""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from itertools import permutations, product

import pytest
import torch

pytest.importorskip("transformers")

from distillm2_kernels.experiment.evaluate import (  # noqa: E402
    answer_log_probs,
    coverage,
    evaluate,
    generate_answers,
)
from distillm2_kernels.experiment.models import ModelSize, build_model  # noqa: E402
from distillm2_kernels.experiment.report import SeedRow, paired_permutation_p, summarise  # noqa: E402
from distillm2_kernels.experiment.task import ArrangeTask, Example  # noqa: E402
from distillm2_kernels.experiment.tokenizer import build_tokenizer  # noqa: E402

TASK = ArrangeTask()


# task


def test_answers_are_checked_exactly():
    assert TASK.is_valid("aabcc", "acabc") and TASK.is_valid("aabcc", "cabac")
    assert TASK.is_valid("aabcc", " acabc\n")  # surrounding whitespace is not an error
    for wrong, kind in [("aacbc", "adjacent"), ("accab", "adjacent"), ("acbcc", "letters"), ("acab", "letters"), ("acabcc", "letters"),
                        ("acabd", "letters"), ("", "letters"), ("a cabc", "letters"), ("ACABC", "letters")]:
        assert not TASK.is_valid("aabcc", wrong), wrong
        assert TASK.error_kind("aabcc", wrong) == kind, wrong
    assert TASK.error_kind("aabcc", "acabc") == "valid"


def _brute_force_count(prompt):
    return len({p for p in permutations(prompt) if all(a != b for a, b in zip(p, p[1:]))})


@pytest.mark.parametrize("prompt", ["aabcc", "aaabb", "abcde", "aaaab", "aabbccdd", "aaabbc", "abcdefgh"])
def test_count_valid_matches_brute_force(prompt):
    assert TASK.count_valid(prompt) == _brute_force_count(prompt)
    assert TASK.count_valid("aaabb") == 1  # only "ababa"


def test_sample_valid_is_uniform_over_the_valid_answers():
    rng = random.Random(0)
    counts = Counter(TASK.sample_valid("aabbc", rng) for _ in range(12_000))
    assert len(counts) == TASK.count_valid("aabbc") == 12
    assert all(TASK.is_valid("aabbc", answer) for answer in counts)
    assert all(abs(c - 1000) < 150 for c in counts.values()), counts  # 5 standard deviations (≈ 30 each)
    with pytest.raises(ValueError, match="no valid arrangement"):
        TASK.sample_valid("aaaab", rng)


def test_prompts_are_the_sorted_multisets_with_a_valid_answer():
    task = ArrangeTask("abc", 2, 4)
    prompts = task.all_prompts()
    assert len(prompts) == len(set(prompts))
    assert all(task.is_prompt(p) and task.count_valid(p) > 0 for p in prompts)
    assert "aa" not in prompts and "aaab" not in prompts and "aab" in prompts and "aabb" in prompts
    expected = {"".join(sorted(c)) for n in range(2, 5) for c in product("abc", repeat=n)
                if _brute_force_count("".join(sorted(c))) > 0}
    assert set(prompts) == expected


def test_split_is_disjoint_distinct_and_sized():
    split = TASK.split(3000, 500, answers_per_prompt=2, seed=7)
    assert len(split.train_prompts) == 3000 and len(split.heldout_prompts) == 500
    assert len(set(split.train_prompts)) == 3000 and len(set(split.heldout_prompts)) == 500
    assert not set(split.train_prompts) & set(split.heldout_prompts)
    assert len(split.train) == 6000 and [e.prompt for e in split.train[:4]] == [split.train_prompts[0]] * 2 + [
        split.train_prompts[1]] * 2
    assert [e.prompt for e in split.heldout] == split.heldout_prompts
    for example in split.train[:300] + split.heldout[:300]:
        assert TASK.is_prompt(example.prompt) and TASK.is_valid(example.prompt, example.answer)


def test_split_is_deterministic_in_the_seed():
    assert TASK.split(200, 50, seed=3) == TASK.split(200, 50, seed=3)
    assert TASK.split(200, 50, seed=3).train != TASK.split(200, 50, seed=4).train
    with pytest.raises(ValueError, match="distinct prompts"):
        ArrangeTask("ab", 2, 3).split(2, 2, seed=0)  # three prompts: "ab", "aab" ("aba"), "abb" ("bab")


# tokenizer


def test_tokenizer_round_trips_through_save_and_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    built = build_tokenizer(TASK.alphabet)
    built.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == built.get_vocab()
    assert len(loaded) == 5 + len(TASK.alphabet)
    assert loaded.eos_token == "<|eos|>" and loaded.pad_token == "<|pad|>"
    assert loaded.eos_token_id != loaded.pad_token_id
    conversation = [{"role": "user", "content": "aabcc"}, {"role": "assistant", "content": "acabc"}]
    text = loaded.apply_chat_template(conversation, tokenize=False)
    assert text == "<|user|>aabcc<|assistant|>acabc<|eos|>"
    prompt = loaded.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>aabcc<|assistant|>" and text.startswith(prompt)
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 5 + 1 + 5 + 1  # one token per character, one per special marker
    assert ids[-1] == loaded.eos_token_id
    assert ids == built(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.decode(ids, skip_special_tokens=True) == "aabccacabc"
    assert loaded("aaz", add_special_tokens=False)["input_ids"][-1] == loaded.unk_token_id
    with pytest.raises(Exception, match="only user and assistant"):
        loaded.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


# metrics


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TASK.alphabet)


class _ScriptedModel(torch.nn.Module):
    """Answers decided by a script, whatever the sampling settings: `script(prompt, k)` for the k-th sequence of
    each prompt; logits that put probability `hit` on the next letter of a fixed answer `"<prompt sorted>"`."""

    def __init__(self, tokenizer, script):
        super().__init__()
        self.tokenizer, self.script = tokenizer, script

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences=1, **_):
        rows = []
        for ids in input_ids.tolist():
            prompt = self.tokenizer.decode(ids, skip_special_tokens=True)
            for k in range(num_return_sequences):
                new = self.tokenizer(self.script(prompt, k), add_special_tokens=False)["input_ids"]
                new = (new + [self.tokenizer.eos_token_id] + [self.tokenizer.pad_token_id] * max_new_tokens)
                rows.append(ids + new[:max_new_tokens])
        return torch.tensor(rows)

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, len(self.tokenizer))})()


def test_evaluate_scores_scripted_answers(tokenizer):
    prompts = ["aabcc", "abcde", "aabbc", "abcdd"]
    # distinct valid answers, none of them the sorted prompt ("abcde" is one of its own valid answers)
    good = {p: sorted({"".join(q) for q in permutations(p) if TASK.is_valid(p, "".join(q))}, reverse=True)[:4]
            for p in prompts}
    assert all(len(set(answers)) == 4 and "".join(sorted(p)) not in answers for p, answers in good.items())

    def student(prompt, k):  # the k-th sample: valid and distinct for k < 2, then a letters and an adjacent error
        return [good[prompt][0], good[prompt][1], prompt[:-1], "".join(sorted(prompt))][k % 4]

    def teacher(prompt, k):
        return good[prompt][k]

    model = _ScriptedModel(tokenizer, student)
    reference = generate_answers(_ScriptedModel(tokenizer, teacher), tokenizer, prompts, samples=4,
                                 temperature=1.0, max_new_tokens=10)
    result = evaluate(model, tokenizer, TASK, prompts, teacher=model, teacher_samples_t1=reference, samples=4)
    # "abcde" sorted is valid, so the 4th sample counts there: 2 + (1 for "abcde") valid of 4 per prompt
    assert result.valid_08 == pytest.approx((3 * 2 + 3) / 16) and result.valid_10 == result.valid_08
    assert result.letters_error == pytest.approx(4 / 16) and result.adjacent_error == pytest.approx(3 / 16)
    assert result.greedy == pytest.approx(1.0)  # the first sequence is valid
    assert result.coverage == pytest.approx((3 * 2 + 3) / 16)  # the teacher's 16 samples are distinct and valid
    # uniform logits: log(1/V) per answer token and per eos
    lengths = [len(student(p, k)) + 1 for p in prompts for k in range(4)]
    assert result.teacher_logp == pytest.approx(-math.log(len(tokenizer)) * sum(lengths) / 16, rel=1e-6)


def _tiny_model(tokenizer, seed=0):
    model = build_model(ModelSize(layers=1, hidden=32, heads=2, mlp=64), tokenizer, seed=seed)
    with torch.no_grad():  # peaked random logits, never a marker token: answers differ between prompts
        weight = model.get_output_embeddings().weight  # tied to the input embeddings
        weight.mul_(20.0)
        for marker in ("<|pad|>", "<|user|>", "<|assistant|>", "<|unk|>"):
            weight[tokenizer.convert_tokens_to_ids(marker)] = 0.0
    return model.eval()


def test_answer_log_probs_match_a_direct_per_example_computation(tokenizer):
    model = _tiny_model(tokenizer)
    examples = [Example("aabcc", "acabc"), Example("abcde", "ba"), Example("aabbccdd", "abcdabcd"), Example("ab", "")]
    expected = []
    for example in examples:  # one unpadded sequence at a time
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].double(), -1)
        expected.append(sum(log_probs[len(prompt_ids) + k - 1, t].item() for k, t in enumerate(answer_ids)))
    assert answer_log_probs(model, tokenizer, examples, batch_size=3) == pytest.approx(expected, rel=1e-5)


def test_batched_greedy_answers_match_one_prompt_at_a_time(tokenizer):
    model = _tiny_model(tokenizer, seed=5)
    prompts = ["aabcc", "abcde", "ab", "aabbccdd", "abc"]  # different lengths: left padding matters
    expected = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
        expected.append(tokenizer.decode(new, skip_special_tokens=True))
    assert [row[0] for row in generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)] == expected
    # not vacuous: some answers stop at <|eos|>, some run to max_new_tokens, and they differ
    assert "" in expected and any(len(a) == 6 for a in expected) and len(set(expected)) > 2


def test_sampling_is_seeded_and_does_not_touch_the_global_stream(tokenizer):
    model = _tiny_model(tokenizer, seed=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(0.05)  # flat logits: samples vary
    prompts = ["aabcc", "abcde", "ab"]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate_answers(model, tokenizer, prompts, samples=5, temperature=1.0, seed=4, max_new_tokens=6)
    assert torch.rand(1) == before  # the caller's random stream is left as it was
    assert generate_answers(model, tokenizer, prompts, samples=5, temperature=1.0, seed=4, max_new_tokens=6) == first
    assert generate_answers(model, tokenizer, prompts, samples=5, temperature=1.0, seed=5, max_new_tokens=6) != first
    assert all(len(row) == 5 for row in first) and len({a for row in first for a in row}) > 3


def test_coverage_counts_distinct_valid_answers_against_the_reference():
    prompts = ["aabcc", "abc"]
    reference = [["acabc", "cabac", "acabc", "bacac"], ["abc", "bca", "cab", "acb"]]  # 3 + 4 distinct valid
    answers = [["acabc", "acabc", "aacbc", "acab"], ["abc", "cba", "abc", "bca"]]  # 1 + 3 distinct valid
    assert coverage(TASK, prompts, answers, reference) == pytest.approx(4 / 7)
    assert coverage(TASK, prompts, reference, reference) == 1.0


# statistics


def test_paired_permutation_p_is_exact():
    assert paired_permutation_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)  # only ± all-same-sign
    assert paired_permutation_p([0.0, 0.0]) == 1.0
    # [1, -1]: every sign pattern gives |sum| 0 or 2 >= 0
    assert paired_permutation_p([1.0, -1.0, 0.5]) == pytest.approx(
        sum(abs(a + b + 0.5 * c) >= 0.5 - 1e-12 for a in (1, -1) for b in (1, -1) for c in (1, -1)) / 8)


def test_summarise_pairs_by_seed():
    metrics = {"valid_0.8": 0.0, "valid_1.0": 0.0, "greedy": 0.0, "teacher_logp": 0.0, "coverage": 0.0}
    rows = []
    for seed, (base, arm) in enumerate([(0.5, 0.6), (0.7, 0.75), (0.9, 0.85)]):
        rows.append(SeedRow(seed, "distillm2", 10, 1.0, {**metrics, "valid_0.8": base}))
        rows.append(SeedRow(seed, "kd", 10, 1.0, {**metrics, "valid_0.8": arm}))
    by = {(s.model, s.metric): s for s in summarise(rows)}
    kd = by["kd", "valid_0.8"]
    assert kd.mean == pytest.approx(0.7333333) and kd.std == pytest.approx(math.sqrt(0.0158333333), rel=1e-6)
    assert kd.diff_mean == pytest.approx(0.1 / 3) and kd.ahead == 2
    assert kd.p_value == pytest.approx(paired_permutation_p([0.1, 0.05, -0.05]))
    assert by["distillm2", "valid_0.8"].diff_mean is None


# the whole experiment, at toy size


@pytest.mark.slow
def test_quick_experiment_writes_tables_csv_and_plot(tmp_path, capsys):
    from distillm2_kernels.experiment.__main__ import main
    from distillm2_kernels.experiment.distil import ARMS
    from distillm2_kernels.experiment.run import QUICK, ExperimentConfig

    output = tmp_path / "out"
    assert main(["--quick", "--output", str(output), "--no-progress", "--seed", "1", "2"]) == 0
    printed = capsys.readouterr().out
    models = ["teacher", "student (before)", *ARMS]
    table = printed[printed.index("model "):]
    for name in models:
        assert any(line.startswith(name + " ") for line in table.splitlines()), name

    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["seed"], r["model"]) for r in rows] == [(s, m) for s in ("1", "2") for m in models]
    samples = QUICK["num_heldout"] * QUICK["eval_samples"]
    for row in rows:
        for metric, count in (("valid_0.8", samples), ("valid_1.0", samples), ("greedy", QUICK["num_heldout"])):
            value = float(row[metric]) * count  # a count of valid answers
            assert abs(value - round(value)) < 1e-4 and 0 <= round(value) <= count, row
        assert float(row["teacher_logp"]) < 0 and float(row["seconds"]) > 0
    arm_rows = [r for r in rows if r["model"] in ARMS]
    steps = {r["steps"] for r in arm_rows}  # the same budget for every arm
    assert steps == {str(QUICK["distil_epochs"] * math.ceil(QUICK["num_prompts"] / QUICK["distil_batch_size"]))}
    # the teacher judging its own samples beats a uniform guess over the vocabulary
    vocab = json.loads((output / "seed-1" / "runs" / "distillm2" / "final" / "config.json").read_text())["vocab_size"]
    teacher = next(r for r in rows if r["model"] == "teacher")
    assert float(teacher["teacher_logp"]) > -math.log(vocab) * (ExperimentConfig().max_length + 1), teacher

    with open(output / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    kd = next(r for r in summary if r["model"] == "kd" and r["metric"] == "valid_0.8")
    assert kd["n"] == "2" and kd["p_value"] != "" and kd["seeds_ahead"] in ("0", "1", "2")
    by_seed = {(r["seed"], r["model"]): float(r["valid_0.8"]) for r in rows}
    assert float(kd["diff_vs_distillm2"]) == pytest.approx(
        sum(by_seed[s, "kd"] - by_seed[s, "distillm2"] for s in ("1", "2")) / 2, abs=1e-5)
    markdown = (output / "results.md").read_text()
    for name in models:
        assert f"| {name} |" in markdown
    png = (output / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    # the on-policy arm regenerated the student's responses each epoch; the others trained on one pairs file
    for epoch in range(QUICK["distil_epochs"]):
        assert (output / "seed-1" / "runs" / "distillm2-onpolicy" / f"epoch-{epoch}" / "pairs.jsonl").is_file()
    assert len((output / "seed-1" / "data" / "pairs.jsonl").read_text().splitlines()) == QUICK["num_prompts"]
    # a rerun of the same command reuses the finished seeds
    assert main(["--quick", "--output", str(output), "--no-progress", "--seed", "1", "2"]) == 0
    assert capsys.readouterr().out.count("reusing") == 2
