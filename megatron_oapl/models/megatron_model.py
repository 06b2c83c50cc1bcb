"""Build the Megatron-Core model for a run: TransformerConfig, layer spec and GPTModel.

On a GPU machine with Transformer Engine the TE layer spec is used (required for FP8); elsewhere
Megatron's local spec. Both produce the same parameters (modulo TE's fused layer-norm placement), and
`hf_mapping.py` handles both names. Under sequence parallelism the local spec's norms are swapped for
`SequenceParallelTorchNorm` (Megatron's torch norm wrapper refuses sequence parallelism).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from megatron_oapl.config import CHOICES, ConfigError, check_hardware
from megatron_oapl.models.fp8 import fp8_transformer_config_kwargs
from megatron_oapl.models.presets import get_architecture, router_aux_loss_coeff
from megatron_oapl.models.rope import apply_rope_scaling
from megatron_oapl.platform import transformer_engine_problem

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def params_dtype(precision_cfg) -> torch.dtype:
    return _DTYPES[precision_cfg.params_dtype]


def use_transformer_engine() -> bool:
    """TE layers on a GPU with TE installed; a TE that is installed but broken is an error, not a fallback."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    problem = transformer_engine_problem()
    if problem:
        raise RuntimeError(problem)
    return True


def recompute_kwargs(par) -> dict:
    """Megatron's activation-recompute fields for `parallel.recompute`.

    full: each chunk of `recompute_num_layers` layers keeps only its input and is re-run in backward
    (recompute_method=uniform). selective: only core attention (the [b, heads, s, s] scores and
    softmax) is re-run; with TE's fused attention those are never stored, so full is the lever there.
    """
    if par.recompute == "none":
        return {"recompute_granularity": None}
    if par.recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": par.recompute_num_layers}
    if par.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    raise ConfigError(f"parallel.recompute={par.recompute!r} is not allowed "
                      f"(allowed: {', '.join(CHOICES['parallel.recompute'])})")


def moe_kwargs(model, par) -> dict:
    """Megatron's MoE fields for a Qwen3-MoE policy (dense: only the dispatcher, which Megatron checks anyway).

    Qwen3-MoE routes with a softmax over all experts, then top-k, renormalised when norm_topk_prob: the same
    as Megatron's softmax over the top-k logits (pre_softmax=False); without renormalisation it is Megatron's
    pre_softmax=True. Routing is dropless (no capacity factor), as in transformers and vLLM. The router runs
    in fp32 whatever the parameter dtype, so bf16 rounding does not decide which expert a token goes to.
    """
    if not model.num_experts:
        # Megatron's default (allgather) dispatcher refuses variable lengths.
        return {"moe_token_dispatcher_type": "alltoall" if par.micro_batch_tokens > 0 else "allgather"}
    aux = router_aux_loss_coeff(model)
    return {
        "num_moe_experts": model.num_experts,
        "moe_ffn_hidden_size": model.moe_ffn_hidden_size or model.ffn_hidden_size,
        "moe_router_topk": model.moe_router_topk,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not model.moe_norm_topk_prob,
        "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "aux_loss" if aux > 0 else "none",
        "moe_aux_loss_coeff": aux,
        "moe_z_loss_coeff": model.moe_z_loss_coeff or None,
        "moe_token_dispatcher_type": "alltoall",
        "moe_grouped_gemm": use_transformer_engine(),
        "expert_model_parallel_size": par.expert_model_parallel_size,
    }


