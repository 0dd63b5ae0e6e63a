"""Test-wide settings, applied before any test module imports JAX.

Compiling is most of this suite's time on a 2-core CPU (a PPO iteration takes tens of seconds to
compile and milliseconds to run). JAX's persistent compilation cache lets identical programs
compiled in other test processes (xdist workers, CLI subprocesses, notebooks) be reused. It only
ever changes speed: the cache key is the HLO, the flags and the jax/jaxlib versions. Set
JAX_COMPILATION_CACHE_DIR to override the location, or to an empty string to turn it off.
"""
import os
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "rlhf_jax_test_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
