//! UltraRefiner: TransUNet coarse segmentation refined by a differentiable SAM/MedSAM prompt path (SPEC §2).
//!
//! Every behaviour lives here so tests can call it; the binaries only parse flags.

// `!(x > 0.0)` is deliberate throughout: unlike `x <= 0.0` it also rejects NaN from user input.
#![allow(clippy::neg_cmp_op_on_partial_ord, clippy::nonminimal_bool)]
// Numeric kernels (EDT, resampling, phantom rendering) index several buffers with one loop variable.
#![allow(clippy::needless_range_loop, clippy::explicit_counter_loop)]
#![allow(clippy::type_complexity, clippy::large_enum_variant)]

pub mod augment;
pub mod bench;
pub mod config;
pub mod convert;
pub mod data;
pub mod devcheck;
pub mod device;
pub mod error;
pub mod eval;
pub mod hub;
pub mod malloc;
pub mod models;
pub mod nn;
pub mod refiner;
pub mod rng;
pub mod testing;
pub mod threads;
pub mod train;

pub use error::{Error, Result};
