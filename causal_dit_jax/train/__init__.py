"""Training: block attention plans, the causal DiT's losses (teacher forcing, diffusion forcing, ODE
distillation, Self-Forcing DMD), the VAE's and the text encoder's, the optax trainer under the mesh,
data sources (the procedural world among them), run checkpoints, and the embedded default's recipe."""
