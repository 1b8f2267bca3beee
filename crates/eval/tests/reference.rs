//! `../shared/reference/eval_voc.json`: AP per class, mAP, and the 11-point variant.

use retinanet_eval::VocEvaluator;
use serde_json::Value;
use std::path::PathBuf;

fn reference(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn boxes(v: &Value) -> Vec<[f32; 4]> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| [0, 1, 2, 3].map(|i| r[i].as_f64().unwrap() as f32))
        .collect()
}

fn ints(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * b.abs().max(1e-12)
}

#[test]
fn eval_voc_reference() {
    let r = reference("eval_voc.json");
    assert_eq!(r["iou_th"].as_f64(), Some(0.5));
    let n_img = r["gt_boxes"].as_array().unwrap().len();
    let mut e = VocEvaluator::new(3);
    for i in 0..n_img {
        let scores: Vec<f32> = r["pred_scores"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        e.add_image(
            &boxes(&r["gt_boxes"][i]),
            &ints(&r["gt_labels"][i]),
            None,
            &boxes(&r["pred_boxes"][i]),
            &ints(&r["pred_labels"][i]),
            &scores,
        )
        .unwrap();
    }
    let res = e.finish();
    for (key, ap) in [("ap", &res.ap), ("ap_07", &res.ap_07)] {
        let want = r[key].as_object().unwrap();
        assert_eq!(want.len(), 3);
        for (label, v) in want {
            let l: usize = label.parse().unwrap();
            let got = ap[l - 1].unwrap();
            assert!(
                close(got, v.as_f64().unwrap()),
                "{key}[{label}]: got {got}, want {v}"
            );
        }
    }
    let (map, map07) = (res.map.unwrap(), res.map_07.unwrap());
    assert!(close(map, r["map"].as_f64().unwrap()), "map {map}");
    assert!(
        close(map07, r["map_07"].as_f64().unwrap()),
        "map_07 {map07}"
    );
}
