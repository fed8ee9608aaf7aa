//! `ultrarefiner fetch` machinery (SPEC §6.7, §13.6) on fabricated Hugging Face caches and local files only.
//! Nothing here touches the network: every fetch is `offline` or `--from-file`.
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use ultrarefiner::hub::{
    self, cache_dir_from_env, fetch, sha256_file, FetchOptions, HubCache, Manifest, WeightSource,
};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";

/// A tiny SAM-like safetensors file (original names, one f16 tensor, plus pixel_mean that must be dropped).
fn write_tiny_sam(path: &Path, scale: f32) {
    let dev = Device::Cpu;
    let mut m: HashMap<String, Tensor> = HashMap::new();
    let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap();
    m.insert(
        "image_encoder.patch_embed.proj.weight".into(),
        (w * scale as f64).unwrap(),
    );
    m.insert(
        "image_encoder.blocks.0.norm1.weight".into(),
        Tensor::new(&[1f32, 1.5], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap(),
    );
    m.insert(
        "prompt_encoder.no_mask_embed.weight".into(),
        Tensor::new(&[[0.5f32, -0.5]], &dev).unwrap(),
    );
    m.insert(
        "mask_decoder.iou_token.weight".into(),
        Tensor::new(&[[0.25f32, 0.75]], &dev).unwrap(),
    );
    m.insert(
        "pixel_mean".into(),
        Tensor::new(&[123.675f32, 116.28, 103.53], &dev).unwrap(),
    );
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    candle_core::safetensors::save(&m, path).unwrap();
}

/// Writes the HF cache layout for `lmz/candle-sam` by hand: blob, snapshot link, ref.
fn fabricate_snapshot(cache: &Path, reference: Option<&str>, commit: &str, scale: f32) -> PathBuf {
    let repo = cache.join("models--lmz--candle-sam");
    let tmp = repo.join("tmp.safetensors");
    write_tiny_sam(&tmp, scale);
    let sha = sha256_file(&tmp).unwrap();
    let blob = repo.join("blobs").join(&sha);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, &blob).unwrap();
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    let file = snap.join("sam_vit_b_01ec64.safetensors");
    #[cfg(unix)]
    std::os::unix::fs::symlink(Path::new("../../blobs").join(&sha), &file).unwrap();
    #[cfg(not(unix))]
    std::fs::copy(&blob, &file).unwrap();
    if let Some(r) = reference {
        let rp = repo.join("refs").join(r);
        std::fs::create_dir_all(rp.parent().unwrap()).unwrap();
        std::fs::write(rp, commit).unwrap();
    }
    file
}

fn offline_opts(alias: &str, cache: &Path, weights: &Path) -> FetchOptions {
    FetchOptions {
        cache_dir: Some(cache.to_path_buf()),
        offline: true,
        weights_dir: weights.to_path_buf(),
        progress: false,
        ..FetchOptions::new(alias)
    }
}

