"""One typed config tree for a run: YAML file (+ `inherit:`) + dotted overrides -> `RunConfig`.

    cfg = load_config("configs/tiny.yaml", ["algo.beta2=1e-3", "parallel.tensor_model_parallel_size=1"])

Each section is a dataclass; the string literal under a field is its documentation (`field_docs`,
`oapl config show`). Every cross-part check lives in `validate`, hardware checks in `check_hardware`,
the world-size split in `check_world_size`. Errors are `ConfigError`s that name the dotted field, the
bad value and what is allowed.

A recipe YAML may say `inherit: other.yaml` (relative to itself); sections are merged key by key, with
the recipe's own values winning, and values that are not sections (including mappings such as
`data.task_kwargs`) are replaced whole, so a recipe never inherits stray task arguments.

This module imports only the standard library, PyYAML and torch (for the hardware check), so
parsing a config stays fast and needs no GPU.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import functools
import importlib.util
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_oapl.rewards.sandbox import SANDBOXES

__all__ = [
    "ConfigError",
    "ModelConfig",
    "RopeScalingConfig",
    "ParallelConfig",
    "FP8Config",
    "PrecisionConfig",
    "OptimConfig",
    "AlgoConfig",
    "LagConfig",
    "WeightSyncConfig",
    "FleetConfig",
    "DataConfig",
    "RewardsConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "EvalConfig",
    "RunConfig",
    "CHOICES",
    "load_config",
    "from_dict",
    "apply_overrides",
    "validate",
    "check_hardware",
    "check_world_size",
    "to_dict",
    "to_yaml",
    "field_docs",
]


class ConfigError(ValueError):
    """A config value is wrong. The message names the dotted field, the value and what is allowed."""

    def __init__(self, message: str, errors: list[str] | None = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [message]


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class RopeScalingConfig:
    type: str = "none"
    """RoPE frequency scaling, read from the HF config.json (rope_scaling / rope_parameters): none |
    linear (every frequency / factor) | llama3 (Llama 3.1+: long wavelengths / factor, short ones kept,
    a smooth ramp between)."""
    factor: float = 1.0
    """Scale factor of the low frequencies (linear: of all)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max_position_embeddings / low_freq_factor are divided by factor."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """llama3: the context length the model was pre-trained with."""


@dataclass
class ModelConfig:
    preset: str = "llama"
    """Architecture preset (layer spec + HF name map): llama | qwen2 | qwen3 | qwen3_moe."""
    hf_path: str | None = None
    """HF model directory, or hub id (org/name) found in the local Hugging Face cache (no downloads: fetch
    it first with `hf download ID`, or `huggingface-cli download ID`), to load weights from; when set, the architecture fields
    below are read from its config.json by the model builder. null = build from the fields below (random
    init)."""
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Model (residual stream) width."""
    ffn_hidden_size: int = 256
    """Width of the MLP's intermediate layer (per gate/up branch for SwiGLU)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int | None = None
    """Key/value heads for grouped-query attention; null = no GQA (as many as query heads)."""
    kv_channels: int | None = None
    """Head dimension; null = hidden_size / num_attention_heads. Qwen3 sets it explicitly (128)."""
    vocab_size: int = 64
    """Tokenizer vocabulary size (before Megatron's padding)."""
    max_seq_length: int = 64
    """Longest prompt + completion the learner trains on (also the RoPE table length)."""
    rotary_base: float = 10000.0
    """RoPE base frequency (theta)."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE frequency scaling (Llama 3.x checkpoints use llama3)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal init for weights built from scratch."""
    make_vocab_size_divisible_by: int = 1
    """Pad the vocabulary to a multiple of this times the tensor-parallel size (Megatron's padding)."""
    num_experts: int = 0
    """Routed experts of every MoE layer (qwen3_moe: config.json num_experts); 0 = a dense MLP (other presets)."""
    moe_ffn_hidden_size: int | None = None
    """Width of one expert's intermediate layer (config.json moe_intermediate_size); null = ffn_hidden_size."""
    moe_router_topk: int = 2
    """Experts each token is routed to (config.json num_experts_per_tok)."""
    moe_norm_topk_prob: bool = True
    """Renormalise the top-k routing weights to sum to 1 (config.json norm_topk_prob)."""
    moe_aux_loss_coeff: float | None = None
    """Weight of the router's load-balancing loss; null = config.json router_aux_loss_coef (transformers'
    default 0.001). Added to the policy loss by Megatron in backward; 0 = off."""
    moe_z_loss_coeff: float = 0.0
    """Weight of the router z-loss (penalises large router logits); Qwen3-MoE has none (0 = off)."""


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (TP) of the learner; must divide the attention heads and KV groups."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (PP) of the learner; must divide num_layers."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size (EP) of an MoE policy: each EP rank holds num_experts / EP experts. EP ranks are
    data-parallel ranks of the dense layers, so EP must divide DP; experts are also split over TP."""
    data_parallel_size: int | None = None
    """Data-parallel size (DP); null = world_size / (TP * PP) (a local run: expert_model_parallel_size). When set,
    world_size must equal TP*PP*DP."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms/dropout (needs TP > 1)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""
    micro_batch_groups: int | None = None
    """Prompt groups (each with its G completions) per micro-batch; null = the whole per-DP-rank batch
    in one micro-batch. Must divide the groups each DP rank receives per step. Ignored when
    micro_batch_tokens > 0."""
    micro_batch_tokens: int = 0
    """Token budget of a micro-batch (0 = off: whole groups, micro_batch_groups). V* is computed per group
    first, then whole sequences are dealt into micro-batches of at most this many tokens (padding
    included); a longer sequence forms its own. Must be >= the longest prompt + 1."""
    pack_sequences: bool = False
    """Pack several sequences into one row (attention confined to each, positions restarting per
    sequence) instead of one padded row per sequence; needs micro_batch_tokens > 0."""
    recompute: str = "none"
    """Activation recompute: none | full (every layer's input kept, the layer recomputed in backward;
    Megatron's recompute_granularity=full, recompute_method=uniform) | selective (core attention only)."""
    recompute_num_layers: int = 1
    """With recompute=full: layers per recomputed chunk (Megatron's recompute_num_layers)."""
    logprob_chunk_tokens: int = 4096
    """Tokens per chunk of the log-prob computation: no fp32 copy of more than this many tokens' logits
    exists at once (0 = the whole micro-batch at once)."""
    collective_timeout_s: float = 1800.0
    """Timeout of the learners' real collectives (NCCL/gloo), in seconds. Waits on the fleet never run on
    a collective: the coordinator hands data to the other ranks through a store they poll."""
    backend: str = "auto"
    """torch.distributed backend of the learner: auto (nccl with a GPU, gloo without) | gloo | nccl."""


@dataclass
class FP8Config:
    enabled: bool = False
    """Train in FP8 through Transformer Engine (needs a CUDA GPU and transformer-engine)."""
    format: str = "hybrid"
    """FP8 format: e4m3 (forward and backward) | hybrid (e4m3 forward, e5m2 gradients)."""
    recipe: str = "delayed"
    """Scaling recipe: delayed | tensorwise | blockwise | mxfp8 (mxfp8 needs Blackwell)."""
    margin: int = 0
    """Scaling-factor margin (power of 2) for the delayed recipe."""
    amax_history_len: int = 1024
    """Length of the amax history window (delayed recipe)."""
    amax_compute_algo: str = "max"
    """How the scale is taken from the amax history: max | most_recent."""
    fp8_param: bool = False
    """Keep parameters in FP8 (saves memory; the optimizer keeps fp32 master weights)."""
    first_last_layers_bf16: bool = False
    """Run the first and last transformer layers in bf16 (not allowed with the delayed recipe)."""


@dataclass
class PrecisionConfig:
    params_dtype: str = "fp32"
    """Parameter / compute dtype of the learner: fp32 | bf16 | fp16."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 training (Transformer Engine)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate (Adam)."""
    min_lr: float = 0.0
    """Learning rate at the end of linear/cosine decay."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.95
    """Adam second-moment decay (not OAPL's beta2)."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global grad-norm clip; 0 = no clipping."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    lr_decay_style: str = "constant"
    """Schedule after warm-up: constant | linear | cosine (decay to min_lr at train_steps)."""
    train_steps: int = 200
    """Optimizer steps of the run."""
    max_consecutive_nonfinite: int = 3
    """Stop the run after this many steps in a row with a non-finite loss or grad norm (each such step
    is skipped before the optimizer runs)."""


@dataclass
class AlgoConfig:
    loss: str = "oapl"
    """Policy loss: oapl (squared-advantage regression onto the lagged policy) | grpo (GRPO with
    importance sampling against the lagged policy; the baseline)."""
    beta1: float = 1.0
    """OAPL value temperature: V_hat(x) = beta1 * (logsumexp_i(r_i / beta1) - ln G). > 0; large values
    approach the group mean, small values the group max."""
    beta2: float = 0.5
    """OAPL trust region: the loss regresses beta2 * [logp_theta(y|x) - logp_lag(y|x)] onto r - V_hat,
    so a sequence log-ratio of about |advantage| / beta2 nats is where the pull-back binds. Pick beta2 so
    that is 1-2 nats. The paper's 1e-3 fits 16K-token responses; short completions need a larger value
    (0.5 was best for ~8-token answers, 1e-3 collapsed there; see docs/OAPL.md). > 0."""
    logp_lag_source: str = "engine"
    """Where logp_lag comes from: engine (log-probs returned at sampling time) | recompute (the learner
    recomputes them with a frozen copy of the last-synced weights; one extra forward pass)."""
    length_normalize: bool = False
    """Divide sequence log-probs by completion length (not in the paper; beta2 must then be rescaled)."""
    filter_degenerate_groups: bool = False
    """Drop groups whose rewards are all equal (by default they stay as a KL anchor toward pi_lag)."""
    mask_truncated: bool = False
    """Leave truncated samples (finish reason length) out of the loss sum; their rewards still enter their
    group's V* (GRPO: the group's mean and std), see docs/ARCHITECTURE.md."""
    grpo_eps_low: float = 0.2
    """GRPO: lower clip range of the importance ratio (1 - eps_low)."""
    grpo_eps_high: float = 0.2
    """GRPO: upper clip range of the importance ratio (1 + eps_high)."""


@dataclass
class LagConfig:
    sync_every: int = 10
    """L: push the learner's weights to the fleet after every L optimizer steps (paper: 50 for math)."""
    max_version_lag: int = 0
    """How many policy versions older than the current one are still admitted (0 = only the current
    version, as in the paper; older groups are dropped and counted)."""
    mode: str = "online"
    """online (the fleet samples while the learner trains) | offline (a dataset written by `oapl generate`
    stands in for the fleet: one round as long as the run, no weight pushes; steps beyond the dataset
    reuse it in order)."""
    offline_dataset: str | None = None
    """JSONL rollout dataset (`oapl generate CONFIG --out PATH`); required when mode=offline."""


@dataclass
class WeightSyncConfig:
    bucket_mb: float = 64.0
    """Size of each broadcast bucket of HF-named tensors, in MiB."""
    backend: str = "auto"
    """Process-group backend of the learner->fleet weight group: auto (nccl with a GPU) | gloo | nccl."""
    master_addr: str = "127.0.0.1"
    """Rendezvous address of the weight group (the learner's rank 0 host)."""
    master_port: int = 0
    """Rendezvous port of the weight group; 0 = pick a free port."""
    timeout_s: float = 300.0
    """Timeout of the weight group's collectives, in seconds."""


@dataclass
class FleetConfig:
    engine: str = "torch"
    """Inference engine: torch (light engine on transformers, for tests and the tiny default) | vllm
    (vLLM, also its CPU build)."""
    num_engines: int = 1
    """Number of engine processes (M)."""
    engine_tensor_parallel_size: int = 1
    """Tensor-parallel size inside each engine (T)."""
    group_size: int = 8
    """G: completions sampled per prompt (>= 2: V_hat and GRPO's baseline need a group)."""
    prompts_per_step: int = 16
    """Prompt groups per optimizer step (split evenly over data-parallel ranks)."""
    temperature: float = 1.0
    """Sampling temperature; the learner computes log-probs at the same temperature."""
    top_p: float = 1.0
    """Nucleus sampling threshold, 0 < top_p <= 1."""
    max_new_tokens: int = 8
    """Longest completion; must be < model.max_seq_length."""
    max_in_flight: int = 256
    """Sequences each engine keeps in flight (whole groups, at least one): vLLM's continuous batching (also
    its max_num_seqs), or the light engine's batch."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: a step trains on the first prompts_per_step groups (in work-order order) whose
    raw scores are not all equal, and the fleet samples extra orders of the same version to refill it. Off by
    default: under OAPL an all-equal group still anchors pi_theta to pi_lag, so dropping it changes the
    objective. Offline, `oapl generate` samples the extra orders and training skips the same groups."""
    dynamic_sampling_max_orders: float = 3.0
    """Dynamic sampling's limit, as a multiple of prompts_per_step: a step that has looked at this many orders
    without finding prompts_per_step groups with differing scores trains on those it found, topped up with
    the first all-equal ones (counted in rollout/dynamic_sampling_capped_total). >= 1."""
    reproducible: bool = False
    """true: one group at a time per engine, so a step's groups are bit-identical whatever the engine
    timing, restarts or fleet size (kill -9 + resume reproduces the run), at the cost of batching.
    false: groups share the engine's batches; each is still sampled exactly once with its own prompt and
    seed, but its tokens may depend on what it was batched with (vLLM on recent GPUs: VLLM_BATCH_INVARIANT=1
    restores bit-identity at a throughput cost)."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """Learner -> fleet weight transport."""
    vllm_gpu_memory_utilization: float = 0.3
    """Fraction of GPU memory vLLM may take (0 < x <= 1)."""
    max_restarts: int = 3
    """Restarts of a crashed engine before the run fails."""
    max_refused_syncs: int = 3
    """An engine that refuses this many weight pushes in a row is treated as dead (restarted within
    max_restarts, then a clear error)."""
    start_timeout_s: float = 1800.0
    """How long to wait for engines to start (hello), fleet nodes to appear and restarted engines, in
    seconds: a cold vLLM start with compilation takes minutes per engine."""
    compile_cache_dir: str | None = None
    """vLLM's compile/CUDA-graph cache (VLLM_CACHE_ROOT) shared by every engine; null = RUN_DIR/vllm_cache."""
    external: bool = False
    """Engines run under `python -m megatron_oapl.rollout.fleet_node` on other nodes (or jobs), which find the
    coordinator through RUN_DIR/coordinator.json and restart their own engines; the coordinator then binds its
    channels on fleet.weight_sync.master_addr. false = the coordinator spawns the engines beside itself."""


@dataclass
class DataConfig:
    source: str = "reasoning_gym"
    """Prompt source: reasoning_gym (procedurally generated task) | jsonl | parquet."""
    task: str = "chain_sum"
    """reasoning-gym task name (source=reasoning_gym)."""
    task_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the reasoning-gym task's config (replaced whole, never merged, on inherit)."""
    path: str | None = None
    """Dataset file or directory; required for source=jsonl|parquet."""
    chat_template: str | None = None
    """Chat template name or Jinja file; null = the tokenizer's own template, or plain text if none."""
    seed: int = 0
    """Seed of prompt generation / shuffling."""
    num_train_prompts: int = 10000
    """Training prompts to generate or take."""
    num_eval_prompts: int = 200
    """Held-out prompts for evaluation."""


@dataclass
class RewardsConfig:
    name: str = "reasoning_gym"
    """Reward function: a registered name (reasoning_gym, math, code, ...) or a dotted path pkg.mod:fn."""
    binarize: bool = True
    """Map rewards to {0, 1} (reward >= 1 counts as correct)."""
    timeout_s: float = 10.0
    """Time limit of one reward call, in seconds (a timeout scores 0)."""
    num_workers: int = 2
    """Reward worker processes per engine; scoring runs beside sampling (a hung call costs one worker
    until its timeout, not the engine)."""
    overlong_buffer_tokens: int = 0
    """DAPO's soft overlong penalty over the last N tokens before fleet.max_new_tokens: a completion of n >
    max_new_tokens - N tokens gets -overlong_penalty * (n - (max_new_tokens - N)) / N added to its score for
    the loss (the raw score stays for dynamic sampling, metrics and evaluation). 0 = off."""
    overlong_penalty: float = 1.0
    """The overlong penalty at n = fleet.max_new_tokens (linear from 0 at the buffer's start). >= 0."""
    code_sandbox: str = "bwrap"
    """How the `code` reward fences model-written programs: bwrap (bubblewrap: no network, no access to the
    run's files or credentials, read-only system; the run refuses to start where it cannot run) |
    rlimits-only (CPU, memory and output limits only, as the run's user: an explicit opt-in)."""


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save every N optimizer steps; 0 = only at the end of the run or on a signal."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    load: str | None = None
    """Checkpoint directory to resume from; null = start fresh (or resume from run_dir if it has one)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    """Write TensorBoard event files under run_dir."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""


@dataclass
class EvalConfig:
    every: int = 0
    """The training fleet evaluates the initial weights (step 0), the final ones (the last step) and, every
    N steps, the first version pushed at or after that step, and logs eval/pass@k at the step of that push
    (RUN_DIR/eval/history.jsonl, where `oapl train` takes its before / after report); 0 = only the initial
    and final weights. An offline round (no fleet) evaluates them on engines of its own."""
    num_samples: int = 8
    """n completions per eval prompt (pass@k for k <= n)."""
    temperature: float = 1.0
    """Sampling temperature for evaluation."""
    sets: dict[str, Any] = field(default_factory=dict)
    """Named eval sets, each {source: reasoning_gym (task, task_kwargs) | file (path: .jsonl/.parquet, the
    records of data.source=jsonl; `oapl data prepare --bench` writes them), num_eval_prompts (default
    data.num_eval_prompts for a task, every record for a file), num_samples (default eval.num_samples),
    reward (its answer checker, default rewards.name)}; TensorBoard eval/<set>/pass@k and avg@k. Empty:
    one set, the data section's held-out prompts (eval/pass@k)."""


@dataclass
class RunConfig:
    run_dir: str = "runs/tiny"
    """Directory of the run: resolved configs, checkpoints, TensorBoard logs, reports."""
    seed: int = 0
    """Global seed (model init, sampling)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Learner parallelism and micro-batching."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Learner dtypes and FP8."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """Policy loss (OAPL or the GRPO baseline)."""
    lag: LagConfig = field(default_factory=LagConfig)
    """Lag schedule between learner and fleet."""
    fleet: FleetConfig = field(default_factory=FleetConfig)
    """Inference engines, sampling and weight sync."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt data."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Reward function."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics logging."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation (pass@k)."""


# Allowed values of every choice field, by dotted name.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": ("llama", "qwen2", "qwen3", "qwen3_moe"),
    "model.rope_scaling.type": ("none", "linear", "llama3"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "parallel.recompute": ("none", "full", "selective"),
    "precision.params_dtype": ("fp32", "bf16", "fp16"),
    "precision.fp8.format": ("e4m3", "hybrid"),
    "precision.fp8.recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "precision.fp8.amax_compute_algo": ("max", "most_recent"),
    "optim.lr_decay_style": ("constant", "linear", "cosine"),
    "algo.loss": ("oapl", "grpo"),
    "algo.logp_lag_source": ("engine", "recompute"),
    "lag.mode": ("online", "offline"),
    "fleet.engine": ("torch", "vllm"),
    "fleet.weight_sync.backend": ("auto", "gloo", "nccl"),
    "data.source": ("reasoning_gym", "jsonl", "parquet"),
    "rewards.code_sandbox": SANDBOXES,  # the sandboxes rewards/sandbox.py can build
}

# --------------------------------------------------------------------------------------------------
# Field docs and type helpers
# --------------------------------------------------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: doc} of a config dataclass, from the string literal under each field."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen app, REPL class): docs are optional
        return {}
    body = ast.parse(source).body[0].body
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of `X | None` / `Optional[X]`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _section_type(cls: type, key: str) -> type | None:
    """The dataclass type of field `key` of `cls`, or None if it is not a section."""
    if not dataclasses.is_dataclass(cls) or key not in {f.name for f in dataclasses.fields(cls)}:
        return None
    tp, _ = _split_optional(_hints(cls)[key])
    return tp if dataclasses.is_dataclass(tp) else None


def _fmt(value: Any) -> str:
    """A value as the user would write it in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping", list: "a list"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML value to the declared field type, or raise a ConfigError naming the field."""
    inner, optional = _split_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}=null is not allowed (allowed: {_type_word(inner)})")
    if dataclasses.is_dataclass(inner):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}={_fmt(value)} must be a mapping of {name} fields "
                              f"(allowed keys: {', '.join(f.name for f in dataclasses.fields(inner))})")
        return _build(inner, value, name)
    base = typing.get_origin(inner) or inner
    bad = ConfigError(f"{name}={_fmt(value)} must be {_type_word(inner)}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if base is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    value = float(value)  # "1e3" -> 1000
                except ValueError:
                    raise bad from None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if base is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    if base is dict:
        if isinstance(value, dict):
            return copy.deepcopy(value)
        raise bad
    if base is list:
        if isinstance(value, (list, tuple)):
            return list(copy.deepcopy(value))
        raise bad
    return value  # Any / unannotated


def _type_word(tp: Any) -> str:
    return _TYPE_WORDS.get(typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp)))


