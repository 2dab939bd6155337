"""`distillm2_kernels.trainer.generation`: prompt files, engine selection, the vLLM path (on a stand-in
module), greedy decoding, and resuming an interrupted run without duplicated or lost rows."""

from __future__ import annotations

import json
import math
import sys

import pytest

pytest.importorskip("transformers")

from distillm2_kernels.trainer import generation  # noqa: E402
from distillm2_kernels.trainer.generation import generate, select_engine  # noqa: E402
from distillm2_kernels.trainer.jsonl import DataError, read_jsonl  # noqa: E402
from distillm2_kernels.trainer.prompts import load_prompts  # noqa: E402
from tiny_models import PROMPTS, write_prompts  # noqa: E402

import vllm_stand_in  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(path):
    return [row for _, row in read_jsonl(path)]


@pytest.mark.parametrize(
    "installed, gpu, expected", [(False, False, "hf"), (False, True, "hf"), (True, False, "hf"), (True, True, "vllm")]
)
def test_auto_engine_uses_vllm_only_when_installed_and_a_gpu_is_present(monkeypatch, installed, gpu, expected):
    monkeypatch.setattr(generation, "vllm_installed", lambda: installed)
    monkeypatch.setattr(generation, "gpu_available", lambda: gpu)
    assert select_engine("auto") == expected
    assert select_engine("hf") == "hf"
    if expected == "vllm":
        assert select_engine("vllm") == "vllm"
    else:
        with pytest.raises(ValueError, match="vllm is not installed" if not installed else "needs a CUDA GPU"):
            select_engine("vllm")


@pytest.mark.parametrize("gpu", [False, True])
def test_auto_falls_back_to_transformers_when_vllm_cannot_be_imported(monkeypatch, gpu):
    """vLLM hidden (installed or not, `import vllm` fails): the real detection reports it absent, auto
    picks transformers with or without a GPU, and engine="vllm" says why it cannot run."""
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError):
        import vllm  # noqa: F401
    monkeypatch.setattr(generation, "gpu_available", lambda: gpu)
    assert not generation.vllm_installed()
    assert select_engine("auto") == "hf"
    with pytest.raises(ValueError, match="vllm is not installed"):
        select_engine("vllm")
    with pytest.raises(ValueError, match="engine must be one of"):
        select_engine("tgi")


def test_vllm_path_calls_the_documented_api(tiny_models, tmp_path, monkeypatch):
    """On the strict stand-in `vllm` (stand_in_packages/vllm) with a "GPU", auto picks vLLM and calls
    LLM(model=..., dtype="auto", seed=...) and LLM.chat(conversations, sampling_params=[SamplingParams(...) per
    prompt], use_tqdm=False); each row holds the completion's text and finish reason."""
    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    created = []
    real_init = vllm.LLM.__init__
    monkeypatch.setattr(vllm.LLM, "__init__", lambda self, *a, **kw: (created.append(kw), real_init(self, *a, **kw))[1])
    teacher, _ = tiny_models("llama")
    result = generate(teacher, PROMPTS[:3], tmp_path / "out.jsonl", temperature=0.7, top_p=0.9, max_new_tokens=5,
                      seed=10, batch_size=2, progress=False)
    assert result.engine == "vllm" and result.num_generated == 3
    assert created == [dict(model=str(teacher), dtype="auto", seed=10)]
    first, second = vllm.CALLS
    assert first["conversations"] == [[{"role": "user", "content": PROMPTS[0]}], [{"role": "user", "content": PROMPTS[1]}]]
    assert second["conversations"] == [[{"role": "user", "content": PROMPTS[2]}]]
    assert [(p.n, p.temperature, p.top_p, p.max_tokens, p.seed) for p in first["params"]] == [
        (1, 0.7, 0.9, 5, 10 + i) for i in (0, 1)]
    assert first["use_tqdm"] is False
    rows = _rows(tmp_path / "out.jsonl")
    assert all(r["generation"]["engine"] == "vllm" for r in rows)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    again = generate(teacher, PROMPTS[:3], tmp_path / "again.jsonl", temperature=0.7, top_p=0.9, max_new_tokens=5,
                     seed=10, progress=False)
    assert again.num_generated == 3 and _rows(tmp_path / "again.jsonl") == rows  # the stand-in is seeded per prompt