#[test]
fn hub_offline_cache_resolves_and_converts() {
    let td = tempfile::tempdir().unwrap();
    let cache = td.path().join("hub");
    let weights = td.path().join("weights");
    let snap_file = fabricate_snapshot(&cache, Some("main"), C1, 1.0);

    let rep = fetch(&offline_opts("sam-vit-b", &cache, &weights)).unwrap();
    assert_eq!(rep.output, weights.join("sam-vit-b.safetensors"));
    assert_eq!(rep.source_path, snap_file);
    assert!(
        !rep.sha_verified,
        "no known or recorded hash on a first download"
    );
    let r = &rep.record;
    assert_eq!(r.alias, "sam-vit-b");
    assert_eq!(r.repo, "lmz/candle-sam");
    assert_eq!(r.repo_type, "model");
    assert_eq!(r.revision.as_deref(), Some("main"));
    assert_eq!(r.commit.as_deref(), Some(C1));
    assert_eq!(r.file, "sam_vit_b_01ec64.safetensors");
    assert_eq!(r.source, "hub");
    assert_eq!(r.provenance, "sam");
    assert_eq!(r.tensor_count, 4);
    assert_eq!(r.sha256, sha256_file(&snap_file).unwrap());
    assert_eq!(r.sha256_converted, sha256_file(&rep.output).unwrap());
    assert_eq!(r.date.len(), 20);

    // Canonical file: SAM keys only, all f32, pixel_mean dropped, values copied through.
    let t = candle_core::safetensors::load(&rep.output, &Device::Cpu).unwrap();
    let mut keys: Vec<_> = t.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "image_encoder.blocks.0.norm1.weight",
            "image_encoder.patch_embed.proj.weight",
            "mask_decoder.iou_token.weight",
            "prompt_encoder.no_mask_embed.weight"
        ]
    );
    assert!(t.values().all(|x| x.dtype() == DType::F32));
    let n1: Vec<f32> = t["image_encoder.blocks.0.norm1.weight"].to_vec1().unwrap();
    assert_eq!(n1, vec![1.0, 1.5]);

    // Sidecar and manifest on disk.
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rep.sidecar).unwrap()).unwrap();
    assert_eq!(side["provenance"], "sam");
    assert_eq!(side["format"], "sam-safetensors");
    assert_eq!(side["tensor_count"], 4);
    let m = Manifest::load(&weights.join("manifest.json")).unwrap();
    assert_eq!(m.weights, vec![rep.record.clone()]);
    // No temporary files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&weights)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn hub_revision_refs_resolve() {
    let td = tempfile::tempdir().unwrap();
    let cache = td.path().join("hub");
    let f1 = fabricate_snapshot(&cache, Some("main"), C1, 1.0);
    let f2 = fabricate_snapshot(&cache, Some("refs/pr/1"), C2, 2.0);
    let entry = hub::lookup("sam-vit-b").unwrap();
    let locate = |rev: Option<&str>| {
        HubCache::for_alias(entry, rev, Some(&cache), true)
            .unwrap()
            .resolve()
            .unwrap()
    };
    let main = locate(None);
    assert_eq!(
        (main.path.as_path(), main.commit.as_deref()),
        (f1.as_path(), Some(C1))
    );
    let pr = locate(Some("refs/pr/1"));
    assert_eq!(
        (pr.path.as_path(), pr.commit.as_deref()),
        (f2.as_path(), Some(C2))
    );
    // A commit hash resolves directly through snapshots/ without a ref file.
    let direct = locate(Some(C2));
    assert_eq!(direct.path, f2);
    // Path-like revisions are refused before touching the cache.
    for bad in ["../../etc", "", "/abs", "refs//pr"] {
        let e = HubCache::for_alias(entry, Some(bad), Some(&cache), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("invalid --revision"), "{bad}: {e}");
    }
    // Spaces live under spaces--org--name.
    let medsam = HubCache::for_alias(
        hub::lookup("medsam-vit-b").unwrap(),
        None,
        Some(&cache),
        true,
    )
    .unwrap();
    assert_eq!(
        medsam.repo_dir(),
        cache.join("spaces--dennistrujillo--MedSAMTest")
    );

    let weights = td.path().join("weights");
    let rep = fetch(&FetchOptions {
        revision: Some("refs/pr/1".into()),
        ..offline_opts("sam-vit-b", &cache, &weights)
    })
    .unwrap();
    assert_eq!(rep.record.revision.as_deref(), Some("refs/pr/1"));
    assert_eq!(rep.record.commit.as_deref(), Some(C2));
    assert_eq!(rep.record.sha256, sha256_file(&f2).unwrap());
}

#[test]
fn hub_offline_missing_is_clear_error() {
    let td = tempfile::tempdir().unwrap();
    let cache = td.path().join("hub");
    let weights = td.path().join("weights");
    // Nothing cached at all.
    let e = fetch(&offline_opts("sam-vit-b", &cache, &weights))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("offline")
            && e.contains("no cached ref `refs/main`")
            && e.contains("--from-file"),
        "{e}"
    );
    // The ref exists but the snapshot lacks the file.
    let repo = cache.join("models--lmz--candle-sam");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(C1)).unwrap();
    std::fs::write(repo.join("refs/main"), C1).unwrap();
    let e = fetch(&offline_opts("sam-vit-b", &cache, &weights))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`sam_vit_b_01ec64.safetensors` is not in the cached snapshot"),
        "{e}"
    );
    assert!(e.contains("lmz/candle-sam"), "{e}");
    assert!(!weights.join("manifest.json").exists());
    // Unknown alias lists the known ones.
    let e = fetch(&offline_opts("sam-vit-z", &cache, &weights))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown weight alias `sam-vit-z`") && e.contains("medsam-vit-b"),
        "{e}"
    );
}

