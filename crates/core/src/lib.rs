//! UltraRefiner: TransUNet coarse segmentation refined by a differentiable SAM/MedSAM prompt path (SPEC §2).
//!
//! Every behaviour lives here so tests can call it; the binaries only parse flags.

pub mod augment;
pub mod bench;
pub mod config;
pub mod convert;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod hub;
pub mod models;
pub mod nn;
pub mod refiner;
pub mod rng;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
