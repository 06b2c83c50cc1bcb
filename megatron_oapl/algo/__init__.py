"""Pure-torch loss functions and estimators (no Megatron imports).

- :mod:`.oapl`: ``v_star``, ``oapl_loss`` (the OAPL objective, Eqs. 2-3).
- :mod:`.grpo`: ``group_normalized_advantages``, ``grpo_loss`` (the GRPO baseline).
- :mod:`.logprobs`: ``token_logprobs``, ``sequence_logprobs``.
- :mod:`.passk`: ``pass_at_k``.
"""

from .grpo import group_normalized_advantages, grpo_loss
from .logprobs import sequence_logprobs, token_logprobs
from .oapl import degenerate_groups, oapl_loss, v_star
from .passk import pass_at_k

__all__ = [
    "v_star",
    "oapl_loss",
    "degenerate_groups",
    "grpo_loss",
    "group_normalized_advantages",
    "token_logprobs",
    "sequence_logprobs",
    "pass_at_k",
]