def padded_vocab_size(model_cfg, tp_size: int) -> int:
    """Megatron splits the vocabulary over TP ranks, so it pads it to a multiple of (multiple * TP)."""
    multiple = max(1, model_cfg.make_vocab_size_divisible_by) * tp_size
    return -(-model_cfg.vocab_size // multiple) * multiple


def build_transformer_config(cfg):
    """A Megatron `TransformerConfig` for `cfg` (a RunConfig)."""
    # First: FP8 without GPU/TE, or a broken TE (which breaks `import megatron.core`), fail here with
    # the config's own message.
    check_hardware(cfg)
    from megatron.core.transformer.transformer_config import TransformerConfig

    model, par, prec = cfg.model, cfg.parallel, cfg.precision
    arch = get_architecture(model.preset)
    dtype = params_dtype(prec)
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups or model.num_attention_heads,
        kv_channels=model.kv_channels,
        layernorm_epsilon=model.norm_epsilon,
        init_method_std=model.init_method_std,
        # Llama family: RMSNorm, SwiGLU, no linear biases (Qwen2 adds q/k/v biases only).
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Parallelism.
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        pipeline_dtype=dtype,
        # Initialise full weights on CPU then split, so a TP=N model starts equal to TP=1 (same seed).
        use_cpu_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # The loss function returns (sum, count); Megatron divides by the global count after the
        # DP all-reduce, which makes the loss independent of micro-batch count and DP size.
        calculate_per_token_loss=True,
        # Token-budget micro-batches differ in shape: pipeline stages exchange each shape first.
        variable_seq_lengths=par.micro_batch_tokens > 0,
        **moe_kwargs(model, par),
        # Fused kernels exist only on GPU (apex / TE / jit CUDA).
        bias_activation_fusion=on_gpu,
        # The fused kernel is TE's, or apex's under the local spec (not installed without TE: it would raise).
        masked_softmax_fusion=on_gpu and use_transformer_engine(),
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=on_gpu,
        gradient_accumulation_fusion=False,
        **recompute_kwargs(par),
        **fp8_transformer_config_kwargs(prec.fp8),
    )


class SequenceParallelTorchNorm:
    """Megatron's `WrappedTorchNorm` (torch RMSNorm / LayerNorm) made usable under sequence parallelism.

    With sequence parallelism each TP rank normalises only its slice of the sequence, so a norm weight's
    gradient is partial on each rank. TE's and apex's norms tag their weights `sequence_parallel`, and
    Megatron's finalize_model_grads sums tagged gradients over the TP group; Megatron's torch wrapper
    lacks the tag and therefore asserts. This adds the tag (and nothing else).
    """

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"RMSNorm": torch.nn.RMSNorm, "LayerNorm": torch.nn.LayerNorm}[config.normalization]
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _with_sequence_parallel_norms(layer_spec):
    """The local layer spec with each torch norm replaced by `SequenceParallelTorchNorm`."""
    from dataclasses import replace

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def swap(module):
        return SequenceParallelTorchNorm if module is WrappedTorchNorm else module

    layer = layer_spec.submodules
    attention = layer.self_attention
    attention = replace(attention, submodules=replace(
        attention.submodules, q_layernorm=swap(attention.submodules.q_layernorm),
        k_layernorm=swap(attention.submodules.k_layernorm)))
    layer = replace(layer, input_layernorm=swap(layer.input_layernorm), self_attention=attention,
                    pre_mlp_layernorm=swap(layer.pre_mlp_layernorm))
    return replace(layer_spec, submodules=layer)


def build_layer_spec(cfg):
    from megatron.core.models.gpt import gpt_layer_specs

    arch = get_architecture(cfg.model.preset)
    experts = dict(num_experts=cfg.model.num_experts or None, moe_grouped_gemm=use_transformer_engine())
    if use_transformer_engine():
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_layernorm, **experts)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm, normalization="RMSNorm",
                                                    **experts)
    return _with_sequence_parallel_norms(spec) if cfg.parallel.sequence_parallel else spec


def build_block_spec(cfg, transformer_config):
    """What GPTModel builds its decoder from: the layer spec, or under sequence parallelism on the local
    spec the whole block (its final norm must be a `SequenceParallelTorchNorm` too)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer_spec = build_layer_spec(cfg)
    if not cfg.parallel.sequence_parallel or use_transformer_engine():
        return layer_spec
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(transformer_config),
                                      layer_norm=SequenceParallelTorchNorm)


def build_gpt_model(cfg, transformer_config, pre_process: bool, post_process: bool):
    """One pipeline stage of the policy (Megatron builds only this stage's layers)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(
        config=transformer_config,
        transformer_layer_spec=build_block_spec(cfg, transformer_config),
        vocab_size=padded_vocab_size(cfg.model, parallel_state.get_tensor_model_parallel_world_size()),
        max_sequence_length=cfg.model.max_seq_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.rotary_base,  # a float theta stays exact (Megatron only raises it to powers)
    )
    apply_rope_scaling(model, cfg.model.rope_scaling)
    return model


def layer_offset(model_chunk) -> int:
    """Global index of this chunk's first transformer layer (pipeline stages count from 0)."""
    from megatron.core.utils import get_attr_wrapped_model

    layers = get_attr_wrapped_model(model_chunk, "decoder").layers
    return layers[0].layer_number - 1 if len(layers) else 0
