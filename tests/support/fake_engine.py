"""A fake model engine behind the real engine process (rollout/engine_worker.py): the fleet tests run the
real worker loop, reward pool, sockets and messages with only the model replaced.

`FakeEngine` answers every order at once with `n` one-token samples, and takes a `Sync` without a weight
push (it adopts the version it is asked for). The test steers it through files in the model directory,
since it lives in another process:
- `hold-<engine id>`: the engine keeps its orders in flight and answers none (an engine busy mid-round);
- `refuse-sync`: every engine refuses every push (`WeightSyncError`: it keeps its weights and version).

`fake_engine_main` is the process entry point the supervisor spawns in these tests
(`supervisor.engine_main` patched): the real `engine_main` with this engine.
"""

from __future__ import annotations

from pathlib import Path

from megatron_oapl.rollout.engine import Engine
from megatron_oapl.rollout.engine_worker import engine_main
from megatron_oapl.rollout.types import Sample, SamplingParams


class FakeEngine(Engine):
    def __init__(self, model_dir: str, engine_id: int):
        self.control_dir, self.engine_id = Path(model_dir), engine_id
        self.version = 0

    @classmethod
    def build(cls, cfg, model_dir: str, engine_id: int) -> "FakeEngine":
        return cls(model_dir, engine_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        stop = params.stop_token_ids[0] if params.stop_token_ids else 0
        return [[Sample([stop], [-0.5], "stop", "0") for _ in range(params.n)] for _ in prompts]

    def step(self):
        if (self.control_dir / f"hold-{self.engine_id}").exists():
            return []
        return super().step()

    def load_weights(self, named_tensors, version: int) -> None:
        raise NotImplementedError("the fake engine takes pushes through sync_from only")

    def sync_from(self, rendezvous: list, first_rank: int, version: int) -> None:
        from megatron_oapl.weights.transport import WeightSyncError

        if (self.control_dir / "refuse-sync").exists():
            raise WeightSyncError("injected: this engine refuses every push")
        self.version = version


def fake_engine_main(engine_id: int, generation: int, cfg_dict: dict, model_dir: str, rollout_addr: str,
                     control_addr: str) -> None:
    engine_main(engine_id, generation, cfg_dict, model_dir, rollout_addr, control_addr, build=FakeEngine.build)
