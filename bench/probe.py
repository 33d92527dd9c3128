import sys, json, torch
sys.path.insert(0, '.')
from ep_runtime import ops, cuda_graphs
E, H, I = 48, 7168, 3072
DEV = torch.device('cuda')
gen = torch.Generator(device=DEV).manual_seed(0)
def w(n, k):
    return (torch.randint(0, 256, (E, n, k // 2), dtype=torch.uint8, device=DEV, generator=gen),
            torch.exp2(torch.rand(E, n, k // 16, device=DEV, generator=gen) * 8 - 4).to(torch.float8_e4m3fn),
            torch.full((E, 2) if n == 2 * I else (E,), 1e-3, device=DEV))
w13, w2 = w(2 * I, H), w(H, I)
def t(fn, reps=20):
    g = cuda_graphs.capture(fn, warmup=1)
    for _ in range(3): g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record(); g.replay(); b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[reps // 2]
res = {}
for m, bn, bms in ((1, 8, (128,)), (8, 16, (128,)), (32, 32, (128,))):
    s = m * E
    offsets = torch.arange(0, s + 1, m, dtype=torch.int32, device=DEV)
    slot_pair = torch.arange(s, dtype=torch.int32, device=DEV)
    x = torch.randn(s, H, device=DEV, generator=gen).bfloat16()
    hb = torch.empty(s, I, dtype=torch.bfloat16, device=DEV)
    hin = torch.randn(s, I, device=DEV, generator=gen).bfloat16()
    y = torch.empty(s, H, device=DEV)
    for bm in bms:
        res[f"L1_m{m}_bn{bn}_bm{bm}"] = t(lambda: ops.grouped_l1(*w13, x, None, offsets, slot_pair, 1, "bf16", swiglu_limit=10.0, h_bf16=hb, block_n=bn, block_m=bm))
        res[f"L2_m{m}_bn{bn}_bm{bm}"] = t(lambda: ops.grouped_l2(*w2, hin, None, offsets, y, bn, bm))
print(json.dumps({k: round(v, 4) for k, v in res.items()}))