def _unknown_key(prefix: str, key: str, valid: list[str]) -> ConfigError:
    dotted = f"{prefix}.{key}" if prefix else str(key)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
    where = f"of {prefix}" if prefix else "at the top level"
    return ConfigError(f"unknown key {dotted}{hint}; valid keys {where}: {', '.join(valid)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, coercing each value to its declared type."""
    names = [f.name for f in dataclasses.fields(cls)]
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(prefix, key, names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}.{key}" if prefix else key)
    return cls(**kwargs)


def from_dict(data: dict[str, Any], check_hardware: bool = True) -> RunConfig:
    """Build and validate a RunConfig from a plain (possibly partial) dict."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {_fmt(data)}")
    cfg = _build(RunConfig, data)
    validate(cfg, check_hardware=check_hardware)
    return cfg


# --------------------------------------------------------------------------------------------------
# Loading: YAML + inherit + overrides
# --------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any], cls: type | None = RunConfig) -> dict[str, Any]:
    """Deep-merge `over` onto `base`: sections merge key by key, every other value is replaced whole."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        sub = _section_type(cls, key) if cls is not None else None
        if sub is not None and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, sub)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML file and, recursively, the file it inherits from (relative to itself)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"inherit={_fmt(str(path))} forms a cycle ({cycle}); allowed: an acyclic chain")
    if not path.is_file():
        where = f" (inherited by {chain[-1]})" if chain else ""
        raise ConfigError(f"config file {path}{where} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {_fmt(data)}")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"inherit={_fmt(parent)} in {path} must be a path to another YAML file "
                          "(relative to this one)")
    return _merge(_read_yaml(path.parent / parent, (*chain, path)), data)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:  # e.g. a path with ': ' in it; keep it as a string
        return text


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides (values parsed as YAML) to a raw config dict."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip().lstrip("-")
        parts = key.split(".")
        if not sep or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.field=value "
                              "(e.g. algo.beta2=1e-3)")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])}={_fmt(child)} "
                                  "is not a section")
            node = child
        node[parts[-1]] = _parse_value(text)
    return out


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = (),
                check_hardware: bool = True) -> RunConfig:
    """Read a run config: YAML file (following `inherit:`), then dotted overrides, then `validate`.

    path None = the built-in defaults. check_hardware=False skips the GPU / transformer-engine check,
    so GPU recipes can be loaded and shown on a CPU machine.
    """
    data = _read_yaml(Path(path)) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(data, check_hardware=check_hardware)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) if n > 0 else "none"


