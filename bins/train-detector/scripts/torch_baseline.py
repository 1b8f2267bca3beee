"""PyTorch baseline of the default `train-detector` run, for side-by-side comparison on the same
machine: the same design (half-width ResNet-18, 64-wide FPN and heads, 129 px, batch 16, SGD with
momentum 0.9, weight decay 1e-4, linear warm-up, step decay), the same augmentation, and the
specification's encoder and focal loss from shared/reference/python, trained on the project's
synthetic data cache for a wall-clock budget. At each `--eval-at` minute it writes detections of
the held-out split (JSON lines, source-image coordinates) for `evaluate --detections`.

  python torch_baseline.py --data data-cache/shapes-det-160-... --lr 0.08 --warmup 50 --clip 1 --decay-at 0.88 --minutes 10
  evaluate --detections OUT-10min.jsonl --ground-truth OUT-gt.jsonl --names DATA/names.txt

`--bench` instead times one training step and one inference of the model on random data."""
import sys, time, json, math, random, argparse

import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from PIL import Image
import torchvision
ap = argparse.ArgumentParser()
ap.add_argument('--data', help='a synthetic detection cache folder (train.txt, eval.txt, images/)')
ap.add_argument('--lr', type=float, default=0.02)
ap.add_argument('--warmup', type=int, default=100)
ap.add_argument('--boundary', type=int, default=10**9)
ap.add_argument('--decay-at', type=float, default=0.0, help='x0.1 once this fraction of --minutes has passed (0: only at --boundary)')
ap.add_argument('--clip', type=float, default=0.0, help='global gradient-norm clip (0: none)')
ap.add_argument('--minutes', type=float, default=10.0)
ap.add_argument('--eval-at', type=str, default='6,10')
ap.add_argument('--batch', type=int, default=16)
ap.add_argument('--out', default='torch-baseline')
ap.add_argument('--seed-dir', default='../shared/reference/python', help='folder of seed_ref.py')
ap.add_argument('--threads', type=int, default=2)
ap.add_argument('--bench', action='store_true', help='time a training step and an inference instead')
ap.add_argument('--device', default='cpu', help='with --bench: cpu or cuda')
ap.add_argument('--bench-warmup', type=int, default=1, help='with --bench: untimed runs first')
ap.add_argument('--bench-iters', type=int, default=10, help='with --bench: timed runs (the median is reported)')
ap.add_argument('--autocast', choices=['bf16'], help="with --bench: forward passes and loss under torch.autocast(device, bfloat16)")
args = ap.parse_args()
sys.path.insert(0, args.seed_dir)
from seed_ref import Encoder, focal_loss_detection, gen_anchors, A_HW
torch.set_num_threads(args.threads); torch.manual_seed(0); random.seed(0)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1); STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
S = 129

def read_list(p):
    out = []
    for l in open(p):
        f = l.split()
        if not f: continue
        v = list(map(float, f[1:]))
        b = [v[i:i + 4] for i in range(0, len(v), 5)]; c = [int(v[i + 4]) for i in range(0, len(v), 5)]
        out.append((f[0], b, c))
    return out

def load(items):
    return [torch.from_numpy(np.asarray(Image.open(f'{args.data}/images/{n}').convert('RGB'))).permute(2, 0, 1).float() / 255 for n, _, _ in items]


def train_item(img, boxes, labels):
    _, ih, iw = img.shape
    ext = [[b[0], b[1], b[2] + 1, b[3] + 1] for b in boxes]
    flip = random.random() < 0.5
    crop = None
    for _ in range(10):
        t = random.uniform(0.85, 1.0) * iw * ih; a = random.uniform(0.75, 4 / 3)
        cw, ch = round(math.sqrt(t * a)), round(math.sqrt(t / a))
        if random.random() < 0.5: cw, ch = ch, cw
        if cw <= iw and ch <= ih:
            crop = (random.randint(0, iw - cw), random.randint(0, ih - ch), cw, ch); break
    if crop is None:
        s = min(iw, ih); crop = ((iw - s) // 2, (ih - s) // 2, s, s)
    x, y, cw, ch = crop
    if flip:
        img = img.flip(2); ext = [[e[0], iw - e[3], e[2], iw - e[1]] for e in ext]
    im = F.interpolate(img[None, :, y:y + ch, x:x + cw], size=(S, S), mode='bilinear', align_corners=False)[0]
    sy, sx = S / ch, S / cw
    ob, ol = [], []
    for e, l in zip(ext, labels):
        b = [min(max(e[0] - y, 0), ch) * sy, min(max(e[1] - x, 0), cw) * sx, min(max(e[2] - y, 0), ch) * sy, min(max(e[3] - x, 0), cw) * sx]
        bh, bw = b[2] - b[0], b[3] - b[1]
        b = [b[0], b[1], b[2] - 1, b[3] - 1]
        if bh > 1 and bw > 1 and bh * bw > 25:
            ob.append(b); ol.append(l)
    return (im - MEAN) / STD, torch.tensor(ob, dtype=torch.float32).view(-1, 4), torch.tensor(ol, dtype=torch.long)

class Basic(nn.Module):
    def __init__(s, cin, cout, stride):
        super().__init__()
        s.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False); s.bn1 = nn.BatchNorm2d(cout)
        s.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False); s.bn2 = nn.BatchNorm2d(cout)
        s.down = None
        if stride != 1 or cin != cout:
            s.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
    def forward(s, x):
        o = F.relu(s.bn1(s.conv1(x))); o = s.bn2(s.conv2(o))
        return F.relu(o + (s.down(x) if s.down is not None else x))

