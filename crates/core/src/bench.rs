//! Benchmark workloads (SPEC §13.7).
