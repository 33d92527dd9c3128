import pytest
import torch

from ep_runtime import ops
from ep_runtime.ops import extension_available


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU and the built ep_runtime._C extension")
    skip_multi = pytest.mark.skip(reason="needs several CUDA GPUs (run under torchrun on a GPU machine)")
    have_gpu = extension_available()
    for item in items:
        if "gpu" in item.keywords and not have_gpu:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and not (have_gpu and torch.cuda.device_count() >= 2):
            item.add_marker(skip_multi)


@pytest.fixture
def gen():
    """A fresh, differently seeded generator per test run: kernels and references see new data each time."""
    seed = torch.seed() % (2**31)
    print(f"generator seed {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def cpu_devices_pass(monkeypatch):
    """The ops' device check with the CPU standing in for the GPU (any other device, meta, is a second one), so
    CPU tensors get through every other check of a CUDA path."""
    def same_device(named: dict) -> None:
        for name, t in named.items():
            if t is not None and t.device.type != "cpu":
                raise ValueError(f"{name}: expected device cpu, got {t.device}")

    monkeypatch.setattr(ops, "check_same_device", same_device)
