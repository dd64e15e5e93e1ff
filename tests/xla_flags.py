"""XLA flags of the test processes and of the subprocesses they start: `devices` simulated CPU devices,
and LLVM's optimisation passes off. The tests' programs are tiny, so those passes cost more compile
time than they save at run time (about a third of a training test's time). Results differ from an
optimised build in the last bits only, and every comparison in the tests is made under the same flags."""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def cpu_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` simulated CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
