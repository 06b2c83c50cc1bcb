"""The learner: Megatron-Core TP x PP x DP ranks training the policy with the OAPL loss."""
