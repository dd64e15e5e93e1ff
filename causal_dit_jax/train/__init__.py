"""Training the causal DiT: block attention plans, losses (teacher forcing, diffusion forcing), the
optax optimiser with EMA, the jitted train step under the mesh, data sources and run checkpoints."""