class R18(nn.Module):
    def __init__(s, w=32):
        super().__init__()
        s.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False); s.bn1 = nn.BatchNorm2d(w)
        chans = [w, 2 * w, 4 * w, 8 * w]; cin = w; layers = []
        for i, c in enumerate(chans):
            layers.append(nn.Sequential(Basic(cin, c, 1 if i == 0 else 2), Basic(c, c, 1))); cin = c
        s.layers = nn.ModuleList(layers)
        for m in s.modules():
            if isinstance(m, nn.Conv2d): nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    def forward(s, x):
        x = F.max_pool2d(F.relu(s.bn1(s.conv1(x))), 3, 2, 1)
        x = s.layers[0](x); o3 = s.layers[1](x); o4 = s.layers[2](o3); o5 = s.layers[3](o4)
        return o3, o4, o5

class Det(nn.Module):
    def __init__(s, c3, c4, c5, f=64, h=64, classes=4, anchors=3):
        super().__init__()
        s.classes = classes
        s.conv_out6 = nn.Conv2d(c5, f, 3, padding=1, stride=2)
        s.prj_5 = nn.Conv2d(c5, f, 1); s.prj_4 = nn.Conv2d(c4, f, 1); s.prj_3 = nn.Conv2d(c3, f, 1)
        s.conv_4 = nn.Conv2d(f, f, 3, padding=1); s.conv_3 = nn.Conv2d(f, f, 3, padding=1)
        mk = lambda c: nn.Sequential(nn.Conv2d(f, h, 3, padding=1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(h, h, 3, padding=1), nn.ReLU(), nn.Conv2d(h, c, 3, padding=1))
        s.conv_cls = mk(anchors * classes); s.conv_reg = mk(anchors * 4)
        for m in s.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.constant_(m.bias, 0); nn.init.normal_(m.weight, 0, 0.01)
        nn.init.constant_(s.conv_cls[-1].bias, -math.log(99))
    @staticmethod
    def up(x, ref):
        return F.interpolate(x, size=ref.shape[2:], mode='bilinear', align_corners=True)
    def forward(s, feats):
        o3, o4, o5 = feats
        p6 = s.conv_out6(o5); p5 = s.prj_5(o5)
        p4 = s.prj_4(o4); p4 = s.up(p5, p4) + p4; p3 = s.prj_3(o3); p3 = s.up(p4, p3) + p3
        preds = [F.relu(s.conv_3(p3)), F.relu(s.conv_4(p4)), F.relu(p5), F.relu(p6)]
        cls, reg = [], []
        for p in preds:
            cls.append(s.conv_cls(p).permute(0, 2, 3, 1).reshape(p.shape[0], -1, s.classes))
            reg.append(s.conv_reg(p).permute(0, 2, 3, 1).reshape(p.shape[0], -1, 4))
        return torch.cat(cls, 1), torch.cat(reg, 1)

class Model(nn.Module):
    def __init__(s):
        super().__init__(); s.ext = R18(32); s.det = Det(64, 128, 256)
    def forward(s, x): return s.det(s.ext(x))

model = Model()
enc = Encoder.__new__(Encoder)
enc.a_hw, enc.scales, enc.first_stride, enc.th = A_HW, 4, 8, (0.3, 0.5)
enc.yxyx, enc.yxhw = gen_anchors(A_HW, 4, (S, S), 8); enc.an = enc.yxyx.shape[0]
opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)

