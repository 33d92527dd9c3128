"""Host-side CUDA hygiene of the extension: a failed CUDA call leaves no error behind for the next check."""
import pytest
import torch

from ep_runtime.ops import extension_available

pytestmark = pytest.mark.gpu

if not extension_available("grouped_l1", "requant_dynamic", "host_status_device_ptr"):
    pytest.skip("needs an sm_90 CUDA device and the built extension", allow_module_level=True)

from ep_runtime import ops  # noqa: E402

DEV = torch.device("cuda")


def test_a_failed_cuda_call_leaves_no_error_for_the_next_launch_check(gen):
    s, inter, e = 24, 128, 3
    h = (torch.randn(s, inter, generator=gen) * 3).to(DEV)
    offsets = torch.tensor([0, 10, 10, s], dtype=torch.int32, device=DEV)
    h_gs = torch.full((e,), float("nan"), device=DEV)
    outs = (torch.empty(s, inter // 2, dtype=torch.uint8, device=DEV),
            torch.empty(s, inter // 16, dtype=torch.float8_e4m3fn, device=DEV),
            torch.empty(s, inter, dtype=torch.bfloat16, device=DEV))
    # Pageable host memory has no device pointer: the runtime refuses it at once (no work reaches the GPU), and
    # keeps the refusal as the thread's last error unless the failed check clears it.
    with pytest.raises(RuntimeError, match="cudaHostGetDevicePointer"):
        ops._ext().host_status_device_ptr(torch.empty(16).data_ptr())
    # requant_dynamic checks its launch through cudaGetLastError: a kept refusal would fail it here.
    ops.requant_dynamic(h, offsets, torch.zeros(e, dtype=torch.int32, device=DEV), *outs, h_gs)
    amax = torch.stack([h[:10].abs().max(), torch.tensor(0.0, device=DEV), h[10:].abs().max()])
    # 2688 / amax correctly rounded: in double, then to fp32 (exact for a quotient; torch's `2688.0 / amax` is a
    # reciprocal and a product, which can end an ulp away)
    assert torch.equal(h_gs, torch.where(amax > 0, (2688.0 / amax.double()).float(), torch.ones_like(amax)))
