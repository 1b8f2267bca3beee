//! Bad input found where it is read and refused by name (file, line, XML and id, class), or
//! skipped and reported once with `skip_bad`; never a hang or a silently wrong dataset.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use image::{ImageFormat, RgbImage};
use retinanet_dataset::{
    ClassificationDataset, ClassificationLoader, ClassificationTransform, DatasetError,
    DetectionDataset, DetectionLoader, DetectionTransform, LoaderConfig, OpenOptions,
    load_image_for_inference, load_rgb,
};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A VOC root with the given splits: `(split, [(id, [(class, [xmin, ymin, xmax, ymax])])])`;
/// every id gets a JPEG and an XML whose `<filename>` is `<id>.jpg`.
/// Objects of one VOC image: `(class, [xmin, ymin, xmax, ymax])`.
type Objects<'a> = Vec<(&'a str, [i32; 4])>;

fn voc_root(root: &Path, splits: &[(&str, Vec<(&str, Objects)>)]) {
    let sets = root.join("ImageSets").join("Main");
    std::fs::create_dir_all(&sets).unwrap();
    std::fs::create_dir_all(root.join("Annotations")).unwrap();
    for (split, images) in splits {
        let ids: Vec<&str> = images.iter().map(|(id, _)| *id).collect();
        std::fs::write(sets.join(format!("{split}.txt")), ids.join("\n")).unwrap();
        for (i, (id, objs)) in images.iter().enumerate() {
            write_voc_xml(root, id, &format!("{id}.jpg"), objs);
            common::save_jpeg(
                &common::gradient_image(64, 48, i as u32),
                &root.join("JPEGImages").join(format!("{id}.jpg")),
            );
        }
    }
}

fn write_voc_xml(root: &Path, id: &str, filename: &str, objs: &[(&str, [i32; 4])]) {
    let body: String = objs
        .iter()
        .map(|(n, b)| {
            format!(
                "<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{}</xmin>\
                 <ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax></bndbox></object>",
                b[0], b[1], b[2], b[3]
            )
        })
        .collect();
    std::fs::write(
        root.join("Annotations").join(format!("{id}.xml")),
        format!("<annotation><filename>{filename}</filename>{body}</annotation>"),
    )
    .unwrap();
}

fn label_of(ds: &DetectionDataset, class: &str) -> u32 {
    ds.class_names().iter().position(|n| n == class).unwrap() as u32 + 1
}

// ---------------------------------------------------------------------------------------------
// Class 1: one class list for every split.

#[test]
fn voc_splits_with_different_classes_get_one_sorted_union() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    voc_root(
        root,
        &[
            (
                "train",
                vec![
                    (
                        "t1",
                        vec![("zebra", [1, 1, 20, 20]), ("cat", [5, 5, 30, 30])],
                    ),
                    ("t2", vec![("cat", [2, 2, 9, 9])]),
                ],
            ),
            (
                "val",
                vec![("v1", vec![("dog", [3, 3, 8, 8]), ("zebra", [1, 2, 10, 12])])],
            ),
        ],
    );
    let sets =
        DetectionDataset::open_voc(root, &["train", "val"], &OpenOptions::default()).unwrap();
    let (train, val) = (&sets[0], &sets[1]);
    assert_eq!(train.class_names(), names(&["cat", "dog", "zebra"]));
    assert_eq!(train.class_names(), val.class_names());
    // The zebra of both splits carries the same label.
    assert_eq!(train.get(0).labels, vec![3, 1]);
    assert_eq!(val.get(0).labels, vec![2, 3]);
    assert_eq!(label_of(val, "zebra"), 3);

    // Read one split at a time (the old way), the lists differ: the union is what fixes it.
    let t = DetectionDataset::from_voc(root, "train").unwrap();
    assert_eq!(t.class_names(), names(&["cat", "zebra"]));

    // A classes.txt fixes the list (and its order) for every split.
    std::fs::write(
        root.join("classes.txt"),
        "\u{feff}zebra\r\ndog\r\ncat\r\nbird\r\n",
    )
    .unwrap();
    let sets =
        DetectionDataset::open_voc(root, &["train", "val"], &OpenOptions::default()).unwrap();
    assert_eq!(
        sets[0].class_names(),
        names(&["zebra", "dog", "cat", "bird"])
    );
    assert_eq!(sets[0].get(0).labels, vec![1, 3]);
    assert_eq!(sets[1].get(0).labels, vec![2, 1]);

    // A class outside classes.txt is refused naming the class, the XML and the id.
    std::fs::write(root.join("classes.txt"), "zebra\ncat\n").unwrap();
    let e =
        DetectionDataset::open_voc(root, &["train", "val"], &OpenOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, DatasetError::UnknownClass { class, .. } if class == "dog"),
        "{msg}"
    );
    assert!(msg.contains("v1.xml") && msg.contains("id v1"), "{msg}");
}

