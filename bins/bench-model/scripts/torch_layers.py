# Every convolution of a model alone in PyTorch, beside this project's own per-layer figures:
#   target/release/bench-model --layers [model flags] --json > layers.json
#   python bins/bench-model/scripts/torch_layers.py layers.json [ITERS] [bf16]
# Forward under no_grad, backward = input and weight gradients (as bench-model's "bwd"), medians
# of ITERS (default 7) after one warm-up, 2 threads; `bf16`: under torch.autocast("cpu", bf16)
# (compare with bench-model --precision bf16 --layers).
import contextlib, json, sys, time, torch
torch.set_num_threads(2)
L = json.load(open(sys.argv[1])); it = int(sys.argv[2]) if len(sys.argv) > 2 else 7
cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if sys.argv[3:4] == ["bf16"] \
    else contextlib.nullcontext
def med(f):
    f(); ts = []
    for _ in range(it):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); return ts[len(ts)//2]
tf = tb = of = ob = 0
print(f"{'layer':24} {'n':>3} {'ours f':>7} {'torch f':>7} {'ours b':>7} {'torch b':>7}")
for r in L:
    s = r["spec"]; x = torch.randn(*s["x"]); w = torch.randn(*s["w"]) * 0.05
    x.requires_grad_(True); w.requires_grad_(True)
    def conv():
        with cast():
            return torch.nn.functional.conv2d(x, w, stride=s["stride"], padding=s["padding"])
    with torch.no_grad(): f = med(conv)
    y = conv(); g = torch.randn_like(y)
    def bw():
        x.grad = None; w.grad = None
        torch.autograd.grad(y, (x, w), g, retain_graph=True)
    b = med(bw)
    n = s["count"]; tf += n*f; tb += n*b; of += n*r["fwd_s"]; ob += n*r["bwd_s"]
    print(f"{s['name']:24} {n:3} {r['fwd_s']*1e3:7.2f} {f*1e3:7.2f} {r['bwd_s']*1e3:7.2f} {b*1e3:7.2f}")
print(f"total x count: ours fwd {of*1e3:.1f} bwd {ob*1e3:.1f}; torch fwd {tf*1e3:.1f} bwd {tb*1e3:.1f}")
