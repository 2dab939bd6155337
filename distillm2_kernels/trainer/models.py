"""Loading the teacher and the student, the student's LoRA adapter, and the student forward the trainer wraps.

Models are loaded with `from_pretrained` from local folders only (no hub downloads). The teacher is frozen
(`eval()`, `requires_grad_(False)`). The student gets a peft LoRA adapter with the paper's settings by
default: r = 16, lora_alpha = 128, dropout 0.05, on every linear layer of the attention and MLP blocks
(peft's "all-linear", which leaves the lm_head out), DoRA on.

`HiddenStates(student)` is the module handed to `accelerator.prepare`: its forward runs the student's decoder
and returns the last hidden states `[R, T, H]` (no logits). Going through the prepared (DDP-wrapped) module
is what makes DDP all-reduce the gradients; the lm_head weight is then read from the unwrapped model
(`lm_head_operands`), and its gradient (full fine-tuning) is reduced by the same DDP hooks.

Teacher and student must share the tokenizer. Their lm_heads may hold more rows than the tokenizer has
tokens, and differ in that number, when checkpoints pad the vocabulary (151936 vs 152064 rows for 151665
tokens in the Qwen2.5 family): the fused loss uses the rows of the tokenizer's tokens only, the first
`len(tokenizer)` of both, as the released DistiLLM-2 code does by resizing both models to the tokenizer.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..hf import lm_head_inputs, lm_head_of, unwrap_peft

__all__ = [
    "torch_dtype_kwargs",
    "load_tokenizer",
    "load_model",
    "local_model_dir",
    "check_same_tokenizer",
    "check_teacher_loading",
    "add_lora",
    "load_student",
    "HiddenStates",
    "LMHead",
    "lm_head_operands",
    "student_lm_head",
    "shared_vocab_size",
    "check_engine",
    "is_deepspeed_zero3",
    "configure_deepspeed",
    "loading_unpartitioned",
    "gathered_parameters",
    "prepare_teacher",
    "save_final_model",
]


def torch_dtype_kwargs(dtype: torch.dtype) -> dict:
    """`from_pretrained`'s dtype argument: `dtype=` from transformers 4.56 on, `torch_dtype=` before."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def local_model_dir(path, role: str) -> Path:
    """`path` as a Path; FileNotFoundError naming the `role` ("teacher", ...) unless it is a local folder."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{role} {path}: not a local directory (models are loaded from local folders only)")
    return path


def load_tokenizer(path):
    """The tokenizer of a local model folder, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir(path, "model"), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {path} has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"the tokenizer of {path} has no chat template")
    return tokenizer


def check_same_tokenizer(student_tokenizer, teacher_path) -> None:
    """Teacher and student must tokenise alike: the teacher folder's tokenizer, when it has one, must hold
    the same vocabulary."""
    from transformers import AutoTokenizer

    try:
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True)
    except (OSError, ValueError):
        return  # a model folder without a tokenizer: the student's is used for both
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"the teacher's tokenizer ({teacher_path}) differs from the student's: DistiLLM-2 compares the two "
            "models token by token and needs one vocabulary"
        )


def check_teacher_loading() -> None:
    """Refuse FSDP's `cpu_ram_efficient_loading` (the environment `accelerate launch` sets for it): with it,
    `from_pretrained` loads the weights on each node's first process only (transformers 4.x leaves
    `torch.empty` on the others) and relies on FSDP to broadcast them, which it does for the student it wraps
    but not for the teacher, which would hold uninitialised memory on every other process."""
    import os

    def enabled(name: str) -> bool:
        return os.environ.get(name, "false").lower() in ("1", "true", "yes", "on")

    if enabled("ACCELERATE_USE_FSDP") and enabled("FSDP_CPU_RAM_EFFICIENT_LOADING"):
        raise ValueError(
            "set fsdp_cpu_ram_efficient_loading: false in the accelerate config: the teacher is not wrapped by "
            "FSDP, so it would not receive the weights that this option loads on the first process only"
        )


def load_model(path, role: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        local_model_dir(path, role), local_files_only=True, **torch_dtype_kwargs(dtype)
    )