#[test]
fn voc_names_all_from_the_voc_list_keep_the_20_voc_classes_in_every_split() {
    let dir = tempfile::tempdir().unwrap();
    voc_root(
        dir.path(),
        &[
            ("train", vec![("a", vec![("person", [1, 1, 9, 9])])]),
            ("val", vec![("b", vec![("tvmonitor", [1, 1, 9, 9])])]),
        ],
    );
    let sets =
        DetectionDataset::open_voc(dir.path(), &["train", "val"], &OpenOptions::default()).unwrap();
    for ds in &sets {
        assert_eq!(ds.class_names().len(), 20);
    }
    assert_eq!(sets[0].get(0).labels, vec![15]);
    assert_eq!(sets[1].get(0).labels, vec![20]);
}

#[test]
fn an_explicit_class_list_relabels_by_name_and_refuses_unknown_classes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("names.txt"), "dog\ncat\nzebra\n").unwrap();
    std::fs::write(
        d.join("list.txt"),
        "a.jpg 0 0 5 5 1 1 1 6 6 2\nb.jpg\nc.jpg 0 0 4 4 2\n",
    )
    .unwrap();
    for n in ["a.jpg", "b.jpg", "c.jpg"] {
        std::fs::write(d.join(n), b"").unwrap();
    }
    let model = names(&["cat", "dog"]);
    let opts = OpenOptions {
        classes: Some(model.clone()),
        ..Default::default()
    };
    let ds =
        DetectionDataset::open_list(&d.join("list.txt"), &d.join("names.txt"), d, &opts).unwrap();
    assert_eq!(ds.class_names(), model);
    assert_eq!(
        ds.get(0).labels,
        vec![2, 1],
        "dog is the model's 2, cat its 1"
    );
    assert_eq!(ds.get(2).labels, vec![1]);

    // A zebra on line 4 is a class the model does not know: named with its line.
    std::fs::write(
        d.join("list.txt"),
        "a.jpg 0 0 5 5 1\nb.jpg\n\nc.jpg 0 0 4 4 2 1 1 3 3 3\n",
    )
    .unwrap();
    let e = DetectionDataset::open_list(&d.join("list.txt"), &d.join("names.txt"), d, &opts)
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, DatasetError::UnknownClass { class, location, .. }
            if class == "zebra" && location.ends_with("list.txt:4")),
        "{msg}"
    );
    assert!(msg.contains("\"cat\", \"dog\""), "{msg}");

    // The same on a VOC root.
    let voc = d.join("voc");
    voc_root(
        &voc,
        &[(
            "val",
            vec![("x", vec![("cat", [1, 1, 5, 5]), ("horse", [1, 1, 5, 5])])],
        )],
    );
    let e = DetectionDataset::open_voc(&voc, &["val"], &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("horse") && msg.contains("x.xml") && msg.contains("id x"),
        "{msg}"
    );
}

fn coco_json(path: &Path, cats: &[(u64, &str)], anns: &[(u64, u64, [f64; 4])]) {
    let images: Vec<String> = (1..=3)
        .map(|i| format!("{{\"id\": {i}, \"file_name\": \"{i}.jpg\"}}"))
        .collect();
    let anns: Vec<String> = anns
        .iter()
        .enumerate()
        .map(|(k, (img, cat, b))| {
            format!(
                "{{\"id\": {}, \"image_id\": {img}, \"category_id\": {cat}, \"bbox\": [{}, {}, {}, {}]}}",
                100 + k,
                b[0],
                b[1],
                b[2],
                b[3]
            )
        })
        .collect();
    let cats: Vec<String> = cats
        .iter()
        .map(|(id, n)| format!("{{\"id\": {id}, \"name\": \"{n}\"}}"))
        .collect();
    std::fs::write(
        path,
        format!(
            "{{\"images\": [{}], \"annotations\": [{}], \"categories\": [{}]}}",
            images.join(","),
            anns.join(","),
            cats.join(",")
        ),
    )
    .unwrap();
    let dir = path.parent().unwrap();
    for i in 1..=3 {
        std::fs::write(dir.join(format!("{i}.jpg")), b"").unwrap();
    }
}

