"""The shared tiny OAPL case of the learner tests: a reference model, its config and one batch."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_oapl.learner.batch import build_batch
from tests.support.learner_workers import batch_to_dict
from tests.support.reference_llama import RefConfig, ReferenceLlama

P, G, SEQ, TEMPERATURE, BETA1, BETA2, LR = 4, 4, 12, 0.7, 1.0, 0.5, 1e-3
# Adam's update is ~sign(g) for |g| >> eps: a near-zero gradient carrying reduction-order noise would
# move its weight by a different fraction of lr (see the module docstring).
ADAM_EPS = 1e-4
REF = RefConfig(vocab_size=32, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)


def run_config(tp=1, pp=1, micro_batch_groups=None, distributed_optimizer=False, loss="oapl") -> dict:
    return {
        "seed": 1,
        "model": {
            "preset": "llama", "num_layers": REF.num_layers, "hidden_size": REF.hidden_size,
            "ffn_hidden_size": REF.ffn_hidden_size, "num_attention_heads": REF.num_heads,
            "num_query_groups": REF.num_kv_heads, "vocab_size": REF.vocab_size, "max_seq_length": 16,
            "tie_word_embeddings": REF.tie_word_embeddings,
        },
        "parallel": {
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
            "micro_batch_groups": micro_batch_groups, "use_distributed_optimizer": distributed_optimizer,
        },
        "optim": {"lr": LR, "clip_grad": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": ADAM_EPS},
        "algo": {"loss": loss, "beta1": BETA1, "beta2": BETA2},
        "fleet": {"temperature": TEMPERATURE, "group_size": G, "prompts_per_step": P, "max_new_tokens": 6},
    }


def make_case(root: Path):
    """Write the reference weights (`ref.pt`) and the batch (`batch.pt`) under `root`."""
    ref = ReferenceLlama(REF, seed=0)
    torch.save({k: v.detach().clone() for k, v in ref.state_dict().items()}, root / "ref.pt")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, REF.vocab_size, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen).tolist() for _ in range(P)]
    completions = [[torch.randint(1, REF.vocab_size, (int(torch.randint(1, 7, (1,), generator=gen)),), generator=gen).tolist() for _ in range(G)] for _ in range(P)]
    rewards = (torch.rand(P, G, generator=gen) > 0.5).float().tolist()
    # Engine log-probs: the reference model's own, perturbed (a lagged policy near pi_theta), so the
    # loss sits in the regime training sees rather than in a 1e4 blow-up.
    with torch.no_grad():
        probe = build_batch(prompts, completions, rewards, seq_length=SEQ)
        token_logp = (ref(probe.tokens) / TEMPERATURE).log_softmax(-1).gather(-1, probe.labels.unsqueeze(-1)).squeeze(-1)
        token_logp = token_logp + 0.3 * torch.randn(token_logp.shape, generator=gen)
    logp = [[token_logp[p * G + i][probe.loss_mask[p * G + i].bool()].tolist() for i in range(G)] for p in range(P)]
    batch = build_batch(prompts, completions, rewards, logp, seq_length=SEQ)
    torch.save(batch_to_dict(batch), root / "batch.pt")
    return root, batch
