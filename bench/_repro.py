import sys, torch
sys.path.insert(0, '.')
from ep_runtime import ops, cuda_graphs
from ep_runtime.sm90_layout import gate_up_row_order, tile_stack_
E, H, I = int(sys.argv[1]), 7168, 3072
reps = int(sys.argv[2])
DEV = torch.device('cuda')
gen = torch.Generator(device=DEV).manual_seed(0)
data = torch.randint(0, 256, (E, 2 * I, H // 2), dtype=torch.uint8, device=DEV, generator=gen)
scale = torch.exp2(torch.rand(E, 2 * I, H // 16, device=DEV, generator=gen) * 8 - 4).to(torch.float8_e4m3fn)
alpha = torch.full((E, 2), 1e-3, device=DEV)
tile_stack_(data, scale, gate_up_row_order(I, DEV))
torch.cuda.synchronize(); print("tiled", flush=True)
s = E
offsets = torch.arange(0, s + 1, dtype=torch.int32, device=DEV)
slot_pair = torch.arange(s, dtype=torch.int32, device=DEV)
x = torch.randn(s, H, device=DEV, generator=gen).bfloat16()
hb = torch.empty(s, I, dtype=torch.bfloat16, device=DEV)
fn = lambda: ops.grouped_l1(data, scale, alpha, x, None, offsets, slot_pair, 1, "bf16", swiglu_limit=10.0, h_bf16=hb, block_n=8, block_m=128)
for i in range(reps):
    fn()
torch.cuda.synchronize(); print("eager ok", flush=True)
g = cuda_graphs.capture(fn, warmup=1)
for i in range(reps):
    g.replay()
torch.cuda.synchronize(); print("graph ok", flush=True)
