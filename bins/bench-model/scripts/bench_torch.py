"""PyTorch side of the benchmark: the tutorial's model (seed_model.py: ResNet-50 extractor + FPN
detector) timed like `bench-model` -- inference (eval mode, no_grad) and one SGD training step
(train mode, focal loss on random targets, SGD with momentum 0.9 and weight decay 1e-4) on random data, median of --iters runs.

    python bench_torch.py --seed-dir /work/shared/reference/python --size 257 --batch 2 --mode both
"""
import argparse, contextlib, json, resource, statistics, sys, time

import torch
import torch.nn.functional as F


def focal_loss(cls, reg, cls_t, reg_t, classes, alpha=0.25, gamma=2.0):
    keep = (cls_t >= 0).unsqueeze(-1).float()
    onehot = F.one_hot(cls_t.clamp(min=0), classes + 1)[..., 1:].float()
    p = torch.sigmoid(cls)
    pt = torch.where(onehot > 0, p, 1 - p)
    w = torch.where(onehot > 0, alpha, 1 - alpha) * (1 - pt) ** gamma
    bce = F.binary_cross_entropy_with_logits(cls, onehot, reduction='none')
    pos = cls_t > 0
    reg_loss = F.smooth_l1_loss(reg[pos], reg_t[pos], reduction='sum')
    return ((w * bce * keep).sum() + reg_loss) / max(1, int(pos.sum()))


def timed(fn, warmup, iters, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    cpu0 = time.process_time()
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()  # a GPU runs asynchronously: count the time until its queue is done
        ts.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / iters
    return {'median_s': statistics.median(ts), 'min_s': min(ts), 'max_s': max(ts), 'cpu_s': cpu,
            'runs': iters}


def bench_conv(a):
    b, cin, h, w, cout, k, s, p = (int(v) for v in a.conv.split(','))
    torch.set_num_threads(a.threads)
    x = torch.randn(b, cin, h, w, requires_grad=True)
    wt = torch.randn(cout, cin, k, k, requires_grad=True)
    y = F.conv2d(x, wt, stride=s, padding=p)
    r = torch.randn_like(y)
    gflop = 2 * b * cout * y.shape[2] * y.shape[3] * cin * k * k / 1e9
    cast = (lambda: torch.autocast('cpu', dtype=torch.bfloat16)) if a.autocast else contextlib.nullcontext

    def fwd_only():
        with torch.no_grad(), cast():
            F.conv2d(x, wt, stride=s, padding=p)
    fwd = timed(fwd_only, a.warmup, a.iters)

    def both():
        x.grad = wt.grad = None
        with cast():
            y = F.conv2d(x, wt, stride=s, padding=p)
        (y.float() * r).sum().backward()
    fb = timed(both, a.warmup, a.iters)
    bwd = max(fb['median_s'] - fwd['median_s'], 1e-9)
    print(f"conv {a.conv}: {gflop:.3f} GFLOP, forward {fwd['median_s'] * 1e3:.2f} ms "
          f"({gflop / fwd['median_s']:.0f} GFLOP/s), backward {bwd * 1e3:.2f} ms ({2 * gflop / bwd:.0f} GFLOP/s)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--seed-dir', default='/work/shared/reference/python')
    ap.add_argument('--size', type=int, default=257)
    ap.add_argument('--batch', type=int, default=2)
    ap.add_argument('--classes', type=int, default=20)
    ap.add_argument('--mode', choices=['infer', 'train', 'both'], default='both')
    ap.add_argument('--iters', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--json', action='store_true')
    ap.add_argument('--device', default='cpu', help='cpu or cuda (whole-model timings only)')
    ap.add_argument('--no-tf32', action='store_true', help='on CUDA: full f32 convolutions (PyTorch lets cuDNN use TF32 by default)')
    ap.add_argument('--autocast', choices=['bf16'], help="forward passes and loss under torch.autocast(device, bfloat16)")
    ap.add_argument('--conv', help='time one convolution B,Cin,H,W,Cout,k,stride,padding instead')
    a = ap.parse_args()
    if a.conv:
        return bench_conv(a)
    sys.path.insert(0, a.seed_dir)
    from seed_model import Detector, Extractor

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    if a.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if a.autocast else contextlib.nullcontext
    ext, det = Extractor().to(dev), Detector(classes=a.classes).to(dev)
    params = list(ext.parameters()) + list(det.parameters())
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev)
    out = {'size': a.size, 'batch': a.batch, 'threads': a.threads, 'torch': torch.__version__,
           'device': str(dev), 'autocast': a.autocast}
    if a.mode in ('infer', 'both'):
        ext.eval(); det.eval()

        def infer():
            with torch.no_grad(), cast():
                det(ext(x, classify=False))
        out['inference'] = timed(infer, a.warmup, a.iters, sync)
    if a.mode in ('train', 'both'):
        ext.train(); det.train()
        with torch.no_grad():
            anchors = det(ext(x, classify=False))[0].shape[1]
        u = torch.rand(a.batch, anchors, device=dev)
        lbl = torch.randint(1, a.classes + 1, (a.batch, anchors), device=dev)
        cls_t = torch.where(u < 0.01, lbl, torch.zeros_like(lbl))
        cls_t = torch.where(u >= 0.99, torch.full_like(lbl, -1), cls_t)
        reg_t = torch.randn(a.batch, anchors, 4, device=dev)
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4)

        def step():
            opt.zero_grad()
            with cast():
                cls, reg = det(ext(x, classify=False))
                loss = focal_loss(cls.float(), reg.float(), cls_t, reg_t, a.classes)
            loss.backward()
            opt.step()
        out['train_step'] = timed(step, a.warmup, a.iters, sync)
    out['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        for k in ('inference', 'train_step'):
            if k in out:
                t = out[k]
                print(f"{k:10}: median {t['median_s']:.3f} s (min {t['min_s']:.3f}, max {t['max_s']:.3f}, "
                      f"{t['runs']} runs; CPU {t['cpu_s']:.3f} s/run)")
        print(f"peak RSS  : {out['peak_rss_bytes'] / 1e9:.2f} GB")


if __name__ == '__main__':
    main()
