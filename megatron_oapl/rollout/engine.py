"""The engine interface: sample groups with log-probs; load a stream of HF-named weights."""

from __future__ import annotations

import abc
from typing import Iterable

import torch

from megatron_oapl.rollout.types import Sample, SamplingParams


def check_request(prompts: list[list[int]], params: SamplingParams) -> None:
    """The checks every engine applies to a generate call (same errors whichever engine runs)."""
    if params.n < 1:
        raise ValueError(f"SamplingParams.n must be >= 1, got {params.n}")
    if params.max_new_tokens < 1:
        raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {params.max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: an engine needs at least one token to condition on")


class Engine(abc.ABC):
    """An inference engine holding one policy version.

    `generate` returns, per prompt, `params.n` samples drawn at `params.temperature` / `params.top_p`,
    each with the log-probs of the processed distribution it was drawn from. `load_weights` replaces
    the policy with full (unsharded) HF-named tensors and sets the version; it is all-or-nothing.
    """

    version: int = 0

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]: ...

    @abc.abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def close(self) -> None:
        pass
