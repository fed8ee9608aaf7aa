//! `ultrarefiner fetch`: download (or take) a pretrained file, verify, convert, record (SPEC §6.7, §13.6).
use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::hub::{self, FetchOptions};

fn after_help() -> String {
    let mut s = String::from("Aliases (repository, file):\n");
    for w in hub::registry() {
        s.push_str(&format!(
            "  {:<17} {}{}\n  {:<17}   {} `{}` {} (revision {}){}\n",
            w.alias,
            w.description,
            if w.is_default { " [default]" } else { "" },
            "",
            w.kind.as_str(),
            w.repo,
            w.file,
            w.revision,
            if w.sha256.is_some() {
                ", known SHA-256"
            } else {
                ""
            },
        ));
    }
    s.push_str(
        "\nWhat it does: finds the file in the Hugging Face cache (downloading it unless --offline), computes its \
SHA-256 and checks it against the known value (or the value recorded at the first download of the same snapshot), \
converts it to WEIGHTS_DIR/<alias>.safetensors with canonical names (+ a .json sidecar) and records \
{alias, repo, type, revision, file, sha256, sha256_converted, provenance, date} in WEIGHTS_DIR/manifest.json.\n\
Training flags (--sam-checkpoint, --vit-pretrained) accept an alias and read WEIGHTS_DIR/<alias>.safetensors; they never \
download.\n\
\n\
Environment: HF_HOME (cache at $HF_HOME/hub, default ~/.cache/huggingface/hub; token at $HF_HOME/token), \
HF_HUB_CACHE (the cache folder itself), HF_ENDPOINT (mirror URL), HF_HUB_OFFLINE=1 (same as --offline).\n\
\n\
Examples:\n  ultrarefiner fetch sam-vit-b\n  ultrarefiner fetch r50-vit-b16 --offline\n  \
ultrarefiner fetch medsam-vit-b --from-file ~/Downloads/medsam_vit_b.pth\n  \
ultrarefiner fetch r50-vit-b16-npz --from-file R50+ViT-B_16.npz   # Google-hosted original\n",
    );
    s
}

#[derive(Parser)]
#[command(after_help = after_help())]
pub struct Args {
    /// Weight alias (listed below).
    alias: String,
    /// Hub revision: branch, tag, `refs/pr/N` or commit hash (default: the alias's). A known SHA-256 is only
    /// checked at the alias's own revision.
    #[arg(long)]
    revision: Option<String>,
    /// Hugging Face hub cache folder (the one holding `models--…`; default $HF_HUB_CACHE, $HF_HOME/hub or
    /// ~/.cache/huggingface/hub).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Use only the local cache; never touch the network (also when HF_HUB_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Convert a file you downloaded yourself (e.g. the official MedSAM or Google npz) instead of using the hub.
    #[arg(long, value_name = "PATH")]
    from_file: Option<PathBuf>,
    /// Where the converted `<alias>.safetensors`, its sidecar and manifest.json go.
    #[arg(long, value_name = "DIR", default_value = hub::DEFAULT_WEIGHTS_DIR)]
    weights_dir: PathBuf,
    /// No download progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(a: Args) -> Result<()> {
    let opts = FetchOptions {
        alias: a.alias,
        revision: a.revision,
        cache_dir: a.cache_dir,
        offline: a.offline
            || std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        from_file: a.from_file,
        weights_dir: a.weights_dir,
        progress: !a.quiet,
    };
    let rep = hub::fetch(&opts)?;
    let r = &rep.record;
    let origin = match (&r.revision, &r.commit) {
        (Some(rev), Some(c)) => format!("{} `{}` {} at {rev} ({c})", r.repo_type, r.repo, r.file),
        (Some(rev), None) => format!("{} `{}` {} at {rev}", r.repo_type, r.repo, r.file),
        _ => format!("local file {}", r.file),
    };
    println!("{}: {origin}", r.alias);
    println!(
        "  source  {}  sha256 {}{}",
        rep.source_path.display(),
        r.sha256,
        if rep.sha_verified {
            " (verified)"
        } else {
            " (recorded)"
        }
    );
    println!(
        "  output  {}  sha256 {}  ({} tensors, provenance {})",
        rep.output.display(),
        r.sha256_converted,
        r.tensor_count,
        r.provenance
    );
    println!("  manifest {}", rep.manifest.display());
    Ok(())
}
