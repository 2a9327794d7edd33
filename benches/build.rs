//! Every benchmark binary links with `memcpy` and `memmove` wrapped
//! (`benches/common/copies.rs`), so that a benchmark can count the bytes
//! its code path copies: the record path's "copies per byte".

fn main() {
    println!("cargo::rustc-link-arg-benches=-Wl,--wrap=memcpy,--wrap=memmove");
}
