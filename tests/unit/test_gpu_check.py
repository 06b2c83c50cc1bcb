"""What of the GPU check runs without a GPU: the weight group's backend choice (learners and engines that
share a GPU must not get NCCL), FP8 parameters leaving the learner dequantised, and the check script's
own argument handling and refusal. The `gpu` tests at the end run on the GPU machine (tools/gpu_check.sh)."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_oapl.weights.reshard import full_precision
from megatron_oapl.weights.transport import (
    Rendezvous,
    WeightGroup,
    WeightStoreServer,
    choose_backend,
    receive_weights,
    send_weights,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402

GPU_A, GPU_B = "GPU-aaaaaaaa-0000", "GPU-bbbbbbbb-1111"


# --------------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["auto", "nccl"])
def test_learner_and_engine_on_one_gpu_get_gloo(requested):
    backend, why = choose_backend(requested, [GPU_A, GPU_A])
    assert backend == "gloo"
    assert "ranks 0 and 1" in why and GPU_A in why


def test_two_engines_sharing_a_gpu_get_gloo_even_if_the_sender_has_its_own():
    backend, why = choose_backend("auto", [GPU_A, GPU_B, GPU_B])
    assert backend == "gloo" and "ranks 1 and 2" in why


def test_a_member_without_gpu_gets_gloo():
    backend, why = choose_backend("nccl", [GPU_A, "cpu"])
    assert backend == "gloo" and "[1]" in why


def test_every_member_on_its_own_gpu_gets_nccl():
    assert choose_backend("auto", [GPU_A, GPU_B])[0] == "nccl"
    assert choose_backend("nccl", [GPU_A, GPU_B])[0] == "nccl"


def test_gloo_when_asked_whatever_the_devices():
    assert choose_backend("gloo", [GPU_A, GPU_B]) == ("gloo", "fleet.weight_sync.backend=gloo")


def test_unknown_backend_names_the_field():
    with pytest.raises(ValueError, match=r"fleet.weight_sync.backend='mpi'"):
        choose_backend("mpi", ["cpu"])


def _receive(port: int, backend: str, out: str) -> None:
    group = WeightGroup(Rendezvous("127.0.0.1", port, epoch=1, stage=0, world_size=2, backend=backend), rank=1)
    tensors = [(name, t.clone()) for name, t in receive_weights(group, expected_version=3)]  # views of a bucket
    torch.save({"tensors": tensors, "backend": group.backend}, out)


@pytest.mark.parametrize("requested", ["nccl", "auto"])
def test_a_group_of_cpu_members_settles_on_gloo_and_the_push_arrives(tmp_path, requested):
    """The members publish their devices when they join; asked for NCCL without GPUs, the group forms
    over gloo instead of failing (before the choice, backend="nccl" went straight to NCCL)."""
    server = WeightStoreServer()
    out = tmp_path / "received.pt"
    engine = mp.get_context("spawn").Process(target=_receive, args=(server.port, requested, str(out)))
    engine.start()
    group = WeightGroup(Rendezvous("127.0.0.1", server.port, epoch=1, stage=0, world_size=2, backend=requested),
                        rank=0)
    assert (group.backend, group.device.type) == ("gloo", "cpu")
    assert "no GPU" in group.why
    sent = [("a", torch.arange(10, dtype=torch.float32)), ("b", torch.ones(3, 4, dtype=torch.bfloat16))]
    send_weights(group, sent, version=3, bucket_bytes=1 << 20)
    engine.join(60)
    assert engine.exitcode == 0
    got = torch.load(out)
    assert got["backend"] == "gloo"
    assert [n for n, _ in got["tensors"]] == ["a", "b"]
    for (_, want), (_, have) in zip(sent, got["tensors"]):
        assert torch.equal(want, have)


# --------------------------------------------------------------------------------------------------
# FP8 parameters leave the learner dequantised (push and export share iter_hf_tensors)
# --------------------------------------------------------------------------------------------------


class _QuantizedStandIn(torch.Tensor):
    """Stands in for Transformer Engine's QuantizedTensor (TE needs a GPU): its storage is FP8 codes,
    the value is codes x scale, and `dequantize()` returns it in the nominal dtype."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale: float):
        self = torch.Tensor._make_subclass(cls, codes)
        self.scale = scale
        return self

    def dequantize(self):
        return (self.as_subclass(torch.Tensor).float() * self.scale).to(torch.bfloat16)


def test_fp8_parameters_are_dequantised_and_others_pass_through(monkeypatch):
    from megatron.core import fp8_utils

    monkeypatch.setattr(fp8_utils, "is_float8tensor", lambda t: isinstance(t, _QuantizedStandIn))
    monkeypatch.setattr(fp8_utils, "dequantize_fp8_tensor", lambda t: t.dequantize())  # TE >= 2's path
    codes = torch.tensor([[1, 2], [3, 4]], dtype=torch.uint8)
    out = full_precision(_QuantizedStandIn(codes, 0.5))
    assert type(out) is torch.Tensor and out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor([[0.5, 1.0], [1.5, 2.0]], dtype=torch.bfloat16))
    plain = torch.randn(3)
    assert full_precision(plain) is plain