def test_the_stand_in_is_as_strict_as_vllm(tiny_models, tmp_path, monkeypatch):
    """What the stand-in refuses, as vLLM 0.33 does: unknown SamplingParams fields and out-of-range values, a
    second engine in a process that holds the first one's memory, and an over-long prompt (the whole batch)."""
    from vllm_stand_in import held_bytes

    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    from vllm.exceptions import VLLMValidationError

    assert not issubclass(VLLMValidationError, ValueError)
    with pytest.raises(TypeError):
        vllm.SamplingParams(max_new_tokens=5)
    for bad in (dict(temperature=2.5), dict(top_p=0.0), dict(max_tokens=0), dict(temperature=-1.0)):
        with pytest.raises(VLLMValidationError):
            vllm.SamplingParams(**bad)
    assert vllm.SamplingParams(temperature=0.001).temperature == 0.01 and vllm.SamplingParams(seed=-1).seed is None
    teacher, _ = tiny_models("llama")
    llm = vllm.LLM(str(teacher), gpu_memory_utilization=0.6)
    assert list(held_bytes(tmp_path / "device.json").values()) == [math.ceil(0.6 * 80 * (1 << 30))]
    with pytest.raises(ValueError, match="less than desired GPU memory utilization"):
        vllm.LLM(str(teacher), gpu_memory_utilization=0.6)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_new_tokens'"):
        vllm.LLM(str(teacher), max_new_tokens=4)
    assert llm.llm_engine.model_config.max_model_len == 256
    conversations = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "x" * 253}]]
    with pytest.raises(VLLMValidationError, match="maximum model length of 256"):  # 253 + 3 template tokens = 256
        llm.chat(conversations, [vllm.SamplingParams()] * 2, use_tqdm=False)
    assert vllm.CALLS == []
    output = llm.chat(conversations[:1], [vllm.SamplingParams(seed=1, max_tokens=4)], use_tqdm=False)[0]
    tokenizer = llm.get_tokenizer()
    assert output.request_id == "0" and output.prompt_token_ids == tokenizer.convert_tokens_to_ids(
        ["<|user|>", "h", "i", "</s>", "<|assistant|>"])
    assert output.outputs[0].finish_reason in ("stop", "length") and output.outputs[0].token_ids
    del llm
    with pytest.raises(ValueError, match="less than desired GPU memory utilization"):  # deleting frees nothing
        vllm.LLM(str(teacher), gpu_memory_utilization=0.6)


def test_the_vllm_path_sends_the_prompt_tokens_of_the_transformers_path(tiny_models, tmp_path, monkeypatch):
    """For the same chat template, the token ids vLLM's chat renders for each prompt (long ones cut to fit)
    equal those that the transformers path gives `model.generate` (without its left padding)."""
    teacher, _ = tiny_models("llama")
    prompts = [PROMPTS[0], "".join(f"{i} " for i in range(700)), PROMPTS[3]]
    options = dict(temperature=0, max_new_tokens=4, progress=False)
    hf_ids = []
    from transformers import GenerationMixin

    real_generate = GenerationMixin.generate

    def spy(self, input_ids=None, attention_mask=None, **kwargs):
        hf_ids.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return real_generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    generate(teacher, prompts, tmp_path / "hf.jsonl", engine="hf", **options)
    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    generate(teacher, prompts, tmp_path / "vllm.jsonl", engine="vllm", **options)
    (call,) = vllm.CALLS
    assert call["prompt_token_ids"] == hf_ids and len(hf_ids[1]) == 252
    truncated = [(r["prompt_truncated"], r.get("prompt_tokens")) for r in _rows(tmp_path / "vllm.jsonl")]
    assert truncated == [(r["prompt_truncated"], r.get("prompt_tokens")) for r in _rows(tmp_path / "hf.jsonl")]
    assert truncated[1] == (True, len(prompts[1]) + 3)


