//! Relevance of the models `make setup` builds, on shoppers' photos of catalogue photos
//! (`bench-load relevance`): the int8 default may not rank worse than its fp32 source, and
//! the compact in-memory index must pick the same top products as exact f32 ranking.

mod common;

use common::*;
use serde_json::Value;

/// `bench-load relevance` on COUNT catalogue photos with these models; its JSON.
fn relevance(models: &[&str], count: usize) -> Value {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bench-load"));
    cmd.arg("relevance")
        .arg("--src")
        .arg(root().join(".tools/data/skimage"))
        .args(["--count", &count.to_string(), "--seed", "1"]);
    for m in models {
        cmd.arg("--model").arg(model(m));
    }
    let out = cmd.output().expect("bench-load runs");
    assert!(
        out.status.success(),
        "bench-load relevance failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

#[test]
fn int8_efficientnet_keeps_the_recall_of_fp32() {
    let r = relevance(&["efficientnet-lite0", "efficientnet-lite0-int8"], 500);
    let rows = r["models"].as_array().unwrap();
    let get = |i: usize, k: &str| rows[i][k].as_f64().unwrap();
    let (fp32, int8) = (get(0, "recall_at_1"), get(1, "recall_at_1"));
    // A broken decode or preprocessing ranks near chance (1 in 500).
    assert!(fp32 > 0.4, "fp32 recall@1 {fp32}");
    assert!(int8 >= fp32 - 0.01, "int8 recall@1 {int8} vs fp32 {fp32}");
    let (fp32_5, int8_5) = (get(0, "recall_at_5"), get(1, "recall_at_5"));
    assert!(
        int8_5 >= fp32_5 - 0.01,
        "int8 recall@5 {int8_5} vs fp32 {fp32_5}"
    );
    // Recall@5 counts the top 1 too.
    assert!(int8_5 >= int8 && fp32_5 >= fp32);
    // The service's compact index: a quarter of the f32 bytes, the exact top products.
    for row in rows {
        let c = &row["compact"];
        let model = &row["model"];
        for k in ["same_top5", "same_top10"] {
            let same = c[k].as_f64().unwrap();
            assert!(same >= 0.99, "{model}: compact {k} {same}");
        }
        let bytes = c["vector_bytes_vs_f32"].as_f64().unwrap();
        assert!(
            bytes <= 0.3,
            "{model}: compact vectors take {bytes}x their f32 bytes"
        );
    }
}
