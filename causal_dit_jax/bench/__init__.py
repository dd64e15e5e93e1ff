"""Measuring the library: rollout and end-to-end timings, analytic FLOPs, profiles, result files."""
