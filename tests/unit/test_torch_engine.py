"""TorchEngine and the sampling helpers against a tiny random Llama.

The reference for every log-prob is an independent recomputation: one full-sequence forward of prompt +
completion (no KV cache, no padding), temperature-scaled and top-p-masked here in the test (not through
`process_logits`), log-softmaxed, read at each completion token.
"""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_oapl.rollout.sampling import process_logits, sample_with_logprobs  # noqa: E402
from megatron_oapl.rollout.torch_engine import TorchEngine  # noqa: E402
from megatron_oapl.rollout.types import SamplingParams  # noqa: E402

VOCAB = 40
PROMPTS = [[5, 9, 3], [7, 1, 22, 30, 4, 11, 8], [17], [2, 6, 13, 29, 3]]


def _config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        # Larger than the 0.02 default so the random model's next-token distributions are far from uniform
        # (otherwise top-p would barely bite and a padding bug could hide in near-constant log-probs).
        initializer_range=0.3,
    )


def _tiny_llama(seed: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(_config()).eval()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(0).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def engine(model_dir):
    return TorchEngine(model_dir, seed=123)


def _ref_top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Independent nucleus: descending sort, keep a token iff the mass strictly above it is < top_p."""
    if top_p >= 1.0:
        return logits
    probs = logits.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    mass_above = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = mass_above < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


def _ref_logprobs(model, prompt, completion, temperature, top_p) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0].double()  # full sequence, no cache, no padding
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    x = _ref_top_p_mask(logits[pos] / temperature, top_p)
    return x.log_softmax(-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)


def _check_against_reference(engine, prompts, groups, temperature, top_p, atol=1e-5):
    for prompt, group in zip(prompts, groups):
        for s in group:
            assert len(s.logprobs) == len(s.token_ids) > 0
            ref = _ref_logprobs(engine.model, prompt, s.token_ids, temperature, top_p)
            assert torch.isfinite(ref).all(), "sampled a token the reference nucleus excludes"
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), ref, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ (1) log-probs


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.8)])
def test_logprobs_match_full_sequence_forward(engine, temperature, top_p):
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_new_tokens=10, seed=7)
    groups = engine.generate(PROMPTS[:2], params)
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    for g in groups:
        for s in g:
            assert s.finish_reason == "length" and len(s.token_ids) == 10
            assert all(0 <= t < VOCAB for t in s.token_ids)
    _check_against_reference(engine, PROMPTS[:2], groups, temperature, top_p)


def test_top_p_actually_masks(engine):
    """Sanity for the (1.3, 0.8) case: the nucleus is a strict subset, so raw and processed log-probs differ."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([PROMPTS[0]])).logits[:, -1]
    kept = torch.isfinite(process_logits(logits, 1.3, 0.8)).sum().item()
    assert 1 <= kept < VOCAB


# ------------------------------------------------------------------------------------------- (2) left padding


def test_left_padded_batch_matches_unpadded(engine):
    """Prompts of lengths 3, 7, 1, 5 decode together (left-padded); every row's log-probs equal the unpadded
    full-sequence recomputation, and greedy decoding gives the same tokens batched as one prompt at a time."""
    params = SamplingParams(n=2, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    groups = engine.generate(PROMPTS, params)
    assert [len(g) for g in groups] == [2, 2, 2, 2]
    _check_against_reference(engine, PROMPTS, groups, 1.0, 1.0)

    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    batched = engine.generate(PROMPTS, greedy)
    for prompt, group in zip(PROMPTS, batched):
        alone = engine.generate([prompt], greedy)[0][0]
        assert group[0].token_ids == alone.token_ids
        assert group[0].logprobs == alone.logprobs == [0.0] * 8  # a point mass


def test_left_padding_positions_with_absolute_position_embeddings():
    """RoPE only sees position differences, so a constant per-row position offset (e.g. forgetting to subtract
    the left padding) is invisible on Llama. GPT-2's learned absolute positions are not: this catches it."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3
    )
    eng = TorchEngine.from_model(transformers.GPT2LMHeadModel(cfg).eval())
    groups = eng.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=2))
    _check_against_reference(eng, PROMPTS, groups, 1.0, 1.0)


def test_single_row_matches_same_row_in_batch_first_step(engine):
    """The shortest prompt, left-padded next to a longer one: its first sampled token's log-prob equals the
    one from an unpadded single-row forward."""
    with torch.no_grad():
        alone = engine.model(torch.tensor([PROMPTS[2]])).logits[0, -1]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=1, seed=11)
    got = engine.generate([PROMPTS[2], PROMPTS[1]], params)[0][0]
    ref = alone.double().log_softmax(-1)[got.token_ids[0]]
    assert got.logprobs[0] == pytest.approx(ref.item(), abs=1e-5)


# ---------------------------------------------------------------------------------------- (3) stop / length


def test_stop_tokens_and_length(engine):
    stops = tuple(range(0, VOCAB, 3))  # ~a third of the vocabulary: most rows stop early, at different steps
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, stop_token_ids=stops, seed=5)
    groups = engine.generate(PROMPTS, params)
    reasons = [s.finish_reason for g in groups for s in g]
    assert "stop" in reasons
    lengths = {len(s.token_ids) for g in groups for s in g}
    assert len(lengths) > 1, "rows should finish at different steps"
    for g in groups:
        for s in g:
            assert len(s.logprobs) == len(s.token_ids)
            assert not any(t in stops for t in s.token_ids[:-1])
            if s.finish_reason == "stop":
                assert s.token_ids[-1] in stops and math.isfinite(s.logprobs[-1])
            else:
                assert s.finish_reason == "length" and len(s.token_ids) == 12 and s.token_ids[-1] not in stops
    # Rows that kept decoding after others finished (fed pads) still have exact log-probs.
    _check_against_reference(engine, PROMPTS, groups, 1.0, 1.0)

    no_stop = engine.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=5, seed=5))
    assert all(s.finish_reason == "length" and len(s.token_ids) == 5 for s in no_stop[0])


def test_text_is_decoded_completion(engine):
    group = engine.generate(PROMPTS[:1], SamplingParams(n=2, max_new_tokens=6, seed=9))[0]
    for s in group:
        assert s.text == engine.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        assert s.text == " ".join(f"w{t}" for t in s.token_ids if t >= 3)


def test_no_tokenizer_gives_empty_text():
    eng = TorchEngine.from_model(_tiny_llama(0))
    s = eng.generate([[3, 4]], SamplingParams(n=1, max_new_tokens=3, seed=0))[0][0]
    assert s.text == "" and len(s.token_ids) == 3


# ------------------------------------------------------------------------------------------ (4) reproducible


def test_same_seed_same_samples(model_dir, engine):
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=42)
    a = engine.generate(PROMPTS, params)
    b = engine.generate(PROMPTS, params)
    assert a == b
    other = engine.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=8, seed=43))
    assert other != a

    # No params.seed: engine seed + call counter, so a fresh engine replays the same calls identically.
    unseeded = SamplingParams(n=2, max_new_tokens=6)
    e1, e2 = TorchEngine(model_dir, seed=5), TorchEngine(model_dir, seed=5)
    first = [e1.generate(PROMPTS, unseeded), e1.generate(PROMPTS, unseeded)]
    assert first[0] != first[1]
    assert [e2.generate(PROMPTS, unseeded), e2.generate(PROMPTS, unseeded)] == first


# ------------------------------------------------------------------------------------------- (5) load_weights


def test_load_weights_switches_policy_and_version():
    eng = TorchEngine.from_model(_tiny_llama(0), version=0)
    donor = _tiny_llama(1)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=1)
    before = eng.generate(PROMPTS, params)

    # A generator (a stream, as from a transport), without the tied lm_head.weight.
    stream = ((k, v) for k, v in donor.state_dict().items() if k != "lm_head.weight")
    eng.load_weights(stream, version=3)
    assert eng.version == 3
    after = eng.generate(PROMPTS, params)
    assert after != before
    assert after == TorchEngine.from_model(donor).generate(PROMPTS, params)
    for k, v in donor.state_dict().items():
        torch.testing.assert_close(eng.model.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("fault", ["wrong_shape", "unknown_name", "missing", "duplicate"])
def test_load_weights_is_all_or_nothing(fault):
    eng = TorchEngine.from_model(_tiny_llama(0), version=2)
    old = {k: v.clone() for k, v in eng.model.state_dict().items()}
    items = list(_tiny_llama(1).state_dict().items())
    if fault == "wrong_shape":
        bad = "model.norm.weight"  # sent last, after everything else was received
        items = [(k, v) for k, v in items if k != bad] + [(bad, torch.ones(31))]
    elif fault == "unknown_name":
        items.append(("model.layers.9.mlp.up_proj.weight", torch.zeros(64, 32)))
        bad = "model.layers.9.mlp.up_proj.weight"
    elif fault == "missing":
        bad = "model.layers.1.mlp.down_proj.weight"
        items = [(k, v) for k, v in items if k != bad]
    else:
        bad = items[-1][0]
        items.append(items[-1])
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        eng.load_weights(iter(items), version=9)
    assert eng.version == 2
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, old[k]), f"{k} was modified by a failed load"


# ------------------------------------------------------------------------------------------- (6) sampling


def test_process_logits_minimal_nucleus():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log().unsqueeze(0)

    def kept(top_p):
        return set(torch.isfinite(process_logits(logits, 1.0, top_p))[0].nonzero().flatten().tolist())

    assert kept(0.01) == {1}  # always the top token
    assert kept(0.4) == {1}
    assert kept(0.75) == {1, 3}
    assert kept(0.9) == {1, 3, 0}
    assert kept(0.99) == {0, 1, 2, 3}
    assert kept(1.0) == {0, 1, 2, 3}
    # Kept entries are the temperature-scaled logits, unchanged; renormalised they give the nucleus distribution.
    out = process_logits(logits, 2.0, 0.75)
    torch.testing.assert_close(out[0, [1, 3]], logits[0, [1, 3]] / 2.0)
    torch.testing.assert_close(process_logits(logits, 2.0, 1.0), logits / 2.0)
    p = process_logits(logits, 1.0, 0.75).softmax(-1)[0]
    torch.testing.assert_close(p, torch.tensor([0.0, 0.625, 0.0, 0.375]))
    # Greedy is the point mass on the argmax.
    torch.testing.assert_close(process_logits(logits, 0.0, 1.0).softmax(-1)[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="top_p"):
        process_logits(logits, 1.0, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        process_logits(logits, -1.0, 1.0)


def test_sample_with_logprobs_never_draws_masked_tokens():
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    logits = probs.log().expand(20000, 4).contiguous()
    gen = torch.Generator().manual_seed(0)
    tokens, logps = sample_with_logprobs(logits, 1.0, 0.75, gen)
    assert set(tokens.unique().tolist()) == {1, 3}
    assert (tokens == 1).float().mean().item() == pytest.approx(0.625, abs=0.02)
    expected = torch.where(tokens == 1, math.log(0.625), math.log(0.375))
    torch.testing.assert_close(logps, expected.float())

    # Random peaked logits over a larger vocabulary: every draw lies in its row's nucleus.
    g2 = torch.Generator().manual_seed(1)
    logits = torch.randn(500, 50, generator=g2) * 3
    for _ in range(10):
        tokens, logps = sample_with_logprobs(logits, 0.8, 0.6, g2)
        processed = process_logits(logits, 0.8, 0.6)
        assert torch.isfinite(processed.gather(-1, tokens.unsqueeze(-1))).all()
        torch.testing.assert_close(logps, processed.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1))

    # Reproducible with the same generator seed.
    a = sample_with_logprobs(logits, 1.0, 0.9, torch.Generator().manual_seed(5))
    b = sample_with_logprobs(logits, 1.0, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --------------------------------------------------------------------------------------------------
# Seeded batches and the request stream (what the fleet's engine loop uses)
# --------------------------------------------------------------------------------------------------


def test_generate_seeded_batches_orders_each_with_its_own_seed():
    """Every prompt of a batch draws from its own generator: a prompt alone reproduces `generate` with its
    seed bit for bit, and in a batch its tokens match that up to padding numerics (fp64: exactly)."""
    engine = TorchEngine.from_model(_tiny_llama(3).double())
    params = SamplingParams(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6)
    seeds = [11, 12, 13, 14]
    alone = [engine.generate([p], SamplingParams(**{**params.__dict__, "seed": s}))[0] for p, s in zip(PROMPTS, seeds)]
    assert [s.token_ids for s in engine.generate_seeded([PROMPTS[0]], params, [11])[0]] == \
        [s.token_ids for s in alone[0]]
    batched = engine.generate_seeded(PROMPTS, params, seeds)
    for got, want in zip(batched, alone):
        assert [s.token_ids for s in got] == [s.token_ids for s in want]
        for a, b in zip(got, want):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-9
    # Different seeds, different draws: the per-prompt generators are really independent.
    same_prompt = engine.generate_seeded([PROMPTS[1], PROMPTS[1]], params, [5, 6])
    assert [s.token_ids for s in same_prompt[0]] != [s.token_ids for s in same_prompt[1]]


def test_request_stream_returns_every_group_once_under_its_key():
    engine = TorchEngine.from_model(_tiny_llama(4))
    train = SamplingParams(n=2, temperature=1.0, max_new_tokens=4)
    evals = SamplingParams(n=3, temperature=0.7, max_new_tokens=4)
    for i, prompt in enumerate(PROMPTS):
        engine.submit(("train", i), prompt, SamplingParams(**{**train.__dict__, "seed": 100 + i}))
    engine.submit(("eval", 0), PROMPTS[0], SamplingParams(**{**evals.__dict__, "seed": 7}))
    engine.abort([("train", 3)])
    assert engine.in_flight() == 3 * 2 + 3
    done = dict(engine.step())
    assert sorted(done) == [("eval", 0), ("train", 0), ("train", 1), ("train", 2)]
    assert [len(done[k]) for k in sorted(done)] == [3, 2, 2, 2]
    assert engine.in_flight() == 0 and engine.step() == []
    # A group from the stream is the group `generate` gives for its prompt and seed.
    alone = engine.generate([PROMPTS[1]], SamplingParams(**{**train.__dict__, "seed": 101}))[0]
    assert [s.token_ids for s in done[("train", 1)]] == [s.token_ids for s in alone]
