"""The one-pass AdamW update (nitp_ds/one_pass_adamw.py, compiled) against DeepSpeed's ZeRO-3 path for one
sub-group: bf16 gradient -> new fp32 buffer, torch's fused AdamW, fp32 master -> bf16 partition. One GPU.

Usage: python bench/one_pass_adamw.py [N parameters, default 1e9 (ZeRO-3's default sub-group size)]
Prints the first call's time (torch.compile), the largest differences after 3 steps of each (the same
gradients, clip scale 2, weight decay 0.1), then ms per update of each: 5 alternating windows of 5 updates,
median [min-max], and the memory throughput that implies (28 vs 40 bytes per parameter).
"""
import statistics, sys, time
import torch
from nitp_ds.one_pass_adamw import update_for
N = int(float(sys.argv[1])) if len(sys.argv) > 1 else 1_000_000_000
dev = torch.device("cuda")
g16 = torch.randn(N, device=dev, dtype=torch.bfloat16)
master = torch.randn(N, device=dev)
ref = master.clone().requires_grad_()
out = torch.empty(N, device=dev, dtype=torch.bfloat16)
out_ref = torch.empty_like(out)
m, v, step = torch.zeros_like(master), torch.zeros_like(master), torch.zeros((), device=dev)
adam = torch.optim.AdamW([ref], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
adam.grad_scale = torch.full((1,), 2.0, device=dev)
upd = update_for(dev)
t0 = time.time()
def one_pass():
    upd(master, g16, m, v, out, step, torch.full((), 1e-3, device=dev), adam.grad_scale.reshape(()), 0.9, 0.95, 1e-8, 0.1, True)
def ds_path():
    ref.grad = g16.to(torch.float32)
    adam.step()
    out_ref.copy_(ref.detach())
    ref.grad = None
with torch.no_grad():
    one_pass(); torch.cuda.synchronize(); print(f"first call (compile) {time.time()-t0:.1f} s", flush=True)
    ds_path()
    for _ in range(2):
        one_pass(); ds_path()
    torch.cuda.synchronize()
    st = adam.state[ref]
    print("max |master diff|", (master - ref.detach()).abs().max().item(), "max |m diff|", (m - st["exp_avg"]).abs().max().item(),
          "out equal frac", (out == out_ref).float().mean().item(), "steps", step.item(), st["step"].item(), flush=True)
    times = {"one_pass": [], "deepspeed": []}
    for _ in range(5):
        for name, fn in (("one_pass", one_pass), ("deepspeed", ds_path)):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(5):
                fn()
            e.record(); torch.cuda.synchronize()
            times[name].append(s.elapsed_time(e) / 5)
    for name, ts in times.items():
        print(f"{name}: {statistics.median(ts):.2f} ms per {N/1e9:.2f}B params [{min(ts):.2f}-{max(ts):.2f}] "
              f"({28 if name=='one_pass' else 40} B/param -> {N*(28 if name=='one_pass' else 40)/statistics.median(ts)/1e9:.2f} TB/s)")
