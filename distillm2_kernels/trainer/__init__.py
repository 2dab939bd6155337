"""A thin reference implementation of the DistiLLM-2 recipe on top of the fused kernels.

One concept per module:

- `prompts`      prompt files (JSON Lines with a `prompt` field, or one prompt per line)
- `generation`   `generate(model, prompts, output, ...)`: one sampled response per prompt with the chat
                 template, vLLM on a GPU or transformers, written atomically and resumable
- `pairing`      `pair(teacher, student, output)`: `{prompt, chosen: [user, teacher], rejected: [user, student]}`
- `data`         reading pairs, chat-template tokenisation (prompt tokens −100, EOS appended), padded batches
- `batching`     the deterministic per-epoch, per-process batch plan (exact resume)
- `models`       loading (local folders only), LoRA/DoRA, the student forward that DDP wraps, saving
- `objectives`   the DistiLLM-2 loss, or SKL / KD alone, from hidden states through the fused-linear ops
- `teacher_cache` the offline teacher cache (safetensors shards + manifest): resumable writer, memory-mapped
                 reader giving each batch's `SparseTeacher`
- `scoring`      `score(teacher, pairs, cache, top_k=...)`: the teacher's top-K + label log-probabilities and
                 tail of every response token, on transformers (chunked, exact tail) or vLLM
- `checkpoint`   checkpoints that resume exactly; `metrics_log` the per-step CSV
- `training`     `TrainConfig`, `train(config) -> TrainResult`: the loop on `accelerate`
- `pipeline`     `run_pipeline(PipelineConfig)`: the batched on-policy loop (student responses regenerated
                 every epoch)
- `cli`          the `distillm2` command (`python -m distillm2_kernels.trainer`)

Needs the `train` extra (`pip install "distillm2_kernels[train]"`: transformers, peft, accelerate, tqdm);
vLLM is optional. Importing this package imports none of them; the modules do.
"""
