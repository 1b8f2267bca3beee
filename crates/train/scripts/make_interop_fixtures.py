"""Fixtures of crates/train/tests/interop.rs, made once with PyTorch (the tests never need it):

  tests/fixtures/interop/net_e.pkl        the tutorial's extractor state dict, torch.save'd as the
                                          tutorial does (zip format), saved from nn.DataParallel
                                          (`module.` prefixes): ResNet-18 layout at width 8, `fc`
  tests/fixtures/interop/net_d.pkl        its detector (FPN and heads of 16 channels, 4 classes)
  tests/fixtures/interop/io.safetensors   an input image batch and PyTorch's cls / reg outputs
                                          (eval mode)

Run: /tmp/torchenv/bin/python crates/train/scripts/make_interop_fixtures.py
(the venv from ../shared/tools/torch-venv.sh).
"""
import math, os, sys
import torch, torch.nn as nn
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', '..'))
sys.path.insert(0, os.path.join(ROOT, 'crates', 'extractor', 'scripts'))
import make_fixtures as mf  # noqa: E402  (the tutorial-named blocks and the general detector)

torch.manual_seed(4321)
W, FPN, CLASSES = 8, 16, 4


class Extractor18(mf.Extractor18):
    STAGES = [(W, W, W, 2, 1), (W, 2 * W, 2 * W, 2, 2), (2 * W, 4 * W, 4 * W, 2, 2), (4 * W, 8 * W, 8 * W, 2, 2)]
    def __init__(s, classes):
        nn.Module.__init__(s)
        s.conv_input = nn.Conv2d(3, W, 7, stride=2, padding=3, bias=False); s.bn_input = nn.BatchNorm2d(W)
        for st, (cin, _, cout, n, stride) in enumerate(s.STAGES, 1):
            for i in range(1, n + 1):
                setattr(s, f'resblock{st}_{i}', mf.BasicBlock(cin if i == 1 else cout, cout, stride if i == 1 else 1))
        s.fc = nn.Linear(8 * W, classes)


class Detector(mf.DetectorGeneral):
    """The tutorial's detector at FPN width 16 with heads of 16 channels."""
    def __init__(s, classes, cin):
        nn.Module.__init__(s)
        s.classes = classes
        c3, c4, c5 = cin
        s.conv_out6 = nn.Conv2d(c5, FPN, 3, padding=1, stride=2)
        s.prj_5 = nn.Conv2d(c5, FPN, 1); s.prj_4 = nn.Conv2d(c4, FPN, 1); s.prj_3 = nn.Conv2d(c3, FPN, 1)
        s.conv_4 = nn.Conv2d(FPN, FPN, 3, padding=1); s.conv_3 = nn.Conv2d(FPN, FPN, 3, padding=1)
        mk = lambda c: nn.Sequential(nn.Conv2d(FPN, FPN, 3, padding=1), nn.ReLU(), nn.Conv2d(FPN, FPN, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(FPN, FPN, 3, padding=1), nn.ReLU(), nn.Conv2d(FPN, c, 3, padding=1))
        s.conv_cls = mk(3 * classes); s.conv_reg = mk(3 * 4)


def main():
    out = os.path.join(ROOT, 'crates', 'train', 'tests', 'fixtures', 'interop')
    os.makedirs(out, exist_ok=True)
    ext = Extractor18(classes=10); mf.randomise(ext); ext.eval()
    det = Detector(CLASSES, (2 * W, 4 * W, 8 * W)); mf.randomise(det); det.eval()
    # As the tutorial saves them: torch.save of state dicts, the extractor from DataParallel.
    torch.save(nn.DataParallel(ext).state_dict(), os.path.join(out, 'net_e.pkl'))
    torch.save(det.state_dict(), os.path.join(out, 'net_d.pkl'))
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        cls, reg = det(ext(x, classify=False))
    save_file({'x': x.contiguous(), 'cls': cls.contiguous(), 'reg': reg.contiguous()},
              os.path.join(out, 'io.safetensors'))
    print('cls', tuple(cls.shape), 'reg', tuple(reg.shape))


if __name__ == '__main__':
    main()