_POS, _NONNEG, _ONE = "> 0", ">= 0", ">= 1"
# (dotted field, bound); None values of optional fields are skipped.
_BOUNDS: list[tuple[str, str]] = [
    ("model.num_layers", _ONE), ("model.hidden_size", _ONE), ("model.ffn_hidden_size", _ONE),
    ("model.num_attention_heads", _ONE), ("model.num_query_groups", _ONE), ("model.kv_channels", _ONE),
    ("model.vocab_size", _ONE), ("model.max_seq_length", "> 1"), ("model.rotary_base", _POS),
    ("model.norm_epsilon", _POS), ("model.init_method_std", _POS),
    ("model.make_vocab_size_divisible_by", _ONE), ("model.num_experts", _NONNEG),
    ("model.moe_ffn_hidden_size", _ONE), ("model.moe_router_topk", _ONE), ("model.moe_aux_loss_coeff", _NONNEG),
    ("model.moe_z_loss_coeff", _NONNEG), ("parallel.expert_model_parallel_size", _ONE),
    ("model.rope_scaling.factor", _POS),
    ("model.rope_scaling.low_freq_factor", _POS), ("model.rope_scaling.high_freq_factor", _POS),
    ("model.rope_scaling.original_max_position_embeddings", _ONE),
    ("parallel.tensor_model_parallel_size", _ONE), ("parallel.pipeline_model_parallel_size", _ONE),
    ("parallel.data_parallel_size", _ONE), ("parallel.micro_batch_groups", _ONE),
    ("parallel.micro_batch_tokens", _NONNEG), ("parallel.recompute_num_layers", _ONE),
    ("parallel.logprob_chunk_tokens", _NONNEG), ("parallel.collective_timeout_s", _POS),
    ("precision.fp8.margin", _NONNEG), ("precision.fp8.amax_history_len", _ONE),
    ("optim.lr", _POS), ("optim.min_lr", _NONNEG), ("optim.weight_decay", _NONNEG),
    ("optim.adam_beta1", "in [0, 1)"), ("optim.adam_beta2", "in [0, 1)"), ("optim.adam_eps", _POS),
    ("optim.clip_grad", _NONNEG), ("optim.lr_warmup_steps", _NONNEG), ("optim.train_steps", _ONE),
    ("optim.max_consecutive_nonfinite", _ONE),
    ("algo.beta1", _POS), ("algo.beta2", _POS), ("algo.grpo_eps_low", _NONNEG),
    ("algo.grpo_eps_high", _NONNEG),
    ("lag.sync_every", _ONE), ("lag.max_version_lag", _NONNEG),
    ("fleet.num_engines", _ONE), ("fleet.engine_tensor_parallel_size", _ONE), ("fleet.group_size", ">= 2"),
    ("fleet.prompts_per_step", _ONE), ("fleet.temperature", _POS), ("fleet.top_p", "in (0, 1]"),
    ("fleet.max_new_tokens", _ONE), ("fleet.weight_sync.bucket_mb", _POS),
    ("fleet.weight_sync.master_port", "in [0, 65535]"), ("fleet.weight_sync.timeout_s", _POS),
    ("fleet.vllm_gpu_memory_utilization", "in (0, 1]"), ("fleet.max_restarts", _NONNEG),
    ("fleet.max_in_flight", _ONE), ("fleet.max_refused_syncs", _ONE), ("fleet.start_timeout_s", _POS),
    ("data.num_train_prompts", _ONE), ("data.num_eval_prompts", _NONNEG),
    ("rewards.timeout_s", _POS), ("rewards.num_workers", _ONE),
    ("rewards.overlong_buffer_tokens", _NONNEG), ("rewards.overlong_penalty", _NONNEG),
    ("fleet.dynamic_sampling_max_orders", _ONE),
    ("checkpoint.save_every", _NONNEG), ("checkpoint.keep_last", _ONE),
    ("logging.log_every", _ONE),
    ("eval.every", _NONNEG), ("eval.num_samples", _ONE), ("eval.temperature", _POS),
]
_BOUND_TESTS: dict[str, typing.Callable[[float], bool]] = {
    _POS: lambda v: v > 0,
    _NONNEG: lambda v: v >= 0,
    _ONE: lambda v: v >= 1,
    "> 1": lambda v: v > 1,
    ">= 2": lambda v: v >= 2,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 65535]": lambda v: 0 <= v <= 65535,
}


