"""megatron_oapl: OAPL post-training with Megatron-Core learners and a lagged vLLM fleet.

Importing the package is cheap and never needs a GPU: Megatron-Core, Transformer Engine and vLLM are
imported only by the modules that use them.
"""

__version__ = "0.1.0"
