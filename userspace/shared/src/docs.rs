//! Man pages and shell completions, written by the binaries themselves so
//! that they always match the flags: `scripts/package` runs each one as
//! `BINARY --generate-docs DIR` (checked before the normal argument
//! parsing, so a daemon's required flags do not get in the way).

use std::path::{Path, PathBuf};

/// The directory asked for, if the arguments are exactly
/// `--generate-docs DIR`.
pub fn requested() -> Option<PathBuf> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag, dir] if flag == "--generate-docs" => Some(PathBuf::from(dir)),
        _ => None,
    }
}

/// Writes `NAME.SECTION` (roff) and bash, zsh and fish completions for
/// `cmd` into `dir`.
pub fn generate(mut cmd: clap::Command, section: &'static str, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let name = cmd.get_name().to_owned();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section(section)
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.{section}")), page)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, &name, dir)?;
    }
    Ok(())
}

/// For a binary's `main`: if asked, writes the docs and exits.
pub fn generate_if_requested(cmd: clap::Command, section: &'static str) {
    let Some(dir) = requested() else { return };
    match generate(cmd, section, &dir) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("cannot write docs into {}: {e}", dir.display());
            std::process::exit(1);
        }
    }
}
