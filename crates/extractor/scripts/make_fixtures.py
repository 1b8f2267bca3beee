"""Golden fixtures for retinanet-extractor and retinanet-detector, made with PyTorch from the
tutorial's architecture (shared/reference/python/seed_model.py) with random weights.

Usage (from the repository root, with a PyTorch venv, e.g. ../shared/tools/torch-venv.sh):
    /tmp/torchenv/bin/python crates/extractor/scripts/make_fixtures.py

Writes
  crates/extractor/tests/fixtures/r18h.pth             half-width ResNet-18 (basic blocks) state
                                                        dict, torchvision names, `module.` prefix
  crates/extractor/tests/fixtures/r18h_io.safetensors  its input, outputs, running stats
  crates/extractor/tests/fixtures/wrapped_*.pth        tiny checkpoints with the state dict under
                                                        a `state_dict` / `model` key
  crates/detector/tests/fixtures/r50h_extractor.safetensors  half-width ResNet-50, tutorial names
  crates/detector/tests/fixtures/r50h_detector.safetensors   detector on top, tutorial names
  crates/detector/tests/fixtures/r50h_io.safetensors   inputs, outputs, running stats

Half width (base 32) keeps the files small; the code path is the same as at width 64.
"""
import math, os, sys
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
sys.path.insert(0, os.path.join(ROOT, '..', 'shared', 'reference', 'python'))
import seed_model  # noqa: E402

torch.manual_seed(1234)
W = 32  # base width


class BasicBlock(nn.Module):
    """ResNet-18/34 block in the tutorial's naming style (conv_k/bn_k/conv_prj/bn_prj)."""
    def __init__(s, cin, cout, stride=1):
        super().__init__()
        s.proj = stride > 1 or cin != cout
        s.conv_1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False); s.bn_1 = nn.BatchNorm2d(cout)
        s.conv_2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False); s.bn_2 = nn.BatchNorm2d(cout)
        if s.proj:
            s.conv_prj = nn.Conv2d(cin, cout, 1, stride=stride, bias=False); s.bn_prj = nn.BatchNorm2d(cout)
    def forward(s, x):
        o = F.relu(s.bn_1(s.conv_1(x))); o = s.bn_2(s.conv_2(o))
        return F.relu(o + (s.bn_prj(s.conv_prj(x)) if s.proj else x))


class Extractor18(seed_model.Extractor):
    """seed_model.Extractor's stem, stages and forward with basic blocks (2, 2, 2, 2)."""
    STAGES = [(W, W, W, 2, 1), (W, 2 * W, 2 * W, 2, 2), (2 * W, 4 * W, 4 * W, 2, 2), (4 * W, 8 * W, 8 * W, 2, 2)]
    def __init__(s, classes):
        nn.Module.__init__(s)
        s.conv_input = nn.Conv2d(3, W, 7, stride=2, padding=3, bias=False); s.bn_input = nn.BatchNorm2d(W)
        for st, (cin, _, cout, n, stride) in enumerate(s.STAGES, 1):
            for i in range(1, n + 1):
                setattr(s, f'resblock{st}_{i}', BasicBlock(cin if i == 1 else cout, cout, stride if i == 1 else 1))
        s.fc = nn.Linear(8 * W, classes)


class Extractor50Half(seed_model.Extractor):
    """seed_model.Extractor (bottlenecks 3, 4, 6, 3) at half width."""
    STAGES = [(W, W, 4 * W, 3, 1), (4 * W, 2 * W, 8 * W, 4, 2), (8 * W, 4 * W, 16 * W, 6, 2), (16 * W, 8 * W, 32 * W, 3, 2)]
    def __init__(s, classes):
        super().__init__(classes)
        s.conv_input = nn.Conv2d(3, W, 7, stride=2, padding=3, bias=False); s.bn_input = nn.BatchNorm2d(W)
        s.fc = nn.Linear(32 * W, classes)


class DetectorGeneral(seed_model.Detector):
    """seed_model.Detector with input widths of the extractor, and `up` to the finer map's size
    (equal to the tutorial's 2x-1 for 2^k+1 inputs)."""
    def __init__(s, classes, cin):
        super().__init__(classes)
        c3, c4, c5 = cin
        s.conv_out6 = nn.Conv2d(c5, 256, 3, padding=1, stride=2)
        s.prj_5 = nn.Conv2d(c5, 256, 1); s.prj_4 = nn.Conv2d(c4, 256, 1); s.prj_3 = nn.Conv2d(c3, 256, 1)
    def forward(s, feats):
        o3, o4, o5 = feats
        up = lambda x, ref: F.interpolate(x, size=ref.shape[2:], mode='bilinear', align_corners=True)
        p6 = s.conv_out6(o5); p5 = s.prj_5(o5)
        q4 = s.prj_4(o4); p4 = up(p5, q4) + q4
        q3 = s.prj_3(o3); p3 = up(p4, q3) + q3
        preds = [F.relu(s.conv_3(p3)), F.relu(s.conv_4(p4)), F.relu(p5), F.relu(p6)]
        cls, reg = [], []
        for p in preds:
            cls.append(s.conv_cls(p).permute(0, 2, 3, 1).reshape(p.shape[0], -1, s.classes))
            reg.append(s.conv_reg(p).permute(0, 2, 3, 1).reshape(p.shape[0], -1, 4))
        return torch.cat(cls, 1), torch.cat(reg, 1)


