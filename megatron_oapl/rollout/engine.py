"""The engine interface: sample groups with log-probs; load a stream of HF-named weights."""

from __future__ import annotations

import abc
from typing import Iterable

import torch

from megatron_oapl.rollout.types import Sample, SamplingParams


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
