//! Explicit PyTorch-default initialisers (SPEC §5.4, §16.3: never rely on `VarBuilder`'s implicit zero default).
use candle_nn::Init;

/// `U(−1/√fan_in, 1/√fan_in)`: PyTorch's `kaiming_uniform_(a = √5)` for Conv/Linear weights (gain √(1/3) times
/// √(3/fan_in) collapses to this bound) and also its default bias initialiser. candle's `DEFAULT_KAIMING_UNIFORM`
/// uses the ReLU gain (bound √(6/fan_in)) and is therefore *not* the PyTorch default.
pub fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// Weight 1 for every normalisation layer.
pub const ONES: Init = Init::Const(1.0);
/// Bias 0 for normalisation layers and zero-initialised LoRA `B`.
pub const ZEROS: Init = Init::Const(0.0);
