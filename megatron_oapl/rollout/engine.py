"""The engine interface: sample groups with log-probs; load a stream of HF-named weights.

Two ways to sample:
- `generate(prompts, params)`: one blocking call (evaluation, tests, `oapl eval`).
- the request stream the fleet uses: `submit(key, prompt, params)` any number of groups, each with its
  own seed, then `step()` until they come back; `step()` returns the groups that finished, so a caller
  can keep many requests in flight and hand each group on as soon as it is complete. The base class
  batches the groups it holds into one `generate_seeded` call per sampling setting; `VLLMEngine` feeds
  them into vLLM's continuous batching instead.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Hashable, Iterable

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
    weight_ranks: int = 1  # ranks this engine takes in a weight group (its TP size when it receives itself)

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]: ...

    def generate_seeded(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> list[list[Sample]]:
        """`generate` with a seed per prompt: prompt i's samples are those of `generate([prompt i],
        params with seed=seeds[i])` up to batching numerics. Engines that can, batch; this one cannot."""
        return [self.generate([p], dataclasses.replace(params, seed=s))[0] for p, s in zip(prompts, seeds)]

    # ------------------------------------------------------------------------------ request stream

    def submit(self, key: Hashable, prompt: list[int], params: SamplingParams) -> None:
        """Queue one group (`params.n` samples of `prompt`, seeded by `params.seed`) under `key`."""
        check_request([prompt], params)
        self._held().append((key, prompt, params))

    def step(self) -> list[tuple[Hashable, list[Sample]]]:
        """Advance the held requests; returns the groups that finished (here: all of them, one batched
        call per sampling setting)."""
        held, self._queue = self._held(), []
        by_setting: dict[SamplingParams, list] = {}
        for key, prompt, params in held:
            by_setting.setdefault(dataclasses.replace(params, seed=None), []).append((key, prompt, params.seed))
        done = []
        for setting, requests in by_setting.items():
            keys, prompts, seeds = zip(*requests)
            done += zip(keys, self.generate_seeded(list(prompts), setting, list(seeds)))
        return done

    def abort(self, keys: Iterable[Hashable]) -> None:
        """Forget requests not yet returned by `step`."""
        drop = set(keys)
        self._queue = [r for r in self._held() if r[0] not in drop]

    def in_flight(self) -> int:
        """Sequences submitted and not yet returned by `step`."""
        return sum(params.n for _, _, params in self._held())

    def _held(self) -> list:
        if not hasattr(self, "_queue"):
            self._queue: list = []
        return self._queue

    @abc.abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None: ...

    def sync_from(self, rendezvous: list, first_rank: int, version: int) -> None:
        """Take one weight push: join every pipeline stage's weight group as rank `first_rank` (this engine's
        workers take ranks first_rank .. first_rank + weight_ranks - 1), verify, load. Raises
        `WeightSyncError` with nothing loaded when the push is corrupt, partial or aborted. Here this
        process receives and `load_weights` applies; `VLLMEngine` has its workers receive themselves."""
        from megatron_oapl.rollout.weight_receiver import receive_all_stages
        from megatron_oapl.weights.transport import Rendezvous

        rdvs = [r if isinstance(r, Rendezvous) else Rendezvous(**r) for r in rendezvous]
        self.load_weights(receive_all_stages(rdvs, first_rank, version), version)  # all-or-nothing

    def close(self) -> None:
        pass