def add_lora(model: nn.Module, *, r: int = 16, alpha: int = 128, dropout: float = 0.05, dora: bool = True) -> nn.Module:
    """The model with a trainable peft LoRA (DoRA) adapter on all attention and MLP linear layers."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear", use_dora=dora, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # peft asks transformers ≥ 5 a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def load_student(
    path, dtype: torch.dtype, *, use_lora: bool = True, lora_r: int = 16, lora_alpha: int = 128,
    lora_dropout: float = 0.05, dora: bool = True, gradient_checkpointing: bool = False, seed: Optional[int] = None,
) -> nn.Module:
    """The student as the trainer trains it: from `path`, with gradient checkpointing when asked, and a LoRA
    (DoRA) adapter unless `use_lora=False`. With `seed` the adapter's initialisation is drawn right after
    `torch.manual_seed(seed)`, so that it depends on the seed alone and not on how many random numbers
    `from_pretrained` happened to draw while loading (which varies with the transformers version)."""
    student = load_model(path, "student", dtype)
    if gradient_checkpointing:
        student.config.use_cache = False
        options = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            student.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    if use_lora:
        if seed is not None:
            torch.manual_seed(seed)
        student = add_lora(student, r=lora_r, alpha=lora_alpha, dropout=lora_dropout, dora=dora)
    return student


class HiddenStates(nn.Module):
    """A causal LM's forward up to the last hidden states `[R, T, H]` (after the final norm), no logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # what FSDP's transformer auto-wrap policy looks up on the module it wraps
        self._no_split_modules = getattr(unwrap_peft(model), "_no_split_modules", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return lm_head_inputs(self.model, input_ids, attention_mask=attention_mask).hidden_states


@dataclass
class LMHead:
    """The operands of one model's logits: softcap(h @ weight.T + bias), weight cut to the shared vocabulary."""

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]


def lm_head_operands(student: nn.Module, teacher: nn.Module, vocab_size: int) -> tuple[LMHead, LMHead]:
    """(student, teacher) lm_head operands cut to the first `vocab_size` rows; the teacher's detached."""
    student_weight, student_bias, student_cap = lm_head_of(student)
    teacher_weight, teacher_bias, teacher_cap = lm_head_of(teacher)
    for role, weight in (("student", student_weight), ("teacher", teacher_weight)):
        if _rows(weight) < vocab_size:
            raise ValueError(f"the {role}'s lm_head has {_rows(weight)} rows, fewer than the vocabulary ({vocab_size})")
    cut = slice(0, vocab_size)
    return (
        LMHead(student_weight[cut], None if student_bias is None else student_bias[cut], student_cap),
        LMHead(teacher_weight[cut].detach(), None if teacher_bias is None else teacher_bias[cut].detach(), teacher_cap),
    )


def student_lm_head(student: nn.Module, vocab_size: int) -> LMHead:
    """The student's lm_head operands cut to the first `vocab_size` rows (a teacher cache: no teacher head)."""
    weight, bias, softcap = lm_head_of(student)
    if _rows(weight) < vocab_size:
        raise ValueError(f"the student's lm_head has {_rows(weight)} rows, fewer than the vocabulary ({vocab_size})")
    cut = slice(0, vocab_size)
    return LMHead(weight[cut], None if bias is None else bias[cut], softcap)


def _rows(weight: torch.Tensor) -> int:
    """The rows of an lm_head weight; a ZeRO-3-partitioned parameter (an empty local tensor) keeps its
    whole shape in `ds_shape`."""
    return getattr(weight, "ds_shape", weight.shape)[0]


def shared_vocab_size(student: nn.Module, teacher: nn.Module, tokenizer) -> int:
    """The vocabulary the loss compares the two models over: the tokenizer's token ids (0 to the largest,
    normally `len(tokenizer)`), not the padding rows of the lm_heads; both lm_heads must cover it."""
    vocab_size = max(len(tokenizer), 1 + max(tokenizer.get_vocab().values()))
    rows = min(_rows(lm_head_of(student)[0]), _rows(lm_head_of(teacher)[0]))
    if vocab_size > rows:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the lm_heads only {rows} shared rows: "
            "teacher and student must cover the tokenizer's vocabulary"
        )
    return vocab_size


