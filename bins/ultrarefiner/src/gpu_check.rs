//! `ultrarefiner gpu-check`: CPU/GPU agreement of every model forward and backward at `narrow` (SPEC §17.1, §17.3).
use anyhow::{bail, Result};
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::devcheck::{self, DevCheckOptions};
use ultrarefiner::device::DeviceSpec;

#[derive(Parser)]
#[command(after_help = "Checks (run in this order; --only picks some):\n  \
transunet-eval, transunet-train, sam-encoder-f32, sam-encoder-bf16, sam-decoder, e2e-phase3, embedding-cache\n\n\
Each check builds the `narrow` models from the fixture weights twice, on --device and on --reference, feeds both the \
same fixture inputs and compares outputs (max|d|/max|ref| <= 1e-4; bf16 encoder vs f32 <= 2e-2; end-to-end refined \
logits <= 1e-3) and every parameter gradient (relative L2 <= 1e-3, cosine >= 0.9999; TransUNet gradients of the \
end-to-end loss <= 1e-2 as the fixture README recommends; a gradient that is zero in exact arithmetic, below 1e-4 of \
the model's largest, must stay below that on the device). TF32 is switched off.\n\
Exit status 1 when a check fails. scripts/gpu-check.sh runs this together with the training steps and benchmarks.\n\n\
Example: ultrarefiner gpu-check --device cuda:0 --fixtures ../shared/fixtures --out gpu-check-results")]
pub struct Args {
    /// Device under test: cuda, cuda:N (or cpu, which compares the CPU with itself).
    #[arg(long, default_value = "cuda:0")]
    device: DeviceSpec,
    /// Reference device.
    #[arg(long, default_value = "cpu")]
    reference: DeviceSpec,
    /// Fixture folder [default: $ULTRAREFINER_SHARED/fixtures, else ../shared/fixtures found from the build's
    /// source folder].
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Comma-separated subset of the checks.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Folder for devcheck.json (every measure) and devcheck.txt (one line per check).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let fixtures = match a.fixtures {
        Some(f) => f,
        None => ultrarefiner::testing::shared_dir()?.join("fixtures"),
    };
    let opts = DevCheckOptions {
        device: a.device.open()?,
        reference: a.reference.open()?,
        fixtures,
        only: if a.only.is_empty() {
            None
        } else {
            Some(a.only)
        },
    };
    let results = devcheck::run(&opts)?;
    let text = format!(
        "device {} vs reference {}\n{}",
        a.device,
        a.reference,
        devcheck::summary(&results)
    );
    print!("{text}");
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(
            dir.join("devcheck.json"),
            serde_json::to_string_pretty(&serde_json::json!({
                "device": a.device.to_string(),
                "reference": a.reference.to_string(),
                "checks": results,
            }))?,
        )?;
        std::fs::write(dir.join("devcheck.txt"), &text)?;
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("device checks failed: {}", failed.join(", "));
    }
    Ok(())
}