def randomise(model):
    """Non-trivial BN statistics and affine parameters; convs with unit-gain scale so the
    activations stay O(1) through the depth (the values matter, not the init)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0, math.sqrt(1.0 / fan_in))
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)


def tutorial_to_torchvision(name):
    """Independent of the Rust mapping: conv_input->conv1, resblockS_I.conv_k->layerS.(I-1).convk."""
    parts = name.split('.')
    if parts[0] == 'conv_input': parts[0] = 'conv1'
    elif parts[0] == 'bn_input': parts[0] = 'bn1'
    elif parts[0].startswith('resblock'):
        s, i = parts[0][len('resblock'):].split('_')
        layer = {'conv_prj': 'downsample.0', 'bn_prj': 'downsample.1'}.get(parts[1], parts[1].replace('_', ''))
        parts = [f'layer{s}', str(int(i) - 1), layer] + parts[2:]
    return '.'.join(parts)


def sd(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def bn_stats(model, rename=lambda n: n):
    return {f'after.{rename(k)}': v.clone() for k, v in model.state_dict().items()
            if k.endswith('running_mean') or k.endswith('running_var')}


def main():
    ext_dir = os.path.join(ROOT, 'crates', 'extractor', 'tests', 'fixtures')
    det_dir = os.path.join(ROOT, 'crates', 'detector', 'tests', 'fixtures')
    os.makedirs(ext_dir, exist_ok=True); os.makedirs(det_dir, exist_ok=True)

    # ResNet-18 (half width), torchvision names, saved as a DataParallel-style .pth.
    r18 = Extractor18(classes=10); randomise(r18); r18.eval()
    weights = {'module.' + tutorial_to_torchvision(k): v for k, v in sd(r18).items()}
    torch.save(weights, os.path.join(ext_dir, 'r18h.pth'))
    x = torch.randn(2, 3, 33, 47)
    io = {'input': x}
    with torch.no_grad():
        o3, o4, o5 = r18(x, classify=False)
        io.update({'eval.out3': o3, 'eval.out4': o4, 'eval.out5': o5, 'eval.logits': r18(x)})
        r18.train()
        o3, o4, o5 = r18(x, classify=False)
        io.update({'train.out3': o3, 'train.out4': o4, 'train.out5': o5})
    io.update(bn_stats(r18, tutorial_to_torchvision))
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(ext_dir, 'r18h_io.safetensors'))

    # ResNet-50 (half width) + detector (256 channels, 3 classes), tutorial names.
    r50 = Extractor50Half(classes=7); randomise(r50); r50.eval()
    det = DetectorGeneral(classes=3, cin=(8 * W, 16 * W, 32 * W)); randomise(det); det.eval()
    save_file(sd(r50), os.path.join(det_dir, 'r50h_extractor.safetensors'))
    save_file(sd(det), os.path.join(det_dir, 'r50h_detector.safetensors'))
    x = torch.randn(2, 3, 65, 57)
    io = {'input': x}
    with torch.no_grad():
        feats = r50(x, classify=False)
        cls, reg = det(feats)
        io.update({'eval.out3': feats[0], 'eval.out4': feats[1], 'eval.out5': feats[2],
                   'eval.cls': cls, 'eval.reg': reg, 'eval.logits': r50(x)})
        r50.train()
        o3, o4, o5 = r50(x, classify=False)
        io.update({'train.out5': o5})
    io.update(bn_stats(r50, tutorial_to_torchvision))
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(det_dir, 'r50h_io.safetensors'))
    for k in ['eval.out5', 'eval.cls', 'eval.reg']:
        print(k, tuple(io[k].shape), float(io[k].abs().max()))
    wrapped()


def wrapped():
    """Training-loop style checkpoints: the state dict under a key, next to other objects."""
    ext_dir = os.path.join(ROOT, 'crates', 'extractor', 'tests', 'fixtures')
    g = torch.Generator().manual_seed(7)
    weights = {'conv1.weight': torch.randn(4, 3, 7, 7, generator=g), 'bn1.weight': torch.rand(4, generator=g)}
    torch.save({'state_dict': weights, 'epoch': 3}, os.path.join(ext_dir, 'wrapped_state_dict.pth'))
    torch.save({'model': {'module.' + k: v for k, v in weights.items()}, 'optimizer': {'lr': 0.1}},
               os.path.join(ext_dir, 'wrapped_model.pth'))
    save_file(weights, os.path.join(ext_dir, 'wrapped_expected.safetensors'))


if __name__ == '__main__':
    main()
