//! Builds the `steer` eBPF object (ebpf/steer) with the nightly toolchain
//! and bpf-linker, so a plain `cargo build` yields a daemon that embeds it.

use anyhow::{Context, bail};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_KERNEL").is_none() {
        return Ok(());
    }
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = here.join("../ebpf/steer");
    let root = root
        .canonicalize()
        .with_context(|| format!("eBPF crate not found at {}", root.display()))?;
    if which("bpf-linker").is_none() {
        bail!(
            "bpf-linker is not on PATH: run scripts/setup (it installs bpf-linker, nightly and rust-src)"
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        here.join("../ebpf/common").display()
    );
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netredir-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|c| c.is_file())
    })
}
