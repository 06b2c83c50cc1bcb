"""Offline rollout datasets (lag.mode=offline): groups the fleet sampled once with a frozen policy, stored as
JSONL and replayed by the learner for a whole round — OAPL's offline setting, where the generator stays
fixed for hundreds of optimizer steps. `oapl generate` writes one; a run with lag.mode=offline reads it.

One line per group, line i holding work order i (rollout/orders.py, so step s trains on the same prompts
an online run would):
    {"order_index", "policy_version", "temperature", "top_p", "engine_id", "split", "generate_seconds",
     "prompt": {"prompt_id", "token_ids", "text", "answer", "metadata"},
     "samples": [{"token_ids", "logprobs", "finish_reason", "text", "reward"}, ...]}
Token ids and the engine's per-token log-probs are stored as sampled, never re-tokenised.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from megatron_oapl.rollout.types import Prompt, RolloutGroup, Sample


def write_groups(path: str | Path, groups: list[RolloutGroup]) -> Path:
    """Write `groups` (group i answers order i) as JSONL, atomically: a crash leaves no partial file."""
    for i, group in enumerate(groups):
        if group.order_index != i:
            raise ValueError(f"group {i} answers order {group.order_index}: line i must hold order i")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for group in groups:
            f.write(json.dumps(dataclasses.asdict(group)) + "\n")
    os.replace(tmp, out)
    return out


def read_groups(path: str | Path, fleet_cfg) -> list[RolloutGroup]:
    """The groups of an offline dataset, checked against the run's sampling settings (`fleet_cfg`): the
    learner computes log-probs at fleet.temperature and OAPL's V_hat needs groups of fleet.group_size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"lag.offline_dataset={str(path)!r} does not exist (write one with `oapl generate`)")
    groups = []
    with path.open() as f:
        for line_no, line in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                raw = json.loads(line)
                samples = [Sample(**s) for s in raw.pop("samples")]
                group = RolloutGroup(prompt=Prompt(**raw.pop("prompt")), samples=samples, **raw)
            except (json.JSONDecodeError, TypeError, KeyError) as err:
                raise ValueError(f"{where}: not a rollout group ({err})") from err
            expected = {"order_index": line_no - 1, "temperature": fleet_cfg.temperature, "top_p": fleet_cfg.top_p,
                        "group size": fleet_cfg.group_size}
            found = {"order_index": group.order_index, "temperature": group.temperature, "top_p": group.top_p,
                     "group size": len(group.samples)}
            for key, want in expected.items():
                if found[key] != want:
                    field = "line number - 1" if key == "order_index" else f"fleet.{key.replace(' ', '_')}"
                    raise ValueError(f"{where}: {key} {found[key]} != {want} ({field}): the dataset was not "
                                     "sampled with this run's settings")
            groups.append(group)
    if not groups:
        raise ValueError(f"lag.offline_dataset={str(path)!r} holds no groups")
    return groups


def generate(cfg, cfg_dict: dict, out: str | Path, steps: int, progress: bool = True) -> Path:
    """Sample the work orders of steps 1..`steps` with the fleet on model.hf_path (version 0) and write them.
    A dead engine is restarted and its open orders are dealt again, as in training; no weights are pushed."""
    from megatron_oapl.data.prompts import load_prompts
    from megatron_oapl.rollout.fleet import Fleet
    from megatron_oapl.rollout.orders import OrderBook, PromptSampler

    fleet = Fleet(cfg, cfg_dict, cfg.model.hf_path)
    try:
        fleet.wait_ready(list(fleet.engines), timeout_s=cfg.fleet.weight_sync.timeout_s)
        sampler = PromptSampler(len(load_prompts(cfg.data, "train")), cfg.data.seed)
        book = OrderBook(sampler, cfg.seed, cfg.fleet.prompts_per_step, sync_every=steps)
        book.plan_round(1, version=0)  # one round: every order of the dataset
        wanted = steps * cfg.fleet.prompts_per_step
        groups: dict[int, RolloutGroup] = {}
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=wanted, desc="generate", unit="group")
        while len(groups) < wanted:
            stale, arrived = fleet.serve(book, version=0)
            if stale:  # every engine, a restarted one too, holds the initial weights
                raise RuntimeError(f"engines {stale} hold a version other than 0 while generating")
            for group in arrived:
                if book.delivered(("train", group.order_index)):
                    groups[group.order_index] = group
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return write_groups(out, [groups[i] for i in range(wanted)])
    finally:
        fleet.close()