EVAL_SET_SOURCES = ("reasoning_gym", "file")
_EVAL_SET_KEYS = {"source", "task", "task_kwargs", "path", "num_eval_prompts", "num_samples", "reward"}


def _eval_set_errors(sets: Any) -> list[str]:
    """eval.sets: a mapping of set names to sources (the files themselves are read before the run starts)."""
    if not isinstance(sets, dict):
        return [f"eval.sets={sets!r} must be a mapping of set names to sources"]
    errors = []
    for name, spec in sets.items():
        where = f"eval.sets.{name}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            errors.append(f"{where}: the set name must be letters, digits, '_' or '-'")
        elif not isinstance(spec, dict):
            errors.append(f"{where}={spec!r} must be a mapping with a 'source'")
        elif spec.get("source") not in EVAL_SET_SOURCES:
            errors.append(f"{where}.source={spec.get('source')!r} is not a known source "
                          f"(allowed: {', '.join(EVAL_SET_SOURCES)})")
        elif set(spec) - _EVAL_SET_KEYS:
            errors.append(f"{where} has unknown key(s) {sorted(set(spec) - _EVAL_SET_KEYS)} "
                          f"(allowed: {', '.join(sorted(_EVAL_SET_KEYS))})")
        elif spec["source"] == "file" and not spec.get("path"):
            errors.append(f"{where}.path is required with source=file (a .jsonl or .parquet file)")
        elif "reward" in spec and (not isinstance(spec["reward"], str) or not spec["reward"].strip()):
            errors.append(f"{where}.reward={spec['reward']!r} must be a reward name (a registered reward or a "
                          "dotted path)")
        else:
            for key in ("num_eval_prompts", "num_samples"):
                value = spec.get(key, 1)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    errors.append(f"{where}.{key}={value!r} must be an integer >= 1")
    return errors


