"""Expert load of an MoE policy: how many tokens each expert received during a training step.

A forward hook on every router adds up its routing map (tokens x experts) while gradients are enabled, so
each micro-batch counts once: the log-prob passes run without gradients, and under full recompute the
first forward runs without gradients and only the recomputation in backward counts. Padding is routed (the
dispatcher moves it) but not counted: the learner hands the MoE layers a padding mask
(`learner.step.moe_padding`), which the router receives after the hidden states, [sequence, batch].
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_oapl import metrics as M


class ExpertLoad:
    """Counts of this rank's MoE layers; `take` reduces them over the learners and starts a new step."""

    def __init__(self, model_chunks: list, sequence_parallel: bool):
        from megatron.core.transformer.moe.router import Router

        self.sequence_parallel = sequence_parallel
        routers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, Router)]
        # Every pipeline stage of an MoE model has routers (Qwen3-MoE: every layer is MoE). The counts live
        # on the model's device: adding on the host would synchronise the GPU at every layer.
        self.counts = torch.zeros(len(routers), routers[0].weight.shape[0], dtype=torch.float64,
                                  device=routers[0].weight.device)
        for layer, router in enumerate(routers):
            router.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def count(_module, inputs, output) -> None:
            if torch.is_grad_enabled():
                _probs, routing_map = output
                padding = inputs[1] if len(inputs) > 1 else None
                if padding is not None:  # routing_map's rows are the [sequence, batch] tokens, flattened
                    routing_map = routing_map & ~padding.reshape(-1, 1)
                self.counts[layer] += routing_map.detach().sum(dim=0)
        return count

    def take(self) -> dict[str, float]:
        """Min, max and max/mean of tokens per (layer, expert) over the whole step on every learner rank.
        Collective over the data-parallel group (each DP rank routes its own tokens), the TP group under
        sequence parallelism (each TP rank routes its slice of the sequence) and the pipeline group (each
        stage holds its own layers)."""
        from megatron.core import parallel_state as ps

        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        if self.sequence_parallel:
            dist.all_reduce(counts, group=ps.get_tensor_model_parallel_group())
        pipeline = ps.get_pipeline_model_parallel_group()
        extremes = torch.stack([counts.min(), -counts.max()])  # one MIN reduction for both
        dist.all_reduce(extremes, op=dist.ReduceOp.MIN, group=pipeline)
        total = torch.stack([counts.sum(), counts.new_tensor(float(counts.numel()))])
        dist.all_reduce(total, group=pipeline)
        low, high, mean = extremes[0].item(), -extremes[1].item(), (total[0] / total[1]).item()
        return {M.EXPERT_TOKENS_MIN: low, M.EXPERT_TOKENS_MAX: high,
                M.EXPERT_LOAD_IMBALANCE: high / mean if mean > 0 else 0.0}
