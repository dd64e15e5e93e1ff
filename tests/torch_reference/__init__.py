"""Small PyTorch reference of the Self-Forcing causal Wan2.1 DiT, used only by the test suite."""
