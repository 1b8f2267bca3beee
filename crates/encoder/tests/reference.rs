//! Every case of `../shared/reference` that concerns the box math.

use retinanet_encoder::{Bbox, DecodeOptions, Encoder, EncoderConfig, NmsMode, box_iou, box_nms};
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

fn f(v: &Value) -> f32 {
    v.as_f64().unwrap() as f32
}

fn boxes(v: &Value) -> Vec<Bbox> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| [0, 1, 2, 3].map(|i| f(&r[i])))
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(f).collect()
}

/// A `[B, A, K]` array of numbers, flattened row-major.
fn flat3(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|img| img.as_array().unwrap().iter().flat_map(floats))
        .collect()
}

fn close(a: f32, b: f32, rel: f32) -> bool {
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1e-6)
}

#[test]
fn iou_matches_reference() {
    let r = reference("box_iou.json");
    let (b1, b2) = (boxes(&r["b1"]), boxes(&r["b2"]));
    let got = box_iou(&b1, &b2);
    let want: Vec<f32> = r["iou"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(floats)
        .collect();
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(close(*g, *w, 1e-5), "iou[{i}] = {g}, reference {w}");
    }
    // The last b2 is b1[0]: IoU 1 with itself.
    assert!(close(got[b2.len() - 1], 1.0, 1e-6));
}

#[test]
fn nms_matches_reference() {
    let r = reference("box_nms.json");
    for (k, case) in r["cases"].as_array().unwrap().iter().enumerate() {
        let mode = match case["mode"].as_str().unwrap() {
            "union" => NmsMode::Union,
            "min" => NmsMode::Min,
            m => panic!("unknown mode {m}"),
        };
        let keep = box_nms(
            &boxes(&case["boxes"]),
            &floats(&case["scores"]),
            f(&case["threshold"]),
            mode,
        );
        let want: Vec<usize> = case["keep"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(keep, want, "case {k} ({mode:?})");
    }
}

fn reference_encoder(r: &Value) -> Encoder {
    let size = &r["train_size"];
    Encoder::new(EncoderConfig {
        train_size: (
            size[0].as_u64().unwrap() as usize,
            size[1].as_u64().unwrap() as usize,
        ),
        iou_th: (f(&r["train_iou_th"][0]), f(&r["train_iou_th"][1])),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn encode_matches_reference() {
    let r = reference("encode.json");
    let enc = reference_encoder(&r);
    let labels: Vec<Vec<u32>> = r["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            l.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let bx: Vec<Vec<Bbox>> = r["boxes"].as_array().unwrap().iter().map(boxes).collect();
    let t = enc.encode(&labels, &bx).unwrap();
    let want_cls = r["cls_targets"].as_array().unwrap();
    let want_reg = r["reg_targets"].as_array().unwrap();
    assert_eq!(t.batch, 3);
    for b in 0..3 {
        let wc: Vec<i32> = want_cls[b]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(t.cls_of(b), &wc[..], "class targets of image {b}");
        let wr = boxes(&want_reg[b]);
        for (a, (g, w)) in t.reg_of(b).iter().zip(&wr).enumerate() {
            for k in 0..4 {
                assert!(
                    close(g[k], w[k], 1e-5),
                    "reg[{b}][{a}][{k}] = {}, reference {}",
                    g[k],
                    w[k]
                );
            }
        }
    }
    // The reference has positives, ignored anchors and an all-background image.
    assert!(t.cls_of(0).contains(&-1));
    assert!(t.cls_of(1).contains(&5));
    assert!(t.cls_of(2).iter().all(|&c| c == 0));
}

#[test]
fn decode_matches_reference() {
    let r = reference("decode.json");
    let enc = Encoder::new(EncoderConfig {
        train_size: (129, 129),
        ..Default::default()
    })
    .unwrap();
    let size = (
        r["img_size"][0].as_u64().unwrap() as usize,
        r["img_size"][1].as_u64().unwrap() as usize,
    );
    let cls = flat3(&r["cls_out"]);
    let reg = flat3(&r["reg_out"]);
    let classes = r["cls_out"][0][0].as_array().unwrap().len();
    let opts = DecodeOptions {
        score_th: f(&r["score_th"]),
        nms_th: f(&r["nms_th"]),
        ..Default::default()
    };
    assert_eq!(
        opts,
        DecodeOptions::default(),
        "the reference uses the tutorial's defaults"
    );
    let dets = enc
        .decode_batch(&cls, &reg, 2, classes, size, &opts)
        .unwrap();
    let want = r["results"].as_array().unwrap();
    assert_eq!(dets.len(), want.len());
    for (b, (d, w)) in dets.iter().zip(want).enumerate() {
        let wl: Vec<u32> = w["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert!(!wl.is_empty());
        assert_eq!(d.labels, wl, "labels of image {b}");
        for (g, s) in d.scores.iter().zip(floats(&w["scores"])) {
            assert!(close(*g, s, 1e-5), "score {g} vs {s}");
        }
        for (g, s) in d.boxes.iter().zip(boxes(&w["boxes"])) {
            for k in 0..4 {
                assert!(close(g[k], s[k], 1e-5), "image {b}: box {g:?} vs {s:?}");
            }
        }
    }
}

#[cfg(feature = "candle")]
#[test]
fn decode_from_tensors_checks_shapes() {
    use candle_core::{Device, Tensor};
    let r = reference("decode.json");
    let enc = Encoder::new(EncoderConfig {
        train_size: (129, 129),
        ..Default::default()
    })
    .unwrap();
    let cls = flat3(&r["cls_out"]);
    let reg = flat3(&r["reg_out"]);
    let an = enc.num_anchors();
    let ct = Tensor::from_vec(cls.clone(), (2, an, 4), &Device::Cpu).unwrap();
    let rt = Tensor::from_vec(reg.clone(), (2, an, 4), &Device::Cpu).unwrap();
    let from_t = enc
        .decode_tensors(&ct, &rt, (129, 129), &DecodeOptions::default())
        .unwrap();
    let from_s = enc
        .decode_batch(&cls, &reg, 2, 4, (129, 129), &DecodeOptions::default())
        .unwrap();
    assert_eq!(from_t, from_s);
    // Wrong image size for these outputs, wrong rank, wrong box width.
    let e = enc
        .decode_tensors(&ct, &rt, (257, 257), &DecodeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("4452 anchors"), "{e}");
    let e = enc
        .decode_tensors(
            &ct.flatten_all().unwrap(),
            &rt,
            (129, 129),
            &DecodeOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("[B, A, C]"), "{e}");
    let e = enc
        .decode_tensors(
            &ct,
            &ct.narrow(2, 0, 3).unwrap(),
            (129, 129),
            &DecodeOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("box output"), "{e}");
}
