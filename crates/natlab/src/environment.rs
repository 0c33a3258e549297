//! What the machine needs for a lab, and what tests that need one (or another part of the
//! machine: miniupnpd, coturn, Chromium, PostgreSQL) call first.
//!
//! Such tests are `#[ignore = "needs …: ./test runs it"]`: a plain `cargo test` counts them as
//! ignored in its own summary, never as passed, and `./test` runs them with
//! `--include-ignored` (as root, after installing what they need). A test that runs without
//! its part fails naming it.

use std::path::Path;

/// Programs the lab calls, with the Debian package that provides each.
pub const PROGRAMS: [(&str, &str); 5] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("sysctl", "procps"),
];

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| Path::new(&dir).join(program).is_file())
}

/// Checks that this process can build labs: root (CAP_NET_ADMIN) and the lab's programs.
pub fn check() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the NAT lab needs root (network namespaces and nftables need CAP_NET_ADMIN): run it with sudo".into());
    }
    let missing: Vec<&str> = PROGRAMS
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the NAT lab needs these Debian packages: {} (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        ));
    }
    Ok(())
}

/// Under `CI=true` every part must be there; say which is missing.
fn missing(test: &str, why: &str) -> ! {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    panic!(
        "{test}: {why}{}",
        if ci {
            " (CI=true runs every test)"
        } else {
            " (this test is #[ignore]d by default because it needs it; run ./test as root, \
             which installs what is missing)"
        }
    )
}

/// For tests that need a lab; they carry
/// `#[ignore = "needs root and the NAT lab (…): ./test runs it"]`, so a plain `cargo test`
/// lists them as ignored, and `./test` runs them with `--include-ignored`. Once asked to run,
/// a test without a usable environment fails with the reason: a skip is never a pass. The
/// first call also sweeps away labs that crashed earlier runs left behind.
pub fn require_lab(test: &str) {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    if let Err(why) = check() {
        missing(test, &why);
    }
    SWEEP.call_once(|| {
        let removed = crate::lab::sweep();
        if !removed.is_empty() {
            eprintln!("removed stale lab leftovers: {}", removed.join(", "));
        }
    });
}

/// For tests that need a port-mapping router: [`require_lab`], plus miniupnpd.
pub fn require_portmap(test: &str) {
    require_lab(test);
    if !Path::new(crate::portmap::MINIUPNPD).is_file() {
        missing(
            test,
            "miniupnpd is not installed (apt-get install miniupnpd-nftables miniupnpd)",
        );
    }
}

/// For tests that need `program` (from the Debian package `package`) on the PATH.
pub fn require_program(test: &str, program: &str, package: &str) {
    if !on_path(program) {
        missing(
            test,
            &format!("{program} is not installed (apt-get install {package})"),
        );
    }
}
