//! What the machine needs for a lab, and how tests that need one decide to run or skip.

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

/// For tests that need a port-mapping router: [`lab_test_can_run`], plus miniupnpd.
pub fn portmap_test_can_run(test: &str) -> bool {
    if !lab_test_can_run(test) {
        return false;
    }
    if Path::new(crate::portmap::MINIUPNPD).is_file() {
        return true;
    }
    let why = "miniupnpd is not installed (apt-get install miniupnpd-nftables miniupnpd)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: CI=true but {why}");
    }
    eprintln!("skipping {test}: {why}");
    false
}

/// For tests that need a lab: `true` if they can run. The first call also sweeps away labs
/// that crashed earlier runs left behind. Without a usable environment this prints
/// why and returns `false` (the test then skips), except under `CI=true`, where it panics:
/// CI must run every lab test.
pub fn lab_test_can_run(test: &str) -> bool {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    match check() {
        Ok(()) => {
            SWEEP.call_once(|| {
                let removed = crate::lab::sweep();
                if !removed.is_empty() {
                    eprintln!("removed stale lab leftovers: {}", removed.join(", "));
                }
            });
            true
        }
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{test}: CI=true but the lab cannot run: {why}")
        }
        Err(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}
