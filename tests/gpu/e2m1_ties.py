"""Blocks of values that land exactly on E2M1 rounding boundaries (not a test module).

Random data rarely hits a tie, so the device encoders' tie rules (NVFP4_SPEC section 2: ties to the even code) are
checked on blocks built to hit every boundary: each 16-block holds its amax 6, the seven boundaries 0.25 ... 5.0 with
both signs and a negative zero, shuffled and scaled by 2^k. Under a global scale of 1 the block scale is then 2^k
exactly (a UE4M3 value for k in [-9, 8]) and every value divided by it is a boundary again.
"""
import torch

BOUNDARIES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def tie_blocks(rows: int, cols: int, gen: torch.Generator, k_range: tuple[int, int] = (-9, 8)) -> torch.Tensor:
    """(rows, cols) fp32, cols a multiple of 16, every value exact in bf16."""
    block = torch.tensor([6.0, *BOUNDARIES, *(-b for b in BOUNDARIES), -0.0])
    n = rows * cols // 16
    order = torch.rand(n, 16, generator=gen).argsort(dim=1)
    k = torch.randint(k_range[0], k_range[1] + 1, (n, 1), generator=gen)
    return (block[order] * torch.exp2(k.float())).reshape(rows, cols)


def on_boundary(values: torch.Tensor) -> torch.Tensor:
    """Where |values| / 2^k is one of the boundaries, k from the block's amax (6 * 2^k)."""
    blocks = values.reshape(-1, 16)
    unit = blocks.abs().amax(dim=1, keepdim=True) / 6
    return torch.isin((blocks / unit).abs(), torch.tensor(BOUNDARIES)).reshape(values.shape)
