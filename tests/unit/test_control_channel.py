"""The control channel on three real gloo ranks whose collectives time out after 2 s: rank 0 answers only
after 4 s (a slow fleet), with a message far over the TCPStore's 8 MiB value limit, and the others get every
message, in order; the store is left empty; a stop request of one rank reaches rank 0."""

from __future__ import annotations

import datetime
import time

import torch.distributed as dist

from tests.support.distributed import run_ranks

BIG = bytes(range(256)) * (20 << 12)  # 20 MiB


def _ranks() -> None:
    from megatron_oapl.learner.distributed import ControlChannel

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    channel = ControlChannel.of_world()
    if dist.get_rank() == 0:
        time.sleep(4)  # longer than any collective may wait
        channel.publish({"groups": BIG})
        channel.publish(None)
    else:
        assert channel.receive() == {"groups": BIG}
        assert channel.receive() is None
        if dist.get_rank() == 2:
            channel.request_stop()
    dist.barrier()  # every reader is done
    if dist.get_rank() == 0:
        keys = ["1", "1/0", "1/4", "1/read", "2", "2/0"]
        assert not any(channel.store.check([k]) for k in keys), [k for k in keys if channel.store.check([k])]
        assert channel.stop_requested()
    dist.barrier()
    dist.destroy_process_group()


def test_followers_wait_past_the_collective_timeout_and_get_every_message():
    run_ranks(3, _ranks)
