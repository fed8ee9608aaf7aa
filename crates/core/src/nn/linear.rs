//! `Linear` with PyTorch's default initialisation (explicit `Init` hints, SPEC §5.4/§16.3).
use super::init::torch_uniform;
use crate::Result;
use candle_nn::{Linear, VarBuilder};

/// `Linear(in → out)`: keys `weight` `(out, in)` and optionally `bias` `(out)`, both `U(±1/√in)` (PyTorch's
/// kaiming-uniform(a=√5) weight and its bias default).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", torch_uniform(in_dim))?;
    let b = if bias {
        Some(vb.get_with_hints(out_dim, "bias", torch_uniform(in_dim))?)
    } else {
        None
    };
    Ok(Linear::new(w, b))
}
