"""`oapl plan`: the memory of one learner GPU and one engine GPU of a run, from its config alone.

Pure arithmetic on the config's model, parallel, precision and fleet sections (no Megatron, no torch), so
it runs on a login node in milliseconds; `oapl train` and `oapl launch slurm` run the same check before
anything starts. Sizes are decimal GB (1e9 bytes), as GPU vendors count them.

The formulas (per learner GPU; t = TP, e = bytes of the activation dtype, h hidden, f FFN width, a query
heads, g KV heads, d head dim, V the padded vocabulary; see docs/cluster.md, "Memory plan"):
- Static: weights (params_dtype), fp32 main_grad (Megatron DDP's grad_reduce_in_fp32), and the Adam state:
  fp32 master weights (with bf16/fp16 params) + m + v = 12 (8 with fp32 params) bytes per parameter,
  divided by DP with the distributed optimizer; with algo.logp_lag_source=recompute, a frozen copy of the
  weights. Parameters of the pipeline stage with the most.
- Activations kept for backward, per token per layer: Korthikanti et al. (2022, sbh(34 + 5as/h) / t with
  sequence parallelism) redone for this decoder (RMSNorm, SwiGLU, GQA, RoPE, no dropout) as Megatron-Core
  runs it under Transformer Engine: e * [4h / t_sp + (3ad + 3gd + 3f) / t + 4d] + 4a / t, where 4h = the
  two norms' inputs and normalised outputs (t_sp = t with sequence parallelism, else 1); 3ad + 3gd = the
  QKV output (v is a view of it, so all of it stays), q and k after RoPE, the core-attention output;
  3f = the fused SwiGLU's input (2f) and output (f); 4d = RoPE's cos and sin for q and k; 4a = flash
  attention's fp32 log-sum-exp. Megatron's local spec (CPU: `kernels="local"`) keeps more, and the
  integration test measures that one: 6h for the composite RMSNorms, 5f for the composite SwiGLU,
  Qwen3's normalised q and k, and unfused attention's softmax and mask, e * a * s / t + s for a row of
  length s. The first pipeline stage holds PP micro-batches (1F1B). Recompute: full keeps each chunk's
  input, e * h / t_sp, per recompute_num_layers layers, plus one chunk recomputed in backward; selective
  drops the core-attention term.
- Log-prob path: logits and their gradient (2e * V/t per token, every token of the micro-batch) plus three
  fp32 copies of one chunk of logprob_chunk_tokens tokens (scaled logits, the padding-masked copy, the
  softmax kept for backward); the whole micro-batch when logprob_chunk_tokens = 0.
- Micro-batch tokens: micro_batch_tokens when > 0 (a sequence longer than the budget forms its own
  micro-batch, so at least the padded max_seq_length), else micro_batch_groups x group_size x the padded
  max_seq_length (micro_batch_groups null: the whole per-DP-rank batch). Padding: to lcm(TP, 16).
- Mixture of experts (model.num_experts > 0, every layer; EP = expert_model_parallel_size, k = top-k, f_e
  the expert width, E experts): attention and the embeddings are split over TP as above; the experts over
  EP x TP (expert-TP = TP); the router (h x E) and the norms are whole on every GPU. The distributed
  optimizer shards the dense state over DP and the expert state over DP / EP (the expert-data-parallel
  group). Activations of an MoE layer replace the SwiGLU term: every token is dispatched to k experts, and
  with TP > 1 (sequence parallelism is then required) each TP rank's experts see the tokens of the whole TP
  group, so e * k * (h + 3 f_e / t): the gathered expert input and the fused SwiGLU's input and output per
  routed copy, plus 9E / t_sp for the router (fp32 logits, the fp32 softmax of the aux loss, the routing
  map). Routing is assumed balanced (a rank whose experts get more tokens holds more). One layer at a time
  also holds the dispatch buffers: the permuted tokens and the all-to-all's output (e k h / t each), the
  expert output before the TP reduce-scatter (e k h) and its fp32 copy that Megatron reduces (4 k h, TP > 1).
- Engine GPU (vLLM): weights (bf16, every expert) / engine TP; KV bytes per token = 2 (K, V) x layers x KV
  heads per GPU x head dim x 2 (bf16); the KV pool is what vllm_gpu_memory_utilization leaves after the weights and
  vLLM's own activations and CUDA graphs; a push needs 2 buckets (received + staged) outside vLLM's share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megatron_oapl.models.presets import ARCHITECTURES  # plain data: no torch, no Megatron

GB = 1e9
LEARNER_RESERVE_GB = 2.5  # CUDA context, NCCL communicators, cuBLAS/TE workspaces
FRAGMENTATION = 0.10  # of the GPU: the caching allocator with micro-batches of varying shapes
ENGINE_INTERNAL_GB = 3.0  # inside vLLM's share besides weights and KV: profile-run activations, CUDA graphs
PUSH_RESERVE_GB = 1.0  # outside vLLM's share besides the push buckets: the weight group's NCCL buffers
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


class PlanError(ValueError):
    """The run does not fit its GPUs; the message is one line naming the field to change."""


@dataclass(frozen=True)
class ModelDims:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vocab_multiple: int  # make_vocab_size_divisible_by
    tied: bool
    qk_norm: bool
    qkv_bias: bool
    experts: int = 0  # routed experts per layer; 0 = a dense SwiGLU MLP
    expert_ffn: int = 0  # one expert's intermediate width
    topk: int = 0  # experts each token is routed to

    @classmethod
    def of(cls, model) -> "ModelDims":
        """The dims of a config's model section."""
        return cls(layers=model.num_layers, hidden=model.hidden_size, ffn=model.ffn_hidden_size,
                   heads=model.num_attention_heads, kv_heads=model.num_query_groups or model.num_attention_heads,
                   head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
                   vocab=model.vocab_size, vocab_multiple=max(1, model.make_vocab_size_divisible_by),
                   tied=model.tie_word_embeddings, qk_norm=ARCHITECTURES[model.preset].qk_layernorm,
                   qkv_bias=ARCHITECTURES[model.preset].qkv_bias, experts=model.num_experts,
                   expert_ffn=(model.moe_ffn_hidden_size or model.ffn_hidden_size) if model.num_experts else 0,
                   topk=model.moe_router_topk if model.num_experts else 0)

    def padded_vocab(self, tp: int) -> int:
        """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP."""
        multiple = self.vocab_multiple * tp
        return -(-self.vocab // multiple) * multiple

    def layer_matrix_params(self) -> int:
        """Parameters of one layer that TP alone splits: QKV (+ its bias), attention output, and the SwiGLU
        MLP of a dense model (an MoE layer's experts are `layer_expert_params`)."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        mlp = 0 if self.experts else 3 * self.hidden * self.ffn
        return self.hidden * qkv + (qkv if self.qkv_bias else 0) + self.heads * self.head_dim * self.hidden + mlp

    def layer_norm_params(self) -> int:
        """Parameters of one layer every GPU holds whole: the two RMSNorms (and Qwen3's q/k norms), and an
        MoE layer's router (hidden x experts)."""
        return 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0) + self.hidden * self.experts

    def layer_expert_params(self) -> int:
        """Parameters of one MoE layer's routed experts (SwiGLU each), which EP x TP split; 0 when dense."""
        return self.experts * 3 * self.hidden * self.expert_ffn

    def total_params(self) -> int:
        """Parameters of the HF model (unpadded vocabulary; a tied output layer counted once; every expert)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        per_layer = self.layer_matrix_params() + self.layer_norm_params() + self.layer_expert_params()
        return self.layers * per_layer + embeddings + self.hidden


def stage_params(dims: ModelDims, tp: int, pp: int, ep: int = 1) -> int:
    """Parameters on one learner GPU of the pipeline stage with the most."""
    return sum(stage_param_split(dims, tp, pp, ep))


def stage_param_split(dims: ModelDims, tp: int, pp: int, ep: int = 1) -> tuple[int, int]:
    """(dense, expert) parameters on one learner GPU of the pipeline stage with the most (the embedding on
    the first stage, the output layer and final norm on the last; with PP > 1 a tied output layer is a copy
    there). Dense ones are split over TP (norms and router whole), expert ones over EP x TP."""
    layers = dims.layers // pp * (dims.layer_matrix_params() // tp + dims.layer_norm_params())
    experts = dims.layers // pp * (dims.layer_expert_params() // (ep * tp))
    table = dims.padded_vocab(tp) // tp * dims.hidden
    first = layers + table
    last = layers + dims.hidden + (table if (not dims.tied or pp > 1) else 0)
    return (first + last - layers if pp == 1 else max(first, last)), experts


def pad_multiple(tp: int) -> int:
    """Micro-batch lengths are padded to lcm(TP, 16): sequence parallelism splits the sequence over TP and
    FP8 GEMMs want multiples of 16."""
    return math.lcm(tp, 16)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def layer_bytes_per_token(dims: ModelDims, e: int, tp: int, sp: bool, row: int, kernels: str) -> float:
    """Bytes one layer keeps for backward per token (the module docstring's formula); `row` is the length
    of the token's row (unfused attention keeps a row x row softmax per head); `kernels` is te (GPU) or
    local (Megatron's local spec, CPU)."""
    a, g, d, h = dims.heads, dims.kv_heads, dims.head_dim, dims.hidden
    te = kernels == "te"
    norms = 2 * (2 if te else 3) * h  # TE: input + normalised output; torch's composite RMSNorm also x * rstd
    # The QKV output (v is a view of it, so all of it stays), q and k after RoPE, the core-attention output.
    attention = (a + 2 * g) * d + a * d + g * d + a * d + (0 if te else (a + g) * d if dims.qk_norm else 0)
    rope = 4 * d  # cos and sin for q and for k, per position, whole on every TP rank
    return (e * (norms / (tp if sp else 1) + attention / tp + rope) + mlp_bytes_per_token(dims, e, tp, sp, kernels)
            + core_attention_bytes(dims, e, tp, row, kernels))


def mlp_bytes_per_token(dims: ModelDims, e: int, tp: int, sp: bool, kernels: str) -> float:
    """Per token: a dense layer's SwiGLU (fused: its input 2f and output f; composite: also silu(x1) and
    x1 * x2), or an MoE layer's k routed copies (each expert's input, whole h: the TP group's tokens are
    gathered to every TP rank, and its SwiGLU; the composite one also keeps the product before the routing
    weight scales it) plus the router's 9E / t_sp (fp32 logits, the aux loss's fp32 softmax, the routing map)."""
    te = kernels == "te"
    if not dims.experts:
        return e * (3 if te else 5) * dims.ffn / tp
    swiglu = (3 if te else 6) * dims.expert_ffn / tp
    return e * dims.topk * (dims.hidden + swiglu) + 9 * dims.experts / (tp if sp else 1)


def moe_dispatch_bytes(dims: ModelDims, e: int, tp: int, tokens: int) -> float:
    """The dispatch buffers of the one MoE layer running (forward, recompute or backward): the permuted tokens
    and the all-to-all's output (k h / t each), the expert output before the TP reduce-scatter (k h), and
    with TP > 1 the fp32 copy of it that Megatron reduces (4 k h)."""
    if not dims.experts:
        return 0.0
    return tokens * dims.topk * dims.hidden * (2 * e / tp + e + (4 if tp > 1 else 0))


def core_attention_bytes(dims: ModelDims, e: int, tp: int, row: int, kernels: str) -> float:
    """Per token: flash attention (TE) keeps an fp32 log-sum-exp per head; unfused attention its softmax and
    a row x row boolean mask."""
    return 4 * dims.heads / tp if kernels == "te" else e * dims.heads * row / tp + row


def logprob_bytes(dims: ModelDims, e: int, tp: int, tokens: int, chunk: int) -> float:
    """The log-prob path of one micro-batch: logits and their gradient, plus three fp32 copies of a chunk."""
    vocab = dims.padded_vocab(tp) / tp
    chunk = tokens if chunk <= 0 else min(chunk, tokens)
    return vocab * (2 * e * tokens + 3 * 4 * chunk)


@dataclass(frozen=True)
class LearnerPlan:
    dp: int
    params: int  # on this GPU
    weights: float  # bytes, as every figure below
    grads: float
    optimizer: float
    tokens: int  # per micro-batch
    row: int  # longest row of a micro-batch
    in_flight: int  # micro-batches whose activations the first stage holds
    activations: dict  # recompute mode -> bytes
    recompute: str
    logprob: float
    dispatch: float  # MoE dispatch buffers of one layer (0 when dense)
    lag_copy: float  # the frozen weights that recompute logp_lag (algo.logp_lag_source=recompute)
    reserve: float
    usable: float
    ep: int = 1
    expert_params: int = 0  # of `params`: sharded over DP / EP by the distributed optimizer

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.lag_copy

    @property
    def total(self) -> float:
        return self.static + self.activations[self.recompute] + self.logprob + self.dispatch + self.reserve

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def micro_batch_tokens(cfg, dp: int) -> int:
    """Tokens of the largest micro-batch (padding included)."""
    par, fleet = cfg.parallel, cfg.fleet
    longest = round_up(cfg.model.max_seq_length, pad_multiple(par.tensor_model_parallel_size))
    if par.micro_batch_tokens > 0:
        return max(par.micro_batch_tokens, longest)
    groups = par.micro_batch_groups or max(1, fleet.prompts_per_step // dp)
    return groups * fleet.group_size * longest


def activation_bytes(cfg, dims: ModelDims, tokens: int, row: int, recompute: str, kernels: str = "te") -> float:
    """Activations the first pipeline stage keeps for backward, for `recompute` (none | selective | full)."""
    par = cfg.parallel
    tp, pp, sp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.sequence_parallel
    e = _DTYPE_BYTES[cfg.precision.params_dtype]
    layers = dims.layers // pp
    per_layer = layer_bytes_per_token(dims, e, tp, sp, row, kernels) * tokens
    if recompute == "selective":
        per_layer -= core_attention_bytes(dims, e, tp, row, kernels) * tokens
    final_norm = (2 if kernels == "te" else 3) * e * dims.hidden / (tp if sp else 1) * tokens
    in_flight = pp
    if recompute == "full":
        chunk = min(par.recompute_num_layers, layers)
        checkpoints = math.ceil(layers / chunk) * e * dims.hidden / (tp if sp else 1) * tokens
        return in_flight * checkpoints + chunk * per_layer + final_norm
    return in_flight * layers * per_layer + final_norm


def plan_learner(cfg, dp: int, gpu_bytes: float, kernels: str = "te") -> LearnerPlan:
    par, dims = cfg.parallel, ModelDims.of(cfg.model)
    tp, pp, ep = par.tensor_model_parallel_size, par.pipeline_model_parallel_size, par.expert_model_parallel_size
    dense, experts = stage_param_split(dims, tp, pp, ep)
    params = dense + experts
    w = _DTYPE_BYTES[cfg.precision.params_dtype]
    # Expert state is sharded over the expert-data-parallel group (DP / EP ranks hold the same experts).
    shards = (dp, max(1, dp // ep)) if par.use_distributed_optimizer else (1, 1)
    adam = (8 if w == 4 else 12) * (dense / shards[0] + experts / shards[1])
    tokens = micro_batch_tokens(cfg, dp)
    longest = round_up(cfg.model.max_seq_length, pad_multiple(tp))
    row = tokens if par.pack_sequences else longest
    acts = {mode: activation_bytes(cfg, dims, tokens, row, mode, kernels) for mode in ("none", "selective", "full")}
    return LearnerPlan(dp=dp, params=params, weights=w * params, grads=4 * params, optimizer=adam, tokens=tokens,
                       row=row, in_flight=pp, activations=acts, recompute=par.recompute,
                       logprob=logprob_bytes(dims, w, tp, tokens, par.logprob_chunk_tokens),
                       dispatch=moe_dispatch_bytes(dims, w, tp, tokens),
                       lag_copy=w * params if cfg.algo.logp_lag_source == "recompute" else 0.0,
                       reserve=LEARNER_RESERVE_GB * GB, usable=gpu_bytes * (1 - FRAGMENTATION), ep=ep,
                       expert_params=experts)


@dataclass(frozen=True)
class EnginePlan:
    tp: int
    weights: float
    share: float  # vLLM's share of the GPU
    internal: float
    kv: float
    kv_per_token: int
    max_length: int
    push: float
    outside: float  # the GPU outside vLLM's share

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv // self.kv_per_token))

    @property
    def full_sequences(self) -> int:
        return self.kv_tokens // self.max_length


def plan_engine(cfg, gpu_bytes: float) -> EnginePlan:
    dims, fleet = ModelDims.of(cfg.model), cfg.fleet
    etp = fleet.engine_tensor_parallel_size
    weights = 2 * dims.total_params() / etp
    share = fleet.vllm_gpu_memory_utilization * gpu_bytes
    internal = ENGINE_INTERNAL_GB * GB
    kv_per_token = 2 * dims.layers * max(1, dims.kv_heads // etp) * dims.head_dim * 2
    bucket = fleet.weight_sync.bucket_mb * 2**20
    return EnginePlan(tp=etp, weights=weights, share=share, internal=internal, kv=share - weights - internal,
                      kv_per_token=kv_per_token, max_length=cfg.model.max_seq_length,
                      push=2 * bucket + PUSH_RESERVE_GB * GB, outside=gpu_bytes - share)


@dataclass(frozen=True)
class MemoryPlan:
    gpu_bytes: float
    learner: LearnerPlan
    engine: EnginePlan | None  # None: the light torch engine (CPU), not planned

    def problem(self, cfg) -> str | None:
        """One line naming the field to change, or None when everything fits."""
        if not self.learner.fits:
            return learner_advice(cfg, self)
        if self.engine is not None:
            return engine_advice(cfg, self.engine)
        return None

    def notes(self, cfg) -> list[str]:
        """What fits but costs throughput."""
        eng = self.engine
        if eng is not None and 0 < eng.full_sequences < cfg.fleet.max_in_flight:
            return [f"fleet.max_in_flight={cfg.fleet.max_in_flight} sequences per engine, but the KV cache holds "
                    f"{eng.full_sequences} of max_seq_length={eng.max_length} tokens: vLLM preempts long ones"]
        return []


def make_memory_plan(cfg, gpu_memory_gb: float, dp: int, kernels: str = "te") -> MemoryPlan:
    gpu_bytes = gpu_memory_gb * GB
    engine = plan_engine(cfg, gpu_bytes) if cfg.fleet.engine == "vllm" else None
    return MemoryPlan(gpu_bytes, plan_learner(cfg, dp, gpu_bytes, kernels), engine)


def _with(cfg, **parallel):
    return replace(cfg, parallel=replace(cfg.parallel, **parallel))


def _fits(cfg, plan: MemoryPlan) -> bool:
    return plan_learner(cfg, plan.learner.dp, plan.gpu_bytes).fits


def _largest_budget(cfg, plan: MemoryPlan) -> int | None:
    """The largest parallel.micro_batch_tokens (a multiple of the padding) that fits, or None."""
    step = pad_multiple(cfg.parallel.tensor_model_parallel_size)
    low = round_up(cfg.model.max_seq_length, step)
    if not _fits(_with(cfg, micro_batch_tokens=low), plan):
        return None
    high = max(low, plan.learner.tokens)
    while high - low > step:  # activations grow with the budget: bisect
        mid = round_up((low + high) // 2, step)
        low, high = (mid, high) if _fits(_with(cfg, micro_batch_tokens=mid), plan) else (low, mid)
    return low


def learner_advice(cfg, plan: MemoryPlan) -> str:
    """'does not fit: ...; <the field to change>': single changes that fit, else the changes together."""
    par, learner = cfg.parallel, plan.learner
    head = (f"does not fit: learner needs {learner.total / GB:.0f} GB of {plan.gpu_bytes / GB:.0f} GB per GPU "
            f"(usable {learner.usable / GB:.0f} GB)")
    single, together, trial = [], [], cfg
    if par.recompute != "full":
        together.append(f"set parallel.recompute=full (now {par.recompute})")
        trial = _with(trial, recompute="full")
        if _fits(_with(cfg, recompute="full"), plan):
            single.append(together[-1])
    if par.recompute_num_layers > 1:
        together.append(f"set parallel.recompute_num_layers=1 (now {par.recompute_num_layers})")
        trial = _with(trial, recompute_num_layers=1)
    if par.logprob_chunk_tokens == 0 or par.logprob_chunk_tokens > 4096:
        together.append(f"set parallel.logprob_chunk_tokens=4096 (now {par.logprob_chunk_tokens})")
        trial = _with(trial, logprob_chunk_tokens=4096)
        if _fits(_with(cfg, logprob_chunk_tokens=4096), plan):
            single.append(together[-1])
    budget = _largest_budget(trial, plan)
    if budget is not None and budget < learner.tokens:
        now = (f"now {par.micro_batch_tokens}" if par.micro_batch_tokens > 0 else
               f"now 0: whole groups of {learner.tokens} tokens")
        change = f"set parallel.micro_batch_tokens <= {budget} ({now})"
        alone = _largest_budget(cfg, plan)
        if alone is not None:
            single.insert(0, f"set parallel.micro_batch_tokens <= {alone} ({now})")
        together.append(change)
        trial = _with(trial, micro_batch_tokens=budget)
    if single:
        return f"{head}; {' or '.join(single[:2])}"
    if _fits(trial, plan):
        return f"{head}; {' and '.join(together)}"
    tp, ep = par.tensor_model_parallel_size, par.expert_model_parallel_size
    experts = f", parallel.expert_model_parallel_size (now {ep})" if cfg.model.num_experts else ""
    return (f"{head}; even one sequence of model.max_seq_length={cfg.model.max_seq_length} tokens with full "
            f"recompute does not fit: raise parallel.tensor_model_parallel_size (now {tp}){experts} or "
            "parallel.pipeline_model_parallel_size")


def engine_advice(cfg, eng: EnginePlan) -> str | None:
    fleet = cfg.fleet
    util = fleet.vllm_gpu_memory_utilization
    if eng.full_sequences < 1:
        return (f"does not fit: an engine's KV cache holds {eng.kv_tokens} tokens, less than one sequence of "
                f"model.max_seq_length={eng.max_length}; raise fleet.vllm_gpu_memory_utilization (now {util}) or "
                f"fleet.engine_tensor_parallel_size (now {eng.tp})")
    if eng.push > eng.outside:
        return (f"does not fit: a weight push needs {eng.push / GB:.1f} GB outside vLLM's share, which leaves "
                f"{eng.outside / GB:.1f} GB; lower fleet.vllm_gpu_memory_utilization (now {util}) or "
                f"fleet.weight_sync.bucket_mb (now {fleet.weight_sync.bucket_mb:g})")
    return None


def _row(label: str, value: str) -> str:
    return f"  {label:<50} {value}"


def _gb(x: float) -> str:
    return f"{x / GB:7.1f} GB"


def format_plan(cfg, plan: MemoryPlan, source: str) -> str:
    """The readable table `oapl plan` prints."""
    par, lp = cfg.parallel, plan.learner
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    chunk = par.logprob_chunk_tokens
    moe = cfg.model.num_experts > 0
    opt = f"distributed over DP={lp.dp}" if par.use_distributed_optimizer else "not sharded"
    if moe and par.use_distributed_optimizer:  # short: the row's label column is 50 wide
        opt = f"over DP={lp.dp}, experts DP/EP={max(1, lp.dp // lp.ep)}"
    mark = {m: ("  <- configured" if m == lp.recompute else "") for m in lp.activations}
    experts = (f" ({lp.expert_params / 1e9:.2f} B of them experts: {cfg.model.num_experts // lp.ep} of "
               f"{cfg.model.num_experts} per layer, each split over TP={tp})") if moe else ""
    lines = [
        f"memory plan per GPU of {plan.gpu_bytes / GB:.0f} GB (model dims: {source})",
        f"learner GPU: TP={tp} PP={pp} DP={lp.dp}{f' EP={lp.ep}' if moe else ''}, sequence_parallel="
        f"{str(par.sequence_parallel).lower()}, {cfg.precision.params_dtype}, {lp.params / 1e9:.2f} B parameters "
        f"on the largest stage{experts}",
        _row(f"weights ({cfg.precision.params_dtype})", _gb(lp.weights)),
        _row("gradients (fp32 main_grad)", _gb(lp.grads)),
        _row(f"optimizer (Adam, {opt})", _gb(lp.optimizer)),
        _row(f"frozen logp_lag copy (logp_lag_source={cfg.algo.logp_lag_source})", _gb(lp.lag_copy)),
        _row("micro-batch", f"{lp.tokens:7d} tokens (longest row {lp.row}; the first stage holds "
             f"{lp.in_flight} at once)"),
        _row("activations, recompute=none", _gb(lp.activations["none"]) + mark["none"]),
        _row("activations, recompute=selective", _gb(lp.activations["selective"]) + mark["selective"]),
        _row(f"activations, recompute=full ({par.recompute_num_layers}/chunk)", _gb(lp.activations["full"])
             + mark["full"]),
        _row(f"log-prob path ({f'chunks of {chunk}' if chunk > 0 else 'not chunked'} tokens)", _gb(lp.logprob)),
        *([_row(f"MoE dispatch buffers (top-{cfg.model.moe_router_topk}, one layer at a time)", _gb(lp.dispatch))]
          if moe else []),
        _row("reserve (CUDA context, NCCL)", _gb(lp.reserve)),
        _row("total", f"{_gb(lp.total)} of {lp.usable / GB:.0f} GB usable ({FRAGMENTATION:.0%} of the GPU kept "
             f"for fragmentation): {'fits' if lp.fits else 'DOES NOT FIT'}"),
        _row("host RAM of each stage's push sender", f"{_gb(sender_host_bytes(cfg))} (the stage's whole weights, "
             "kept for engines that restart)"),
    ]
    eng = plan.engine
    if eng is None:
        lines.append(f"engine GPU: fleet.engine={cfg.fleet.engine} is not a GPU engine (not planned)")
        return "\n".join(lines)
    lines += [
        f"engine GPU: vLLM, engine TP={eng.tp}, vllm_gpu_memory_utilization={cfg.fleet.vllm_gpu_memory_utilization}"
        f" -> {eng.share / GB:.1f} GB",
        _row("weights (bf16, / engine TP)", _gb(eng.weights)),
        _row("vLLM activations, CUDA graphs", _gb(eng.internal)),
        _row("KV cache", f"{_gb(max(0.0, eng.kv))} = {eng.kv_tokens} tokens at {eng.kv_per_token / 1024:.0f} "
             "KiB/token"),
        _row("full-length sequences that fit", f"{eng.full_sequences:7d} of {eng.max_length} tokens "
             f"(fleet.max_in_flight={cfg.fleet.max_in_flight})"),
        _row("push (2 buckets + NCCL), outside vLLM", f"{_gb(eng.push)} of {eng.outside / GB:.1f} GB: "
             f"{'fits' if eng.push <= eng.outside else 'DOES NOT FIT'}"),
    ]
    return "\n".join(lines)


def sender_host_bytes(cfg) -> float:
    """Host memory the push sender of the largest pipeline stage keeps (weights.sync.WeightPusher): its stage
    whole, every expert and no TP split, in the parameter dtype."""
    return _DTYPE_BYTES[cfg.precision.params_dtype] * sum(
        stage_param_split(ModelDims.of(cfg.model), 1, cfg.parallel.pipeline_model_parallel_size, 1))


def model_source(cfg) -> tuple[object, str]:
    """(config with the model section read from model.hf_path when it is here, where the dims came from)."""
    if not cfg.model.hf_path:
        return cfg, "the config's model section"
    from megatron_oapl.config import ConfigError
    from megatron_oapl.models.hf_config import resolve_model

    try:
        return resolve_model(cfg), f"{cfg.model.hf_path}/config.json"
    except ConfigError:  # a login node without the checkpoint: the recipe's model.* fields, said so
        return cfg, f"the config's model section; model.hf_path={cfg.model.hf_path} is not here"


def data_parallel_size(cfg, learner_gpus: int | None) -> int:
    """DP from the learner GPU count, else parallel.data_parallel_size, else the smallest that runs: 1, or
    EP for an MoE model (EP ranks are DP ranks); the optimizer least sharded, so the most memory."""
    if learner_gpus:
        from megatron_oapl.config import check_world_size

        return check_world_size(cfg, learner_gpus)
    return cfg.parallel.data_parallel_size or cfg.parallel.expert_model_parallel_size


def check_memory(cfg, gpu_memory_gb: float, dp: int) -> MemoryPlan:
    """Raise PlanError (one line) when the run does not fit GPUs of `gpu_memory_gb`; the plan otherwise."""
    plan = make_memory_plan(cfg, gpu_memory_gb, dp)
    problem = plan.problem(cfg)
    if problem:
        raise PlanError(problem)
    return plan


def add_memory_check_arguments(parser) -> None:
    """--gpu-memory-gb / --force of the memory check that `oapl train` and `oapl launch slurm` run first."""
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="check the memory plan (`oapl plan`) against GPUs of this many GB (1e9 bytes) before "
                             "starting (`oapl train`: default this machine's GPU, a CPU run is not checked; "
                             "`oapl launch slurm`: not checked without it)")
    parser.add_argument("--force", action="store_true",
                        help="start even when the memory plan says the run does not fit")


def launch_memory_check(cfg, args, learner_ranks: int, gpus_per_node: int, errors: list, warnings: list) -> None:
    """`oapl launch slurm`: the memory plan of GPU learner nodes, appended to `errors` (or to `warnings`
    with --force, or when --gpu-memory-gb is not given); CPU nodes and a rank count that does not divide
    are left alone (the latter is an error already)."""
    from megatron_oapl.config import ConfigError, check_world_size

    if gpus_per_node <= 0:
        return
    if args.gpu_memory_gb is None:
        warnings.append("the memory plan was not checked: pass --gpu-memory-gb (e.g. 80) to check it, or run "
                        "`oapl plan CONFIG --gpu-memory-gb N`")
        return
    try:
        dp = check_world_size(cfg, learner_ranks)
    except ConfigError:
        return
    try:
        check_memory(model_source(cfg)[0], args.gpu_memory_gb, dp)
    except PlanError as err:
        (warnings if args.force else errors).append(
            f"{err} (--gpu-memory-gb={args.gpu_memory_gb:g}; `oapl plan` shows the table; --force submits anyway)")
