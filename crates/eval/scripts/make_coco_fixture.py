"""Writes tests/fixtures/coco_*.json: random but realistic detection sets scored by pycocotools'
COCOeval (and the project's VOC reference, `eval_detection` of shared/reference/python/seed_ref.py).

    python -m venv /tmp/cocoenv && /tmp/cocoenv/bin/pip install pycocotools numpy
    /tmp/cocoenv/bin/python crates/eval/scripts/make_coco_fixture.py

Boxes are made as float32 [ymin, xmin, ymax, xmax] (the Rust input); COCO gets
[x, y, w, h] = [xmin, ymin, xmax - xmin, ymax - ymin] computed in float64 from those float32
values, which is what the Rust side computes too. Scores are float32 values.
"""
import ast
import contextlib
import io
import json
import os
import sys

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, '..', 'tests', 'fixtures')
SEED_REF = os.path.join(HERE, '..', '..', '..', '..', 'shared', 'reference', 'python', 'seed_ref.py')


def load_voc_reference():
    """bbox_iou_np and eval_detection from seed_ref.py, verbatim, without importing torch."""
    src = open(SEED_REF).read()
    tree = ast.parse(src)
    ns = {'np': np}
    from collections import defaultdict
    ns['defaultdict'] = defaultdict
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in ('bbox_iou_np', 'eval_detection'):
            exec(compile(ast.Module([node], []), SEED_REF, 'exec'), ns)
    return ns['eval_detection']


def f32(x):
    return float(np.float32(x))


def make_set(rng, n_images, n_classes, crowd, explicit_areas):
    images = []
    for i in range(n_images):
        H, W = 480.0, 640.0
        kind = i % 10
        n_gt = 0 if kind == 3 else int(rng.integers(1, 9))
        gts = []
        for _ in range(n_gt):
            # log-uniform sides: small, medium and large objects
            h = float(np.exp(rng.uniform(np.log(6), np.log(300))))
            w = float(np.clip(h * np.exp(rng.normal(0, 0.4)), 4, 400))
            y = rng.uniform(0, H - h)
            x = rng.uniform(0, W - w)
            gts.append(([f32(y), f32(x), f32(y + h), f32(x + w)], int(rng.integers(1, n_classes + 1))))
        if i == 7 and gts:
            # a degenerate (zero-width) object
            b = gts[0][0]
            gts[0] = ([b[0], b[1], b[2], b[1]], gts[0][1])
        dets = []
        if kind != 5:
            for b, lab in gts:
                for _ in range(int(rng.integers(0, 3))):
                    h, w = b[2] - b[0], b[3] - b[1]
                    s = 0.05 * max(h, w, 4.0)
                    y0 = b[0] + rng.normal(0, s)
                    x0 = b[1] + rng.normal(0, s)
                    y1 = max(y0, b[2] + rng.normal(0, s))
                    x1 = max(x0, b[3] + rng.normal(0, s))
                    lab2 = lab if rng.random() < 0.85 else int(rng.integers(1, n_classes + 1))
                    dets.append(([f32(y0), f32(x0), f32(y1), f32(x1)], lab2, f32(rng.uniform(0.2, 1.0))))
            for _ in range(int(rng.integers(0, 8))):
                h = float(np.exp(rng.uniform(np.log(5), np.log(250))))
                w = float(np.exp(rng.uniform(np.log(5), np.log(250))))
                y = rng.uniform(0, H - h)
                x = rng.uniform(0, W - w)
                dets.append(([f32(y), f32(x), f32(y + h), f32(x + w)], int(rng.integers(1, n_classes + 1)),
                             f32(rng.uniform(0, 0.7))))
        if i == 11:
            # well over 100 detections of one class in one image: exercises maxDets
            for _ in range(150):
                h, w = rng.uniform(10, 120, 2)
                y, x = rng.uniform(0, 300, 2)
                dets.append(([f32(y), f32(x), f32(y + h), f32(x + w)], 1, f32(rng.uniform(0, 1))))
        if i == 13:
            # a zero-area detection
            dets.append(([f32(10), f32(10), f32(10), f32(50)], 1, f32(0.5)))
        if i in (17, 23, 29):
            # few detections per class with tied scores, within and across images
            for d in range(len(dets)):
                dets[d] = (dets[d][0], dets[d][1], 0.5)
        img = dict(
            id=i + 1,
            gt_boxes=[b for b, _ in gts],
            gt_labels=[l for _, l in gts],
            det_boxes=[b for b, _, _ in dets],
            det_labels=[l for _, l, _ in dets],
            det_scores=[s for _, _, s in dets],
        )
        if crowd:
            img['gt_crowd'] = [bool(rng.random() < 0.12) for _ in gts]
        if explicit_areas:
            img['gt_areas'] = [float((b[2] - b[0]) * (b[3] - b[1]) * rng.uniform(0.4, 1.0)) for b, _ in gts]
        images.append(img)
    return images