def _batch_split_errors(cfg: RunConfig, dp: int) -> list[str]:
    """Each DP rank must get the same whole number of groups, in whole micro-batches."""
    groups = cfg.fleet.prompts_per_step
    if groups % dp:
        return [f"fleet.prompts_per_step={groups} must be divisible by the data-parallel size {dp} "
                f"(allowed: multiples of {dp})"]
    mb = cfg.parallel.micro_batch_groups
    per_rank = groups // dp
    if mb is not None and mb >= 1 and per_rank % mb:
        return [f"parallel.micro_batch_groups={mb} must divide the {per_rank} groups per data-parallel "
                f"rank (fleet.prompts_per_step={groups} / DP={dp}; allowed: {_divisors(per_rank)}, "
                "or null for one micro-batch)"]
    return []


def _choice_and_bound_errors(cfg: RunConfig) -> list[str]:
    """Each choice field against CHOICES, each bounded number against its bound."""
    errors: list[str] = []
    for name, allowed in CHOICES.items():
        value = _get(cfg, name)
        if value not in allowed:
            errors.append(f"{name}={_fmt(value)} must be one of: {', '.join(allowed)}")

    for name, bound in _BOUNDS:
        value = _get(cfg, name)
        if value is not None and not _BOUND_TESTS[bound](value):  # NaN fails every bound
            errors.append(f"{name}={_fmt(value)} must be {bound}")
    return errors


