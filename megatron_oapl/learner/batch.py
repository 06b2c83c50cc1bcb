"""The learner's input: a global batch of rollout groups as padded token tensors (pure torch).

Layout (N = P groups x G samples, S = padded length):
- `tokens[N, S]`: prompt + completion token ids exactly as the engine produced them (never re-tokenised),
  right-padded (right padding never changes a causal model's outputs at earlier positions).
- `labels[N, S]`: `tokens` shifted left by one: position t predicts token t+1.
- `loss_mask[N, S]`: 1 where `labels` is a completion token (prompt and padding masked out).
- `rewards[P, G]`, `logp_lag[P, G]`: sequence-level reward and log-prob under pi_lag.
- `behaviour_logp[N, S]`: per-token engine log-probs aligned with `labels` (GRPO's IS ratio).
- `lengths[N]`: real tokens of each row (prompt + completion); the rest of the row is padding.
- `keep[P, G]` (optional): False for a sequence whose own loss term is masked (algo.mask_truncated); it
  still counts in its group's V* / advantage baseline. None: every sequence enters the loss.

Token-budget micro-batches (`parallel.micro_batch_tokens > 0`, `plan_micro_batches` + `layout`): the loss
is a sum over sequences once V* is known per group, so whole *sequences* (not groups) are dealt into
micro-batches of at most the budget, and each micro-batch is padded to its own length, a multiple of
`lcm(TP, 16)` (`pad_multiple`). With packing, a micro-batch is one row holding several sequences.
"""

from __future__ import annotations