def lr_at(step, el=0.0):
    decayed = step >= args.boundary or (args.decay_at > 0 and el >= args.decay_at * args.minutes * 60)
    base = args.lr * (0.1 if decayed else 1.0)
    if step < args.warmup: return base * (0.1 + 0.9 * step / args.warmup)
    return base

def evaluate(tag):
    model.eval(); lines = []
    with torch.no_grad():
        for i in range(0, len(evl), 50):
            x = torch.stack([(F.interpolate(im[None], size=(S, S), mode='bilinear', align_corners=False)[0] - MEAN) / STD for im in eimg[i:i + 50]])
            c, r = model(x)
            lab, p, box = enc.decode_raw(c, r, (S, S))
            for b in range(x.shape[0]):
                m = p[b] > 0.05
                bb, pb, lb = box[b][m], p[b][m], lab[b][m]
                keep = torchvision.ops.batched_nms(bb[:, [1, 0, 3, 2]], pb, lb, 0.5)[:100]
                bb = bb[keep].clone(); bb[:, :2] = bb[:, :2].clamp(min=0); bb[:, 2:] = bb[:, 2:].clamp(max=S - 1)
                name, gb, gl = evl[i + b]
                k = eimg[i + b].shape[1] / S  # square scenes: eval resize is a plain scale
                lines.append(json.dumps({'image': name, 'boxes': (bb * k).tolist(), 'labels': lb[keep].tolist(), 'scores': pb[keep].tolist()}))
    open(f'{args.out}-{tag}.jsonl', 'w').write('\n'.join(lines) + '\n')
    model.train()

if args.bench:
    import statistics
    dev = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, S, S, device=dev)
    with torch.no_grad():
        a = model(x)[0].shape[1]
    tc = torch.randint(-1, 5, (args.batch, a), device=dev); tr = torch.randn(args.batch, a, 4, device=dev)
    loss_fn = focal_loss_detection
    if dev.type == 'cuda':
        # seed_ref's loss builds its one-hot targets on the CPU; bench_torch.py's (the same
        # focal loss + smooth L1) stays on the device
        sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2] / 'bench-model' / 'scripts'))
        from bench_torch import focal_loss
        loss_fn = lambda c, r, tc, tr: focal_loss(c, r, tc, tr, 4)
    import contextlib
    cast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if args.autocast else contextlib.nullcontext
    def step():
        with cast():
            c, r = model(x); loss = loss_fn(c.float(), r.float(), tc, tr)
        opt.zero_grad(); loss.backward(); opt.step()
    def infer():
        model.eval()
        with torch.no_grad(), cast(): model(x)
        model.train()
    for name, f in [('train step', step), ('inference', infer)]:
        for _ in range(args.bench_warmup): f()
        sync(); ts = []
        for _ in range(args.bench_iters):
            t = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t)
        print(f'{name}: median {statistics.median(ts):.4f} s (min {min(ts):.4f})')
    sys.exit(0)
train = read_list(f'{args.data}/train.txt'); evl = read_list(f'{args.data}/eval.txt')
timg = load(train); eimg = load(evl)
gt = [json.dumps({'image': n, 'boxes': b, 'labels': c}) for n, b, c in evl]
open(f'{args.out}-gt.jsonl', 'w').write('\n'.join(gt) + '\n')
evals = [float(v) * 60 for v in args.eval_at.split(',')]
t0 = time.time(); step = 0; order = []
model.train()
while True:
    if not order: order = list(range(len(train))); random.shuffle(order)
    idx, order = order[:args.batch], order[args.batch:]
    if len(idx) < args.batch: order = []; continue
    items = [train_item(timg[j], train[j][1], train[j][2]) for j in idx]
    x = torch.stack([it[0] for it in items])
    tc, tr = enc.encode([it[2] for it in items], [it[1] for it in items])
    lr = lr_at(step, time.time() - t0)
    for g in opt.param_groups: g['lr'] = lr
    c, r = model(x)
    loss = focal_loss_detection(c, r, tc, tr)
    opt.zero_grad(); loss.backward()
    if args.clip > 0: torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step(); step += 1
    el = time.time() - t0
    if step % 50 == 0: print(f'step {step} t {el:.1f}s loss {loss.item():.4f} lr {lr:.4f}', flush=True)
    if evals and el >= evals[0]:
        te = time.time(); evaluate(f'{evals[0] / 60:g}min'); print(f'eval at step {step}, {el:.1f}s (took {time.time() - te:.1f}s)', flush=True)
        t0 += time.time() - te; evals.pop(0)
        if not evals: break
