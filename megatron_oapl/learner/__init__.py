"""The learner: Megatron-Core TP x PP x DP ranks training the policy with the OAPL loss."""

import warnings

import torch

if not torch.cuda.is_available():
    # Without a GPU, Megatron-Core's notes that Transformer Engine / apex are absent (it then uses its torch
    # implementations, which is the CPU path by design) and its CUDA tuning hints are noise, printed once
    # per rank. On a GPU they stay: there a missing Transformer Engine means no FP8.
    for _pattern in (r"Transformer Engine and Apex are not installed", r"Apex is not installed",
                     r"When using async grad allreduce", r"full scope is deprecated"):
        warnings.filterwarnings("ignore", message=_pattern, category=UserWarning)
