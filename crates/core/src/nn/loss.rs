//! Numerically stable binary cross-entropy with logits (SPEC §9, §16.1).
//!
//! candle's `binary_cross_entropy_with_logit` goes through `log(σ(z))` and is NaN for |z| ≳ 17. The stable form
//! `max(z,0) − z·y + log(1 + e^{−|z|})` never exponentiates a positive number, so value and gradient stay finite for
//! any finite logit. At z = 0 candle's sub-gradients (relu' = 1, sign = +1) give the exact derivative σ(0) − y.
use crate::Result;
use candle_core::Tensor;

/// Element-wise BCE-with-logits (no reduction; take the mean yourself). `targets` must have the shape of `logits`.
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let pos = logits.relu()?;
    let zy = (logits * targets)?;
    let soft = (logits.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok(((pos - zy)? + soft)?)
}
