"""The light engine: a `transformers` causal LM sampled with a KV cache, for fast tests and the tiny CPU default.

It implements the same contract as the vLLM engine: per prompt `n` samples drawn from the temperature- and
top-p-processed distribution, each token's log-prob under that distribution (vLLM's `processed_logprobs`),
and an all-or-nothing `load_weights` fed by the same stream of full HF-named tensors (the hub's names: a MoE
layer's experts arrive one tensor per expert and are fused into transformers' in-memory layout, see
`fuse_hub_experts`).

Batching: all `len(prompts) * n` rows decode together. Prompts are LEFT-padded so every row's next token
sits in the last column; the attention mask hides the pads and the position ids count only real tokens
(`cumsum(mask) - 1`), so a padded row sees exactly the positions (RoPE) and keys it would see alone.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, Iterable, Mapping

import torch

from megatron_oapl.data.tokenizer import has_tokenizer
from megatron_oapl.rollout.engine import Engine, check_request
from megatron_oapl.rollout.sampling import sample_with_logprobs
from megatron_oapl.rollout.types import Sample, SamplingParams

__all__ = ["TorchEngine", "fuse_hub_experts"]


def _load_tokenizer(model_dir: str) -> Any | None:
    """AutoTokenizer from `model_dir` if it holds tokenizer files; None otherwise (texts are then empty)."""
    if not has_tokenizer(model_dir):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class TorchEngine(Engine):
    """Sample groups from a local HF checkpoint with `transformers` (no vLLM).

    Args:
        model_dir: a local HF model directory (config + safetensors, optionally a tokenizer).
        device: where the model runs.
        dtype: the model's parameter dtype (log-probs are always computed in float32 or wider).
        seed: base seed; a call without `params.seed` uses `seed + <number of earlier generate calls>`, so a
            fresh engine replays the same sequence of calls identically.
        version: the policy version of the loaded weights.
    """

    def __init__(
        self,
        model_dir: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        version: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM

        # transformers 5.x renamed `torch_dtype` to `dtype` (the old name still works, with a warning).
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self._setup(model, _load_tokenizer(model_dir), device, seed, version)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer: Any | None = None,
        device: str | torch.device | None = None,
        seed: int = 0,
        version: int = 0,
    ) -> "TorchEngine":
        """Wrap an in-memory HF causal LM (used as-is, not copied: `load_weights` writes into it).

        `device=None` keeps the model where it is.
        """
        self = cls.__new__(cls)
        if device is None:
            device = next(model.parameters()).device
        self._setup(model, tokenizer, device, seed, version)
        return self

    def _setup(self, model: torch.nn.Module, tokenizer: Any | None, device, seed: int, version: int) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.seed = int(seed)
        self.version = int(version)
        self._calls = 0
        params = inspect.signature(self.model.forward).parameters
        # transformers >= 5.x (seen in 5.24) renamed the forward kwarg `past_key_values` to `cache`
        # (the old name is deprecated until 5.40); pass whichever this model's forward declares.
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        if pad is None:
            pad = getattr(self.model.config, "pad_token_id", None)
        vocab = self.model.get_input_embeddings().weight.shape[0]
        # Any in-vocabulary id works: pads are masked out of attention, and finished rows' outputs are dropped.
        self.pad_token_id = int(pad) if pad is not None and 0 <= int(pad) < vocab else 0

    # --------------------------------------------------------------------------------------------- generate

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        kwargs = {self._cache_kwarg: cache}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = 1  # only the last column is ever sampled from
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **kwargs
        )
        new_cache = getattr(out, "cache", None)
        if new_cache is None:  # transformers before the rename
            new_cache = out.past_key_values
        return out.logits[:, -1, :], new_cache

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        check_request(prompts, params)
        seed = params.seed if params.seed is not None else self.seed + self._calls
        self._calls += 1
        if not prompts:
            return []
        # One generator draws for every row, as before per-prompt seeds existed.
        return self._sample(prompts, params, [(slice(None), self._generator(seed))])

    def generate_seeded(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> list[list[Sample]]:
        """All prompts decode together; prompt i's rows draw from their own generator seeded with
        `seeds[i]`, so a prompt alone gives exactly `generate([prompt], seed=seeds[i])` (in a batch, only
        padding can move its logits by float rounding)."""
        check_request(prompts, params)
        n = params.n
        return self._sample(prompts, params,
                            [(slice(i * n, (i + 1) * n), self._generator(s)) for i, s in enumerate(seeds)])

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(int(seed))

    @torch.inference_mode()
    def _sample(self, prompts: list[list[int]], params: SamplingParams,
                row_generators: list[tuple[slice, torch.Generator]]) -> list[list[Sample]]:
        """Decode every prompt's `params.n` rows together; the rows of each slice draw from its generator."""

        # Rows are prompt-major: row i * n + j is sample j of prompt i.
        rows = [p for p in prompts for _ in range(params.n)]
        B, L = len(rows), max(len(p) for p in rows)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(rows):
            input_ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, L - len(p) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Positions count real tokens only, so a left-padded row sees the positions it would see alone. RoPE
        # only feels position differences, so on Llama a constant offset would hide; learned absolute position
        # embeddings (GPT-2) would not (tested). Pad columns get 0: masked out, it only has to be a valid index.
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        next_pos = mask.sum(-1)  # [B], the position of each row's first generated token

        stop_ids = set(params.stop_token_ids)
        finished = [False] * B
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        out_logps: list[list[float]] = [[] for _ in range(B)]
        reasons = ["length"] * B

        logits, cache = self._forward(input_ids, mask, position_ids, None)
        for step in range(params.max_new_tokens):
            drawn = [sample_with_logprobs(logits[rows], params.temperature, params.top_p, gen)
                     for rows, gen in row_generators]
            tokens, logps = torch.cat([t for t, _ in drawn]), torch.cat([lp for _, lp in drawn])
            tok_list, logp_list = tokens.tolist(), logps.tolist()  # host sync, once per step
            for b in range(B):
                if finished[b]:
                    continue  # finished rows are still decoded (keeps the batch rectangular); drop their output
                out_tokens[b].append(tok_list[b])
                out_logps[b].append(logp_list[b])
                if tok_list[b] in stop_ids:
                    finished[b], reasons[b] = True, "stop"
            if all(finished) or step == params.max_new_tokens - 1:
                break
            done = torch.tensor(finished, device=self.device)
            feed = torch.where(done, torch.full_like(tokens, self.pad_token_id), tokens)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=self.device)], dim=-1)
            logits, cache = self._forward(feed.unsqueeze(-1), mask, next_pos.unsqueeze(-1), cache)
            next_pos = next_pos + 1

        samples = [
            Sample(
                token_ids=out_tokens[b],
                logprobs=out_logps[b],
                finish_reason=reasons[b],
                text=self._decode(out_tokens[b]),
            )
            for b in range(B)
        ]
        return [samples[i * params.n : (i + 1) * params.n] for i in range(len(prompts))]

    def _decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------------------ load_weights

    def sync_from(self, rendezvous: list, first_rank: int, version: int) -> None:
        """As `Engine.sync_from`; a stream that `load_weights` refuses (an unknown name, a wrong shape, a missing
        tensor such as one expert) raises `WeightSyncError`: a refused push that left the weights and version
        as they were, which the engine worker reports and survives (as the vLLM engine's completeness check),
        not a failed load that ends the engine process."""
        from megatron_oapl.weights.transport import WeightSyncError

        try:
            super().sync_from(rendezvous, first_rank, version)
        except ValueError as err:  # load_weights raises it only before writing anything
            raise WeightSyncError(f"weight push of version {version} refused: {err}") from err

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace every parameter from full HF-named tensors, then set `version`; all-or-nothing.

        The stream is materialised and checked before anything is written: no name may repeat, every name
        must be in the model's state dict (after `fuse_hub_experts` turned a MoE layer's per-expert hub names
        into the model's fused expert tensors) with the same shape, and every parameter must be covered (a
        tied parameter, e.g. `lm_head.weight` with `tie_word_embeddings`, is covered by any one of its names).
        On failure a ValueError names the first offending name and the model and version are unchanged.
        """
        state = self.model.state_dict(keep_vars=True)
        received: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors:
            if name in received:
                raise ValueError(f"load_weights: {name!r} appears twice in the stream; nothing was applied")
            # Clone: a transport may reuse its receive buffer for the next bucket before we copy.
            received[name] = tensor.detach().clone()
        received = fuse_hub_experts(received, state)
        for name, tensor in received.items():
            if name not in state:
                raise ValueError(f"load_weights: unknown parameter name {name!r}; nothing was applied")
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(state[name].shape)}; nothing was applied"
                )

        # Coverage: group the state-dict names that share storage (tied weights) and require one per group.
        aliases: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        for names in aliases.values():
            if not any(n in received for n in names):
                raise ValueError(
                    f"load_weights: parameter {names[0]!r} is missing from the stream; nothing was applied"
                )

        with torch.no_grad():
            for name, tensor in received.items():
                state[name].copy_(tensor)  # copy_ casts dtype and moves device
        self.version = int(version)


_HUB_EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_hub_experts(received: dict[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace a MoE layer's per-expert hub tensors in `received` by the fused ones the model holds.

    Why: pushes carry the hub's names (`<layer>.experts.E.{gate,up,down}_proj.weight`, what the safetensors
    files hold and vLLM loads), but transformers 5.x fuses a Qwen3-MoE layer's experts in memory into
    `<layer>.experts.gate_up_proj` [E, 2I, H], each expert's gate rows THEN its up rows (its forward chunks
    the product into gate, up), and `<layer>.experts.down_proj` [E, H, I] (conversion_mapping.py 'qwen2_moe',
    which qwen3_moe reuses: stack the experts, concatenate gate and up on dim 1). Every expert of every
    fused layer must be in the stream (a layer fused from a partial set would mix old and new experts);
    otherwise ValueError naming the first missing hub name. The router `mlp.gate.weight`, the other
    names, and models that hold per-expert modules pass through unchanged.
    """
    fused_layers = [n[: -len(".gate_up_proj")] for n in state
                    if n.endswith(".experts.gate_up_proj") and n[: -len("gate_up_proj")] + "down_proj" in state]
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[str, int], torch.Tensor]] = {layer: {} for layer in fused_layers}
    for name, tensor in received.items():
        m = _HUB_EXPERT.match(name)
        if m is None or m["layer"] not in experts:
            out[name] = tensor
        elif int(m["expert"]) >= state[m["layer"] + ".gate_up_proj"].shape[0]:
            raise ValueError(f"load_weights: unknown parameter name {name!r} (the model has "
                             f"{state[m['layer'] + '.gate_up_proj'].shape[0]} experts); nothing was applied")
        else:
            experts[m["layer"]][(m["proj"], int(m["expert"]))] = tensor
    for layer, parts in experts.items():
        if not parts and f"{layer}.gate_up_proj" in out:
            continue  # the fused tensors themselves were pushed
        num, two_i, hidden = state[f"{layer}.gate_up_proj"].shape
        want = {"gate_proj": (two_i // 2, hidden), "up_proj": (two_i // 2, hidden), "down_proj": (hidden, two_i // 2)}
        for e in range(num):
            for proj, shape in want.items():
                name = f"{layer}.{e}.{proj}.weight"
                if (proj, e) not in parts:
                    raise ValueError(f"load_weights: {name!r} is missing from the stream (a push must carry every "
                                     f"expert of every layer); nothing was applied")
                if tuple(parts[proj, e].shape) != shape:
                    raise ValueError(f"load_weights: {name!r} has shape {tuple(parts[proj, e].shape)}, the model "
                                     f"expects {shape}; nothing was applied")
        if f"{layer}.gate_up_proj" in out or f"{layer}.down_proj" in out:
            raise ValueError(f"load_weights: {layer!r} arrived both fused and per expert; nothing was applied")
        gate = torch.stack([parts["gate_proj", e] for e in range(num)])
        up = torch.stack([parts["up_proj", e] for e in range(num)])
        out[f"{layer}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        out[f"{layer}.down_proj"] = torch.stack([parts["down_proj", e] for e in range(num)])
    return out