def is_deepspeed_zero3(accelerator) -> bool:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def check_engine(accelerator, use_lora: bool) -> None:
    """Refuse the engines the trainer cannot train with, before any model is loaded:
    - FSDP version 1: after the student's forward, FSDP1 (torch 2.13) leaves the root unit's lm_head weight as
      a sharded flat view, so the fused loss, which reads it outside the forward, gets a shard (FSDP2 keeps it
      whole from the root's forward to the backward);
    - full fine-tuning under DeepSpeed ZeRO-3: the lm_head weight is gathered read-only for the fused loss,
      so it would get no gradient."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise ValueError(
            "FSDP version 1 is not supported: it shards the lm_head weight again after the forward, and the fused "
            "loss reads it after the forward; set fsdp_version: 2 in the accelerate config "
            "(examples/accelerate/fsdp.yaml)"
        )
    if not use_lora and is_deepspeed_zero3(accelerator):
        raise ValueError(
            "full fine-tuning (use_lora=False) is not supported under DeepSpeed ZeRO-3: train a LoRA adapter"
        )


def configure_deepspeed(accelerator, batch_size: int, max_grad_norm: Optional[float]) -> None:
    """Fill in the DeepSpeed settings that accelerate takes from a prepared data loader, which the trainer
    does not have: the micro-batch (`batch_size` pairs), and the clipping (the trainer's `max_grad_norm`; the
    DeepSpeed engine clips, so a different number in the config is refused). A no-op without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = batch_size
    clipping = float(max_grad_norm or 0.0)
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = clipping
    elif float(config["gradient_clipping"]) != clipping:
        raise ValueError(
            f"the DeepSpeed config clips gradients at {config['gradient_clipping']} but the trainer's max_grad_norm is "
            f"{max_grad_norm}: remove gradient_clipping from the config (the trainer fills it in) or make them equal"
        )


@contextlib.contextmanager
def loading_unpartitioned(accelerator):
    """A context in which `from_pretrained` loads whole weights on this process alone. Under DeepSpeed ZeRO-3
    accelerate registers its config with transformers, which then partitions every model it loads (whatever
    `zero3_init_flag` says), a collective that would wait for the other processes. A no-op otherwise."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    registered = getattr(plugin, "dschf", None)
    if registered is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def gathered_parameters(accelerator, *tensors):
    """A context in which ZeRO-3-partitioned parameters are whole (read-only); a no-op otherwise."""
    if not is_deepspeed_zero3(accelerator):
        return contextlib.nullcontext()
    import deepspeed

    params = [t for t in tensors if isinstance(t, nn.Parameter)]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def prepare_teacher(accelerator, teacher: nn.Module) -> nn.Module:
    """The frozen teacher on the training device: under DeepSpeed ZeRO-3 partitioned like the student (an
    inference engine, as TRL prepares its reference models; the model returned is the engine's module, whose
    layers gather their weights when called), else replicated on every process (DDP, FSDP)."""
    teacher.eval()
    teacher.requires_grad_(False)
    if accelerator.state.deepspeed_plugin is None:
        return teacher.to(accelerator.device)
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    if config.get("zero_optimization", {}).get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    hidden = getattr(getattr(teacher, "config", None), "hidden_size", None)
    zero = config["zero_optimization"]
    if hidden and zero.get("stage") == 3:  # the sizes that accelerate fills in for the student only
        for key, value in (
            ("reduce_bucket_size", hidden * hidden),
            ("stage3_param_persistence_threshold", 10 * hidden),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
        ):
            if zero.get(key) == "auto":
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    object.__setattr__(teacher, "_deepspeed_engine", engine)  # keep it alive, unregistered as a submodule
    return teacher


def save_final_model(model: nn.Module, tokenizer, folder: Path) -> nn.Module:
    """Save the trained student so that `AutoModelForCausalLM.from_pretrained(folder)` loads it: a peft model
    is merged into its base weights (in place; the adapter itself is saved first to `folder/adapter`). The
    tokenizer is saved beside it. Returns the (merged) model."""
    folder.mkdir(parents=True, exist_ok=True)
    if unwrap_peft(model) is not model:
        model.save_pretrained(folder / "adapter")
        tokenizer.save_pretrained(folder / "adapter")
        model = model.merge_and_unload()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