@pytest.mark.parametrize("reason", ["abort", "error", "repetition"])
def test_vllm_finish_reasons_are_recorded_as_they_are(tiny_models, tmp_path, monkeypatch, reason):
    vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    teacher, _ = tiny_models("llama")
    prompts = [PROMPTS[0], f"say it [finish_reason={reason}]"]
    generate(teacher, prompts, tmp_path / "out.jsonl", max_new_tokens=5, progress=False)
    assert _rows(tmp_path / "out.jsonl")[1]["finish_reason"] == reason
    assert _rows(tmp_path / "out.jsonl")[0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=2.5), r"temperature must be 0 \(greedy\) or in \[0.01, 2\] on vLLM"),
    (dict(temperature=0.005), r"temperature must be 0 \(greedy\) or in \[0.01, 2\] on vLLM"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(seed=2**63), "seed"),
])
def test_sampling_settings_vllm_refuses_are_one_error_before_the_model_loads(tiny_models, tmp_path, monkeypatch,
                                                                             bad, message):
    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    monkeypatch.setattr(vllm, "LLM", lambda *a, **kw: pytest.fail("the engine was loaded"))
    teacher, _ = tiny_models("llama")
    with pytest.raises(ValueError, match=message):
        generate(teacher, PROMPTS[:2], tmp_path / "out.jsonl", **bad, progress=False)


def test_transformers_takes_a_temperature_above_2(tiny_models, tmp_path):
    teacher, _ = tiny_models("llama")
    result = generate(teacher, PROMPTS[:2], tmp_path / "out.jsonl", engine="hf", temperature=2.5, max_new_tokens=3,
                      progress=False)
    assert result.num_generated == 2
    with pytest.raises(ValueError, match="seed must be >= 0"):
        generate(teacher, PROMPTS[:2], tmp_path / "x.jsonl", engine="hf", seed=-1, progress=False)


