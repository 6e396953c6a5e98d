"""Test setup: 8 fake CPU devices, created before JAX initialises its backend."""
import gc
import importlib.metadata
import os
import shutil
import sys
import tempfile

import pytest

# Tests compile many small programs and run each a few steps, so compile time is most of the
# suite's time: skip LLVM's slow optimisation passes (several times faster compiles), and on
# the pinned jaxlib emit fusions with XLA's older CPU emitters, which compile a train step
# 30-50% faster (an unknown flag would abort XLA, hence the version check).
COMPILE_FLAGS = ' --xla_backend_optimization_level=0'
if importlib.metadata.version('jaxlib').startswith('0.10.'):
  COMPILE_FLAGS += ' --xla_cpu_use_fusion_emitters=false'
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8" + COMPILE_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (only used by the TFDS input path) must not grab the accelerator.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Many tests compile the same program (the one-device reference of each sharded-vs-unsharded
# check, the same tiny models in several files). A JAX persistent compilation cache in a fresh
# folder compiles each once per test session: the first process to load this file (the xdist
# controller, or the only process) makes the folder, the workers and subprocesses it starts
# find it through the environment, and the maker removes it at the end. A cache the user set
# is not used, so the suite never fills it with its tiny programs.
_CACHE_OWNER = 'MPL_TEST_JAX_CACHE' not in os.environ
if _CACHE_OWNER:
  os.environ['MPL_TEST_JAX_CACHE'] = tempfile.mkdtemp(prefix='mpl_test_jax_cache_')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ['MPL_TEST_JAX_CACHE']
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


@pytest.fixture(autouse=True, scope='session')
def _temp_files_under_pytests_tmp(tmp_path_factory):
  """Temporary files the libraries leave behind (a TFDS builder made directly, as the tests'
  tiny datasets are, leaves an empty folder) go to pytest's own temporary tree, which pytest
  prunes, not to /tmp; so do those of the subprocesses the tests start."""
  scratch = str(tmp_path_factory.mktemp('tempfile'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tempfile, 'tempdir', scratch)
    patch.setenv('TMPDIR', scratch)
    yield


def pytest_unconfigure(config):
  if _CACHE_OWNER:
    shutil.rmtree(os.environ['MPL_TEST_JAX_CACHE'], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
  """A garbage collection in a process that has compiled hundreds of programs takes about a
  second (JAX frees them in a gc callback). pytest collects five times before it exits, and
  xdist interrupts a worker still busy 5 s after the tests end, which printed a KeyboardInterrupt
  warning from that callback. So JAX's caches are dropped and collected once here; then what is
  left (freed when the process exits) is frozen out of later collections, and JAX's callback,
  which still took seconds in a worker of a 2-core machine, is removed."""
  if 'jax' in sys.modules:
    sys.modules['jax'].clear_caches()
    gc.collect()
    gc.freeze()
    gc.callbacks[:] = [callback for callback in gc.callbacks
                       if not getattr(callback, '__module__', '').startswith('jax')]
