"""PyTorch counterpart of `examples/step.rs` (seed_model.py's ResNet-50 + detector): one
training step or one inference pass on random data, for `/usr/bin/time -v` comparisons.

    /tmp/torchenv/bin/python crates/detector/scripts/step_torch.py train 257 2
    /tmp/torchenv/bin/python crates/detector/scripts/step_torch.py infer 641 1
"""
import os, sys, time
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
sys.path.insert(0, os.path.join(ROOT, '..', 'shared', 'reference', 'python'))
import seed_model  # noqa: E402

mode, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
classes = int(sys.argv[4]) if len(sys.argv) > 4 else 20
ext, det = seed_model.Extractor(), seed_model.Detector(classes=classes)
x = torch.randn(batch, 3, size, size)
if mode == 'train':
    params = [p for p in list(ext.parameters()) + list(det.parameters())]
    opt = torch.optim.SGD(params, lr=0.01)
    ext.train(); det.train()
    t = time.time()
    cls, reg = det(ext(x, classify=False))
    loss = cls.sigmoid().mean() + reg.pow(2).mean()
    tf = time.time() - t
    opt.zero_grad(); loss.backward(); opt.step()
    print(f'train {size}x{size} batch {batch}: forward {tf:.2f}s, step total {time.time() - t:.2f}s, loss {loss.item():.5f}')
else:
    ext.eval(); det.eval()
    with torch.no_grad():
        t = time.time()
        cls, reg = det(ext(x, classify=False))
        print(f'infer {size}x{size} batch {batch}: {time.time() - t:.2f}s, {cls.shape[1]} anchors')
