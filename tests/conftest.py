"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture(params=["kernels", "pytorch"])
def path(request):
    """Both implementations of the layers that have a compiled CPU kernel
    (normswap.kernels) and a PyTorch formulation (used under torch.compile, on other
    devices, without a C compiler)."""
    import normswap.kernels as kernels
    if request.param == "pytorch":
        with kernels.disabled():
            yield request.param
    else:
        assert kernels.available(), "the compiled CPU kernels did not build (is a C compiler installed?)"
        yield request.param