#[test]
fn coco_files_share_categories_mapped_once_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let (tr, va) = (dir.path().join("train"), dir.path().join("val"));
    std::fs::create_dir_all(&tr).unwrap();
    std::fs::create_dir_all(&va).unwrap();
    let (tj, vj) = (tr.join("i.json"), va.join("i.json"));
    coco_json(
        &tj,
        &[(3, "zebra"), (1, "person")],
        &[(1, 3, [0.0, 0.0, 5.0, 5.0])],
    );
    coco_json(
        &vj,
        &[(5, "horse"), (1, "person")],
        &[(2, 5, [1.0, 1.0, 4.0, 4.0]), (3, 1, [0.0, 0.0, 2.0, 2.0])],
    );
    let sets =
        DetectionDataset::open_coco(&[(&tj, &tr), (&vj, &va)], &OpenOptions::default()).unwrap();
    let want = names(&["person", "zebra", "horse"]);
    assert_eq!(sets[0].class_names(), want);
    assert_eq!(sets[1].class_names(), want);
    assert_eq!(sets[0].get(0).labels, vec![2]);
    assert_eq!(
        sets[1].get(1).labels,
        vec![3],
        "horse (id 5) is label 3 everywhere"
    );
    assert_eq!(sets[1].get(2).labels, vec![1]);
    // Read alone, the val file would have called the horse 2.
    assert_eq!(
        DetectionDataset::from_coco(&vj, &va).unwrap().get(1).labels,
        vec![2]
    );

    // One id, two names: refused naming both files.
    coco_json(&vj, &[(3, "horse")], &[]);
    let e = DetectionDataset::open_coco(&[(&tj, &tr), (&vj, &va)], &OpenOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("category id 3") && e.contains("val/i.json") && e.contains("train/i.json"),
        "{e}"
    );

    // With the model's classes: a category it does not know is named with file, image and
    // annotation.
    coco_json(
        &vj,
        &[(5, "horse"), (1, "person")],
        &[(2, 5, [1.0, 1.0, 4.0, 4.0])],
    );
    let opts = OpenOptions {
        classes: Some(names(&["zebra", "person"])),
        ..Default::default()
    };
    let e = DetectionDataset::open_coco(&[(&vj, &va)], &opts).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, DatasetError::UnknownClass { class, .. } if class == "horse"),
        "{msg}"
    );
    assert!(
        msg.contains("val/i.json")
            && msg.contains("image id 2")
            && msg.contains("annotation id 100"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Class 2: truncated images, VOC image lookup.

/// Cut points spread over the whole file, plus the last few bytes.
fn cut_points(len: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (1..48).map(|k| len * k / 48).collect();
    v.extend([len - 3, len - 2, len - 1]);
    v.sort();
    v.dedup();
    v
}

#[test]
fn every_truncated_jpeg_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases = 0;
    for (w, h, seed) in [(97, 61, 1), (320, 240, 7), (16, 16, 3), (640, 17, 11)] {
        let full = encode(&common::gradient_image(w, h, seed), ImageFormat::Jpeg);
        let p = dir.path().join(format!("photo-{w}x{h}.jpg"));
        std::fs::write(&p, &full).unwrap();
        assert_eq!(load_rgb(&p).unwrap().dimensions(), (w, h));
        for cut in cut_points(full.len()) {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = load_rgb(&p).unwrap_err();
            assert!(
                matches!(&e, DatasetError::Image { path, .. } if path == &p),
                "{w}x{h} cut at {cut}/{}: {e}",
                full.len()
            );
            assert!(e.to_string().contains(&*p.to_string_lossy()), "{e}");
            cases += 1;
        }
    }
    assert!(cases > 150);
}

/// A JPEG whose APP1 segment carries a complete thumbnail JPEG: the thumbnail's end marker must
/// not make a truncated main image pass.
#[test]
fn an_embedded_thumbnail_does_not_hide_a_truncated_jpeg() {
    let main = encode(&common::gradient_image(200, 150, 5), ImageFormat::Jpeg);
    let thumb = encode(&common::gradient_image(20, 15, 9), ImageFormat::Jpeg);
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend(&thumb);
    let mut file = main[..2].to_vec();
    file.extend([0xFF, 0xE1]);
    file.extend(((payload.len() + 2) as u16).to_be_bytes());
    file.extend(&payload);
    let body = file.len();
    file.extend(&main[2..]);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("exif.jpg");
    std::fs::write(&p, &file).unwrap();
    assert_eq!(load_rgb(&p).unwrap().dimensions(), (200, 150));
    for cut in cut_points(file.len()).into_iter().filter(|&c| c > body) {
        std::fs::write(&p, &file[..cut]).unwrap();
        let e = load_rgb(&p).unwrap_err().to_string();
        assert!(
            e.contains("exif.jpg") && e.contains("truncated JPEG"),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn truncated_png_gif_bmp_and_empty_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let img = common::gradient_image(73, 41, 2);
    for (format, ext) in [
        (ImageFormat::Png, "png"),
        (ImageFormat::Gif, "gif"),
        (ImageFormat::Bmp, "bmp"),
    ] {
        let full = encode(&img, format);
        let p = dir.path().join(format!("x.{ext}"));
        // Up to the image data's end (a PNG's IEND chunk or a GIF's trailer carry no pixels).
        for cut in cut_points(full.len())
            .into_iter()
            .filter(|&c| c + 16 < full.len())
        {
            std::fs::write(&p, &full[..cut]).unwrap();
            let e = load_rgb(&p).unwrap_err();
            assert!(
                matches!(&e, DatasetError::Image { path, .. } if path == &p),
                "{ext} {cut}: {e}"
            );
        }
    }
    let p = dir.path().join("empty.jpg");
    std::fs::write(&p, b"").unwrap();
    let e = load_rgb(&p).unwrap_err().to_string();
    assert!(e.contains("empty.jpg") && e.contains("empty"), "{e}");
}

#[test]
fn truncated_images_are_refused_by_the_loaders_and_inference_or_skipped_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut list = String::new();
    for i in 0..6 {
        let name = format!("im/{i}.jpg");
        let bytes = encode(&common::gradient_image(90, 70, i), ImageFormat::Jpeg);
        std::fs::create_dir_all(d.join("im")).unwrap();
        // Items 1 and 4 lose the second half of their data.
        let keep = if i == 1 || i == 4 {
            bytes.len() / 2
        } else {
            bytes.len()
        };
        std::fs::write(d.join(&name), &bytes[..keep]).unwrap();
        list.push_str(&format!("{name} 5 5 40 40 1\n"));
    }
    std::fs::write(d.join("list.txt"), list).unwrap();
    std::fs::write(d.join("names.txt"), "thing\n").unwrap();
    let ds = DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d).unwrap();
    let cfg = LoaderConfig {
        shuffle: false,
        ..LoaderConfig::new(3, 0)
    };
    let t = DetectionTransform::eval(33, 25.0);
    let strict = DetectionLoader::new(ds.clone(), t, cfg).unwrap();
    let e = strict.epoch(0).next().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("im/1.jpg") && e.contains("truncated JPEG"),
        "{e}"
    );

    let lenient = DetectionLoader::new(
        ds,
        t,
        LoaderConfig {
            skip_bad: true,
            ..cfg
        },
    )
    .unwrap();
    let got: Vec<Vec<usize>> = lenient.epoch(0).map(|b| b.unwrap().indices).collect();
    assert_eq!(got, vec![vec![0, 2], vec![3, 5]]);
    let skips = lenient.take_new_skips();
    assert_eq!(skips.len(), 2);
    assert_eq!(skips[0].path, d.join("im/1.jpg"));
    assert!(skips[1].reason.contains("im/4.jpg") && skips[1].reason.contains("truncated"));

    let e = load_image_for_inference(&d.join("im/4.jpg"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("im/4.jpg") && e.contains("truncated"), "{e}");

    // ImageFolder pretraining data goes through the same decoder.
    let folder = d.join("folder");
    for (c, i) in [("a", 0), ("a", 1), ("b", 4)] {
        std::fs::create_dir_all(folder.join(c)).unwrap();
        std::fs::copy(
            d.join(format!("im/{i}.jpg")),
            folder.join(c).join(format!("{i}.jpg")),
        )
        .unwrap();
    }
    let cds = ClassificationDataset::from_image_folder(&folder).unwrap();
    let cl = ClassificationLoader::new(
        cds,
        ClassificationTransform::eval(32),
        LoaderConfig {
            shuffle: false,
            ..LoaderConfig::new(3, 0)
        },
    )
    .unwrap();
    let e = cl.epoch(0).next().unwrap().unwrap_err().to_string();
    assert!(e.contains("1.jpg") && e.contains("truncated"), "{e}");
}

#[test]
fn voc_images_are_found_from_the_split_id_and_errors_name_the_xml_and_id() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    voc_root(
        root,
        &[(
            "val",
            vec![
                ("a", vec![("cat", [1, 1, 9, 9])]),
                ("b", vec![]),
                ("c", vec![]),
            ],
        )],
    );
    // a: a stale <filename>; b: a PNG under its id; c: only its <filename> exists.
    write_voc_xml(root, "a", "IMG_0001.JPG", &[("cat", [1, 1, 9, 9])]);
    let img = root.join("JPEGImages");
    std::fs::remove_file(img.join("b.jpg")).unwrap();
    std::fs::write(
        img.join("b.png"),
        encode(&common::gradient_image(8, 8, 0), ImageFormat::Png),
    )
    .unwrap();
    std::fs::rename(img.join("c.jpg"), img.join("renamed.jpg")).unwrap();
    write_voc_xml(root, "c", "renamed.jpg", &[]);
    let ds = DetectionDataset::from_voc(root, "val").unwrap();
    let found: Vec<&str> = ds.records().iter().map(|r| r.name.as_str()).collect();
    assert_eq!(found, ["a.jpg", "b.png", "renamed.jpg"]);

    // Nothing under the id nor the filename: the error names the XML, the id and what was tried.
    std::fs::remove_file(img.join("renamed.jpg")).unwrap();
    let e = DetectionDataset::from_voc(root, "val").unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DatasetError::MissingImage { .. }), "{msg}");
    assert!(
        msg.contains("c.xml") && msg.contains("id c") && msg.contains("renamed.jpg"),
        "{msg}"
    );

    // Every malformed annotation names its XML and id.
    let ann = root.join("Annotations");
    std::fs::write(img.join("renamed.jpg"), b"").unwrap();
    let cases: [(&str, &str); 6] = [
        ("<annotation><object>", "invalid XML"),
        (
            "<annotation><object><bndbox/></object></annotation>",
            "no <name>",
        ),
        (
            "<annotation><object><name>cat</name></object></annotation>",
            "no <bndbox>",
        ),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>x</xmax><ymax>4</ymax></bndbox></object></annotation>",
            "<xmax> \"x\" is not a number",
        ),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object></annotation>",
            "xmax 3 is below xmin 8",
        ),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>1</xmin><ymin>NaN</ymin><xmax>4</xmax><ymax>4</ymax></bndbox></object></annotation>",
            "<ymin> \"NaN\" is not a number",
        ),
    ];
    for (xml, want) in cases {
        std::fs::write(ann.join("c.xml"), xml).unwrap();
        let e = DetectionDataset::from_voc(root, "val")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.xml") && e.contains("id c") && e.contains(want),
            "{xml}: {e}"
        );
    }
    std::fs::remove_file(ann.join("c.xml")).unwrap();
    let e = DetectionDataset::from_voc(root, "val")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("c.xml") && e.contains("id c") && e.contains("val.txt"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Class 3: list files from real editors, bad boxes everywhere, missing images at open.

#[test]
fn bom_and_crlf_are_accepted_in_list_names_and_split_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines = [
        "a.jpg 1 2 30 40 2 5 6 7 8 1",
        "b.jpg",
        "",
        "c.jpg 0 0 9 9 3",
    ];
    let name_lines = ["cat", "dog", "", "bird"];
    for n in ["a.jpg", "b.jpg", "c.jpg"] {
        std::fs::write(d.join(n), b"").unwrap();
    }
    let mut reference = None;
    for bom in [false, true] {
        for eol in ["\n", "\r\n"] {
            for trailing in [false, true] {
                let text = |l: &[&str]| {
                    let mut s = if bom {
                        "\u{feff}".to_string()
                    } else {
                        String::new()
                    };
                    s.push_str(&l.join(eol));
                    if trailing {
                        s.push_str(eol);
                    }
                    s
                };
                std::fs::write(d.join("list.txt"), text(&lines)).unwrap();
                std::fs::write(d.join("names.txt"), text(&name_lines)).unwrap();
                let ds = DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d)
                    .unwrap_or_else(|e| panic!("bom {bom} eol {eol:?}: {e}"));
                assert_eq!(ds.get(0).name, "a.jpg");
                assert_eq!(ds.class_names(), names(&["cat", "dog", "bird"]));
                match &reference {
                    None => reference = Some(ds.records().to_vec()),
                    Some(r) => assert_eq!(ds.records(), &r[..], "bom {bom} eol {eol:?}"),
                }
            }
        }
    }
    // A VOC split file with a BOM and CRLF.
    let voc = d.join("voc");
    voc_root(
        &voc,
        &[(
            "val",
            vec![("a", vec![("cat", [1, 1, 9, 9])]), ("b", vec![])],
        )],
    );
    std::fs::write(voc.join("ImageSets/Main/val.txt"), "\u{feff}a\r\nb\r\n").unwrap();
    assert_eq!(DetectionDataset::from_voc(&voc, "val").unwrap().len(), 2);
    // A duplicated class name is refused with both lines.
    std::fs::write(d.join("names.txt"), "cat\ndog\ncat\n").unwrap();
    let e = DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d).unwrap_err();
    assert!(
        e.to_string().contains("names.txt:3") && e.to_string().contains("line 1"),
        "{e}"
    );
}

