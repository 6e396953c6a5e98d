"""Test setup: 8 fake CPU devices, created before JAX initialises its backend."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    # Tests compile many small programs and run each a few steps: skip LLVM's slow
    # optimisation passes (several times faster compiles on 2 cores).
    + " --xla_backend_optimization_level=0"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (only used by the TFDS input path) must not grab the accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
