"""Weights between layouts: Megatron TP/PP shards <-> full HF-named tensors (through the one mapping in
`megatron_oapl.models.hf_mapping`), and their transport to the inference engines."""
