"""Run checkpoints (atomic, verified, resharding) and Megatron <-> HF conversion, on real gloo ranks.

Training runs use the shared tiny OAPL case (tests/support/oapl_case.py): the reference weights, one
fixed batch, fp32, lr 1e-3. Uninterrupted runs are compared with save -> new process -> resume:

- same layout (TP=2 -> TP=2, plain optimizer; DP=2 -> DP=2, distributed optimizer): the following
  steps' losses and weights are bit-identical. On CPU every kernel is deterministic, and the
  checkpoint restores every bit that feeds the next step (weights, Adam moments and step, LR schedule,
  RNG streams);
- across layouts (TP=2 -> PP=2 -> TP=2, and DP=2 -> TP=2 with the distributed optimizer): losses agree
  to rel 1e-5 and weights to atol 1e-6 (= lr / 1000). Not bit-exact: a different split changes the
  order of floating-point reductions (TP all-reduces partial matmuls; PP and DP do not), which moves
  results by ~1e-7; a lost or misplaced shard or optimizer state would move weights by ~lr.

Process budget (starting ranks is what costs time on 2 cores): two 2-rank training worlds (the
saving life and the resuming one; each phase inside rebuilds Megatron's groups for its layout and a
fresh policy, so only files carry state between phases), and for conversion the two CLI commands
(2 ranks and 1 rank) and one 2-rank world for the other imports, all logits and the other exports.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from megatron_oapl.checkpoint import (
    CheckpointManager,
    install_signal_handlers,
    list_checkpoints,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from megatron_oapl.checkpoint import convert
from megatron_oapl.config import to_dict
from tests.support.checkpoint_workers import checkpoint_script, hf_conversions
from tests.support.distributed import run_ranks
from tests.support.hf_reference import hf_logits
from tests.support.oapl_case import LR, run_config

LOSS_RTOL, WEIGHT_ATOL = 1e-5, LR / 1000
STATE = lambda step: {"step": step, "policy_version": step // 2, "guard": {"consecutive": 0, "total": 0}}  # noqa: E731


def _lives(setup, name: str, phases: list[tuple[str, dict, list[dict]]]) -> dict[str, list[dict]]:
    """Run `phases` ((name, layout, actions), in order) in one 2-rank gloo world; each phase builds a
    fresh policy under its own layout. Returns {phase name: [record per pipeline stage]}."""
    root, _ = setup
    out = root / name
    out.mkdir()
    run_ranks(2, checkpoint_script, str(root / "ref.pt"), str(root / "batch.pt"), str(out),
              [{"name": n, "cfg": run_config(**layout), "actions": actions} for n, layout, actions in phases])
    return {n: [torch.load(p) for p in sorted(out.glob(f"{n}.rank*.pt"))] for n, _, _ in phases}


# --------------------------------------------------------------------------------------------------
# The training lives (module fixtures: the tests below read them)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_life(setup):
    """A: TP=2, plain optimizer, 5 uninterrupted steps saving after steps 1, 2, 3 (keep_last=2).
    E: DP=2, distributed optimizer, 5 uninterrupted steps saving after step 3."""
    root = setup[0]
    lives = _lives(setup, "first", [
        ("A", dict(tp=2), [{"op": "train", "tag": "straight", "first": 1, "last": 5, "save_dir": str(root / "runA"),
                            "save_at": [1, 2, 3], "keep_last": 2}]),
        ("E", dict(distributed_optimizer=True), [
            {"op": "train", "tag": "straight", "first": 1, "last": 5, "save_dir": str(root / "runE"), "save_at": [3]}]),
    ])
    return lives["A"][0], lives["E"][0]


@pytest.fixture(scope="module")
def corrupted_run(setup, first_life):
    """A copy of run A whose newest checkpoint has a truncated shard file, plus the leftover of a save
    that crashed before its manifest (tmp-step_4). Returns (run dir, truncated file's relative path)."""
    root = setup[0]
    run = root / "runX"
    shutil.copytree(root / "runA", run)
    step3 = run / "checkpoints" / "step_3"
    shard = max((step3 / "dist").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (run / "checkpoints" / "tmp-step_4" / "dist").mkdir(parents=True)
    (run / "checkpoints" / "tmp-step_4" / "dist" / "__0_0.distcp").write_bytes(b"partial")
    return run, shard.relative_to(step3).as_posix()


@pytest.fixture(scope="module")
def second_life(setup, first_life, corrupted_run):
    """A new process (the saving one is gone), each phase a fresh policy:
    B: TP=2, resume A's step 3, steps 4-5.        (same layout)
    C: PP=2, resume A's step 3, step 4, save it.  (TP=2 -> PP=2)
    D: TP=2, load_latest of the corrupted copy; then resume C's step 4, step 5.  (PP=2 -> TP=2)
    H: DP=2 + distributed optimizer, resume E's step 3, steps 4-5.  (same layout)
    F: TP=2 + distributed optimizer, resume E's step 3, steps 4-5.  (DP=2 -> TP=2)"""
    root = setup[0]
    resume_e = [{"op": "load_latest", "run_dir": str(root / "runE")},
                {"op": "train", "tag": "resumed", "first": 4, "last": 5}]
    return _lives(setup, "second", [
        ("B", dict(tp=2), [{"op": "load_latest", "run_dir": str(root / "runA")},
                           {"op": "train", "tag": "resumed", "first": 4, "last": 5}]),
        ("C", dict(pp=2), [{"op": "load_latest", "run_dir": str(root / "runA")},
                           {"op": "train", "tag": "resumed", "first": 4, "last": 4, "save_dir": str(root / "runC"),
                            "save_at": [4]}]),
        ("D", dict(tp=2), [{"op": "load_latest", "run_dir": str(corrupted_run[0])},
                           {"op": "load_latest", "run_dir": str(root / "runC")},
                           {"op": "train", "tag": "resumed", "first": 5, "last": 5}]),
        ("H", dict(distributed_optimizer=True), resume_e),
        ("F", dict(tp=2, distributed_optimizer=True), resume_e),
    ])


# --------------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------------


def _assert_bit_identical(resumed: dict, straight: dict, steps) -> None:
    assert resumed["losses"] == {s: straight["losses"][s] for s in steps}  # exact float equality
    assert set(resumed["weights"]) == set(straight["weights"])
    for name, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name
    assert resumed["lr"] == straight["lr"] and resumed["scheduler_steps"] == straight["scheduler_steps"] == 5


def _assert_close_run(losses: dict, weights: dict, straight: dict) -> None:
    for step, loss in losses.items():
        assert loss == pytest.approx(straight["losses"][step], rel=LOSS_RTOL), step
    assert set(weights) == set(straight["weights"])
    for name, weight in straight["weights"].items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=WEIGHT_ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_same_layout_resume_is_bit_exact(setup, first_life, second_life):
    straight = first_life[0]["train"]["straight"]
    b = second_life["B"][0]
    assert b["loads"][0]["state"] == {**STATE(3), "checkpoint_step": 3,
                                      "checkpoint_dir": b["loads"][0]["state"]["checkpoint_dir"]}
    _assert_bit_identical(b["train"]["resumed"], straight, (4, 5))
    # Same layout: every RNG (python, numpy, torch, Megatron's TP tracker) continues where it was saved.
    assert not any("RNG" in w for w in b["warnings"])
    saved_rng, loaded_rng = first_life[0]["train"]["straight"]["listings"][3]["rng"], b["loads"][0]["rng"]
    assert saved_rng.keys() == loaded_rng.keys()
    for key, value in saved_rng.items():
        assert (torch.equal(value, loaded_rng[key]) if torch.is_tensor(value) else value == loaded_rng[key]), key
    # The steps moved the weights, so equality is not vacuous.
    start = torch.load(setup[0] / "ref.pt")
    assert max((straight["weights"][k] - start[k]).abs().max().item() for k in start) > 1e-3


def test_distributed_optimizer_resume_is_bit_exact_in_the_same_layout(first_life, second_life):
    h = second_life["H"][0]
    assert h["loads"][0]["state"]["step"] == 3
    _assert_bit_identical(h["train"]["resumed"], first_life[1]["train"]["straight"], (4, 5))


def test_resume_across_layouts_tp2_to_pp2_and_back(first_life, second_life):
    straight = first_life[0]["train"]["straight"]
    c, d = second_life["C"], second_life["D"][0]
    # TP=2 -> PP=2 (both stages report the broadcast loss; each holds its own layers).
    assert c[0]["loads"][0]["state"]["step"] == 3
    assert any("RNG states are not restored" in w for w in c[0]["warnings"])
    for stage in c:
        assert stage["train"]["resumed"]["losses"][4] == pytest.approx(straight["losses"][4], rel=LOSS_RTOL)
    # PP=2 -> TP=2: step 5 from C's step-4 checkpoint against the uninterrupted step 5.
    assert d["loads"][1]["state"]["step"] == 4
    _assert_close_run(d["train"]["resumed"]["losses"], d["train"]["resumed"]["weights"], straight)


def test_distributed_optimizer_resume_across_layouts_dp2_to_tp2(first_life, second_life):
    f = second_life["F"][0]
    assert f["loads"][0]["state"]["step"] == 3
    resumed = f["train"]["resumed"]
    _assert_close_run(resumed["losses"], resumed["weights"], first_life[1]["train"]["straight"])
    assert not any("optimizer state is not restored" in w for w in f["warnings"])


# --------------------------------------------------------------------------------------------------
# Corruption, crash leftovers, pruning
# --------------------------------------------------------------------------------------------------


def test_truncated_file_is_refused_and_the_previous_checkpoint_is_used(second_life, corrupted_run):
    d = second_life["D"][0]
    _, truncated = corrupted_run
    load = d["loads"][0]
    assert load["state"]["step"] == 2 and load["state"]["checkpoint_dir"].endswith("step_2")
    assert len(load["refused"]) == 1  # tmp-step_4 (an interrupted save) is not even a candidate
    message = load["refused"][0]
    assert "step_3" in message and truncated in message and "truncated" in message
    assert any(truncated in w for w in d["warnings"])  # logged (as an error) on rank 0


def test_keep_last_and_latest_pointer(setup, first_life):
    listings = first_life[0]["train"]["straight"]["listings"]
    seen = {step: {k: v for k, v in listing.items() if k != "rng"} for step, listing in listings.items()}
    assert seen[1] == {"entries": ["latest", "step_1"], "latest": "step_1"}
    assert seen[2] == {"entries": ["latest", "step_1", "step_2"], "latest": "step_2"}
    assert seen[3] == {"entries": ["latest", "step_2", "step_3"], "latest": "step_3"}
    root = setup[0] / "runA" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_3", "step_2"]
    assert resolve_checkpoint(setup[0] / "runA") == root / "step_3"
    for ckpt in list_checkpoints(root):
        assert verify_checkpoint(ckpt) is None
        files = {e["path"] for e in json.loads((ckpt / "manifest.json").read_text())["files"]}
        assert {"meta.json", "config.yaml", "rng/rank_00000.pt", "rng/rank_00001.pt"} <= files
        assert any(f.startswith("dist/") and f.endswith(".distcp") for f in files)
    meta = read_meta(root / "step_3")
    assert meta["format_version"] == 1 and meta["step"] == 3 and meta["state"] == STATE(3)
    assert meta["layout"] == {"world_size": 2, "tp": 2, "pp": 1, "dp": 1}
    assert meta["contents"] == ["model", "optimizer", "scheduler", "rng"]


def test_verify_names_the_bad_file(setup, first_life, tmp_path):
    """No ranks needed: the manifest checks are plain file I/O."""
    src = setup[0] / "runA" / "checkpoints" / "step_2"
    ckpt = tmp_path / "checkpoints" / "step_2"
    shutil.copytree(src, ckpt)
    # Same size, one byte flipped: only the checksum can tell.
    target = ckpt / "rng" / "rank_00001.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    problem = verify_checkpoint(ckpt)
    assert problem is not None and "rng/rank_00001.pt" in problem and "sha256" in problem
    (ckpt / "meta.json").unlink()
    assert "meta.json is missing" in verify_checkpoint(ckpt)
    (ckpt / "manifest.json").unlink()
    assert "manifest.json is missing" in verify_checkpoint(ckpt)
    # Interrupted saves are never candidates; a checkpoint without a manifest is one, and is refused.
    (tmp_path / "checkpoints" / "tmp-step_9").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_2"]
    manager = CheckpointManager(tmp_path)
    assert manager.latest_valid() is None and "manifest.json is missing" in manager.refused[0]


def test_signal_handler_requests_a_stop():
    previous = signal.getsignal(signal.SIGUSR1)
    stop = install_signal_handlers((signal.SIGUSR1,))
    try:
        assert not stop.requested and not stop.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1 and stop.agreed()
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) == previous


# --------------------------------------------------------------------------------------------------
# Megatron <-> HF conversion
# --------------------------------------------------------------------------------------------------

# Tiny GQA models (4 query heads, 2 KV groups), a vocabulary that TP=2 must pad (37 -> 38), and one
# head_dim that is not hidden/heads (Qwen3, like the real ones).
PRESETS = {
    "llama": dict(head_dim=16, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(head_dim=16, rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(head_dim=32, rope_theta=500000.0, tie_word_embeddings=False),
}
TOKENS = [[3, 17, 5, 36, 0, 22, 9, 14, 30, 1, 8, 25]]


def make_hf_model(preset: str, out: Path) -> Path:
    import transformers

    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[preset]
    config = cls[0](vocab_size=37, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1,
                    eos_token_id=2, **PRESETS[preset])
    torch.manual_seed(len(preset))
    model = cls[1](config)
    with torch.no_grad():  # no all-ones norms or zero biases: every tensor must travel correctly
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else
                    (0.1 if name.endswith("bias") else 0.05) * torch.randn_like(p))
    model.save_pretrained(out)
    if preset == "llama":  # a tokenizer, to check the export copies it
        from tokenizers import Tokenizer, models

        tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(37)}, unk_token="t0")),
            bos_token="t1", eos_token="t2")
        tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def conversions(tmp_path_factory):
    """HF -> Megatron (TP=2) -> HF for every preset; llama through the CLI (`convert.main`), the
    others through the same rank-side functions in shared worlds; plus qwen2 (tied embeddings)
    imported with PP=2. Megatron logits always with TP=2, from the converted checkpoints."""
    root = tmp_path_factory.mktemp("convert")
    jobs = {p: {"preset": p, "hf": make_hf_model(p, root / f"{p}-hf"), "ckpt": root / f"{p}-tp2",
                "out": root / f"{p}-back", "layout": (2, 1)} for p in PRESETS}
    jobs["qwen2-pp2"] = {**jobs["qwen2"], "ckpt": root / "qwen2-pp2", "out": root / "qwen2-pp2-back", "layout": (1, 2)}
    assert convert.main(["hf-to-megatron", "--hf", str(jobs["llama"]["hf"]), "--out", str(jobs["llama"]["ckpt"]),
                         "--tp", "2", "--pp", "1"]) == 0
    logits_dir = root / "logits"
    logits_dir.mkdir()
    run_ranks(2, hf_conversions, [
        {"name": name, "hf": str(j["hf"]), "ckpt": str(j["ckpt"]), "tokens": TOKENS,
         "import_cfg": None if name == "llama" else to_dict(convert.import_config(j["hf"], *j["layout"])),
         "cfg": to_dict(convert.import_config(j["hf"], 2, 1))} for name, j in jobs.items()],
        [{"ckpt": str(j["ckpt"]), "out": str(j["out"])} for name, j in jobs.items() if name != "llama"],
        str(logits_dir))
    assert convert.main(["megatron-to-hf", "--ckpt", str(jobs["llama"]["ckpt"]), "--out", str(jobs["llama"]["out"]),
                         "--dtype", "fp32"]) == 0
    for name, j in jobs.items():
        j["megatron"] = torch.load(logits_dir / f"{name}.pt")
    return jobs


