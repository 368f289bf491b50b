"""Tiny transformers models (random init, no downloads) and the folders ``save_pretrained``
writes for them: the checkpoints whose layout differs from the model's (issue 22).

Importing this module needs transformers; tests ``pytest.importorskip("transformers")`` first.
The factories need no argument, so the command line can build them
(``--model support.hf:tiny_mixtral``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tr
from torch import nn

__all__ = [
    "BUILDERS",
    "DECODER",
    "VISION",
    "from_pretrained",
    "save_pretrained",
    "tiny_dinov2",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_mixtral",
    "tiny_qwen_moe",
    "tiny_vit",
    "tiny_vit_classifier",
]


# The one tiny decoder shape every causal LM here shares: 2 layers, grouped-query attention.
DECODER = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def mixtral_config(experts: int = 4, vocab: int = 64) -> tr.MixtralConfig:
    """The issue's Mixtral: 2 layers, 4 experts (21 parameter tensors)."""
    return tr.MixtralConfig(
        **{**DECODER, "vocab_size": vocab}, num_local_experts=experts, num_experts_per_tok=2
    )


def tiny_mixtral() -> nn.Module:
    return tr.MixtralForCausalLM(mixtral_config())


def tiny_qwen_moe() -> nn.Module:
    cfg = tr.Qwen2MoeConfig(
        **DECODER,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return tr.Qwen2MoeForCausalLM(cfg)


# The one tiny vision transformer shape: 32x32 images in 8x8 patches, 2 layers.
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)


def _vit_config() -> tr.ViTConfig:
    return tr.ViTConfig(**VISION, num_labels=10)


def tiny_vit() -> nn.Module:
    return tr.ViTModel(_vit_config())


def tiny_vit_classifier() -> nn.Module:
    return tr.ViTForImageClassification(_vit_config())


def tiny_dinov2() -> nn.Module:
    """A SwiGLU Dinov2: its checkpoint's fused ``weights_in`` is chunked into two tensors."""
    return tr.Dinov2Model(tr.Dinov2Config(**VISION, use_swiglu_ffn=True))


def tiny_gpt2(tie: bool = True) -> nn.Module:
    """GPT-2, its head tied to the token embedding as GPT-2's config does by default."""
    cfg = tr.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=tie
    )
    return tr.GPT2LMHeadModel(cfg)


def tiny_llama(tie: bool = False) -> nn.Module:
    """Llama, its head untied from the token embedding unless ``tie``."""
    return tr.LlamaForCausalLM(tr.LlamaConfig(**DECODER, tie_word_embeddings=tie))


BUILDERS = {
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen_moe,
    "vit": tiny_vit,
    "vit_classifier": tiny_vit_classifier,
    "dinov2": tiny_dinov2,
}


def save_pretrained(model: nn.Module, folder: Path, shard: str | None = None) -> Path:
    """The folder transformers writes for ``model`` (one file, or shards of ``shard`` bytes)."""
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


def from_pretrained(model: nn.Module, folder: Path, **kwargs) -> dict[str, torch.Tensor]:
    """The oracle: the state transformers' own ``from_pretrained`` loads from ``folder``."""
    return type(model).from_pretrained(folder, **kwargs).state_dict()
