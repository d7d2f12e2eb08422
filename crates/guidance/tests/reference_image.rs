//! The Pick-and-Draw reference image is decoded and resized as PIL does: on every DreamBench image
//! (all square), `load_reference_image(path, 224, 224)` equals PIL's
//! `Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC)`, whose SHA-256 the metrics
//! crate's fixture records as the CLIP crop (shortest side 224 of a square image, crop a no-op).

use guidance::inversion::load_reference_image;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[test]
#[cfg_attr(
    no_dreambench,
    ignore = "needs DreamBench: set PND_DREAMBENCH or run `pnd dataset fetch`"
)]
fn dreambench_references_equal_pil_bicubic() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dreambench = testdata::dreambench();
    let fixture = manifest.join("../metrics/tests/fixtures/preprocess.json");
    let hashes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture).unwrap()).unwrap();
    let mut n = 0;
    for (rel, h) in hashes.as_object().unwrap() {
        assert_eq!(h["width"], h["height"], "{rel} is not square");
        let img = load_reference_image(&dreambench.join(rel), 224, 224).unwrap();
        let got = format!("{:x}", Sha256::digest(img.as_raw()));
        assert_eq!(got, h["clip_crop"].as_str().unwrap(), "{rel}");
        n += 1;
    }
    assert_eq!(n, 158);
}