def xywh(b):
    y0, x0, y1, x1 = (float(v) for v in b)
    return [x0, y0, x1 - x0, y1 - y0]


def run_coco(images, n_classes):
    anns, dts = [], []
    for img in images:
        for j, (b, l) in enumerate(zip(img['gt_boxes'], img['gt_labels'])):
            bb = xywh(b)
            area = img['gt_areas'][j] if 'gt_areas' in img else bb[2] * bb[3]
            crowd = int(img.get('gt_crowd', [False] * len(img['gt_boxes']))[j])
            anns.append(dict(id=len(anns) + 1, image_id=img['id'], category_id=l, bbox=bb, area=area, iscrowd=crowd))
        for b, l, s in zip(img['det_boxes'], img['det_labels'], img['det_scores']):
            dts.append(dict(image_id=img['id'], category_id=l, bbox=xywh(b), score=s))
    gt = COCO()
    gt.dataset = dict(images=[dict(id=img['id']) for img in images], annotations=anns,
                      categories=[dict(id=k, name=f'c{k}') for k in range(1, n_classes + 1)])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dts)
        E = COCOeval(gt, dt, 'bbox')
        E.evaluate()
        E.accumulate()
        E.summarize()
    prec = E.eval['precision']  # [T, R, K, A, M]
    per_ap, per_ap50 = [], []
    for k in range(n_classes):
        p = prec[:, :, k, 0, 2]
        per_ap.append(float(np.mean(p[p > -1])) if (p > -1).any() else None)
        p = prec[0, :, k, 0, 2]
        per_ap50.append(float(np.mean(p[p > -1])) if (p > -1).any() else None)
    return [float(s) for s in E.stats], per_ap, per_ap50


def run_voc(images, eval_detection, use_07):
    arr = lambda x, shape: np.array(x, dtype=np.float64).reshape(shape)
    r = eval_detection([arr(i['det_boxes'], (-1, 4)) for i in images],
                       [np.array(i['det_labels'], int) for i in images],
                       [np.array(i['det_scores'], np.float64) for i in images],
                       [arr(i['gt_boxes'], (-1, 4)) for i in images],
                       [np.array(i['gt_labels'], int) for i in images], 0.5, use_07=use_07)
    return {str(k): v for k, v in r['ap'].items()}, r['map']


def eval_detection_difficult(pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficult,
                             iou_th=0.5, use_07=False):
    """seed_ref.eval_detection with VOC difficult objects (as the VOC devkit and chainercv): the IoU
    argmax runs over all objects of the class; a prediction whose best object is difficult is
    neither a hit nor a miss (and does not take it); difficult objects are not positives."""
    from collections import defaultdict
    n_pos = defaultdict(int); score = defaultdict(list); match = defaultdict(list)
    for pb, pl, ps, gb, gl, gd in zip(pred_bboxes, pred_labels, pred_scores, gt_bboxes, gt_labels, gt_difficult):
        for l in np.unique(np.concatenate((pl, gl)).astype(int)):
            m = pl == l
            pbl, psl = pb[m], ps[m]
            order = psl.argsort(kind='stable')[::-1]
            pbl, psl = pbl[order], psl[order]
            gbl = gb[gl == l]; gdl = gd[gl == l]
            n_pos[l] += int(np.sum(~gdl))
            score[l].extend(psl)
            if len(pbl) == 0:
                continue
            if len(gbl) == 0:
                match[l].extend([0] * len(pbl)); continue
            pbl = pbl.copy(); gbl = gbl.copy()
            pbl[:, 2:] += 1; gbl[:, 2:] += 1
            tl = np.maximum(pbl[:, None, :2], gbl[:, :2]); br = np.minimum(pbl[:, None, 2:], gbl[:, 2:])
            inter = np.prod(br - tl, axis=2) * (tl < br).all(axis=2)
            aa = np.prod(pbl[:, 2:] - pbl[:, :2], axis=1); ab = np.prod(gbl[:, 2:] - gbl[:, :2], axis=1)
            iou = inter / (aa[:, None] + ab - inter + 1e-10)
            gi = iou.argmax(1); gi[iou.max(1) < iou_th] = -1
            sel = np.zeros(len(gbl), bool)
            for g in gi:
                if g >= 0 and gdl[g]:
                    match[l].append(-1)
                elif g >= 0:
                    match[l].append(0 if sel[g] else 1); sel[g] = True
                else:
                    match[l].append(0)
    ap = {}
    for l in sorted(set(n_pos) | set(score)):
        if n_pos[l] == 0:
            continue
        s = np.array(score[l]); mt = np.array(match[l], dtype=np.int8)
        mt = mt[s.argsort(kind='stable')[::-1]]
        tp = np.cumsum(mt == 1); fp = np.cumsum(mt == 0)
        with np.errstate(invalid='ignore', divide='ignore'):
            prec = tp / (tp + fp)
        rec = tp / n_pos[l]
        if use_07:
            a = 0.0
            for t in np.arange(0., 1.1, 0.1):
                a += (np.max(np.nan_to_num(prec)[rec >= t]) if np.sum(rec >= t) else 0) / 11
            ap[int(l)] = a
        else:
            mpre = np.concatenate(([0], np.nan_to_num(prec), [0]))
            mrec = np.concatenate(([0], rec, [1]))
            mpre = np.maximum.accumulate(mpre[::-1])[::-1]
            i = np.where(mrec[1:] != mrec[:-1])[0]
            ap[int(l)] = float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    return {str(k): v for k, v in ap.items()}, (float(np.mean(list(ap.values()))) if ap else None)