def _model_parallel_errors(cfg: RunConfig) -> list[str]:
    """The model's shapes against the TP / PP split, recompute, packing and the batch split."""
    errors: list[str] = []
    m, p = cfg.model, cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    heads, groups = m.num_attention_heads, m.num_query_groups
    if groups is not None and heads % groups:
        errors.append(f"model.num_query_groups={groups} must divide model.num_attention_heads={heads} "
                      f"(allowed: {_divisors(heads)})")
    if heads % tp:
        errors.append(f"parallel.tensor_model_parallel_size={tp} must divide model.num_attention_heads="
                      f"{heads} (allowed: {_divisors(heads)})")
    if groups is not None and groups % tp:
        errors.append(f"parallel.tensor_model_parallel_size={tp} must divide model.num_query_groups="
                      f"{groups} (allowed: {_divisors(groups)})")
    if m.ffn_hidden_size % tp:
        errors.append(f"model.ffn_hidden_size={m.ffn_hidden_size} must be divisible by "
                      f"parallel.tensor_model_parallel_size={tp} (allowed TP: {_divisors(m.ffn_hidden_size)})")
    if m.num_layers % pp:
        errors.append(f"parallel.pipeline_model_parallel_size={pp} must divide model.num_layers="
                      f"{m.num_layers} (allowed: {_divisors(m.num_layers)})")
    if m.kv_channels is None and m.hidden_size % heads:
        errors.append(f"model.hidden_size={m.hidden_size} must be divisible by model.num_attention_heads="
                      f"{heads} when model.kv_channels is null (or set model.kv_channels)")
    rope = m.rope_scaling
    if rope.type == "llama3" and rope.high_freq_factor <= rope.low_freq_factor:
        errors.append(f"model.rope_scaling.high_freq_factor={rope.high_freq_factor} must be > "
                      f"model.rope_scaling.low_freq_factor={rope.low_freq_factor} (llama3 ramps between them)")
    if p.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true requires parallel.tensor_model_parallel_size > 1 "
                      "(allowed: false with TP=1)")
    if p.recompute == "full" and not m.num_layers % pp and p.recompute_num_layers > m.num_layers // pp:
        errors.append(f"parallel.recompute_num_layers={p.recompute_num_layers} must be <= the layers per "
                      f"pipeline stage, {m.num_layers // pp} (model.num_layers / pipeline_model_parallel_size)")
    if p.pack_sequences and p.micro_batch_tokens == 0:
        errors.append("parallel.pack_sequences=true needs a token budget: parallel.micro_batch_tokens=0 "
                      "(allowed: micro_batch_tokens > 0, or pack_sequences=false)")
    if p.data_parallel_size is not None:
        errors += _batch_split_errors(cfg, p.data_parallel_size)
    elif p.micro_batch_groups is not None and p.micro_batch_groups > cfg.fleet.prompts_per_step:
        errors.append(f"parallel.micro_batch_groups={p.micro_batch_groups} must be <= "
                      f"fleet.prompts_per_step={cfg.fleet.prompts_per_step}")
    return errors


