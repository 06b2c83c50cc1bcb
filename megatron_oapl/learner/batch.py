"""The learner's input: a global batch of rollout groups as padded token tensors (pure torch).

Layout (N = P groups x G samples, S = padded length):
- `tokens[N, S]`: prompt + completion token ids exactly as the engine produced them (never re-tokenised),
  right-padded (right padding never changes a causal model's outputs at earlier positions).
- `labels[N, S]`: `tokens` shifted left by one: position t predicts token t+1.
- `loss_mask[N, S]`: 1 where `labels` is a completion token (prompt and padding masked out).
- `rewards[P, G]`, `logp_lag[P, G]`: sequence-level reward and log-prob under pi_lag.
- `behaviour_logp[N, S]`: per-token engine log-probs aligned with `labels` (GRPO's IS ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch


@dataclass
class TrainBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    rewards: torch.Tensor
    logp_lag: torch.Tensor
    behaviour_logp: torch.Tensor
    group_size: int

    @property
    def num_groups(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def groups(self, start: int, stop: int) -> "TrainBatch":
        """Groups [start, stop) — whole groups, since V_hat needs every member of a group."""
        g = self.group_size
        return TrainBatch(
            tokens=self.tokens[start * g : stop * g],
            labels=self.labels[start * g : stop * g],
            loss_mask=self.loss_mask[start * g : stop * g],
            rewards=self.rewards[start:stop],
            logp_lag=self.logp_lag[start:stop],
            behaviour_logp=self.behaviour_logp[start * g : stop * g],
            group_size=g,
        )

    def shard(self, index: int, count: int) -> "TrainBatch":
        """The `index`-th of `count` equal slices of groups (data-parallel ranks)."""
        if self.num_groups % count:
            raise ValueError(f"{self.num_groups} groups do not split evenly over {count} ranks")
        per = self.num_groups // count
        return self.groups(index * per, (index + 1) * per)

    def micro_batches(self, groups_per_micro_batch: int | None) -> list["TrainBatch"]:
        per = groups_per_micro_batch or self.num_groups
        if self.num_groups % per:
            raise ValueError(f"{self.num_groups} groups do not split into micro-batches of {per}")
        return [self.groups(i, i + per) for i in range(0, self.num_groups, per)]

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(
            **{
                f.name: getattr(self, f.name).to(device) if f.name != "group_size" else self.group_size
                for f in fields(self)
            }
        )


def build_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[Sequence[int]]],
    rewards: Sequence[Sequence[float]],
    token_logp: Sequence[Sequence[Sequence[float]]] | None = None,
    pad_id: int = 0,
    seq_length: int | None = None,
) -> TrainBatch:
    """Pack P prompts with G completions each (token ids) into a TrainBatch.

    `token_logp[p][i]` are the engine's per-token log-probs of completion i (one per completion token);
    their sum is `logp_lag` (the `engine` source). Without them logp_lag is zero and must be recomputed.
    """
    num_groups, group_size = len(prompts), len(completions[0])
    rows = [list(prompts[p]) + list(c) for p in range(num_groups) for c in completions[p]]
    longest = max(len(r) for r in rows)
    length = seq_length or longest
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens exceeds seq_length={length}")
    n = len(rows)
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, length)
    behaviour = torch.zeros(n, length)
    for row, ids in enumerate(rows):
        p, i = divmod(row, group_size)
        prompt_len, comp = len(prompts[p]), completions[p][i]
        if len(completions[p]) != group_size:
            raise ValueError(f"group {p} has {len(completions[p])} completions, expected {group_size}")
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        # Label position t holds token t+1: completion tokens sit at label positions
        # prompt_len-1 .. prompt_len+len(comp)-2.
        loss_mask[row, prompt_len - 1 : prompt_len - 1 + len(comp)] = 1.0
        if token_logp is not None:
            values = torch.tensor(token_logp[p][i], dtype=torch.float32)
            behaviour[row, prompt_len - 1 : prompt_len - 1 + len(comp)] = values
    labels = torch.cat([tokens[:, 1:], torch.full((n, 1), pad_id, dtype=torch.long)], dim=1)
    reward_t = torch.tensor(rewards, dtype=torch.float32).reshape(num_groups, group_size)
    logp_lag = (behaviour * loss_mask).sum(-1).reshape(num_groups, group_size)
    return TrainBatch(tokens, labels, loss_mask, reward_t, logp_lag, behaviour, group_size)