#[test]
fn inverted_and_non_finite_boxes_are_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("names.txt"), "a\nb\n").unwrap();
    let good = "10 20 30 40";
    let bad_boxes = [
        ("30 20 10 40", "ymax 10 is below ymin 30"),
        ("10 40 30 20", "xmax 20 is below xmin 40"),
        ("10.5 20 10.25 40", "ymax 10.25 is below ymin 10.5"),
        ("NaN 20 30 40", "not a number"),
        ("10 nan 30 40", "not a number"),
        ("10 20 inf 40", "not a number"),
        ("10 20 30 -inf", "not a number"),
        ("10 20 30 1e39", "not a number"),
    ];
    let mut cases = 0;
    for (bad, want) in bad_boxes {
        for line in 1..=4usize {
            for box_pos in 0..2 {
                let mut text = String::new();
                for l in 1..=4 {
                    let b = if l == line { bad } else { good };
                    let (b0, b1) = if box_pos == 0 { (b, good) } else { (good, b) };
                    text.push_str(&format!("img{l}.jpg {b0} 1 {b1} 2\n"));
                }
                std::fs::write(d.join("list.txt"), &text).unwrap();
                let e = DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d)
                    .unwrap_err();
                assert!(
                    matches!(&e, DatasetError::Parse { line: l, .. } if *l == line),
                    "{bad} on line {line}: {e}"
                );
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("list.txt:{line}")) && msg.contains(want),
                    "{msg}"
                );
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 64);

    // From records (any other reader): refused naming the record.
    let rec = retinanet_dataset::DetectionRecord {
        name: "x.jpg".into(),
        boxes: vec![[5.0, 5.0, 4.0, 9.0]],
        labels: vec![1],
    };
    let e = DetectionDataset::from_records(vec![rec], names(&["a"]), d)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.jpg") && e.contains("ymax 4 is below ymin 5"),
        "{e}"
    );

    // COCO: negative sizes are refused naming the annotation; sizes below a pixel are
    // zero-size boxes, never inverted ones.
    let json = d.join("i.json");
    for (bbox, ok) in [
        ([1.0, 1.0, -2.0, 3.0], false),
        ([1.0, 1.0, 2.0, -0.5], false),
        ([1.0, 1.0, 0.5, 0.0], true),
    ] {
        coco_json(&json, &[(1, "a")], &[(1, 1, bbox)]);
        match DetectionDataset::from_coco(&json, d) {
            Ok(ds) => {
                assert!(ok, "{bbox:?}");
                assert_eq!(ds.get(0).boxes, vec![[1.0, 1.0, 1.0, 1.0]]);
            }
            Err(e) => {
                assert!(!ok, "{bbox:?}: {e}");
                let e = e.to_string();
                assert!(
                    e.contains("i.json") && e.contains("annotation id 100"),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn missing_images_are_found_at_open_by_list_line_or_skipped_and_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("names.txt"), "a\n").unwrap();
    let mut list = String::new();
    for i in 0..8 {
        list.push_str(&format!("im/{i}.jpg 1 1 30 30 1\n"));
        if i != 3 && i != 6 {
            common::save_jpeg(
                &common::gradient_image(40, 40, i),
                &d.join(format!("im/{i}.jpg")),
            );
        }
    }
    std::fs::write(d.join("list.txt"), list).unwrap();
    let e = DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, DatasetError::MissingImage { missing: 2, total: 8, location, .. }
            if location.ends_with("list.txt:4")),
        "{msg}"
    );
    assert!(
        msg.contains("im/3.jpg") && msg.contains("does not exist") && msg.contains("2 of the 8"),
        "{msg}"
    );

    // A folder where an image should be.
    std::fs::create_dir_all(d.join("im/3.jpg")).unwrap();
    let e = DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d).unwrap_err();
    assert!(e.to_string().contains("im/3.jpg is not a file"), "{e}");
    std::fs::remove_dir(d.join("im/3.jpg")).unwrap();

    let opts = OpenOptions {
        skip_missing: true,
        ..Default::default()
    };
    let ds =
        DetectionDataset::open_list(&d.join("list.txt"), &d.join("names.txt"), d, &opts).unwrap();
    assert_eq!(ds.len(), 6);
    assert_eq!(ds.dropped().len(), 2);
    assert!(
        ds.dropped()[1].reason.contains("list.txt:7"),
        "{:?}",
        ds.dropped()
    );
    assert_eq!(ds.origin(3), format!("{}:5", d.join("list.txt").display()));
    // The loader reports them as skipped, once, before any batch.
    let loader = DetectionLoader::new(
        ds,
        DetectionTransform::eval(33, 25.0),
        LoaderConfig {
            skip_bad: true,
            shuffle: false,
            ..LoaderConfig::new(4, 0)
        },
    )
    .unwrap();
    let first = loader.take_new_skips();
    assert_eq!(
        first.iter().map(|s| s.path.clone()).collect::<Vec<_>>(),
        [d.join("im/3.jpg"), d.join("im/6.jpg")]
    );
    let n: usize = loader
        .epoch(0)
        .chain(loader.epoch(1))
        .map(|b| b.unwrap().indices.len())
        .sum();
    assert_eq!(n, 12);
    assert!(loader.take_new_skips().is_empty());
    assert_eq!(loader.skipped_files(), 2);

    // Every image missing, even with skipping: an error, not an empty dataset.
    let e = DetectionDataset::open_list(
        &d.join("list.txt"),
        &d.join("names.txt"),
        d.join("nowhere"),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no image is left") && e.contains("8 of the 8"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Classes 5 and 6: nothing readable ends with an error; each skip is named once.

/// Runs `f` on a thread and fails (instead of hanging) when it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("the loader did not finish: it hangs")
}

