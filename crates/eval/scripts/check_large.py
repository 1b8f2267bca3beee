"""Scores the set written by `cargo run --release -p retinanet-eval --example bench -- --dump SET`
with pycocotools and the VOC reference (seed_ref.eval_detection), timing both, and prints the
numbers for comparison with the example's output.

    /tmp/cocoenv/bin/python crates/eval/scripts/check_large.py SET
"""
import json
import sys
import time

from make_coco_fixture import load_voc_reference, run_coco, run_voc

images = json.load(open(sys.argv[1]))
n_classes = images['num_classes']
images = images['images']
t = time.perf_counter()
stats, per_ap, _ = run_coco(images, n_classes)
t_coco = time.perf_counter() - t
eval_detection = load_voc_reference()
t = time.perf_counter()
ap, m = run_voc(images, eval_detection, False)
t_voc = time.perf_counter() - t
ap07, m07 = run_voc(images, eval_detection, True)
print(f'pycocotools (evaluate+accumulate+summarize, from in-memory dicts): {t_coco:.2f} s')
print('stats', stats)
print(f'VOC reference eval_detection: {t_voc:.2f} s  map {m!r}  map07 {m07!r}')
