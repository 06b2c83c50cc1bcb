"""Launchers that start an OAPL run on a cluster (`oapl launch ...`).

- `launch.slurm`: renders a SLURM batch script from a Jinja template (`launch/templates/`) and submits it:
  a heterogeneous job (learner nodes + fleet nodes) or one job with a node split (`--homogeneous`).
- `launch.srun_env`: the per-rank wrapper that turns SLURM's task variables into torchrun's.

Only the standard library, PyYAML, Jinja2 and `megatron_oapl.config` are imported: launching never needs
torch, a GPU or Megatron on the login node.
"""
