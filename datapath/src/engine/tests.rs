//! Engine tests: crafted frames in, frames and events out.
