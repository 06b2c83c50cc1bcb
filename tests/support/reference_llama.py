"""A plain-PyTorch Llama/Qwen2/Qwen3 decoder with Hugging Face parameter names.

The independent reference the Megatron learner is checked against: written from the architecture's
definition (pre-norm RMSNorm, GQA with half-rotation RoPE, SwiGLU), sharing no code with Megatron or
with the project's mapping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RefConfig:
    vocab_size: int = 32
    hidden_size: int = 64
    ffn_hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    eps: float = 1e-5
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def _rope(x, theta):
    # x: [b, heads, s, d]; rotate the two halves of each head (HF / Megatron non-interleaved style).
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Attention(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.c = c
        d = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * d, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * d, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.num_heads * d, c.hidden_size, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(d, c.eps)
            self.k_norm = RMSNorm(d, c.eps)

    def forward(self, x):
        b, s, _ = x.shape
        c, d = self.c, self.c.head_dim
        q = self.q_proj(x).view(b, s, c.num_heads, d)
        k = self.k_proj(x).view(b, s, c.num_kv_heads, d)
        v = self.v_proj(x).view(b, s, c.num_kv_heads, d)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = _rope(q, c.rope_theta), _rope(k, c.rope_theta)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        causal = torch.ones(s, s, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(c.ffn_hidden_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.eps)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.eps)


class ReferenceLlama(nn.Module):
    def __init__(self, c: RefConfig, seed: int = 0):
        super().__init__()
        self.config = c
        torch.manual_seed(seed)
        self.model = Decoder(c)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        with torch.no_grad():
            # nn.Embedding's N(0, 1) with a tied head gives one-hot next-token distributions (the logit of
            # the current token is |e|^2 ~ hidden); a smaller scale keeps sampling non-degenerate.
            self.model.embed_tokens.weight.normal_(0, 0.1)
            # Non-trivial norm weights and biases, so that a mix-up would show.
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith(".bias"):
                    p.uniform_(0.5, 1.5) if name.endswith("norm.weight") else p.normal_(0, 0.1)

    def forward(self, tokens):
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x)
        x = self.model.norm(x)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        return x @ head.t()
