"""The Megatron learner on real gloo ranks against itself (layouts) and against plain PyTorch.

One OAPL step on the same model and batch must give the same loss, gradients, updated weights and
sequence log-probs under the updated weights whether it runs on 1 rank or with TP=2, PP=2, DP=2
(also with the distributed optimizer), and with 1, 2 or 4 micro-batches. The 1-rank run must match an
independent plain-PyTorch implementation of the model, the loss formula of OAPL.md and AdamW.

Tolerances (fp32): losses rel 1e-4 (a loss of ~0.3 built from sequence log-probs of ~-20 nats);
gradients atol 1e-6 + rtol 1e-4; updated weights atol 1e-5 = lr/100. Adam's first step moves a weight
by lr*g/(|g|+eps), whose slope lr/(4*eps) at |g|~eps amplifies reduction-order gradient noise (~1e-7
here); eps=1e-4 keeps that below 1e-6, while a missing DP reduction or a wrong shard changes most
updates by ~lr.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.support.distributed import run_ranks
from tests.support.learner_workers import oapl_steps
from tests.support.oapl_case import ADAM_EPS, BETA1, BETA2, G, LR, P, REF, TEMPERATURE, run_config
from tests.support.reference_llama import ReferenceLlama


def run_layout(setup, name, world_size, steps=1, **layout) -> dict:
    root, _ = setup
    out = root / name
    out.mkdir()
    run_ranks(world_size, oapl_steps, run_config(**layout), str(root / "ref.pt"), str(root / "batch.pt"), str(out), steps)
    merged: dict = {"weights": {}, "grads": {}}
    for path in sorted(out.glob("rank*.pt")):  # one file per pipeline stage
        part = torch.load(path)
        merged["weights"].update(part["weights"])
        merged["grads"].update(part["grads"])
        for key in ("losses", "grad_norms", "skipped", "metrics", "logp_before", "logp_after"):
            merged[key] = part[key]
    return merged


def plain_pytorch_steps(setup, steps=1) -> dict:
    """The same steps with the reference model, the OAPL.md formula and torch AdamW."""
    root, batch = setup
    model = ReferenceLlama(REF)
    model.load_state_dict(torch.load(root / "ref.pt"))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=ADAM_EPS, weight_decay=0.0)
    losses, grads, logp_before = [], None, None
    for step in range(steps):
        opt.zero_grad()
        logits = model(batch.tokens) / TEMPERATURE
        token_logp = logits.log_softmax(-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
        seq = (token_logp * batch.loss_mask).sum(-1).view(P, G)
        if step == 0:
            logp_before = seq.detach().clone()
        r = batch.rewards
        v = BETA1 * (torch.logsumexp(r / BETA1, dim=1) - math.log(G))
        loss = ((BETA2 * (seq - batch.logp_lag) - (r - v[:, None])) ** 2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step == 0:
            grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(batch.tokens) / TEMPERATURE
        token_logp = logits.log_softmax(-1).gather(-1, batch.labels.unsqueeze(-1)).squeeze(-1)
        logp_after = (token_logp * batch.loss_mask).sum(-1).view(P, G)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    return {"losses": losses, "grads": grads, "weights": weights, "logp_before": logp_before, "logp_after": logp_after}


def assert_same_run(got: dict, want: dict, check_grads: bool = True) -> None:
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-4)
    assert not any(got.get("skipped", []))
    torch.testing.assert_close(got["logp_before"], want["logp_before"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["logp_after"], want["logp_after"], rtol=1e-5, atol=1e-4)
    assert set(got["weights"]) == set(want["weights"])
    if check_grads:
        assert set(got["grads"]) == set(want["grads"])
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"gradient of {n}: {m}")
    for name, weight in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], weight, rtol=0, atol=LR / 100, msg=lambda m, n=name: f"weight {n}: {m}")


@pytest.fixture(scope="module")
def single_rank(setup):
    return run_layout(setup, "single", 1)


def test_single_rank_matches_plain_pytorch(setup, single_rank):
    ref = plain_pytorch_steps(setup)
    assert_same_run(single_rank, ref)
    # The step actually moved the weights (so equality above is not vacuous).
    start = torch.load(setup[0] / "ref.pt")
    assert max((single_rank["weights"][k] - start[k]).abs().max().item() for k in start) > 5e-4


@pytest.mark.parametrize("micro_batch_groups", [2, 1], ids=["2-micro-batches", "4-micro-batches"])
def test_micro_batches_match_single(setup, single_rank, micro_batch_groups):
    got = run_layout(setup, f"mb{micro_batch_groups}", 1, micro_batch_groups=micro_batch_groups)
    assert_same_run(got, single_rank)


@pytest.mark.parametrize(
    "name,layout",
    [
        ("tp2", dict(tp=2)),
        ("pp2", dict(pp=2)),
        ("pp2-4mb", dict(pp=2, micro_batch_groups=1)),
        ("dp2", dict()),
        ("dp2-2mb", dict(micro_batch_groups=1)),
        ("dp2-distopt", dict(distributed_optimizer=True)),
    ],
)
def test_two_rank_layouts_match_single(setup, single_rank, name, layout):
    got = run_layout(setup, name, 2, **layout)
    assert_same_run(got, single_rank, check_grads=not layout.get("distributed_optimizer", False))
