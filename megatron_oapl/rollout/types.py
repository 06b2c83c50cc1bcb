"""What crosses the learner/fleet boundary: sampling parameters, samples and versioned groups.

Token ids are kept exactly as the engine produced them and are never re-tokenised; per-token log-probs
are those of the distribution the sampler actually drew from (temperature- and top-p-processed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    n: int  # completions per prompt (the group size G)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()  # e.g. EOS; the stop token is part of the completion
    seed: int | None = None


@dataclass
class Sample:
    token_ids: list[int]  # completion tokens only (prompt excluded), including a final stop token
    logprobs: list[float]  # one per completion token, under the processed sampling distribution
    finish_reason: str  # "stop" (a stop token was sampled) | "length" (max_new_tokens reached)
    text: str = ""  # decoded completion, for scoring and inspection only
    reward: float | None = None


@dataclass
class Prompt:
    prompt_id: str
    token_ids: list[int]
    text: str = ""
    answer: Any = None  # what the reward function compares against
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutGroup:
    """G samples of one prompt from one policy version — the unit the lag schedule admits or drops."""

    prompt: Prompt
    samples: list[Sample]
    policy_version: int
    temperature: float
    top_p: float
    engine_id: int = 0
    order_index: int = 0  # the work order it answers (rollout/orders.py): fixes its place in the batches
    split: str = "train"  # "eval": pass@k samples of held-out prompt `order_index`, never trained on
    generate_seconds: float = 0.0  # from the engine taking the order to its last sample scored
    reward_errors: int = 0  # samples whose reward raised or returned no finite number (scored 0)
    reward_timeouts: int = 0  # samples whose reward ran past rewards.timeout_s (scored 0)

    @property
    def rewards(self) -> list[float]:
        return [s.reward if s.reward is not None else 0.0 for s in self.samples]
