"""Checks, with PyTorch, what `convert` exports (run by hand; the Rust tests need no Python):
torch.load reads every file; the tutorial-named pair loads into the tutorial's modules (the
detector strictly, the extractor with only its `fc` missing) and gives the outputs of the
committed fixture; the torchvision-named ResNet has exactly torchvision's ResNet-18 keys (no fc).

  cargo run --release -p convert -- import --extractor crates/train/tests/fixtures/interop/net_e.pkl \
      --detector crates/train/tests/fixtures/interop/net_d.pkl --names NAMES --out /tmp/x/model.safetensors
  cargo run --release -p convert -- export --checkpoint /tmp/x/model.safetensors --to tutorial --out /tmp/x/tut
  cargo run --release -p convert -- export --checkpoint /tmp/x/model.safetensors --to torchvision --out /tmp/x/tv
  /tmp/torchenv/bin/python crates/train/scripts/check_interop_export.py /tmp/x
"""
import os, sys
import torch, torchvision
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_interop_fixtures as fx  # noqa: E402

root = sys.argv[1]
ext = fx.Extractor18(classes=10).eval()
det = fx.Detector(fx.CLASSES, (2 * fx.W, 4 * fx.W, 8 * fx.W)).eval()
missing, unexpected = ext.load_state_dict(torch.load(os.path.join(root, 'tut', 'net_e.pkl')), strict=False)
assert sorted(missing) == ['fc.bias', 'fc.weight'] and not unexpected, (missing, unexpected)
det.load_state_dict(torch.load(os.path.join(root, 'tut', 'net_d.pkl')), strict=True)
io = load_file(os.path.join(HERE, '..', 'tests', 'fixtures', 'interop', 'io.safetensors'))
with torch.no_grad():
    cls, reg = det(ext(io['x'], classify=False))
print('tutorial names: max |cls - fixture|', (cls - io['cls']).abs().max().item(),
      '|reg - fixture|', (reg - io['reg']).abs().max().item())
assert torch.allclose(cls, io['cls'], atol=1e-4) and torch.allclose(reg, io['reg'], atol=1e-4)

tv = torch.load(os.path.join(root, 'tv', 'resnet.pth'))
want = {k for k in torchvision.models.resnet18().state_dict() if not k.startswith('fc.')}
assert set(tv) == want, (set(tv) ^ want)
assert all(tv[k].dtype == torch.int64 for k in tv if k.endswith('num_batches_tracked'))
print('torchvision names:', len(tv), 'keys, exactly resnet18\'s without fc')
for f in ['tut/net_e.safetensors', 'tut/net_d.safetensors', 'tv/resnet.safetensors']:
    assert load_file(os.path.join(root, f))
print('ok')