# --------------------------------------------------------------------------------------------------
# The check script without a GPU
# --------------------------------------------------------------------------------------------------


def _script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is what a machine without a GPU sees")
def test_script_refuses_without_gpu_in_one_line_with_exit_3(tmp_path):
    done = _script("--out", str(tmp_path / "out"), "--prepared", str(tmp_path / "prepared"))
    assert done.returncode == gpu_check.EXIT_NO_GPU == 3
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "prepared" / "site").exists()  # refused before installing anything


@pytest.mark.parametrize("args,needle", [
    (["--only", "learner-fp32,bogus"], "unknown check(s) ['bogus']"),
    (["--only", ","], "(none given)"),
    (["--budget-s", "0"], "--budget-s=0 must be > 0"),
    (["--dry-run"], "--dry-run only applies to --prepare"),
])
def test_bad_arguments_exit_2_with_one_line(args, needle):
    done = _script(*args)
    assert done.returncode == gpu_check.EXIT_USAGE == 2
    assert done.stderr.count("\n") == 1 and needle in done.stderr


def test_list_names_every_check_and_only_selects_them():
    done = _script("--list")
    assert done.returncode == 0
    assert [line.split()[0] for line in done.stdout.splitlines()] == [c.name for c in gpu_check.CHECKS]
    assert gpu_check.parse_args(["--only", "train, learner-bf16"]).only == ["train", "learner-bf16"]


def test_prepare_dry_run_downloads_cp312_wheels_and_builds_the_rest(tmp_path):
    done = _script("--prepare", "--dry-run", "--prepared", str(tmp_path), "--python312", sys.executable)
    assert done.returncode == 0
    download, pure, binary, model = done.stdout.splitlines()
    assert "--python-version 3.12" in download and "--only-binary=:all:" in download and "--no-deps" in download
    assert "megatron-core==0.16.1" in download and "pyzmq==" in download and f"-d {tmp_path}/wheels" in download
    assert "cellpylib==" in pure and "pycosat==" in binary
    assert model.endswith(f"make_tiny_model.py --out {tmp_path}/tiny-model")


def test_not_prepared_is_exit_4_with_the_fix(tmp_path):
    assert "run tools/gpu_check.sh --prepare here first" in gpu_check.install_wheels(tmp_path)


def test_table_ends_with_the_verdict():
    rows = [gpu_check.Row("learner-fp32", "PASS", 12.0, "loss rel 1e-07"),
            gpu_check.Row("train", "FAIL", 80.5, "pass@1 did not rise"),
            gpu_check.Row("weight-push", "SKIP", 0.0, "--budget-s=450 spent")]
    table = gpu_check.format_table(rows, "H200").splitlines()
    assert table[0] == "== gpu_check summary: H200 =="
    assert table[3].split()[:3] == ["train", "FAIL", "80.5"]
    assert table[-1] == "overall: FAIL (train); 1/2 passed, 1 skipped"


def test_mfu_flops_count_the_matmuls_of_a_tied_llama():
    params, flops = gpu_check.model_flops_per_token(hidden=8, layers=2, ffn=16, vocab=10, seq=4)
    matmul = 2 * (4 * 64 + 3 * 8 * 16) + 8 * 10
    assert params == matmul + 2 * 2 * 8 + 8
    assert flops == 6 * matmul + 12 * 2 * 8 * 4


# --------------------------------------------------------------------------------------------------
# On a GPU (tools/gpu_check.sh runs these)
# --------------------------------------------------------------------------------------------------


def _receive_on_gpu(port: int, out: str) -> None:
    _receive(port, "nccl", out)


@pytest.mark.gpu
def test_sender_and_engine_on_one_gpu_push_over_gloo(tmp_path):
    """Two processes on the same GPU asked for NCCL (which would refuse them): the group settles on
    gloo, says why, and CUDA tensors arrive intact."""
    server = WeightStoreServer()
    out = tmp_path / "received.pt"
    engine = mp.get_context("spawn").Process(target=_receive_on_gpu, args=(server.port, str(out)))
    engine.start()
    group = WeightGroup(Rendezvous("127.0.0.1", server.port, epoch=1, stage=0, world_size=2, backend="nccl"), rank=0)
    assert group.backend == "gloo" and "share GPU-" in group.why
    sent = [("w", torch.randn(256, 64, device="cuda", dtype=torch.bfloat16))]
    send_weights(group, sent, version=3, bucket_bytes=1 << 20)
    engine.join(120)
    assert engine.exitcode == 0
    got = torch.load(out)
    assert torch.equal(got["tensors"][0][1], sent[0][1].cpu())
