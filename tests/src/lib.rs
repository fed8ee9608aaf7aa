//! Helpers shared by the integration tests: locating ../shared, the built binaries and temp dirs.