import dataclasses
import math
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
    lengths: torch.Tensor
    group_size: int
    keep: torch.Tensor | None = None

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
            lengths=self.lengths[start * g : stop * g],
            group_size=g,
            keep=None if self.keep is None else self.keep[start:stop],
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

    def padded_to_multiple(self, multiple: int) -> "TrainBatch":
        """Every row right-padded to the next multiple of `multiple` tokens: pad id 0, masked out of the loss;
        causal attention keeps the padding from reaching the real tokens."""
        extra = _round_up(self.seq_length, multiple) - self.seq_length
        if extra == 0:
            return self
        pad = torch.nn.functional.pad
        return dataclasses.replace(self, tokens=pad(self.tokens, (0, extra)), labels=pad(self.labels, (0, extra)),
                                   loss_mask=pad(self.loss_mask, (0, extra)),
                                   behaviour_logp=pad(self.behaviour_logp, (0, extra)))

    def padding(self) -> torch.Tensor:
        """[N, S] True on each row's padding (positions at or past its length)."""
        positions = torch.arange(self.seq_length, device=self.tokens.device)
        return positions[None, :] >= self.lengths.to(self.tokens.device)[:, None]

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(
            **{
                f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                else getattr(self, f.name)
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
    keep: Sequence[Sequence[bool]] | None = None,
) -> TrainBatch:
    """Pack P prompts with G completions each (token ids) into a TrainBatch.

    `token_logp[p][i]` are the engine's per-token log-probs of completion i (one per completion token);
    their sum is `logp_lag` (the `engine` source). Without them logp_lag is zero and must be recomputed.
    `rewards` may be a [P, G] tensor (shaped rewards, algo/shaping.py); `keep[p][i]`: whether completion
    i's own loss term counts (None: all).
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
    reward_t = torch.as_tensor(rewards, dtype=torch.float32).reshape(num_groups, group_size)
    logp_lag = (behaviour * loss_mask).sum(-1).reshape(num_groups, group_size)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    keep_t = None if keep is None else torch.as_tensor(keep, dtype=torch.bool).reshape(num_groups, group_size)
    return TrainBatch(tokens=tokens, labels=labels, loss_mask=loss_mask, rewards=reward_t, logp_lag=logp_lag,
                      behaviour_logp=behaviour, lengths=lengths, group_size=group_size, keep=keep_t)


# --------------------------------------------------------------------------------------------------
# Token-budget micro-batches and packing
# --------------------------------------------------------------------------------------------------


def pad_multiple(tensor_parallel_size: int) -> int:
    """Every micro-batch length is a multiple of lcm(TP, 16): sequence parallelism splits the sequence
    dimension over the TP ranks (Megatron asserts divisibility) and FP8 GEMMs in Transformer Engine want
    token counts that are multiples of 16."""
    return math.lcm(tensor_parallel_size, 16)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def deal_padded(lengths: Sequence[int], budget: int, multiple: int) -> list[list[int]]:
    """Sequence indices per micro-batch, one padded row each: longest first, so each micro-batch holds
    sequences of similar length, as many as fit `budget` tokens padded to the first (longest) one; a
    sequence longer than the budget forms its own micro-batch."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, start = [], 0
    while start < len(order):
        rows = max(1, budget // _round_up(lengths[order[start]], multiple))
        bins.append(order[start : start + rows])
        start += rows
    return bins


def deal_packed(lengths: Sequence[int], budget: int, multiple: int) -> list[list[int]]:
    """Sequence indices per packed row (first-fit decreasing): a row takes a sequence while its padded
    length stays within `budget`; a sequence longer than the budget forms its own row."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((b for b, u in enumerate(used) if _round_up(u + lengths[i], multiple) <= budget), None)
        if fit is None:
            bins.append([i])
            used.append(lengths[i])
        else:
            bins[fit].append(i)
            used[fit] += lengths[i]
    return bins


def micro_batch_tokens(seq_ids: Sequence[int], lengths: Sequence[int], multiple: int, pack: bool) -> int:
    """Tokens a micro-batch computes, padding included (an empty one still runs one aligned row)."""
    if not seq_ids:
        return multiple
    if pack:
        return _round_up(sum(lengths[i] for i in seq_ids), multiple)
    return len(seq_ids) * _round_up(max(lengths[i] for i in seq_ids), multiple)


def assign_to_ranks(bins: list[list[int]], lengths: Sequence[int], ranks: int, multiple: int,
                    pack: bool) -> list[list[list[int]]]:
    """Deal micro-batches to data-parallel ranks, the largest first to the least-loaded rank that still
    has room, so every rank runs the same number of micro-batches (1F1B pipelines and the DP gradient
    reduction step together); ranks short of that count get empty micro-batches (one padding row)."""
    per_rank = max(1, -(-len(bins) // ranks))
    cost = [micro_batch_tokens(b, lengths, multiple, pack) for b in bins]
    plans: list[list[list[int]]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for b in sorted(range(len(bins)), key=lambda b: (-cost[b], b)):
        rank = min((r for r in range(ranks) if len(plans[r]) < per_rank), key=lambda r: (load[r], r))
        plans[rank].append(bins[b])
        load[rank] += cost[b]
    for plan in plans:
        plan.extend([] for _ in range(per_rank - len(plan)))
    return plans


@dataclass
class MicroBatchPlan:
    """Which global sequences each data-parallel rank runs in each micro-batch, and what it costs."""

    per_rank: list[list[list[int]]]
    computed_tokens: int  # over all ranks, padding included
    useful_tokens: int

    @property
    def micro_batches_per_rank(self) -> int:
        return len(self.per_rank[0])

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.useful_tokens / max(self.computed_tokens, 1)


def plan_micro_batches(batch: TrainBatch, budget: int, multiple: int, pack: bool, ranks: int) -> MicroBatchPlan:
    """The same plan on every rank (it depends on the global batch only)."""
    lengths = batch.lengths.tolist()
    bins = (deal_packed if pack else deal_padded)(lengths, budget, multiple)
    per_rank = assign_to_ranks(bins, lengths, ranks, multiple, pack)
    computed = sum(micro_batch_tokens(b, lengths, multiple, pack) for plan in per_rank for b in plan)
    return MicroBatchPlan(per_rank, computed, sum(lengths))


def whole_group_padding(batch: TrainBatch) -> float:
    """Padding fraction of the whole-group path (every row padded to the step's longest)."""
    return 1.0 - batch.lengths.sum().item() / max(batch.tokens.numel(), 1)


@dataclass
class SequenceMicroBatch:
    """A token-budget micro-batch: R rows of length L (a multiple of `pad_multiple`), holding `n` whole
    sequences. `segments[R, L]` is the sequence (0..n-1) each position belongs to, -1 on padding;
    `seq_index[n]` their rows in the global batch (flattened [P*G])."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    behaviour_logp: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    seq_index: torch.Tensor
    cu_seqlens: torch.Tensor  # packed rows (R = 1): sequence boundaries, the tail padding a last segment

    @property
    def num_sequences(self) -> int:
        return self.seq_index.numel()

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def to(self, device: torch.device) -> "SequenceMicroBatch":
        return SequenceMicroBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def padding(self) -> torch.Tensor:
        """[R, L] True on padding (the positions of no sequence)."""
        return self.segments < 0

    def block_causal_mask(self) -> torch.Tensor:
        """Megatron's boolean attention mask [R, 1, L, L] (True = masked): causal and confined to each
        segment, so packed sequences never see each other (the tail padding is a segment of its own)."""
        seg = self.segments
        length = self.seq_length
        causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
        same = seg[:, :, None] == seg[:, None, :]
        return ~(same & causal).unsqueeze(1)


def layout(batch: TrainBatch, seq_ids: Sequence[int], multiple: int, pack: bool) -> SequenceMicroBatch:
    """Lay out the global sequences `seq_ids` as one micro-batch: one padded row each, or (pack) one row
    holding them all, with positions restarting at each sequence."""
    lengths = [int(batch.lengths[i]) for i in seq_ids]
    if pack:
        rows, length = 1, _round_up(sum(lengths), multiple) if seq_ids else multiple
        starts = [(0, sum(lengths[:k])) for k in range(len(lengths))]
    else:
        rows, length = max(1, len(seq_ids)), _round_up(max(lengths, default=1), multiple)
        starts = [(k, 0) for k in range(len(lengths))]
    out = {name: torch.zeros(rows, length, dtype=getattr(batch, name).dtype)
           for name in ("tokens", "labels", "loss_mask", "behaviour_logp")}
    positions = torch.zeros(rows, length, dtype=torch.long)
    segments = torch.full((rows, length), -1, dtype=torch.long)
    # Padding holds token 0: right of a causal row, or in a segment of its own, it never reaches a real token.
    for k, (i, (row, start)) in enumerate(zip(seq_ids, starts)):
        n = lengths[k]
        for name in out:
            out[name][row, start : start + n] = getattr(batch, name)[i, :n]
        positions[row, start : start + n] = torch.arange(n)
        segments[row, start : start + n] = k
    used = sum(lengths)
    cu = [0] + [s + n for (_, s), n in zip(starts, lengths)] if pack else [0]
    if pack and used < length:
        cu.append(length)
    return SequenceMicroBatch(
        **out, position_ids=positions, segments=segments,
        seq_index=torch.tensor(list(seq_ids), dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
    )
