"""Pure-torch sampling helpers shared by engines: temperature + top-p, and the sampled token's log-prob.

The log-prob an engine reports is that of the distribution it actually drew from: the log-softmax of the
*processed* logits (divided by the temperature, then top-p masked). This is what vLLM returns with
`LLM(logprobs_mode="processed_logprobs")` (its default, `raw_logprobs`, is the log-softmax of the raw
logits, before temperature and top-p; see docs/GPU-APIS.md). OAPL's behaviour policy is the processed one,
so both the light torch engine and the vLLM engine must report processed log-probs.

The top-p mask follows vLLM's formulation (sort ascending, drop the tokens whose ascending cumulative
probability is <= 1 - top_p, never drop the top token), which keeps exactly the smallest set of
highest-probability tokens whose cumulative probability is >= top_p. At an exact boundary (the nucleus sums
to top_p up to float rounding) rounding decides, as it does in vLLM.
"""

from __future__ import annotations

import math

import torch

__all__ = ["process_logits", "sample_with_logprobs"]


def _check(temperature: float, top_p: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def process_logits(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The logits of the distribution a sampler draws from: `logits / temperature`, then top-p masked.

    Args:
        logits: `[B, V]` raw logits (any float dtype; the result is float32, or float64 for float64 input,
            because a bf16 softmax over a large vocabulary loses the digits the log-probs need).
        temperature: > 0; 0 means greedy, returned as a point mass (the argmax logit kept at 0, every other
            entry -inf), so the "processed" log-prob of the greedy token is 0.
        top_p: in (0, 1]; 1 disables the mask. Keeps the smallest set of highest-probability tokens whose
            cumulative probability is >= top_p (always at least the top token).

    Returns:
        `[B, V]` processed logits; masked entries are -inf.
    """
    _check(temperature, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    if temperature == 0:
        # Greedy: the distribution sampled from is the point mass on the argmax (first one on ties).
        out = torch.full_like(x, float("-inf"))
        return out.scatter(-1, x.argmax(dim=-1, keepdim=True), 0.0)
    if temperature != 1.0:
        x = x / temperature
    if top_p < 1.0:
        # As vLLM: ascending sort; drop a token iff the probability mass at or below it (itself included)
        # is <= 1 - top_p, i.e. iff the tokens strictly above it already reach top_p. Never drop the top one.
        sorted_x, order = x.sort(dim=-1, descending=False)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1.0 - top_p
        drop_sorted[:, -1] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return x


def sample_with_logprobs(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from the processed distribution and return its log-prob under it.

    Args:
        logits: `[B, V]` raw logits.
        temperature, top_p: as in `process_logits`.
        generator: a `torch.Generator` on `logits.device` (reproducible draws); None uses the global RNG.

    Returns:
        `(token_ids [B] long, logprobs [B] float32/float64)`, where `logprobs[b]` is
        `log_softmax(process_logits(logits))[b, token_ids[b]]` (vLLM's `processed_logprobs`). Masked tokens
        have probability exactly 0 and are never drawn.
    """
    processed = process_logits(logits, temperature, top_p)
    logp = torch.log_softmax(processed, dim=-1)
    if temperature == 0:
        tokens = processed.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp.exp(), num_samples=1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
