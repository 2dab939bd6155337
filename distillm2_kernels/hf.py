"""Hugging Face helper: what a causal LM's lm_head would multiply, without computing its logits.

`lm_head_inputs(model, input_ids, attention_mask=...)` runs the model's decoder (the transformer body,
with any peft adapters inside it active) and returns its last hidden states `[B, T, H]` together with the
lm_head weight `[V, H]`, its bias, and the model's final logit soft-cap (Gemma-2's
`final_logit_softcapping`), so that a trainer can call the fused-linear losses directly::

    student = lm_head_inputs(student_model, input_ids, attention_mask=mask)
    with torch.no_grad():
        teacher = lm_head_inputs(teacher_model, input_ids, attention_mask=mask)
    loss = fused_linear_skl(
        student.hidden_states, student.weight, teacher.hidden_states, teacher.weight.detach(),
        student_bias=student.bias, teacher_bias=teacher.bias, labels=labels,
        softcap=(student.softcap, teacher.softcap),
    )

`model(...).logits[b, t]` equals `softcap(hidden_states[b, t] @ weight.T + bias)`. Works for a plain
`transformers` causal LM and for one wrapped by peft (`PeftModel`); with tied embeddings the weight is the
input embedding matrix (the same Parameter). The teacher's weight is a Parameter that usually still
requires grad: pass `.detach()` of it (or freeze the teacher). Models that rescale their logits after the
lm_head in another way (Cohere's `logit_scale`, Granite's `logits_scaling`) are refused rather than
silently mis-scaled; an lm_head adapted by LoRA is refused too (merge the adapter first).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["LMHeadInputs", "lm_head_inputs", "lm_head_of", "unwrap_peft"]


@dataclass
class LMHeadInputs:
    """The operands of a causal LM's final projection: logits = softcap(hidden_states @ weight.T + bias)."""

    hidden_states: torch.Tensor  # [B, T, H], after the final norm
    weight: torch.Tensor  # [V, H]
    bias: Optional[torch.Tensor]  # [V] or None
    softcap: Optional[float]  # c in c·tanh(z / c), or None


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft `PeftModel` (its adapter layers stay in place); else `model`."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _plain_linear(head: nn.Module) -> nn.Linear:
    """The `nn.Linear` that computes the logits, looking through peft's `modules_to_save` wrapper."""
    modules_to_save = getattr(head, "modules_to_save", None)
    if isinstance(modules_to_save, nn.ModuleDict):  # peft ModulesToSaveWrapper: the active copy trains
        active = [name for name in head.active_adapters if name in modules_to_save]
        head = modules_to_save[active[0]] if active and not head.disable_adapters else head.original_module
    if hasattr(head, "base_layer") or not isinstance(head, nn.Linear):
        raise NotImplementedError(
            f"the lm_head is a {type(head).__name__}, not a plain nn.Linear (a LoRA adapter on the lm_head?); "
            "the fused-linear loss needs its weight as one matrix: merge the adapter or leave the lm_head out "
            "of target_modules"
        )
    return head


def _final_softcap(config) -> Optional[float]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("logit_scale", "logits_scaling"):
        scale = getattr(text_config, name, None)
        if scale is not None and scale != 1:
            raise NotImplementedError(
                f"this model scales its logits after the lm_head (config.{name} = {scale}); the fused-linear "
                "helper does not reproduce that"
            )
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return None if softcap is None else float(softcap)


def lm_head_of(model: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
    """(weight [V, H], bias [V] or None, final soft-cap or None) of a causal LM, plain or peft-wrapped."""
    base = unwrap_peft(model)
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings (lm_head): is it a causal LM?")
    linear = _plain_linear(head)
    return linear.weight, linear.bias, _final_softcap(base.config)


def lm_head_inputs(model: nn.Module, input_ids: Optional[torch.Tensor] = None, **model_kwargs) -> LMHeadInputs:
    """Run the decoder of `model` (plain or peft-wrapped causal LM) on `input_ids` and the other forward
    arguments (attention_mask, position_ids, inputs_embeds, ...), and return the lm_head's operands instead
    of the logits. `use_cache` defaults to False."""
    base = unwrap_peft(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.base_model
    if decoder is base:
        raise ValueError(f"could not find the decoder (the model without its lm_head) of {type(base).__name__}")
    model_kwargs.setdefault("use_cache", False)
    outputs = decoder(input_ids=input_ids, **model_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    weight, bias, softcap = lm_head_of(base)
    return LMHeadInputs(hidden_states=hidden, weight=weight, bias=bias, softcap=softcap)
