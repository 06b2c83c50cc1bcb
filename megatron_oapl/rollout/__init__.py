"""Rollout: inference engines, the fleet that drives them, and the versioned rollout buffer.

Never imports Megatron: engines speak HF parameter names only (the learner's `weights/` package does the
layout conversion through the one mapping in `models/hf_mapping.py`).
"""
