//! The systemd units in `dist/systemd` as `systemd-analyze verify` sees
//! them, with their `/usr/bin/` binaries pointed at this build: no error,
//! no warning (a misspelt key or value is only a warning there).

use netredir_benches::testbed::bin;
use std::path::Path;
use std::process::Command;

fn verify(unit: &str, user: bool) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist/systemd")
        .join(unit);
    let text = std::fs::read_to_string(&src).unwrap();
    let bins = bin("netredird").unwrap();
    let bins = bins.parent().unwrap();
    assert!(
        text.contains("/usr/bin/"),
        "{unit} runs a binary from /usr/bin"
    );
    let text = text.replace("/usr/bin/", &format!("{}/", bins.display()));
    let dir = std::env::temp_dir().join(format!("netredir-units-{}-{unit}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(unit), text).unwrap();
    let runtime = dir.join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    let mut cmd = Command::new("systemd-analyze");
    if user {
        // The user manager wants a runtime directory of its own.
        cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
    }
    let out = cmd
        .args(["verify", "--man=no"])
        .arg(dir.join(unit))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "{unit}:\n{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_host_unit_verifies_clean() {
    verify("netredird.service", false);
}

#[test]
fn the_agent_user_unit_verifies_clean() {
    verify("netredir-agent.service", true);
}