def test_vllm_engine_settings_are_passed_through_and_checked_before_loading(tiny_models, tmp_path, monkeypatch):
    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json", gpus=2)
    engines = []
    real_init = vllm.LLM.__init__
    monkeypatch.setattr(vllm.LLM, "__init__", lambda self, *a, **kw: (engines.append(self), real_init(self, *a, **kw))[1])
    teacher, _ = tiny_models("llama")
    options = dict(max_new_tokens=4, progress=False)
    generate(teacher, PROMPTS[:2], tmp_path / "out.jsonl", gpu_memory_utilization=0.5, max_model_len=128,
             tensor_parallel_size=2, engine_args={"enforce_eager": True, "max_num_seqs": 8}, **options)
    (llm,) = engines
    assert llm.init_arguments == dict(model=str(teacher), dtype="auto", seed=42, gpu_memory_utilization=0.5,
                                      max_model_len=128, tensor_parallel_size=2, enforce_eager=True, max_num_seqs=8)
    row = _rows(tmp_path / "out.jsonl")[0]
    assert row["generation"]["max_prompt_tokens"] == 128 - 4
    assert row["generation"]["engine_args"] == dict(gpu_memory_utilization=0.5, max_model_len=128,
                                                    tensor_parallel_size=2, enforce_eager=True, max_num_seqs=8)
    for bad, message in [
        (dict(engine_args={"enforce_eagr": True}), "enforce_eagr.*not an argument of vLLM's LLM"),
        (dict(engine_args={"seed": 1}), "engine_args.*'seed'.*set by generate"),
        (dict(engine_args={"max_model_len": 64}), "engine_args.*'max_model_len'.*max_model_len="),
        (dict(gpu_memory_utilization=1.5), r"gpu_memory_utilization must lie in \(0, 1\]"),
        (dict(tensor_parallel_size=0), "tensor_parallel_size must be >= 1"),
        (dict(max_model_len=1000), "max_model_len=1000 is more than the model's context of 256"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(teacher, PROMPTS[:2], tmp_path / "bad.jsonl", **bad, **options)
    with pytest.raises(ValueError, match="gpu_memory_utilization, tensor_parallel_size and engine_args are vLLM"):
        generate(teacher, PROMPTS[:2], tmp_path / "hf.jsonl", engine="hf", gpu_memory_utilization=0.5, **options)
    assert len(engines) == 1  # every bad setting was refused before an engine was made


def test_a_prompt_longer_than_vllms_context_is_cut_the_same_way_on_both_engines(tiny_models, tmp_path, monkeypatch):
    """A config.json without `max_position_embeddings` (transformers and vLLM then take the architecture's
    default, 2048 for Llama): the limit is the one vLLM derives, so the prompt keeps its end on both engines
    and vLLM is never sent a prompt it refuses."""
    import shutil

    teacher, _ = tiny_models("llama")
    model = tmp_path / "model"
    shutil.copytree(teacher, model)
    config = json.loads((model / "config.json").read_text())
    del config["max_position_embeddings"]
    (model / "config.json").write_text(json.dumps(config))
    long_prompt = "".join(f"{i} " for i in range(600))  # 2290 characters, one token each
    options = dict(temperature=0, max_new_tokens=4, progress=False)
    vllm = vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    generate(model, [long_prompt, PROMPTS[0]], tmp_path / "vllm.jsonl", engine="vllm", **options)
    assert [len(ids) for ids in vllm.CALLS[0]["prompt_token_ids"]] == [2044, len(PROMPTS[0]) + 3]
    generate(model, [long_prompt, PROMPTS[0]], tmp_path / "hf.jsonl", engine="hf", **options)
    for path in ("vllm.jsonl", "hf.jsonl"):
        rows = _rows(tmp_path / path)
        assert [(r["prompt_truncated"], r.get("prompt_tokens")) for r in rows] == [(True, 2293), (False, None)]
        assert rows[0]["generation"]["max_prompt_tokens"] == 2044 and rows[0]["prompt"] == long_prompt


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_max_prompt_tokens_beyond_the_context_is_refused_before_loading(tiny_models, tmp_path, monkeypatch, engine):
    vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    teacher, _ = tiny_models("llama")
    with pytest.raises(ValueError, match="max_prompt_tokens=253 and max_new_tokens=4 exceed the model's context of 256"):
        generate(teacher, [PROMPTS[0]], tmp_path / "out.jsonl", engine=engine, max_prompt_tokens=253,
                 max_new_tokens=4, progress=False)


def test_vllm_rows_say_whether_vllm_was_batch_invariant(tiny_models, tmp_path, monkeypatch):
    vllm_stand_in.install(monkeypatch, tmp_path / "device.json")
    teacher, _ = tiny_models("llama")
    generate(teacher, [PROMPTS[0]], tmp_path / "a.jsonl", max_new_tokens=3, progress=False)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    generate(teacher, [PROMPTS[0]], tmp_path / "b.jsonl", max_new_tokens=3, progress=False)
    assert [_rows(tmp_path / f)[0]["generation"]["batch_invariant"] for f in ("a.jsonl", "b.jsonl")] == [False, True]


def test_prompt_files_jsonl_and_plain_text(tmp_path):
    assert load_prompts(write_prompts(tmp_path / "p.jsonl")) == PROMPTS
    (tmp_path / "p.txt").write_text("first prompt\n\n  second  \n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "  second  "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_prompts(bad)
    (tmp_path / "nofield.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl:2: expected a non-empty string field 'prompt'"):
        load_prompts(tmp_path / "nofield.jsonl")


def test_prompt_file_format_follows_the_name_and_a_mix_up_is_an_error(tmp_path):
    """The README's rule: *.jsonl / *.json are JSON Lines, any other name plain text; a plain-text file named
    *.jsonl, or JSON Lines under a plain-text name, is an error naming the rule, never misread."""
    (tmp_path / "plain.jsonl").write_text("What is 2+3?\nSay hi.\n")
    with pytest.raises(DataError, match=r"plain\.jsonl:1: not valid JSON.*read as JSON Lines.*prompts\.txt"):
        load_prompts(tmp_path / "plain.jsonl")
    write_prompts(tmp_path / "rows.txt")
    with pytest.raises(DataError, match=r"rows\.txt: every line is a JSON object with a 'prompt' field.*rename it"):
        load_prompts(tmp_path / "rows.txt")
    write_prompts(tmp_path / "rows.json")
    assert load_prompts(tmp_path / "rows.json") == PROMPTS
    (tmp_path / "prompts").write_text('{"prompt": "a"}\nnot json\n')  # some lines JSON: plain text
    assert load_prompts(tmp_path / "prompts") == ['{"prompt": "a"}', "not json"]


def test_greedy_decoding_ignores_the_seed_and_follows_the_chat_template(tiny_models, tmp_path):
    _, student = tiny_models("llama")
    first = generate(student, PROMPTS[:3], tmp_path / "a.jsonl", temperature=0, max_new_tokens=6, seed=1,
                     progress=False)
    generate(student, PROMPTS[:3], tmp_path / "b.jsonl", temperature=0, max_new_tokens=6, seed=2, progress=False)
    a, b = _rows(tmp_path / "a.jsonl"), _rows(tmp_path / "b.jsonl")
    assert first.engine == "hf" and len(a) == 3
    assert [r["response"] for r in a] == [r["response"] for r in b]

    # the same greedy continuation straight from transformers
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=2)[0, ids.shape[1]:]
    tokens = out.tolist()
    expected = tokenizer.decode(tokens[: tokens.index(2)] if 2 in tokens else tokens, skip_special_tokens=True)
    assert a[0]["response"] == expected
    assert a[0]["finish_reason"] == ("stop" if 2 in tokens else "length")


def test_the_models_own_generation_config_does_not_change_the_sampling(tiny_models, tmp_path):
    """Instruct checkpoints ship a generation_config.json (Qwen2.5: top_k 20, repetition_penalty 1.05, ...);
    transformers fills whatever a GenerationConfig leaves unset from it. Sampling must follow the documented
    settings only (as vLLM's SamplingParams do): a copy of the model whose generation config forces top_k = 1
    and a strong repetition penalty samples exactly what the model without them does, greedy and sampled."""
    import shutil

    from transformers import GenerationConfig

    _, student = tiny_models("llama")
    configured = tmp_path / "configured"
    shutil.copytree(student, configured)
    config = GenerationConfig.from_pretrained(configured)
    config.update(do_sample=True, top_k=1, repetition_penalty=50.0, no_repeat_ngram_size=1, temperature=0.3)
    config.save_pretrained(configured)
    for temperature in (0.0, 1.0):
        options = dict(temperature=temperature, top_p=1.0, max_new_tokens=12, seed=5, batch_size=4, progress=False)
        plain = generate(student, PROMPTS[:4], tmp_path / f"plain-{temperature}.jsonl", **options)
        other = generate(configured, PROMPTS[:4], tmp_path / f"configured-{temperature}.jsonl", **options)
        responses = [[r["response"] for r in _rows(result.output_path)] for result in (plain, other)]
        assert responses[0] == responses[1], temperature


def test_sampling_uses_temperature_and_top_p_only_no_top_k(tiny_models):
    """No top-k, as vLLM's SamplingParams: the engine's samples are those of transformers' sampling with
    top_k = 0 (a GenerationConfig that leaves top_k unset gets transformers' default top_k = 50). At
    temperature 2 the tiny model's ~100-token distributions put mass beyond the top 50."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    _, student = tiny_models("llama")
    engine = generation.HFEngine(student)
    sampled = engine.generate(PROMPTS[:4], [0, 1, 2, 3], temperature=2.0, top_p=1.0, max_new_tokens=16, seed=7)

    model = AutoModelForCausalLM.from_pretrained(student)
    texts = [engine.tokenizer.apply_chat_template(generation.user_conversation(p), tokenize=False,
                                                  add_generation_prompt=True) for p in PROMPTS[:4]]
    encoded = engine.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    config = GenerationConfig(do_sample=True, temperature=2.0, top_p=1.0, top_k=0, max_new_tokens=16,
                              pad_token_id=0, eos_token_id=[2])
    torch.manual_seed(7)
    with torch.no_grad():
        output = model.generate(**encoded, generation_config=config)[:, encoded["input_ids"].shape[1]:].tolist()
    expected = [engine.tokenizer.decode(row[: row.index(2)] if 2 in row else row, skip_special_tokens=True)
                for row in output]
    assert [text for text, _ in sampled] == expected


def _crash_on_third_batch(monkeypatch, *args, **kwargs) -> None:
    """`generate(*args, **kwargs)` killed by a simulated crash when the engine is called the third time."""
    real_generate, calls = generation.HFEngine.generate, []

    def crash_on_third_batch(self, *engine_args, **engine_kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_generate(self, *engine_args, **engine_kwargs)

    monkeypatch.setattr(generation.HFEngine, "generate", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        generate(*args, **kwargs)
    monkeypatch.setattr(generation.HFEngine, "generate", real_generate)


def test_interrupted_generation_resumes_without_duplicates_or_losses(tiny_models, tmp_path, monkeypatch):
    teacher, _ = tiny_models("llama")
    options = dict(temperature=0.8, top_p=0.95, max_new_tokens=5, seed=3, batch_size=2, progress=False)
    generate(teacher, PROMPTS, tmp_path / "reference.jsonl", **options)

    output = tmp_path / "out.jsonl"
    _crash_on_third_batch(monkeypatch, teacher, PROMPTS, output, **options)
    partial = output.with_name(output.name + ".partial")
    assert not output.exists() and len(_rows(partial)) == 4
    with open(partial, "a") as handle:  # a write torn by the crash
        handle.write('{"index": 4, "prompt": "Spell')

    result = generate(teacher, PROMPTS, output, **options)
    assert (result.num_reused, result.num_generated, result.num_rows) == (4, len(PROMPTS) - 4, len(PROMPTS))
    assert not partial.exists()
    rows = _rows(output)
    assert [r["index"] for r in rows] == list(range(len(PROMPTS)))
    assert rows == _rows(tmp_path / "reference.jsonl")  # the same samples as the uninterrupted run

    again = generate(teacher, PROMPTS, output, **options)  # complete: nothing to do
    assert (again.num_generated, again.num_rows, again.engine) == (0, len(PROMPTS), None)


def test_a_repeated_prompt_gets_a_row_per_occurrence_across_a_resume_and_pairs_by_occurrence(
    tiny_models, tmp_path, monkeypatch
):
    """Rows are matched by their index in the prompt list, not by the prompt's text: a prompt listed twice gets
    two rows, none duplicated or lost by an interrupted run, and `pair` joins the k-th occurrences."""
    from distillm2_kernels.trainer.pairing import pair

    teacher, _ = tiny_models("llama")
    prompts = PROMPTS[:2] * 2
    options = dict(max_new_tokens=4, seed=3, batch_size=1, progress=False)
    output = tmp_path / "out.jsonl"
    _crash_on_third_batch(monkeypatch, teacher, prompts, output, **options)
    result = generate(teacher, prompts, output, **options)
    assert (result.num_reused, result.num_generated) == (2, 2)
    rows = _rows(output)
    assert [(r["index"], r["prompt"]) for r in rows] == list(enumerate(prompts))

    report = pair(output, output, tmp_path / "pairs.jsonl")
    assert report.complete and report.num_pairs == 4
    assert [p["chosen"][1]["content"] for p in _rows(tmp_path / "pairs.jsonl")] == [r["response"] for r in rows]


def test_n_takes_the_first_prompts_and_a_larger_n_extends_the_file(tiny_models, tmp_path):
    teacher, _ = tiny_models("llama")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    options = dict(max_new_tokens=4, progress=False)
    first = generate(teacher, prompts, tmp_path / "out.jsonl", n=3, **options)
    assert [r["prompt"] for r in _rows(tmp_path / "out.jsonl")] == PROMPTS[:3] and first.num_generated == 3
    second = generate(teacher, prompts, tmp_path / "out.jsonl", n=5, **options)
    assert (second.num_reused, second.num_generated) == (3, 2)
    assert [r["prompt"] for r in _rows(tmp_path / "out.jsonl")] == PROMPTS[:5]


def test_resuming_with_other_settings_or_prompts_is_refused(tiny_models, tmp_path):
    teacher, _ = tiny_models("llama")
    output = tmp_path / "out.jsonl"
    generate(teacher, PROMPTS[:2], output, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="resume with the same settings"):
        generate(teacher, PROMPTS[:2], output, max_new_tokens=4, temperature=0.5, progress=False)
    with pytest.raises(DataError, match=r"out\.jsonl:1: row 0 is for another prompt"):
        generate(teacher, ["another prompt", PROMPTS[1]], output, max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="top_p must lie in"):
        generate(teacher, PROMPTS[:2], tmp_path / "x.jsonl", top_p=0, progress=False)
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        generate(tmp_path / "no-such-model", PROMPTS[:2], tmp_path / "x.jsonl", progress=False)
    assert json.loads(output.read_text().splitlines()[0])["generation"]["temperature"] == 0.8