def make_voc_difficult():
    rng = np.random.default_rng(20260703)
    images = make_set(rng, 60, 4, False, False)
    for img in images:
        img['gt_difficult'] = [bool(rng.random() < 0.2) for _ in img['gt_boxes']]
    arr = lambda x: np.array(x, dtype=np.float64).reshape(-1, 4)
    args = ([arr(i['det_boxes']) for i in images], [np.array(i['det_labels'], int) for i in images],
            [np.array(i['det_scores'], np.float64) for i in images], [arr(i['gt_boxes']) for i in images],
            [np.array(i['gt_labels'], int) for i in images], [np.array(i['gt_difficult'], bool) for i in images])
    ap, m = eval_detection_difficult(*args)
    ap07, m07 = eval_detection_difficult(*args, use_07=True)
    fx = dict(about='VOC AP with difficult objects (eval_detection_difficult in scripts/make_coco_fixture.py: '
                    'seed_ref.eval_detection plus the devkit/chainercv difficult rule)',
              num_classes=4, images=images, ap=ap, map=m, ap_07=ap07, map_07=m07)
    with open(os.path.join(OUT, 'voc_difficult.json'), 'w') as f:
        json.dump(fx, f, separators=(',', ':'))
    print('voc_difficult.json', m, m07, file=sys.stderr)


def main():
    eval_detection = load_voc_reference()
    os.makedirs(OUT, exist_ok=True)
    cases = [('coco_plain.json', 20260701, False, False), ('coco_crowd_areas.json', 20260702, True, True)]
    for name, seed, crowd, areas in cases:
        rng = np.random.default_rng(seed)
        n_classes = 3
        images = make_set(rng, 50, n_classes, crowd, areas)
        stats, per_ap, per_ap50 = run_coco(images, n_classes)
        fx = dict(
            about='pycocotools COCOeval (bbox) on these images (ids 1..N in order; boxes [ymin,xmin,ymax,xmax] f32, '
                  'COCO xywh = [xmin, ymin, xmax-xmin, ymax-ymin] in f64; gt area = w*h unless gt_areas; '
                  'iscrowd = gt_crowd or 0). stats = COCOeval.stats; ap_per_class = mean of precision[:, :, k, all, 100] > -1. '
                  'voc = seed_ref.eval_detection (crowd/areas not used) on the same set. Made by scripts/make_coco_fixture.py',
            num_classes=n_classes, images=images, stats=stats, ap_per_class=per_ap, ap50_per_class=per_ap50)
        if not crowd:
            ap, m = run_voc(images, eval_detection, False)
            ap07, m07 = run_voc(images, eval_detection, True)
            fx['voc'] = dict(ap=ap, map=m, ap_07=ap07, map_07=m07)
        path = os.path.join(OUT, name)
        with open(path, 'w') as f:
            json.dump(fx, f, separators=(',', ':'))
        print(name, ' '.join(f'{s:.4f}' for s in stats), file=sys.stderr)
    make_voc_difficult()


if __name__ == '__main__':
    main()
