"""Megatron checkpoint <-> Hugging Face model directory, for Llama / Qwen2 / Qwen3.

    oapl convert megatron-to-hf --ckpt runs/tiny --out runs/tiny-hf [--dtype bf16|fp16|fp32]
    oapl convert hf-to-megatron --hf Qwen3-0.6B/ --out ckpt/qwen3-tp2 --tp 2 --pp 1 [--config recipe.yaml]

(also `python -m megatron_oapl.checkpoint.convert ...`). Both directions go through the project's one
name/layout map (`models.hf_mapping`) and the live-model resharding code (`weights.reshard`).

megatron-to-hf: `--ckpt` is a checkpoint directory, a `checkpoints/` root or a run directory (its
`latest`). The checkpoint is verified against its manifest, then loaded on one spawned rank with TP=PP=1
(Megatron's sharded checkpoint reshards on load, whatever TP x PP x DP saved it); the model is built
from the `config.yaml` stored in the checkpoint. The weights go through the writer of `oapl train`'s final
export (`weights.export.export_hf_model`: one shard in memory at a time). Output: `config.json` (a
LlamaConfig / Qwen2Config / Qwen3Config made by transformers from the preset and the model fields, with
`dtype`), safetensors shards of at most 2 GiB (`model-s000-<k>.safetensors`) + `model.safetensors.index.json`,
`generation_config.json`, and the tokenizer files of `model.hf_path` when that directory exists.
FP8-trained models are exported in high precision: the model is rebuilt without FP8 for the export, so
what is written is the high-precision weight (and `weights.reshard` dequantises any Transformer Engine
FP8 parameter it hands out). That path needs a GPU with Transformer Engine and is not exercised on CPU.
The exported weights are the model parameters (bf16 when trained in bf16), not the optimizer's fp32
master copies.

hf-to-megatron: the architecture comes from the HF `config.json` (`models.hf_config`); the rest of the
run config (precision, optimizer, ...) from `--config` when given. `tp * pp` ranks are spawned; each
cuts its shards out of the HF tensors and the model is saved as one run checkpoint (step 0, model only,
with `config.yaml` and a manifest) at `--out`. Train from it with `checkpoint.load=OUT` (the optimizer
starts fresh), or export it back with megatron-to-hf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# No torch / Megatron at import time: the CLI imports `add_convert_parser` before parsing.
DTYPES = ("bf16", "fp16", "fp32")
_HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    return {v: k for k, v in ((n, torch_dtype(n)) for n in DTYPES)}[dtype]


class ConversionError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------

def export_config(ckpt_dir: str | Path):
    """The run config stored in checkpoint `ckpt_dir`, with a one-rank TP=PP=1 layout and no FP8 (the
    export model only holds weights; FP8 parameters are loaded dequantised)."""
    from megatron_oapl.config import load_config

    path = Path(ckpt_dir) / "config.yaml"
    if not path.is_file():
        raise ConversionError(f"checkpoint {ckpt_dir} has no config.yaml: it was not written by "
                              "megatron_oapl's CheckpointManager (the run config is needed to build the model)")
    overrides = [
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
        "parallel.expert_model_parallel_size=1", "parallel.data_parallel_size=null", "parallel.micro_batch_groups=null",
        "parallel.sequence_parallel=false", "parallel.use_distributed_optimizer=false",
        "precision.fp8.enabled=false", "precision.fp8.fp8_param=false", "precision.fp8.first_last_layers_bf16=false"]
    return load_config(path, overrides, check_hardware=False)


def import_config(hf_dir: str | Path, tp: int, pp: int, config_path: str | Path | None = None, ep: int = 1):
    """A run config whose model section is read from `hf_dir/config.json` (the rest from
    `config_path` or the defaults), with TP x PP x EP and DP = EP (expert-parallel ranks are data-parallel
    ranks). The layout is checked against the HF model's shapes (heads, KV groups, layers, experts), not
    against the YAML's own model section."""
    from megatron_oapl.config import load_config, validate
    from megatron_oapl.models.hf_config import resolve_model

    cfg = resolve_model(load_config(config_path, [f"model.hf_path={Path(hf_dir).resolve()}"], check_hardware=False))
    model = cfg.model
    hf = json.loads((Path(hf_dir) / "config.json").read_text())
    if config_path is None and hf.get("max_position_embeddings"):
        # Without a run config, keep the HF model's context length (the defaults are the tiny run's).
        model = dataclasses.replace(model, max_seq_length=int(hf["max_position_embeddings"]))
    # Megatron trains experts under TP only with sequence parallelism.
    sequence_parallel = cfg.parallel.sequence_parallel or (tp > 1 and model.num_experts > 0)
    parallel = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   expert_model_parallel_size=ep, data_parallel_size=None, micro_batch_groups=None,
                                   sequence_parallel=sequence_parallel)
    cfg = dataclasses.replace(cfg, model=model, parallel=parallel)
    validate(cfg, check_hardware=False, model_read=True)
    return cfg


