//! Device
