//! What the machine needs for a lab: root and the programs the lab calls. The binary checks it
//! before building a lab; tests check it through `testkit::require`.

use std::path::Path;

/// Programs the lab calls, with the Debian package that provides each.
pub const PROGRAMS: [(&str, &str); 5] = [
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("iptables", "iptables"),
    ("conntrack", "conntrack"),
    ("sysctl", "procps"),
];

/// Whether `program` is on the PATH, or in `/usr/sbin` or `/sbin` (which a user's PATH often lacks).
pub fn on_path(program: &str) -> bool {
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
