//! Weight registry and sources (SPEC §13.6).