def _build_cfg(cfg):
    """The config the conversion model is built from: FP8 and sequence parallelism off (the model only
    holds weights; neither changes a weight's name or shape; see the module doc)."""
    fp8 = dataclasses.replace(cfg.precision.fp8, enabled=False, fp8_param=False, first_last_layers_bf16=False)
    return dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision, fp8=fp8),
                               parallel=dataclasses.replace(cfg.parallel, sequence_parallel=False))


def _hf_moe_kwargs(model_cfg) -> dict:
    """Qwen3MoeConfig's expert fields: every layer routed (no dense MLP layers), as the learner builds it."""
    from megatron_oapl.models.presets import router_aux_loss_coeff

    return dict(num_experts=model_cfg.num_experts, num_experts_per_tok=model_cfg.moe_router_topk,
                moe_intermediate_size=model_cfg.moe_ffn_hidden_size or model_cfg.ffn_hidden_size,
                norm_topk_prob=model_cfg.moe_norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[],
                router_aux_loss_coef=router_aux_loss_coeff(model_cfg))


def hf_config(model_cfg, dtype, source_dir: str | Path | None = None):
    """A transformers config (LlamaConfig / Qwen2Config / Qwen3Config / Qwen3MoeConfig) for `model_cfg`; `dtype` is a
    torch dtype or bf16 | fp16 | fp32. It describes the same function as the Megatron model (RoPE theta
    and scaling included), so an export -> import round trip keeps the model.

    Token ids (bos/eos/pad) and a longer `max_position_embeddings` come from `source_dir/config.json`
    (the model the run started from) when it exists."""
    import transformers

    from megatron_oapl.models.presets import get_architecture

    arch = get_architecture(model_cfg.preset)
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
               "qwen3_moe": transformers.Qwen3MoeConfig}
    heads = model_cfg.num_attention_heads
    source = {}
    if source_dir and (Path(source_dir) / "config.json").is_file():
        source = json.loads((Path(source_dir) / "config.json").read_text())
    kwargs = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model_cfg.num_query_groups or heads,
        head_dim=model_cfg.kv_channels or model_cfg.hidden_size // heads,
        max_position_embeddings=max(model_cfg.max_seq_length, int(source.get("max_position_embeddings") or 0)),
        rms_norm_eps=model_cfg.norm_epsilon,
        rope_theta=float(model_cfg.rotary_base),
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        hidden_act="silu",
        initializer_range=model_cfg.init_method_std,
        architectures=[arch.hf_architecture],
    )
    if arch.name in ("llama", "qwen3", "qwen3_moe"):
        kwargs["attention_bias"] = False  # Qwen2's q/k/v biases are implied by its model type
    if arch.name == "llama":
        kwargs["mlp_bias"] = False
    if arch.name in ("qwen2", "qwen3", "qwen3_moe"):
        kwargs["use_sliding_window"] = False
    if arch.moe:
        kwargs.update(_hf_moe_kwargs(model_cfg))
    rope = model_cfg.rope_scaling
    if rope.type == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": rope.factor}
    elif rope.type == "llama3":
        kwargs["rope_scaling"] = {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
                                  "high_freq_factor": rope.high_freq_factor,
                                  "original_max_position_embeddings": rope.original_max_position_embeddings}
    # (transformers 5 reads `rope_scaling` + `rope_theta` into its `rope_parameters`, 4.x keeps them.)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if source.get(key) is not None:
            kwargs[key] = source[key]
    # transformers >= 5 names the field `dtype`; 4.x `torch_dtype`.
    major = int(transformers.__version__.split(".")[0])
    kwargs["dtype" if major >= 5 else "torch_dtype"] = _HF_DTYPE_NAMES[_dtype_name(dtype)]
    return classes[arch.name](**kwargs)