#[test]
fn hub_known_sha_mismatch_names_both_hashes() {
    let td = tempfile::tempdir().unwrap();
    let bogus = td.path().join("sam_vit_b_01ec64.pth");
    std::fs::write(&bogus, b"not the real checkpoint").unwrap();
    let got = sha256_file(&bogus).unwrap();
    let opts = FetchOptions {
        from_file: Some(bogus),
        weights_dir: td.path().join("weights"),
        ..FetchOptions::new("sam-vit-b-pth")
    };
    let e = fetch(&opts).unwrap_err().to_string();
    assert!(e.contains("SHA-256 mismatch"), "{e}");
    assert!(
        e.contains("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        "{e}"
    );
    assert!(e.contains(&got), "{e}");
    assert!(!td.path().join("weights/sam-vit-b-pth.safetensors").exists());
}

#[test]
fn hub_recorded_sha_mismatch_on_same_snapshot() {
    let td = tempfile::tempdir().unwrap();
    let cache = td.path().join("hub");
    let weights = td.path().join("weights");
    let file = fabricate_snapshot(&cache, Some("main"), C1, 1.0);
    let first = fetch(&offline_opts("sam-vit-b", &cache, &weights)).unwrap();
    // Same snapshot again: verified against the hash recorded at the first download.
    let again = fetch(&offline_opts("sam-vit-b", &cache, &weights)).unwrap();
    assert!(again.sha_verified);
    // The cached blob changes under the same commit: an error naming both hashes.
    let blob = std::fs::canonicalize(&file).unwrap();
    std::fs::remove_file(&blob).unwrap();
    write_tiny_sam(&blob, 3.0);
    let e = fetch(&offline_opts("sam-vit-b", &cache, &weights))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&first.record.sha256) && e.contains(&sha256_file(&blob).unwrap()),
        "{e}"
    );
}

#[test]
fn hub_manifest_record_replaced_not_duplicated() {
    let td = tempfile::tempdir().unwrap();
    let cache = td.path().join("hub");
    let weights = td.path().join("weights");
    std::fs::create_dir_all(&weights).unwrap();
    // A pre-existing record of another alias must survive untouched.
    let other = hub::ManifestRecord {
        alias: "r50-vit-b16".into(),
        repo: "timm/vit_base_r50_s16_224.orig_in21k".into(),
        repo_type: "model".into(),
        revision: Some("main".into()),
        commit: Some(C2.into()),
        file: "model.safetensors".into(),
        source: "hub".into(),
        format: "timm".into(),
        sha256: "ab".repeat(32),
        sha256_converted: "cd".repeat(32),
        output: "r50-vit-b16.safetensors".into(),
        tensor_count: 1,
        provenance: "vit".into(),
        date: "2026-01-01T00:00:00Z".into(),
    };
    let mut m = Manifest::default();
    m.upsert(other.clone());
    m.save(&Manifest::path(&weights)).unwrap();

    // First from a local file, then from the cache: one sam-vit-b record, the second one.
    let local = td.path().join("downloads/sam_vit_b.safetensors");
    write_tiny_sam(&local, 5.0);
    let a = fetch(&FetchOptions {
        from_file: Some(local.clone()),
        weights_dir: weights.clone(),
        ..FetchOptions::new("sam-vit-b")
    })
    .unwrap();
    assert_eq!(a.record.source, "file");
    fabricate_snapshot(&cache, Some("main"), C1, 1.0);
    let b = fetch(&offline_opts("sam-vit-b", &cache, &weights)).unwrap();
    let m = Manifest::load(&Manifest::path(&weights)).unwrap();
    assert_eq!(m.weights.len(), 2, "{m:?}");
    assert_eq!(m.weights[0], other);
    assert_eq!(m.weights[1], b.record);
    assert_eq!(m.weights[1].source, "hub");
    assert_ne!(a.record.sha256_converted, b.record.sha256_converted);
    // The manifest is plain JSON with the SPEC §13.6 field names.
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Manifest::path(&weights)).unwrap()).unwrap();
    for k in [
        "alias",
        "repo",
        "type",
        "revision",
        "file",
        "sha256",
        "sha256_converted",
        "provenance",
        "date",
    ] {
        assert!(raw["weights"][1].get(k).is_some(), "missing {k}");
    }
}

