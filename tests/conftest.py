"""Test configuration: float64 available, implicit rank promotion an error, 2 CPU devices,
float32 matrix products at full precision (matmul precision "highest", for GPUs).

Float64 is enabled for the whole test process so that the tight checks (manual vs jax.grad
<= 1e-10) can run; float32 tests build their arrays in float32 explicitly. Layers initialise in
float32 whatever the setting, and `nets.gradcheck.astype` casts.
"""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
# The shared data sets beside the checkout (the Makefile sets the same when they exist).
_SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    os.environ.setdefault("NETS_DATA_DIR", str(_SHARED_DATA))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
# The float32 tolerances assume full float32 products; a GPU's default may use TF32.
jax.config.update("jax_default_matmul_precision", "highest")

DTYPES = ("float64", "float32")


@pytest.fixture(params=DTYPES)
def dtype(request):
    """Each test using it runs once in float64 and once in float32."""
    return request.param