def _moe_errors(cfg: RunConfig) -> list[str]:
    """Experts against the preset, the router and the EP x TP split."""
    m, p = cfg.model, cfg.parallel
    ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
    if m.num_experts == 0:
        if m.preset == "qwen3_moe":
            return ["model.num_experts=0: model.preset='qwen3_moe' needs routed experts (allowed: >= 1)"]
        if ep > 1:
            return [f"parallel.expert_model_parallel_size={ep} needs an MoE model (model.num_experts=0; allowed: 1)"]
        return []
    if m.preset != "qwen3_moe":
        return [f"model.num_experts={m.num_experts}: model.preset={m.preset!r} is dense (allowed: 0, or "
                "model.preset='qwen3_moe')"]
    errors = []
    if p.data_parallel_size is not None and p.data_parallel_size % ep:
        errors.append(f"parallel.expert_model_parallel_size={ep} must divide parallel.data_parallel_size="
                      f"{p.data_parallel_size} (expert-parallel ranks are data-parallel ranks of the dense layers)")
    if m.num_experts % ep:
        errors.append(f"parallel.expert_model_parallel_size={ep} must divide model.num_experts={m.num_experts} "
                      f"(allowed: {_divisors(m.num_experts)})")
    if m.moe_router_topk > m.num_experts:
        errors.append(f"model.moe_router_topk={m.moe_router_topk} must be <= model.num_experts={m.num_experts}")
    if tp > 1 and not p.sequence_parallel:
        # Megatron's MoE layer refuses to train with TP but without SP (each TP rank would route the same tokens).
        errors.append(f"parallel.tensor_model_parallel_size={tp} with experts needs parallel.sequence_parallel="
                      "true (allowed: true, or TP=1)")
    width = m.moe_ffn_hidden_size or m.ffn_hidden_size
    if width % tp:
        errors.append(f"model.moe_ffn_hidden_size={width} must be divisible by parallel.tensor_model_parallel_size"
                      f"={tp} (experts are split over TP; allowed TP: {_divisors(width)})")
    return errors


def _precision_errors(cfg: RunConfig) -> list[str]:
    """FP8 and the parameter dtype."""
    errors: list[str] = []
    fp8 = cfg.precision.fp8
    if fp8.enabled and fp8.recipe == "delayed" and fp8.first_last_layers_bf16:
        errors.append("precision.fp8.first_last_layers_bf16=true is not supported with "
                      "precision.fp8.recipe='delayed' (allowed recipes: "
                      f"{', '.join(r for r in CHOICES['precision.fp8.recipe'] if r != 'delayed')})")
    if fp8.fp8_param and not fp8.enabled:
        errors.append("precision.fp8.fp8_param=true requires precision.fp8.enabled=true")
    if cfg.precision.params_dtype == "fp16" and fp8.enabled:
        errors.append("precision.params_dtype='fp16' cannot be combined with precision.fp8.enabled=true "
                      "(allowed: bf16 or fp32)")
    return errors


def _sampling_errors(cfg: RunConfig) -> list[str]:
    """The LR schedule, generation lengths, overlong shaping, dynamic sampling and top-p."""
    errors: list[str] = []
    m = cfg.model
    if cfg.optim.min_lr > cfg.optim.lr:
        errors.append(f"optim.min_lr={cfg.optim.min_lr} must be <= optim.lr={cfg.optim.lr}")
    if cfg.fleet.max_new_tokens >= m.max_seq_length:
        errors.append(f"fleet.max_new_tokens={cfg.fleet.max_new_tokens} must be < model.max_seq_length="
                      f"{m.max_seq_length} (the prompt needs at least one token)")
    if cfg.rewards.overlong_buffer_tokens > cfg.fleet.max_new_tokens:
        errors.append(f"rewards.overlong_buffer_tokens={cfg.rewards.overlong_buffer_tokens} must be <= "
                      f"fleet.max_new_tokens={cfg.fleet.max_new_tokens} (the penalty ramps over the last N tokens)")
    if cfg.fleet.dynamic_sampling and cfg.fleet.prompts_per_step > cfg.data.num_train_prompts:
        errors.append(f"fleet.prompts_per_step={cfg.fleet.prompts_per_step} must be <= data.num_train_prompts="
                      f"{cfg.data.num_train_prompts} with fleet.dynamic_sampling=true (a step refills with other "
                      "prompts)")
    if cfg.fleet.top_p < 1 and cfg.algo.logp_lag_source == "engine":  # review W1: a length-dependent bias
        errors.append(f"fleet.top_p={cfg.fleet.top_p} needs algo.logp_lag_source='recompute' (or fleet.top_p=1): "
                      "the engine's log-probs are top-p-renormalised, the learner's temperature-only")
    return errors


