"""What the coordinator and the engines say to each other on the control channel (pickled over ZeroMQ).

coordinator -> engine: `Deal` (work orders to sample), `Sync` (join the weight groups for a version),
`Stop`. engine -> coordinator: `Hello` (started; its version and how many weight-group ranks it takes),
`Synced` (the push was applied, or refused and why). fleet node -> coordinator: `Died` (an engine it
runs exited; a push in flight aborts at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_oapl.rollout.orders import Order


@dataclass(frozen=True)
class Hello:
    engine: int
    generation: int  # restarts of this engine id so far: tells a new process from its predecessor
    version: int
    weight_ranks: int = 1  # ranks it takes in a weight group: one per worker that receives (engine TP size)


@dataclass(frozen=True)
class Died:
    engine: int
    generation: int
    exitcode: int | None


@dataclass(frozen=True)
class Deal:
    orders: list[Order]


@dataclass(frozen=True)
class Sync:
    version: int
    rendezvous: list[dict]  # one weight group per pipeline stage
    first_rank: int  # the engine's workers are ranks first_rank .. first_rank + weight_ranks - 1


@dataclass(frozen=True)
class Synced:
    engine: int
    version: int
    error: str | None = None  # why the push was refused (the engine kept its weights and version)


@dataclass(frozen=True)
class Stop:
    pass
