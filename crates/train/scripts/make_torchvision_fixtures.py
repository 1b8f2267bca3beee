"""Makes the torchvision RetinaNet fixtures of crates/train/tests/torchvision.rs.

Small random-weight models built from torchvision's own RetinaNet classes (its FPN, extra
blocks, heads, anchor generator, transform and post-processing), so the Rust side can be
checked against torchvision itself without downloading the COCO weights:

* v1: `retinanet_resnet50_fpn`'s layout (P6 from P5, heads without normalisation, frozen
  BatchNorm with eps 0 as torchvision sets for its COCO weights; the head convolutions saved
  under the pre-v2 names `conv.0`, `conv.2`, ... that torchvision's COCO file has);
* v2: `retinanet_resnet50_fpn_v2`'s (P6 from C5, GroupNorm(32) in the heads, BatchNorm eps 1e-5).

The ResNet-50 is torchvision's, built at width 8 (torchvision's own `_make_layer`), the FPN at
32 channels, 5 classes; scores are spread (larger head weights) so that detections pass the
threshold. For two images (one scaled up, one down, the longer side binding) it stores
torchvision's transformed batch, the head outputs on it and the final detections.

Run: python make_torchvision_fixtures.py OUT_DIR   (torch, torchvision, safetensors, pillow)
"""

import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

WIDTH = 4
FPN = 32
CLASSES = 5
MIN_SIZE, MAX_SIZE = 160, 240
# Per variant, so that fewer than the 300 detections kept pass (no tie at the cut).
SCORE_TH = {False: 0.5, True: 0.75}


def tiny_resnet50(norm):
    m = ResNet(Bottleneck, [3, 4, 6, 3], norm_layer=norm)
    # The same modules at width WIDTH, made by torchvision's own layer builder.
    m.inplanes = WIDTH
    m.conv1 = nn.Conv2d(3, WIDTH, 7, 2, 3, bias=False)
    m.bn1 = norm(WIDTH)
    m.layer1 = m._make_layer(Bottleneck, WIDTH, 3)
    m.layer2 = m._make_layer(Bottleneck, 2 * WIDTH, 4, stride=2)
    m.layer3 = m._make_layer(Bottleneck, 4 * WIDTH, 6, stride=2)
    m.layer4 = m._make_layer(Bottleneck, 8 * WIDTH, 3, stride=2)
    return m


def randomise(model, g):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "head" in name and name.endswith("weight") and p.dim() == 4:
                p.normal_(0.0, 0.05, generator=g)
            elif name.endswith("cls_logits.bias"):
                p.normal_(-1.0, 0.5, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05, generator=g)
            elif p.dim() == 1:  # norm weights
                p.uniform_(0.5, 1.5, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("running_mean") or (name.endswith("bias") and "bn" in name):
                b.normal_(0.0, 0.1, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
            elif name.endswith("weight"):  # FrozenBatchNorm2d's weight is a buffer
                b.uniform_(0.5, 1.5, generator=g)


def legacy_name(k):
    """`head.*.conv.{i}.0.{leaf}` -> `head.*.conv.{2i}.{leaf}` (torchvision's pre-v2 names)."""
    if k.startswith("head.") and ".conv." in k:
        pre, rest = k.split(".conv.", 1)
        parts = rest.split(".")
        if len(parts) == 3 and parts[1] == "0":
            return f"{pre}.conv.{2 * int(parts[0])}.{parts[2]}"
    return k


def build(v2, seed):
    torch.manual_seed(seed)
    norm = nn.BatchNorm2d if v2 else FrozenBatchNorm2d
    body = tiny_resnet50(norm)
    c5 = 32 * WIDTH
    extra = LastLevelP6P7(c5, FPN) if v2 else LastLevelP6P7(FPN, FPN)
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[8 * WIDTH, 16 * WIDTH, 32 * WIDTH],
        out_channels=FPN,
        extra_blocks=extra,
    )
    head = RetinaNetHead(
        FPN, 9, CLASSES, norm_layer=partial(nn.GroupNorm, 32) if v2 else None
    )
    model = RetinaNet(
        backbone,
        num_classes=CLASSES,
        head=head,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        score_thresh=SCORE_TH[v2],
    )
    g = torch.Generator().manual_seed(seed + 1)
    randomise(model, g)
    if not v2:
        overwrite_eps(model, 0.0)
    return model.eval()


def images(out):
    rng = np.random.default_rng(3)
    paths = []
    # Smooth colour fields with rectangles: a photo-like mix of flat and textured parts.
    for i, (h, w) in enumerate([(150, 230), (301, 197)]):
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack(
            [
                128 + 90 * np.sin(x / 17.0 + i),
                128 + 90 * np.cos(y / 13.0),
                128 + 60 * np.sin((x + y) / 29.0),
            ],
            axis=-1,
        )
        for _ in range(6):
            y0, x0 = rng.integers(0, h - 30), rng.integers(0, w - 30)
            img[y0 : y0 + rng.integers(15, 60), x0 : x0 + rng.integers(15, 60)] = rng.integers(0, 255, 3)
        img += rng.normal(0, 12, img.shape)
        p = out / f"tv_image{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    paths = images(out)
    for v2 in [False, True]:
        tag = "v2" if v2 else "v1"
        model = build(v2, 10 + v2)
        sd = model.state_dict()
        if not v2:
            # The layout of torchvision's COCO v1 file: head convolutions conv.0, conv.2, ...
            sd = {legacy_name(k): v for k, v in sd.items()}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / f"tv_{tag}.safetensors"))
        expected = {
            "score_th": torch.tensor([SCORE_TH[v2]]),
            "sizes": torch.tensor([MIN_SIZE, MAX_SIZE]),
        }
        with torch.no_grad():
            for i, p in enumerate(paths):
                x = torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).float() / 255
                il, _ = model.transform([x])
                feats = list(model.backbone(il.tensors).values())
                ho = model.head(feats)
                dets = model([x])[0]
                expected[f"image{i}.input"] = il.tensors.contiguous()
                expected[f"image{i}.valid"] = torch.tensor(il.image_sizes[0])
                expected[f"image{i}.cls"] = ho["cls_logits"].contiguous()
                expected[f"image{i}.reg"] = ho["bbox_regression"].contiguous()
                expected[f"image{i}.boxes"] = dets["boxes"].contiguous()
                expected[f"image{i}.scores"] = dets["scores"].contiguous()
                expected[f"image{i}.labels"] = dets["labels"].contiguous()
                print(tag, p.name, tuple(il.tensors.shape), il.image_sizes[0], len(dets["boxes"]), "detections")
        save_file(expected, str(out / f"tv_{tag}_expected.safetensors"))


if __name__ == "__main__":
    main()
