"""Test setup: 8 simulated CPU devices (set before JAX starts) and the PyTorch reference on sys.path."""

import os
import pathlib
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, str(pathlib.Path(__file__).parent))
