"""The miniature experiment: task, tokenizer, evaluation, and one quick end-to-end run."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

pytest.importorskip("transformers")

from distillm2_kernels.experiment.evaluate import answer_nll, evaluate, greedy_answers  # noqa: E402
from distillm2_kernels.experiment.models import ModelSize, build_model  # noqa: E402
from distillm2_kernels.experiment.task import AdditionTask, Example  # noqa: E402
from distillm2_kernels.experiment.tokenizer import build_tokenizer  # noqa: E402

TASK = AdditionTask(3)


# task


def test_answers_are_checked_exactly():
    assert TASK.answer("437+85") == "522"
    assert TASK.answer("999+999") == "1998"
    assert TASK.answer("0+0") == "0"
    assert TASK.is_correct("437+85", "522")
    assert TASK.is_correct("437+85", " 522\n")  # surrounding whitespace is not an error
    for wrong in ("521", "5220", "0522", "52", "", "522+0", "five hundred"):
        assert not TASK.is_correct("437+85", wrong), wrong
    with pytest.raises(ValueError, match="not an addition prompt"):
        TASK.answer("4*5")


def test_split_is_disjoint_distinct_and_sized():
    split = TASK.split(3000, 500, seed=7)
    train, heldout = [e.prompt for e in split.train], [e.prompt for e in split.heldout]
    assert len(train) == 3000 and len(heldout) == 500
    assert len(set(train)) == 3000 and len(set(heldout)) == 500
    assert not set(train) & set(heldout)
    for example in split.train[:200] + split.heldout[:200]:
        a, b = map(int, example.prompt.split("+"))
        assert 0 <= a < 1000 and 0 <= b < 1000
        assert example.answer == str(a + b) and TASK.is_correct(example.prompt, example.answer)


def test_split_is_deterministic_in_the_seed():
    assert TASK.split(200, 50, seed=3) == TASK.split(200, 50, seed=3)
    assert TASK.split(200, 50, seed=3).train != TASK.split(200, 50, seed=4).train
    with pytest.raises(ValueError, match="distinct prompts"):
        AdditionTask(1).split(90, 20, seed=0)  # 1-digit addition has only 100 prompts


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
    conversation = [{"role": "user", "content": "437+85"}, {"role": "assistant", "content": "522"}]
    text = loaded.apply_chat_template(conversation, tokenize=False)
    assert text == "<|user|>437+85<|assistant|>522<|eos|>"
    prompt = loaded.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>437+85<|assistant|>" and text.startswith(prompt)
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1 + 6 + 1 + 3 + 1  # one token per character, one per special marker
    assert ids[-1] == loaded.eos_token_id
    assert ids == built(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert loaded.decode(ids, skip_special_tokens=True) == "437+85522"
    with pytest.raises(Exception, match="only user and assistant"):
        loaded.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


# evaluation


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TASK.alphabet)


class _ScriptedModel(torch.nn.Module):
    """Greedy answers decided by a script (the right answer unless the prompt is in `wrong`); uniform logits."""

    def __init__(self, tokenizer, wrong):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids in input_ids.tolist():
            text = self.tokenizer.decode(ids, skip_special_tokens=True)  # the user's prompt
            answer = TASK.answer(text)
            if text in self.wrong:
                answer = answer[:-1] + str((int(answer[-1]) + 1) % 10)
            new = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            new += [self.tokenizer.pad_token_id] * (max_new_tokens - len(new))
            rows.append(ids + new[:max_new_tokens])
        return torch.tensor(rows)

    def forward(self, input_ids, attention_mask):
        return type("Output", (), {"logits": torch.zeros(*input_ids.shape, len(self.tokenizer))})()


def test_evaluate_scores_scripted_answers(tokenizer):
    examples = TASK.split(40, 0, seed=1).train
    wrong = {e.prompt for e in examples[::4]}  # 10 of 40 answered wrongly
    result = evaluate(_ScriptedModel(tokenizer, wrong), tokenizer, TASK, examples, batch_size=16)
    assert result.accuracy == pytest.approx(30 / 40)
    assert result.nll == pytest.approx(math.log(len(tokenizer)), rel=1e-6)  # uniform logits: log V per token
    assert result.num_examples == 40


def _tiny_model(tokenizer, seed=0):
    model = build_model(ModelSize(layers=1, hidden=32, heads=2, mlp=64), tokenizer, seed=seed)
    with torch.no_grad():  # peaked random logits, never a marker token: greedy answers differ between prompts
        weight = model.get_output_embeddings().weight  # tied to the input embeddings
        weight.mul_(20.0)
        for marker in ("<|pad|>", "<|user|>", "<|assistant|>", "<|unk|>"):
            weight[tokenizer.convert_tokens_to_ids(marker)] = 0.0
    return model.eval()


def test_answer_nll_matches_a_direct_per_example_computation(tokenizer):
    model = _tiny_model(tokenizer)
    examples = [Example("7+5", "12"), Example("437+85", "522"), Example("999+999", "1998"), Example("0+10", "10")]
    total, count = 0.0, 0
    for example in examples:  # one unpadded sequence at a time
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        for k, token in enumerate(answer_ids):
            total -= log_probs[len(prompt_ids) + k - 1, token].item()
        count += len(answer_ids)
    assert answer_nll(model, tokenizer, examples, batch_size=3) == pytest.approx(total / count, rel=1e-5)


def test_batched_greedy_answers_match_one_prompt_at_a_time(tokenizer):
    model = _tiny_model(tokenizer, seed=1)
    prompts = ["7+5", "437+85", "999+999", "0+10", "12+345"]  # different lengths: left padding matters
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
    assert greedy_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=4) == expected
    # not vacuous: some answers stop at <|eos|>, some run to max_new_tokens, and they differ
    assert "" in expected and any(len(a) == 6 for a in expected) and len(set(expected)) > 2


# the whole experiment, at toy size


@pytest.mark.slow
def test_quick_experiment_writes_table_csv_and_plot(tmp_path, capsys):
    from distillm2_kernels.experiment.__main__ import main
    from distillm2_kernels.experiment.run import QUICK

    output = tmp_path / "out"
    assert main(["--quick", "--output", str(output), "--no-progress", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    models = ["teacher", "student (before)", "distillm2", "kd", "skl"]
    for name in models:
        assert any(line.startswith(name + " ") for line in printed.splitlines()), name

    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == models
    vocab = json.loads((output / "runs" / "distillm2" / "final" / "config.json").read_text())["vocab_size"]
    for row in rows:
        correct = float(row["accuracy"]) * QUICK["num_heldout"]  # a count of exact matches
        assert abs(correct - round(correct)) < 1e-4 and 0 <= round(correct) <= QUICK["num_heldout"], row
        # the printed table shows the CSV's numbers
        line = next(line for line in printed.splitlines() if line.startswith(row["model"] + " "))
        assert f"{100 * float(row['accuracy']):.1f} %" in line and f"{float(row['nll']):.3f}" in line, line
        assert float(row["train_seconds"]) > 0
        assert row["seed"] == "1" and row["distil_steps"] == str(QUICK["distil_steps"])
    # the trained teacher predicts the answers better than a uniform guess over the vocabulary
    assert float(rows[0]["nll"]) < math.log(vocab), rows[0]
    # and four distillation steps toward it lower every method's NLL below the student's starting point
    assert all(float(r["nll"]) < float(rows[1]["nll"]) for r in rows[2:]), rows
    assert {r["steps"] for r in rows[2:]} == {str(QUICK["distil_steps"])}  # the same budget for every method

    markdown = (output / "results.md").read_text()
    for name in models:
        assert f"| {name} |" in markdown
    # held-out points during distillation: before (step 0), after the first epoch (2 steps of 16 of the 32
    # pairs: the trainer stopped and resumed there) and at the end
    assert "| method | step 0 | step 2 | step 4 |" in markdown
    png = (output / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    for method in ("distillm2", "kd", "skl"):
        assert (output / "runs" / method / "final" / "config.json").is_file()
    pairs = (output / "data" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) == QUICK["num_prompts"]