def _data_errors(cfg: RunConfig) -> list[str]:
    """Offline rounds, eval sets, the data source, the reward name and the run directory."""
    errors: list[str] = []
    if cfg.lag.mode == "offline" and not cfg.lag.offline_dataset:
        errors.append("lag.offline_dataset=null must be set when lag.mode='offline' "
                      "(allowed: a JSONL rollout dataset written by `oapl generate`)")
    errors.extend(_eval_set_errors(cfg.eval.sets))
    if cfg.lag.mode == "offline" and cfg.eval.every:
        errors.append(f"eval.every={cfg.eval.every} needs the fleet, and lag.mode='offline' runs none "
                      "(allowed: 0; `oapl train` still evaluates before and after, `oapl eval` any HF directory)")
    if cfg.data.source in ("jsonl", "parquet") and not cfg.data.path:
        errors.append(f"data.path=null must be set when data.source={_fmt(cfg.data.source)} "
                      f"(allowed: a {cfg.data.source} file or directory)")
    if not cfg.rewards.name:
        errors.append("rewards.name='' must be a registered reward name or a dotted path pkg.mod:fn")
    blocking = next((p for p in (Path(cfg.run_dir), *Path(cfg.run_dir).parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # the run directory could never be created
        what = "is" if blocking == Path(cfg.run_dir) else f"is inside {str(blocking)!r}, which is"
        errors.append(f"run_dir={_fmt(cfg.run_dir)} {what} an existing file (allowed: a directory path, new or "
                      "existing)")
    return errors


def validate(cfg: RunConfig, check_hardware: bool = True, model_read: bool | None = None) -> None:
    """All checks of a config, across sections; raises one ConfigError listing every problem.

    `model_read`: whether the model section describes the model (default: no model.hf_path). With an HF
    path the experts are checked only once its config.json is read (models/hf_config.resolve_model)."""
    errors = _choice_and_bound_errors(cfg)
    if errors:  # the cross checks below assume sane values
        raise ConfigError("\n".join(errors), errors)
    model_read = not cfg.model.hf_path if model_read is None else model_read
    errors = [*_model_parallel_errors(cfg), *(_moe_errors(cfg) if model_read else []), *_precision_errors(cfg),
              *_sampling_errors(cfg), *_data_errors(cfg)]
    if errors:
        raise ConfigError("\n".join(errors), errors)
    if check_hardware:
        _check_hardware(cfg)


def check_hardware(cfg: RunConfig) -> None:
    """Checks that depend on this machine: FP8 needs a CUDA GPU and transformer-engine, NCCL a GPU, the
    `code` reward a sandbox that runs here, and an installed transformer-engine must import."""
    import torch  # here, not at the top: parsing a config should not pay for importing torch

    has_gpu = torch.cuda.is_available()
    errors = []
    if cfg.precision.fp8.enabled:
        has_te = importlib.util.find_spec("transformer_engine") is not None
        if not (has_gpu and has_te):
            missing = " and ".join(x for x, ok in (("no GPU", has_gpu), ("no transformer-engine", has_te))
                                   if not ok)
            errors.append("precision.fp8.enabled=true needs a CUDA GPU and transformer-engine "
                          "(the learner image: NGC PyTorch, or pip install 'megatron_oapl[learner-gpu]'); "
                          f"this machine has {missing} "
                          "(allowed here: precision.fp8.enabled=false)")
    from megatron_oapl.platform import transformer_engine_problem

    te_problem = transformer_engine_problem()  # a broken TE breaks `import megatron.core` itself
    if te_problem:
        errors.append(te_problem)
    for name in ("parallel.backend", "fleet.weight_sync.backend"):
        if _get(cfg, name) == "nccl" and not has_gpu:
            errors.append(f"{name}='nccl' needs a CUDA GPU; this machine has no GPU (allowed here: auto, gloo)")
    if cfg.rewards.name == "code":  # refuse before anything starts, not at the first reward of an engine
        from megatron_oapl.rewards.sandbox import sandbox_problem

        problem = sandbox_problem(cfg.rewards.code_sandbox)
        if problem:
            errors.append(problem)
    if errors:
        raise ConfigError("\n".join(errors), errors)


_check_hardware = check_hardware  # `validate`/`load_config` take a flag of the same name


def check_world_size(cfg: RunConfig, world_size: int) -> int:
    """The data-parallel size for `world_size` learner ranks; ConfigError if TP*PP*DP cannot match."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    mp = tp * pp
    if world_size < 1 or world_size % mp:
        raise ConfigError(f"world_size={world_size} must be a multiple of parallel.tensor_model_parallel_size"
                          f"={tp} x parallel.pipeline_model_parallel_size={pp} = {mp} "
                          f"(allowed: {mp}, {2 * mp}, {3 * mp}, ...)")
    dp = world_size // mp
    want = cfg.parallel.data_parallel_size
    if want is not None and want != dp:
        raise ConfigError(f"parallel.data_parallel_size={want} does not match world_size={world_size} / "
                          f"(TP={tp} x PP={pp}) = {dp} (allowed: {dp}, or null to derive it; or launch "
                          f"{mp * want} ranks)")
    ep = cfg.parallel.expert_model_parallel_size
    if dp % ep:
        raise ConfigError(f"parallel.expert_model_parallel_size={ep} must divide the data-parallel size {dp} "
                          f"(world_size={world_size} / (TP={tp} x PP={pp}); expert-parallel ranks are "
                          f"data-parallel ranks of the dense layers; launch a multiple of {mp * ep} ranks)")
    errors = _batch_split_errors(cfg, dp)
    if errors:
        raise ConfigError("\n".join(errors), errors)
    return dp


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (YAML/JSON-ready)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any, docs: bool = False) -> str:
    """The config as YAML that `load_config` reads back; docs=True adds each field's doc as a comment."""
    if not docs:
        return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    lines: list[str] = []
    _yaml_with_docs(cfg, 0, lines)
    return "\n".join(lines) + "\n"


def _yaml_with_docs(obj: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for line in textwrap.wrap(docs.get(f.name, ""), width=max(40, 100 - len(pad) - 2)):
            lines.append(f"{pad}# {line}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            _yaml_with_docs(value, indent + 1, lines)
        else:
            dumped = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
            text = "\n".join(x for x in dumped.splitlines() if x != "...")  # drop the document end
            lines.append(f"{pad}{f.name}: {text}")