CONVERSIONS = [*PRESETS, "qwen2-pp2"]


@pytest.mark.parametrize("name", CONVERSIONS)
def test_hf_megatron_round_trip_is_exact(conversions, name):
    from safetensors.torch import load_file

    job = conversions[name]
    preset = job["preset"]
    original = load_file(job["hf"] / "model.safetensors")
    index = json.loads((job["out"] / "model.safetensors.index.json").read_text())  # the one writer's layout
    back = {}
    for file in set(index["weight_map"].values()):
        back.update(load_file(job["out"] / file))
    assert set(back) == set(original)
    assert ("lm_head.weight" in back) == (not PRESETS[preset]["tie_word_embeddings"])
    for name, tensor in original.items():
        assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name
    meta = read_meta(job["ckpt"])
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == job["layout"] and meta["contents"] == ["model", "rng"]
    assert verify_checkpoint(job["ckpt"]) is None


@pytest.mark.parametrize("name", CONVERSIONS)
def test_megatron_logits_match_transformers(conversions, name):
    job = conversions[name]
    reference = hf_logits(job["hf"], TOKENS)
    assert job["megatron"]["state"]["step"] == 0
    torch.testing.assert_close(job["megatron"]["logits"], reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_exported_directory_loads_with_transformers(conversions, preset):
    import transformers

    job = conversions[preset]
    config = json.loads((job["out"] / "config.json").read_text())
    original = json.loads((job["hf"] / "config.json").read_text())
    assert config["model_type"] == preset and config["architectures"] == original["architectures"]
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                "rope_parameters", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert config.get(key) == original.get(key), key
    assert config["dtype"] == "float32"
    assert (job["out"] / "generation_config.json").is_file()
    # The exported config must describe the same function: same logits as the source model.
    torch.testing.assert_close(hf_logits(job["out"], TOKENS), hf_logits(job["hf"], TOKENS), rtol=0, atol=0)
    if preset == "llama":
        tokenizer = transformers.AutoTokenizer.from_pretrained(job["out"])
        assert tokenizer.convert_tokens_to_ids("t5") == 5


def test_convert_cli_help_documents_both_directions():
    parser = argparse.ArgumentParser(prog="oapl")
    sub = parser.add_subparsers(dest="command")
    convert.add_convert_parser(sub)
    text = sub.choices["convert"].format_help()
    assert "megatron-to-hf" in text and "hf-to-megatron" in text
    assert "AutoModelForCausalLM.from_pretrained" in text
    assert convert.main(["megatron-to-hf", "--ckpt", "/nonexistent", "--out", "/tmp/x"]) == 2
