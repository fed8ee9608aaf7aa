//! See SPEC; filled in by its issue.