fn unreadable_dataset(d: &Path, n: usize, readable: &[usize]) -> DetectionDataset {
    let mut list = String::new();
    for i in 0..n {
        let p: PathBuf = d.join(format!("{i}.jpg"));
        if readable.contains(&i) {
            common::save_jpeg(&common::gradient_image(40, 40, i as u32), &p);
        } else {
            std::fs::write(&p, format!("not an image {i}")).unwrap();
        }
        list.push_str(&format!("{i}.jpg 1 1 20 20 1\n"));
    }
    std::fs::write(d.join("list.txt"), list).unwrap();
    std::fs::write(d.join("names.txt"), "a\n").unwrap();
    DetectionDataset::from_list(&d.join("list.txt"), &d.join("names.txt"), d).unwrap()
}

#[test]
fn an_epoch_with_nothing_readable_is_an_error_not_an_endless_loop() {
    for (n, batch, drop_last) in [(5, 2, false), (7, 3, true), (1, 1, false), (12, 4, true)] {
        let dir = tempfile::tempdir().unwrap();
        let ds = unreadable_dataset(dir.path(), n, &[]);
        let cfg = LoaderConfig {
            skip_bad: true,
            drop_last,
            ..LoaderConfig::new(batch, 3)
        };
        let loader = DetectionLoader::new(ds, DetectionTransform::train(33, 25.0), cfg).unwrap();
        // The endless stream (training) and one epoch (evaluation) both end with an error.
        let (first, epoch) = within(60, move || {
            let first = loader
                .from_position(0, 0)
                .next()
                .map(|r| r.map(|_| ()).map_err(|e| e.to_string()));
            let epoch: Vec<_> = loader
                .epoch(0)
                .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
                .collect();
            (first, epoch)
        });
        assert_eq!(epoch.len(), 1);
        for msg in [first.unwrap().unwrap_err(), epoch[0].clone().unwrap_err()] {
            assert!(msg.contains("no item of epoch 0 could be read"), "{msg}");
            let tried = if drop_last { n / batch * batch } else { n };
            assert!(
                msg.contains(&format!("all {tried} items"))
                    && msg.contains(&format!("({tried} files; the first: cannot decode image")),
                "{msg}"
            );
        }
    }
}

