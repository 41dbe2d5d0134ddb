"""Test configuration: float64 available, implicit rank and dtype promotion errors, 2 CPU
devices, float32 matrix products at full precision (matmul precision "highest", for GPUs).

One JAX compilation cache serves the whole run (a fresh directory, removed at the end): the
experiments build new closures over the same programs in test after test, in both xdist workers
and in subprocesses, and compiling them again took about a fifth of the suite's time
(tests/test_harness.py: 134 s without the cache, 105 s with it, 2-core CPU).

Most tests compile many small programs and run each briefly, so XLA:CPU compiles its fusions
with its loop emitters rather than its newer MLIR fusion emitters
(`--xla_cpu_use_fusion_emitters=false`): a one-multiply program compiles in 35 ms rather than 60
ms, tests/test_curvature.py took 64-85 s against 110-118 s, and the longest-running tests were
no slower (the lecture's 5 restarts 126 against 124 s, AlexNet's full-size step 48 against 53
s). For the same reason LLVM optimises the compiled code at level 1, not XLA's default 2
(`--xla_backend_optimization_level=1`): the whole suite took 834 s against 1,145 s, one run each
on the same host and day (2026-12-03); tests/test_conv.py with tests/test_curvature.py, one
worker, 229 against 257 s; AlexNet's full-size step 29 against 35 s, the lecture's restarts 61 s
either way (one test of the 32 timed in both full runs was clearly slower: the four-device one,
46 against 37 s). Level 0 compiles faster still (199 s for those two files) but runs slowly:
AlexNet's step 106 s, the lecture 106 s (hence the `runs_long` mark below). The code under test
is the same; the experiments' and benchmarks' numbers in README.md are measured with XLA's
defaults. A jaxlib that no longer knows these flags would abort every process on them, so they
are first tried in a subprocess and left out if refused.

Most programs are also compiled with XLA's optimisations off (`jax_disable_most_optimizations`,
through its environment variable, so in the experiments a test starts as subprocesses too: LLVM
at level 0, its expensive passes skipped): most tests compile programs and run each a few times.
The whole suite took 986 s against 1,350 s, its workers' compilations 646 s against 1,342 s (one
run each, 2026-12-07, the same host; 974 s with the marks below). A test whose time goes into
running its programs (the lecture's restarts, AlexNet at full size) carries the `runs_long` mark
and keeps the optimisations; so do the subprocesses of the killed-and-resumed run and of the GPU
command's stages. Unoptimised code rounds differently in places (initial weights one ulp apart),
so a test that compares bit for bit compares two programs compiled alike.

Float64 is enabled for the whole test process so that the tight checks (manual vs jax.grad
<= 1e-10) can run; float32 tests build their arrays in float32 explicitly. Layers initialise in
float32 whatever the setting, and `nets.gradcheck.astype` casts.
"""
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count=2"
FAST_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1"


def _test_xla_flags() -> str:
    """The two CPU devices, and the faster-compiling settings when this jaxlib accepts them."""
    flags = f"{CPU_DEVICES_FLAG} {FAST_COMPILE_FLAGS}"
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                           env={**os.environ, "XLA_FLAGS": flags}, capture_output=True)
    return flags if probe.returncode == 0 else CPU_DEVICES_FLAG


# Set by the first process (pytest itself, or its xdist controller) and inherited by the
# workers and the subprocesses they start; XLA_FLAGS set by the user win.
if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = _test_xla_flags()

# The shared data sets beside the checkout (the Makefile sets the same when they exist).
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("NETS_DATA_DIR", str(_SHARED_DATA))

# Created by the first process (pytest itself, or its xdist controller) and inherited by the
# workers and the subprocesses they start; a JAX_COMPILATION_CACHE_DIR set by the user wins.
_OWNS_CACHE = "NETS_TEST_COMPILATION_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["NETS_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="nets-test-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["NETS_TEST_COMPILATION_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Read by JAX as it starts, in this process and in every process the tests start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# No implicit promotion between dtypes either (equinox's tests do the same): under x64 a
# float64 constant or input met in a float32 test would otherwise promote its computation to
# float64, and the float32 comparisons would test float64 arithmetic. A test of the layers'
# promotion of mixed inputs carries the `standard_promotion` mark, and so does one that runs
# optax's Adam or schedules (their `decay ** count` raises a Python float to an int32 count,
# which strict promotion refuses).
jax.config.update("jax_numpy_dtype_promotion", "strict")
# The float32 tolerances assume full float32 products; a GPU's default may use TF32.
jax.config.update("jax_default_matmul_precision", "highest")

DTYPES = ("float64", "float32")


def pytest_unconfigure(config):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ["NETS_TEST_COMPILATION_CACHE"], ignore_errors=True)


# Settings the code under test may change for its own process (a benchmark turns the
# compilation cache off, `training.harness.use_compilation_cache` tunes it) or that the
# checks above rely on: each test leaves them as it found them for the next test in its worker.
RESTORED_SETTINGS = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
                     "jax_persistent_cache_min_compile_time_secs",
                     "jax_compilation_cache_max_size", "jax_enable_x64",
                     "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion",
                     "jax_default_matmul_precision")


@pytest.fixture(autouse=True)
def _jax_settings_restored():
    saved = {name: getattr(jax.config, name) for name in RESTORED_SETTINGS}
    yield
    for name, value in saved.items():
        if getattr(jax.config, name) != value:
            jax.config.update(name, value)


@pytest.fixture(autouse=True)
def _optimised_if_it_runs_long(request):
    """XLA's optimisations on for a test marked `runs_long` (the module docstring)."""
    if request.node.get_closest_marker("runs_long") is None:
        yield
        return
    unoptimised = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", unoptimised)


@pytest.fixture(autouse=True)
def _standard_promotion_if_marked(request):
    """JAX's standard dtype promotion for a test marked `standard_promotion` (float32 params on
    float64 data, as NumPy arrays are under x64; optax's Adam), strict for every other test."""
    if request.node.get_closest_marker("standard_promotion") is None:
        yield
        return
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(params=DTYPES)
def dtype(request):
    """Each test using it runs once in float64 and once in float32."""
    return request.param