#[test]
fn hub_from_file_converts_local_file() {
    let td = tempfile::tempdir().unwrap();
    let local = td.path().join("my sam.safetensors");
    write_tiny_sam(&local, 1.0);
    let weights = td.path().join("w");
    let rep = fetch(&FetchOptions {
        from_file: Some(local.clone()),
        weights_dir: weights.clone(),
        // Ignored for local files: no cache is consulted.
        cache_dir: Some(td.path().join("nonexistent-cache")),
        ..FetchOptions::new("sam-vit-b")
    })
    .unwrap();
    assert_eq!(rep.source_path, local);
    assert_eq!(rep.record.source, "file");
    assert_eq!(rep.record.revision, None);
    assert_eq!(rep.record.commit, None);
    assert_eq!(
        PathBuf::from(&rep.record.file),
        std::fs::canonicalize(&local).unwrap()
    );
    assert_eq!(rep.record.sha256, sha256_file(&local).unwrap());
    assert!(weights.join("sam-vit-b.safetensors").is_file());
    assert!(weights.join("sam-vit-b.json").is_file());

    // --revision makes no sense with a local file.
    let e = fetch(&FetchOptions {
        from_file: Some(local.clone()),
        revision: Some("main".into()),
        weights_dir: weights.clone(),
        ..FetchOptions::new("sam-vit-b")
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("--from-file"), "{e}");
    // A missing local file names the path.
    let e = fetch(&FetchOptions {
        from_file: Some(td.path().join("absent.safetensors")),
        weights_dir: weights,
        ..FetchOptions::new("sam-vit-b")
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("absent.safetensors") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn hub_non_sam_file_rejected() {
    let td = tempfile::tempdir().unwrap();
    let f = td.path().join("hf.safetensors");
    let mut m = HashMap::new();
    m.insert(
        "vision_encoder.patch_embed.projection.weight".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    m.insert(
        "mask_decoder.iou_token.weight".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&m, &f).unwrap();
    let weights = td.path().join("weights");
    let e = fetch(&FetchOptions {
        from_file: Some(f),
        weights_dir: weights.clone(),
        ..FetchOptions::new("sam-vit-b")
    })
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("vision_encoder.patch_embed.projection.weight") && e.contains("sam-vit-b-hf"),
        "{e}"
    );
    assert!(!weights.join("sam-vit-b.safetensors").exists());
    assert!(!weights.join("manifest.json").exists());
}

#[test]
fn hub_alias_resolution_suggests_fetch() {
    let td = tempfile::tempdir().unwrap();
    let weights = td.path().join("weights");
    // An existing path is returned as is.
    let f = td.path().join("x.safetensors");
    std::fs::write(&f, b"x").unwrap();
    assert_eq!(
        hub::resolve_weights_arg(f.to_str().unwrap(), &weights).unwrap(),
        f
    );
    // A known alias without its converted file: error suggesting fetch.
    let e = hub::resolve_weights_arg("medsam-vit-b", &weights)
        .unwrap_err()
        .to_string();
    assert!(e.contains("ultrarefiner fetch medsam-vit-b"), "{e}");
    assert!(e.contains("medsam-vit-b.safetensors"), "{e}");
    // With the file present it resolves to weights/<alias>.safetensors.
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::write(weights.join("medsam-vit-b.safetensors"), b"x").unwrap();
    assert_eq!(
        hub::resolve_weights_arg("medsam-vit-b", &weights).unwrap(),
        weights.join("medsam-vit-b.safetensors")
    );
    // Neither a file nor an alias.
    let e = hub::resolve_weights_arg("no/such/file.safetensors", &weights)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("neither an existing file nor a weight alias") && e.contains("sam-vit-b"),
        "{e}"
    );
}

#[test]
fn hub_cache_dir_precedence() {
    let p = |a, b, c| cache_dir_from_env(a, b, c).unwrap();
    assert_eq!(
        p(Some("/c"), Some("/h"), Some("/home/u")),
        PathBuf::from("/c")
    );
    assert_eq!(
        p(None, Some("/h"), Some("/home/u")),
        PathBuf::from("/h/hub")
    );
    assert_eq!(
        p(Some(""), None, Some("/home/u")),
        PathBuf::from("/home/u/.cache/huggingface/hub")
    );
    assert!(cache_dir_from_env(None, None, None)
        .unwrap_err()
        .to_string()
        .contains("--cache-dir"));
}

#[test]
fn hub_registry_matches_spec_table() {
    let names: Vec<_> = hub::registry().iter().map(|w| w.alias).collect();
    assert_eq!(
        names,
        [
            "sam-vit-b",
            "sam-vit-b-pth",
            "sam-vit-b-hf",
            "medsam-vit-b",
            "medsam-vit-b-hf",
            "r50-vit-b16",
            "r50-vit-b16-npz"
        ]
    );
    let npz = hub::lookup("r50-vit-b16-npz").unwrap();
    assert_eq!((npz.revision, npz.file), ("refs/pr/1", "R50+ViT-B_16.npz"));
    for w in hub::registry() {
        if let Some(s) = w.sha256 {
            assert!(
                s.len() == 64
                    && s.bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
        }
    }
    let defaults: Vec<_> = hub::registry()
        .iter()
        .filter(|w| w.is_default)
        .map(|w| w.alias)
        .collect();
    assert_eq!(defaults, ["sam-vit-b", "medsam-vit-b", "r50-vit-b16"]);
}
