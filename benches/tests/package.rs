//! The Debian package as `scripts/package` builds it from this build's
//! binaries: it holds every path the README's install section lists, its
//! control fields are right, and what it installs runs.

use netredir_benches::testbed::bin;
use std::path::Path;
use std::process::Command;

/// The paths the README says the package installs.
fn readme_paths() -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .unwrap();
    let after = readme
        .split_once("The package installs:")
        .expect("the README's install section")
        .1;
    let block = after.split("```").nth(1).expect("a code block");
    block
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| l.starts_with('/'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_package_holds_what_the_readme_says_and_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bins = bin("netredird").unwrap();
    let bins = bins.parent().unwrap();
    let out = std::env::temp_dir().join(format!("netredir-package-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let built = Command::new(root.join("scripts/package"))
        .arg("--bin-dir")
        .arg(bins)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = String::from_utf8(built.stdout).unwrap().trim().to_owned();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "{deb}");

    let list = Command::new("dpkg-deb")
        .args(["-c", &deb])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let paths: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.'))
        .collect();
    let want = readme_paths();
    assert!(want.len() >= 10, "{want:?}");
    for p in &want {
        assert!(
            paths.contains(&p.as_str()),
            "{p} not in the package:\n{list}"
        );
    }
    assert!(
        list.lines()
            .next()
            .is_some_and(|l| l.starts_with("drwxr-xr-x root/root")),
        "{list}"
    );

    let field = |f: &str| {
        let o = Command::new("dpkg-deb")
            .args(["-f", &deb, f])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_owned()
    };
    assert_eq!(field("Package"), "netredir");
    assert_eq!(field("Version"), env!("CARGO_PKG_VERSION"));
    assert!(field("Depends").contains("libc6"));

    // Unpacked, the binaries run and the man pages are pages.
    let tree = out.join("tree");
    let x = Command::new("dpkg-deb")
        .args(["-x", &deb])
        .arg(&tree)
        .status()
        .unwrap();
    assert!(x.success());
    for b in ["netredird", "netredir-agent", "netredirctl"] {
        let o = Command::new(tree.join("usr/bin").join(b))
            .arg("--version")
            .output()
            .unwrap();
        assert!(
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(b),
            "{b} --version"
        );
    }
    let page = Command::new("gzip")
        .args(["-dc"])
        .arg(tree.join("usr/share/man/man8/netredird.8.gz"))
        .output()
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout);
    assert!(
        page.contains(".TH netredird 8") && page.contains("\\-\\-iface"),
        "{page}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}
