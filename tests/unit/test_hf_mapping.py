"""The one Megatron <-> HF mapping, on tensors: HF -> TP shards -> HF is exact for every preset, and the
fused layouts are the ones Megatron's layers compute with (checked against explicit per-head math)."""

from __future__ import annotations

import pytest
import torch

from megatron_oapl.models.hf_mapping import HFMapping
from megatron_oapl.models.presets import ARCHITECTURES, get_architecture

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, VOCAB = 8, 4, 4, 32, 48, 30


def hf_state(arch_name: str, tie: bool, layers: int = 2) -> dict[str, torch.Tensor]:
    arch = get_architecture(arch_name)
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    state = {"model.embed_tokens.weight": r(VOCAB, HIDDEN), "model.norm.weight": r(HIDDEN)}
    if not tie:
        state["lm_head.weight"] = r(VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": r(HIDDEN),
            p + "self_attn.q_proj.weight": r(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": r(GROUPS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": r(GROUPS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": r(HIDDEN, HEADS * HEAD_DIM),
            p + "post_attention_layernorm.weight": r(HIDDEN),
            p + "mlp.gate_proj.weight": r(FFN, HIDDEN),
            p + "mlp.up_proj.weight": r(FFN, HIDDEN),
            p + "mlp.down_proj.weight": r(HIDDEN, FFN),
        })
        if arch.qkv_bias:
            state.update({p + f"self_attn.{x}_proj.bias": r(n * HEAD_DIM) for x, n in (("q", HEADS), ("k", GROUPS), ("v", GROUPS))})
        if arch.qk_layernorm:
            state.update({p + "self_attn.q_norm.weight": r(HEAD_DIM), p + "self_attn.k_norm.weight": r(HEAD_DIM)})
    return state


def megatron_names(arch_name: str, tie: bool, layers: range) -> list[str]:
    arch = get_architecture(arch_name)
    names = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"]
    for i in layers:
        p = f"decoder.layers.{i}."
        names += [p + s for s in ("input_layernorm.weight", "self_attention.linear_qkv.weight",
                                  "self_attention.linear_proj.weight", "pre_mlp_layernorm.weight",
                                  "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")]
        if arch.qkv_bias:
            names.append(p + "self_attention.linear_qkv.bias")
        if arch.qk_layernorm:
            names += [p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight"]
    return names


def mapping(arch_name: str, tie: bool) -> HFMapping:
    return HFMapping(get_architecture(arch_name), HEADS, GROUPS, HEAD_DIM, VOCAB, tie)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_to_shards_to_hf_is_exact(arch, tp, tie):
    """Two pipeline stages of one layer each, vocabulary padded to a multiple of 8 * TP."""
    state, m = hf_state(arch, tie), mapping(arch, tie)
    padded = -(-VOCAB // (8 * tp)) * (8 * tp)
    rebuilt: dict[str, torch.Tensor] = {}
    for offset in (0, 1):  # stage-local layer 0 is global layer `offset`
        for name in megatron_names(arch, tie, range(1)):
            shards = [m.to_megatron_shard(name, state.__getitem__, r, tp, offset, padded) for r in range(tp)]
            if "word_embeddings" in name or name == "output_layer.weight":
                assert all(s.shape[0] == padded // tp for s in shards)
            for hf_name, tensor in m.to_hf(name, shards, offset):
                if hf_name in rebuilt:
                    assert torch.equal(rebuilt[hf_name], tensor)
                rebuilt[hf_name] = tensor
    assert rebuilt.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(rebuilt[name], tensor), name


def test_fused_qkv_matches_per_head_attention_layout():
    """Megatron splits linear_qkv output per KV group as [q heads of the group, k, v]."""
    state, m = hf_state("qwen2", tie=True), mapping("qwen2", tie=True)
    get = state.__getitem__
    w = m.to_megatron_shard("decoder.layers.0.self_attention.linear_qkv.weight", get, 0, 1)
    b = m.to_megatron_shard("decoder.layers.0.self_attention.linear_qkv.bias", get, 0, 1)
    x = torch.randn(3, HIDDEN)
    out = (x @ w.t() + b).view(3, GROUPS, (HEADS // GROUPS + 2) * HEAD_DIM)
    q = x @ get("model.layers.0.self_attn.q_proj.weight").t() + get("model.layers.0.self_attn.q_proj.bias")
    k = x @ get("model.layers.0.self_attn.k_proj.weight").t() + get("model.layers.0.self_attn.k_proj.bias")
    per = HEADS // GROUPS
    for group in range(GROUPS):
        got_q = out[:, group, : per * HEAD_DIM]
        torch.testing.assert_close(got_q, q[:, group * per * HEAD_DIM : (group + 1) * per * HEAD_DIM])
        got_k = out[:, group, per * HEAD_DIM : (per + 1) * HEAD_DIM]
        torch.testing.assert_close(got_k, k[:, group * HEAD_DIM : (group + 1) * HEAD_DIM])


def test_fc1_shards_hold_gate_and_up_halves():
    state, m = hf_state("llama", tie=True), mapping("llama", tie=True)
    shard = m.to_megatron_shard("decoder.layers.1.mlp.linear_fc1.weight", state.__getitem__, 1, 2)
    gate, up = shard.chunk(2)
    torch.testing.assert_close(gate, state["model.layers.1.mlp.gate_proj.weight"][FFN // 2 :])
    torch.testing.assert_close(up, state["model.layers.1.mlp.up_proj.weight"][FFN // 2 :])


def test_tied_output_layer_is_not_exported_but_is_imported():
    state, m = hf_state("llama", tie=True), mapping("llama", tie=True)
    assert m.rule("output_layer.weight") is None
    got = m.to_megatron_shard("module.output_layer.weight", state.__getitem__, 0, 1)
    assert torch.equal(got, state["model.embed_tokens.weight"])


def test_unknown_parameter_names_the_parameter():
    with pytest.raises(KeyError, match="decoder.layers.0.mystery.weight"):
        mapping("llama", True).rule("decoder.layers.0.mystery.weight")
