"""token_logprobs / sequence_logprobs against torch.distributions and explicit sums."""

import pytest
import torch

from megatron_oapl.algo import sequence_logprobs, token_logprobs


@pytest.mark.parametrize("temperature", [0.3, 0.6, 1.0, 1.7])
def test_token_logprobs_matches_categorical(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen) * 4
    tokens = torch.randint(0, 11, (2, 5), generator=gen)
    got = token_logprobs(logits, tokens, temperature)
    ref = torch.distributions.Categorical(logits=logits.double() / temperature).log_prob(tokens)
    assert got.shape == (2, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_token_logprobs_bf16_and_large_logits():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 4, 50, generator=gen) * 30).bfloat16()
    tokens = torch.randint(0, 50, (3, 4), generator=gen)
    got = token_logprobs(logits, tokens, 0.6)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    ref = torch.distributions.Categorical(logits=logits.double() / 0.6).log_prob(tokens)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-4)
    # huge logits: no overflow
    huge = torch.tensor([[1e4, 0.0, -1e4]])
    out = token_logprobs(huge, torch.tensor([1]), 0.5)
    assert torch.isfinite(out).all() and out.item() == pytest.approx(-2e4)


def test_token_logprobs_grad_and_validation():
    logits = torch.randn(4, 7, requires_grad=True)
    tokens = torch.tensor([0, 3, 6, 2])
    token_logprobs(logits, tokens).sum().backward()
    p = torch.softmax(logits.detach(), -1)
    expected = torch.nn.functional.one_hot(tokens, 7).float() - p
    torch.testing.assert_close(logits.grad, expected)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            token_logprobs(logits, tokens, bad)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, tokens[:3])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32])
def test_sequence_logprobs(mask_dtype):
    lp = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")], [-0.1, -0.2, -0.3, -0.4]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]).to(mask_dtype)
    got = sequence_logprobs(lp, mask)
    torch.testing.assert_close(got, torch.tensor([-2.5, -1.0]))
