"""Checks an ONNX export of `convert onnx` in onnxruntime (run by hand; the Rust tests run the
export in tract and need no Python).

onnx.checker validates the file (with shape inference), the graph's input and outputs are
checked by name and shape (`image` [1, 3, H, W] with H, W symbolic; `cls`, `reg`, `anchors`,
`cls_logits`), and one onnxruntime session runs every input of the check data — several image
sizes through the same session — and compares each output with what the project computed:
the largest absolute difference per output and size is printed, and the script fails beyond
--tol (1e-4) or on any anchor that differs at all.

  cargo run --release -p convert -- onnx --checkpoint runs/default/checkpoint.safetensors \
      --out /tmp/x/model.onnx --check-data /tmp/x/check.safetensors [--check-sizes 97x130,160x96]
  /tmp/torchenv/bin/python crates/train/scripts/check_onnx.py /tmp/x/model.onnx /tmp/x/check.safetensors
"""
import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

ap = argparse.ArgumentParser()
ap.add_argument('model')
ap.add_argument('check_data')
ap.add_argument('--tol', type=float, default=1e-4)
args = ap.parse_args()

m = onnx.load(args.model)
onnx.checker.check_model(m, full_check=True)
meta = {p.key: p.value for p in m.metadata_props}
classes = json.loads(meta['class_names'])
print(f'{args.model}: opset {m.opset_import[0].version}, {len(m.graph.node)} nodes, '
      f'{len(classes)} classes {classes[:5]}{"..." if len(classes) > 5 else ""}')


def dims(v):
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


assert [(i.name, dims(i)) for i in m.graph.input] == [('image', [1, 3, 'H', 'W'])], m.graph.input
C = len(classes)
want = [('cls', [1, 'A', C]), ('reg', [1, 'A', 4]), ('anchors', ['A', 4]), ('cls_logits', [1, 'A', C])]
got = [(o.name, dims(o)) for o in m.graph.output]
assert got == want, got

sess = ort.InferenceSession(args.model, providers=['CPUExecutionProvider'])
data = load_file(args.check_data)
n = len([k for k in data if k.startswith('image_')])
assert n > 0, 'no image_* tensors in the check data'
names = [o.name for o in sess.get_outputs()]
worst = 0.0
ok = True
for i in range(n):
    x = data[f'image_{i}']
    outs = dict(zip(names, sess.run(None, {'image': x})))
    line = []
    for name in ['cls_logits', 'cls', 'reg', 'anchors']:
        ref = data[f'{name}_{i}']
        out = outs[name]
        if out.shape != ref.shape:
            print(f'  {name}: shape {out.shape}, expected {ref.shape}')
            ok = False
            continue
        d = float(np.abs(out.astype(np.float64) - ref.astype(np.float64)).max()) if ref.size else 0.0
        line.append(f'{name} {d:.2e}')
        limit = 0.0 if name == 'anchors' else args.tol
        if not d <= limit:
            ok = False
        if name != 'anchors':
            worst = max(worst, d)
    print(f'  {x.shape[2]}x{x.shape[3]}: {ref.shape[0]} anchors; max |onnxruntime - project|: ' + ', '.join(line))
print(f'largest difference {worst:.2e} (tolerance {args.tol:g}); anchors must match exactly')
if not ok:
    print('FAILED')
    sys.exit(1)
print('ok')