# --------------------------------------------------------------------------------------------------
# Writing an HF directory
# --------------------------------------------------------------------------------------------------


def write_hf_side_files(out_dir: Path, config, source_dir: str | Path | None) -> None:
    """config.json (written anew: it describes the checkpoint's model), then the other side files of
    `source_dir` (if any): generation_config.json (made from the config when the source has none) and the
    tokenizer files."""
    import transformers

    from megatron_oapl.weights.hf_io import SIDE_FILES, copy_side_files

    config.save_pretrained(str(out_dir))
    source = Path(source_dir) if source_dir else None
    if source is None or not (source / "generation_config.json").is_file():
        transformers.GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    copy_side_files(source, out_dir, [name for name in SIDE_FILES if name != "config.json"])


# --------------------------------------------------------------------------------------------------
# Rank-side work (inside an initialised learner world)
# --------------------------------------------------------------------------------------------------


def _weights_model(cfg, ctx):
    """This rank's stage of the model as a bare GPTModel, without random initialisation (every weight
    is overwritten by the conversion)."""
    from megatron_oapl.models.megatron_model import build_gpt_model, build_transformer_config

    build_cfg = _build_cfg(cfg)
    tconfig = build_transformer_config(build_cfg)
    tconfig.perform_initialization = False
    module = build_gpt_model(build_cfg, tconfig, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    return [module.to(ctx.device)], tconfig


def export_hf_rank(cfg, ctx, ckpt_dir: str | Path, out_dir: str | Path, dtype) -> Path:
    """Load checkpoint `ckpt_dir` into a TP=PP=1 model and write the HF directory `out_dir` with
    weights in `dtype` (torch dtype or bf16 | fp16 | fp32). `cfg` is `export_config(ckpt_dir)`.

    Collective over a TP=PP=1 world: `megatron_to_hf` runs it on one rank; on a larger (data-parallel)
    world every rank loads the whole model and rank 0 writes."""
    import torch
    import torch.distributed as dist

    from megatron_oapl.checkpoint.save_load import load_model_weights
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.models.presets import get_architecture
    from megatron_oapl.weights.export import export_hf_model

    if ctx.tp_size != 1 or ctx.pp_size != 1:
        raise ConversionError(f"megatron-to-hf loads the whole model on a rank (TP=PP=1), got TP={ctx.tp_size} "
                              f"PP={ctx.pp_size}")
    model, _ = _weights_model(cfg, ctx)
    load_model_weights(model, ckpt_dir)
    mapping = HFMapping.from_model_config(get_architecture(cfg.model.preset), cfg.model)
    dtype = torch_dtype(_dtype_name(dtype))
    with torch.no_grad():
        # No side files from the source: its config.json would not describe this checkpoint's dtype.
        out = export_hf_model(model, mapping, ctx, None, out_dir, dtype=dtype)
    if out is not None:
        write_hf_side_files(out, hf_config(cfg.model, dtype, cfg.model.hf_path), cfg.model.hf_path)
    dist.barrier()  # the directory is complete on every rank's return
    return Path(out_dir)


def import_hf_rank(cfg, ctx, hf_dir: str | Path, out_dir: str | Path) -> list:
    """Every rank loads its shard of `hf_dir`'s weights; together they save checkpoint `out_dir` (step 0,
    model only). Returns this rank's model chunks. `cfg` is `import_config(hf_dir, tp, pp, ...)`."""
    from megatron_oapl.checkpoint.save_load import save_checkpoint
    from megatron_oapl.learner.model import Policy
    from megatron_oapl.models.hf_mapping import HFMapping
    from megatron_oapl.models.presets import get_architecture
    from megatron_oapl.weights.hf_io import hf_tensor_reader
    from megatron_oapl.weights.reshard import load_hf_tensors

    model, tconfig = _weights_model(cfg, ctx)
    mapping = HFMapping.from_model_config(get_architecture(cfg.model.preset), cfg.model)
    load_hf_tensors(model, mapping, hf_tensor_reader(hf_dir))
    policy = Policy(model=model, optimizer=None, scheduler=None, config=tconfig)
    save_checkpoint(Path(out_dir), 0, policy, ctx, {"step": 0, "source": "hf", "hf_path": str(Path(hf_dir).resolve())},
                    config=cfg)
    return model


# --------------------------------------------------------------------------------------------------
# Process entry points (spawned ranks)
# --------------------------------------------------------------------------------------------------


def _rank_entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    fn(*args)


def spawn_ranks(world_size: int, fn, *args) -> None:
    """Run `fn(*args)` on `world_size` fresh gloo/NCCL ranks on this machine (torchrun-style env)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_entry, args=(world_size, port, fn, args), nprocs=world_size, join=True)


def _export_entry(cfg_dict: dict, ckpt_dir: str, out_dir: str, dtype_name: str) -> None:
    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed

    cfg = from_dict(cfg_dict, check_hardware=False)
    ctx = init_distributed(cfg)
    try:
        export_hf_rank(cfg, ctx, ckpt_dir, out_dir, dtype_name)
    finally:
        destroy_distributed()


def _import_entry(cfg_dict: dict, hf_dir: str, out_dir: str) -> None:
    from megatron_oapl.config import from_dict
    from megatron_oapl.learner.distributed import destroy_distributed, init_distributed

    cfg = from_dict(cfg_dict, check_hardware=False)
    ctx = init_distributed(cfg)
    try:
        import_hf_rank(cfg, ctx, hf_dir, out_dir)
    finally:
        destroy_distributed()


def megatron_to_hf(ckpt: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    """Export a Megatron run checkpoint as an HF model directory (spawns one rank). `dtype`: bf16 |
    fp16 | fp32; None = the run's `precision.params_dtype`."""
    from megatron_oapl.checkpoint.files import resolve_checkpoint, verify_checkpoint
    from megatron_oapl.config import to_dict

    ckpt_dir = resolve_checkpoint(ckpt)
    problem = verify_checkpoint(ckpt_dir)
    if problem:
        raise ConversionError(f"checkpoint {ckpt_dir} refused: {problem}")
    cfg = export_config(ckpt_dir)
    dtype = dtype or cfg.precision.params_dtype
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype={dtype!r} must be one of: {', '.join(DTYPES)}")
    source = cfg.model.hf_path
    if source and not (Path(source) / "config.json").is_file():
        log.warning("model.hf_path=%s (from the checkpoint's config.yaml) is not here: no tokenizer files are "
                    "copied and token ids come from nowhere; copy them from the source model", source)
    spawn_ranks(1, _export_entry, to_dict(cfg), str(ckpt_dir), str(out), dtype)
    return Path(out)


def hf_to_megatron(hf: str | Path, out: str | Path, tp: int = 1, pp: int = 1,
                   config: str | Path | None = None, ep: int = 1) -> Path:
    """Convert an HF model directory into a Megatron checkpoint for TP x PP x EP (spawns tp*pp*ep ranks)."""
    from megatron_oapl.config import to_dict
    from megatron_oapl.weights.hf_io import hf_tensor_reader

    hf_dir = Path(hf)
    if not (hf_dir / "config.json").is_file():
        raise ConversionError(f"--hf {hf_dir} is not an HF model directory (no config.json)")
    hf_tensor_reader(hf_dir)  # fails early, naming what is missing
    cfg = import_config(hf_dir, tp, pp, config, ep)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--out {out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    spawn_ranks(tp * pp * ep, _import_entry, to_dict(cfg), str(hf_dir), str(out))
    return out


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_EPILOG = """\
directions:
  megatron-to-hf  a run checkpoint (any TP x PP x DP layout) -> an HF model directory. --ckpt takes a
                  checkpoint directory, a run's checkpoints/ directory or the run directory (its
                  `latest`). The checkpoint is verified against its manifest first. FP8-trained
                  models are written dequantised.
  hf-to-megatron  an HF Llama / Qwen2 / Qwen3 / Qwen3-MoE directory -> a Megatron checkpoint for
                  TP x PP (x EP for experts; model only, step 0). Train from it with checkpoint.load=OUT.

where it runs: on this machine. hf-to-megatron starts TP*PP*EP ranks (one GPU each on a GPU machine,
gloo processes on CPU), megatron-to-hf one rank that holds the whole model (weights only). Inside a
SLURM allocation: srun -N1 -n1 --gpus=<TP*PP*EP> oapl convert ...

examples:
  oapl convert megatron-to-hf --ckpt runs/tiny --out runs/tiny-hf --dtype bf16
  oapl convert hf-to-megatron --hf runs/tiny-model --out runs/tiny-tp2 --tp 2 --pp 1
  oapl convert hf-to-megatron --hf Qwen/Qwen3-30B-A3B --out ckpt/q30b --tp 2 --ep 4

load the exported model:
  from transformers import AutoModelForCausalLM, AutoTokenizer
  model = AutoModelForCausalLM.from_pretrained("runs/tiny-hf")
  tokenizer = AutoTokenizer.from_pretrained("runs/tiny-hf")   # when the run's model.hf_path had one
"""


def _cli_errors(run):
    """User errors (bad paths, configs, refused checkpoints) as `error: ...` and exit status 2."""
    def wrapped(args) -> int:
        from megatron_oapl.config import ConfigError

        try:
            return run(args)
        except (ConversionError, ConfigError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return wrapped


@_cli_errors
def _run_megatron_to_hf(args) -> int:
    megatron_to_hf(args.ckpt, args.out, args.dtype)
    print(f"wrote {args.out}")
    return 0


@_cli_errors
def _run_hf_to_megatron(args) -> int:
    hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.config, args.ep)
    print(f"wrote {args.out} (TP={args.tp}, PP={args.pp}, EP={args.ep}); train from it with "
          f"checkpoint.load={args.out}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `convert` (with `megatron-to-hf` and `hf-to-megatron`) on an argparse subparsers object."""
    convert = subparsers.add_parser(
        "convert", help="convert between Megatron run checkpoints and Hugging Face model directories",
        description="Convert between Megatron run checkpoints and Hugging Face model directories "
        "(Llama, Qwen2, Qwen3, Qwen3-MoE).", epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")

    m2h = sub.add_parser("megatron-to-hf", help="run checkpoint -> HF model directory",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m2h.add_argument("--ckpt", required=True,
                     help="checkpoint directory, a run's checkpoints/ directory, or the run directory")
    m2h.add_argument("--out", required=True, help="HF model directory to write")
    m2h.add_argument("--dtype", choices=DTYPES, default=None,
                     help="dtype of the written weights (default: the run's precision.params_dtype)")
    m2h.set_defaults(func=_run_megatron_to_hf)

    h2m = sub.add_parser("hf-to-megatron", help="HF model directory -> Megatron checkpoint for TP x PP x EP",
                         epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    h2m.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="checkpoint directory to write (new or empty)")
    h2m.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the checkpoint (default 1)")
    h2m.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the checkpoint (default 1)")
    h2m.add_argument("--ep", type=int, default=1,
                     help="expert-parallel size of an MoE checkpoint (default 1); the data-parallel size is EP")
    h2m.add_argument("--config", default=None,
                     help="run config YAML for the non-architecture sections (precision, ...); the "
                          "architecture always comes from the HF config.json")
    h2m.set_defaults(func=_run_hf_to_megatron)
    return convert


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_oapl.checkpoint.convert DIRECTION ...` (the same as `oapl convert ...`)."""
    parser = argparse.ArgumentParser(prog="oapl")
    add_convert_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