#[test]
fn a_resumed_epoch_without_a_readable_item_is_not_an_error_but_the_next_full_one_is() {
    let dir = tempfile::tempdir().unwrap();
    // Only item 0 is readable: without shuffling it is in batch 0 only.
    let ds = unreadable_dataset(dir.path(), 6, &[0]);
    let cfg = LoaderConfig {
        skip_bad: true,
        shuffle: false,
        ..LoaderConfig::new(2, 0)
    };
    let loader = DetectionLoader::new(ds, DetectionTransform::train(33, 25.0), cfg).unwrap();
    let got: Vec<(usize, usize)> = within(60, move || {
        loader
            .from_position(0, 1)
            .take(3)
            .map(|b| {
                let b = b.unwrap();
                (b.epoch, b.batch)
            })
            .collect()
    });
    assert_eq!(got, vec![(1, 0), (2, 0), (3, 0)]);

    // The rest of one epoch only: a training loop that resumes mid-epoch cannot run into the
    // next epoch's batches when some of this one's are skipped entirely.
    let dir2 = tempfile::tempdir().unwrap();
    let ds = unreadable_dataset(dir2.path(), 6, &[0, 4]);
    let loader = DetectionLoader::new(ds, DetectionTransform::train(33, 25.0), cfg).unwrap();
    let rest: Vec<(usize, usize)> = loader
        .epoch_from(0, 1)
        .map(|b| b.map(|b| (b.epoch, b.batch)).unwrap())
        .collect();
    assert_eq!(rest, vec![(0, 2)], "batch 1 (items 2, 3) is skipped whole");

    let dir = tempfile::tempdir().unwrap();
    let ds = unreadable_dataset(dir.path(), 6, &[]);
    let loader = DetectionLoader::new(ds, DetectionTransform::train(33, 25.0), cfg).unwrap();
    let e = within(60, move || {
        loader.from_position(0, 2).next().unwrap().map(|_| ())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no item of epoch 1 could be read"), "{e}");
}

#[test]
fn each_skipped_file_is_named_once_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ds = unreadable_dataset(d, 9, &[0, 1, 3, 4, 6, 8]);
    let cfg = LoaderConfig {
        skip_bad: true,
        ..LoaderConfig::new(4, 1)
    };
    let loader = DetectionLoader::new(ds, DetectionTransform::train(33, 25.0), cfg).unwrap();
    assert!(loader.take_new_skips().is_empty());
    let mut named: Vec<PathBuf> = Vec::new();
    for epoch in 0..3 {
        for b in loader.epoch(epoch) {
            b.unwrap();
            named.extend(loader.take_new_skips().into_iter().map(|s| s.path));
        }
    }
    named.sort();
    assert_eq!(named, [d.join("2.jpg"), d.join("5.jpg"), d.join("7.jpg")]);
    assert_eq!(loader.skipped_files(), 3);
    assert_eq!(
        loader.skipped_count(),
        9,
        "three files in each of three epochs"
    );
    let summary = loader.skip_summary().unwrap();
    assert!(
        summary.starts_with("3 unreadable file(s) skipped (9 skips in all):"),
        "{summary}"
    );
    for f in ["2.jpg", "5.jpg", "7.jpg"] {
        assert_eq!(
            summary.matches(&*d.join(f).to_string_lossy()).count(),
            1,
            "{summary}"
        );
    }
}

#[test]
fn pretraining_data_with_nothing_readable_is_an_error_too() {
    let dir = tempfile::tempdir().unwrap();
    for c in ["a", "b"] {
        std::fs::create_dir_all(dir.path().join(c)).unwrap();
        for i in 0..3 {
            std::fs::write(
                dir.path().join(c).join(format!("{i}.png")),
                b"\x89PNG broken",
            )
            .unwrap();
        }
    }
    let ds = ClassificationDataset::from_image_folder(dir.path()).unwrap();
    let loader = ClassificationLoader::new(
        ds,
        ClassificationTransform::eval(16),
        LoaderConfig {
            skip_bad: true,
            ..LoaderConfig::new(4, 0)
        },
    )
    .unwrap();
    let e = within(60, move || {
        let e = loader
            .from_position(0, 0)
            .next()
            .unwrap()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        (e, loader.skipped_files())
    });
    assert!(
        e.0.contains("no item of epoch 0 could be read: all 6 items"),
        "{}",
        e.0
    );
    assert_eq!(e.1, 6);
}
