"""Architecture presets, the Megatron model builder and the one HF <-> Megatron parameter mapping."""
