"""The one Megatron <-> Hugging Face parameter mapping for the Llama family (Llama, Qwen2, Qwen3, Qwen3-MoE).

Weight sync, HF export and HF import all go through `HFMapping`; nothing else knows both layouts.

Layouts that differ between the two worlds (and why):
- Fused QKV: Megatron keeps one `linear_qkv` whose rows are grouped per KV group
  ``[q_0 .. q_{n-1}, k, v]`` (n = query heads per group) so that a TP split over rows hands each rank
  whole KV groups. HF keeps separate q/k/v projections with heads in order.
- Fused gate/up: Megatron's `linear_fc1` holds ``[gate; up]`` *per TP shard* (each rank needs both
  halves for SwiGLU), so the unsharded tensor is not simply ``[gate; up]``.
- Vocabulary: Megatron pads the vocabulary to a multiple of TP (and a user multiple); HF does not.
- Tied embeddings: HF has no `lm_head.weight`; Megatron's last PP stage keeps a copy in `output_layer`.
- Pipeline stages number their layers from 0; `layer_offset` turns them into global HF layer indices.
- Transformer Engine fuses the pre-attention/pre-MLP norms into `linear_qkv`/`linear_fc1`
  (`layer_norm_weight`); the local spec keeps `input_layernorm`/`pre_mlp_layernorm`. Both are mapped.
- Experts (Qwen3-MoE): the HF names are the hub's, one tensor per expert (`mlp.experts.E.gate_proj`, what
  vLLM loads and transformers writes), never transformers' fused in-memory `experts.gate_up_proj`. Megatron
  numbers an EP rank's experts from 0 (`local_experts.J` in the local spec, `weightJ` in TE's grouped
  MLP): global expert E = EP rank x experts per rank + J, passed in as `expert_offset`. Each expert's
  fc1/fc2 is TP-split like a dense MLP's (over the expert-TP group); the router is replicated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from megatron_oapl.models.presets import Architecture

# Megatron name (layer index as {i}) -> (kind, HF name(s)).
#   replicated: same tensor on every TP rank;  column: split over rows (dim 0);  row: split over dim 1;
#   vocab: column split of a padded vocabulary;  qkv / qkv_bias / fc1: fused layouts described above.
_LAYER_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("replicated", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.weight": (
        "qkv",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    ),
    "self_attention.linear_qkv.bias": (
        "qkv_bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    ),
    "self_attention.q_layernorm.weight": ("replicated", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("replicated", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("replicated", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.weight": ("fc1", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
_GLOBAL_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("replicated", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
# One expert's fc1/fc2: SequentialMLP (local spec) `local_experts.J.linear_fc1.weight`, TEGroupedMLP
# `linear_fc1.weightJ`.
_EXPERT_RE = re.compile(
    r"^mlp\.experts\.(?:local_experts\.(\d+)\.(linear_fc[12])\.weight|(linear_fc[12])\.weight(\d+))$")
_EXPERT_RULES = {"linear_fc1": ("fc1", ("gate_proj.weight", "up_proj.weight")),
                 "linear_fc2": ("row", ("down_proj.weight",))}
_LAYER_RULES["mlp.router.weight"] = ("replicated", ("mlp.gate.weight",))
# Megatron extra state (FP8 metadata) and DDP wrappers are not weights.
_SKIP_SUFFIXES = ("._extra_state",)


def strip_wrappers(name: str) -> str:
    """`module.module.decoder...` (DDP / Float16Module wrappers) -> `decoder...`."""
    while name.startswith("module."):
        name = name[len("module.") :]
    return name


@dataclass(frozen=True)
class HFMapping:
    arch: Architecture
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # the true (unpadded) vocabulary
    tie_word_embeddings: bool
    num_experts: int = 0  # routed experts per layer (0: dense)

    @classmethod
    def from_model_config(cls, arch: Architecture, model_cfg) -> "HFMapping":
        heads = model_cfg.num_attention_heads
        return cls(
            arch=arch,
            num_attention_heads=heads,
            num_query_groups=model_cfg.num_query_groups or heads,
            head_dim=model_cfg.kv_channels or model_cfg.hidden_size // heads,
            vocab_size=model_cfg.vocab_size,
            tie_word_embeddings=model_cfg.tie_word_embeddings,
            num_experts=model_cfg.num_experts,
        )

    @classmethod
    def for_config(cls, model_cfg) -> "HFMapping":
        """The mapping of the run config's model section (its preset picks the architecture)."""
        from megatron_oapl.models.presets import get_architecture

        return cls.from_model_config(get_architecture(model_cfg.preset), model_cfg)

    # ---- names ----------------------------------------------------------------------------------

    @staticmethod
    def is_expert(mcore_name: str) -> bool:
        """An expert's weight: split over the expert-parallel (and expert-TP) group, not the dense groups."""
        match = _LAYER_RE.match(strip_wrappers(mcore_name))
        return match is not None and _EXPERT_RE.match(match.group(2)) is not None

    def rule(self, mcore_name: str, layer_offset: int = 0, expert_offset: int = 0) -> tuple[str, list[str]] | None:
        """(kind, HF names) for a Megatron parameter, or None if it is not exported.

        `output_layer.weight` of a tied model is a copy of the embedding and is not exported. An expert's
        global index is `expert_offset` (this EP rank's first expert) plus its local index.
        """
        name = strip_wrappers(mcore_name)
        if name.endswith(_SKIP_SUFFIXES):
            return None
        if name in _GLOBAL_RULES:
            if name == "output_layer.weight" and self.tie_word_embeddings:
                return None
            kind, hf = _GLOBAL_RULES[name]
            return kind, list(hf)
        match = _LAYER_RE.match(name)
        expert = _EXPERT_RE.match(match.group(2)) if match else None
        if match is None or (expert is None and match.group(2) not in _LAYER_RULES):
            raise KeyError(f"no HF mapping for Megatron parameter {mcore_name!r}")
        layer = int(match.group(1)) + layer_offset
        if expert is not None:
            local, fc = (int(expert.group(1)), expert.group(2)) if expert.group(1) else (int(expert.group(4)),
                                                                                       expert.group(3))
            kind, hf = _EXPERT_RULES[fc]
            return kind, [f"model.layers.{layer}.mlp.experts.{expert_offset + local}.{suffix}" for suffix in hf]
        kind, hf = _LAYER_RULES[match.group(2)]
        return kind, [f"model.layers.{layer}.{suffix}" for suffix in hf]

    @staticmethod
    def tp_split_dim(kind: str) -> int | None:
        """The dimension TP shards are split along (None: replicated)."""
        return {"replicated": None, "row": 1}.get(kind, 0)

    # ---- Megatron -> HF ---------------------------------------------------------------------------

    def to_hf(
        self, mcore_name: str, tp_shards: list[torch.Tensor], layer_offset: int = 0, expert_offset: int = 0
    ) -> list[tuple[str, torch.Tensor]]:
        """Full HF tensors from the TP shards (in TP-rank order) of one Megatron parameter."""
        rule = self.rule(mcore_name, layer_offset, expert_offset)
        if rule is None:
            return []
        kind, hf_names = rule
        if kind == "replicated":
            return [(hf_names[0], tp_shards[0])]
        if kind == "row":
            return [(hf_names[0], torch.cat(tp_shards, dim=1))]
        if kind == "vocab":
            return [(hf_names[0], torch.cat(tp_shards, dim=0)[: self.vocab_size])]
        if kind in ("qkv", "qkv_bias"):
            return list(zip(hf_names, self._split_qkv(torch.cat(tp_shards, dim=0))))
        if kind == "fc1":
            halves = [shard.chunk(2, dim=0) for shard in tp_shards]
            gate = torch.cat([h[0] for h in halves], dim=0)
            up = torch.cat([h[1] for h in halves], dim=0)
            return [(hf_names[0], gate), (hf_names[1], up)]
        raise AssertionError(kind)

    def _split_qkv(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g, d = self.num_query_groups, self.head_dim
        per_group = self.num_attention_heads // g
        grouped = fused.reshape(g, (per_group + 2) * d, *fused.shape[1:])
        q, k, v = grouped.split([per_group * d, d, d], dim=1)
        rest = fused.shape[1:]
        return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)

    # ---- HF -> Megatron ---------------------------------------------------------------------------

    def to_megatron_shard(
        self,
        mcore_name: str,
        get_hf: Callable[[str], torch.Tensor],
        tp_rank: int,
        tp_size: int,
        layer_offset: int = 0,
        padded_vocab_size: int | None = None,
        expert_offset: int = 0,
    ) -> torch.Tensor:
        """This TP rank's shard of a Megatron parameter, built from full HF tensors (for an expert: its
        expert-TP rank and size)."""
        name = strip_wrappers(mcore_name)
        if name == "output_layer.weight" and self.tie_word_embeddings:
            name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
        rule = self.rule(name, layer_offset, expert_offset)
        if rule is None:
            raise KeyError(f"Megatron parameter {mcore_name!r} has no HF source")
        kind, hf_names = rule
        if kind == "replicated":
            return get_hf(hf_names[0])
        if kind == "row":
            return get_hf(hf_names[0]).chunk(tp_size, dim=1)[tp_rank]
        if kind == "vocab":
            full = get_hf(hf_names[0])
            padded = padded_vocab_size or full.shape[0]
            if padded > full.shape[0]:
                pad = full.new_zeros(padded - full.shape[0], *full.shape[1:])
                full = torch.cat([full, pad], dim=0)
            return full.chunk(tp_size, dim=0)[tp_rank]
        if kind in ("qkv", "qkv_bias"):
            fused = self._fuse_qkv(*(get_hf(n) for n in hf_names))
            return fused.chunk(tp_size, dim=0)[tp_rank]
        if kind == "fc1":
            gate, up = (get_hf(n).chunk(tp_size, dim=0)[tp_rank] for n in hf_names)
            return torch.cat([gate, up], dim=0)
        raise AssertionError(kind)

    def _fuse_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g, d = self.num_query_groups, self.head_dim
        per_group = self.num_attention_heads // g
        rest = q.shape[1:]
        fused = torch.cat(
            [q.reshape(g, per_group * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
        )
        return fused.reshape(-1, *rest)

    def hf_names(self, mcore_names: Iterable[str], layer_offset: int = 0) -> list[str]:
        out = []
        for name in mcore_names:
            rule = self.rule(name, layer_offset)
            if rule is not None:
                out.extend(rule[1])
        return out
