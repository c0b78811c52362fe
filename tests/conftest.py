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


def pytest_configure(config):
    """Under pytest-xdist, each worker takes its share of the cores this process may run on
    (as ``-n auto`` counts them) for PyTorch's threads: every worker with all of them made
    two workers on two cores run four busy threads."""
    import os
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // int(workers)))
