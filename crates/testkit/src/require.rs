//! What tests that need a lab (or another part of the machine: miniupnpd, coturn, Chromium,
//! PostgreSQL) call first.
//!
//! Such tests are `#[ignore = "needs …: ./test runs it"]`: a plain `cargo test` counts them as
//! ignored in its own summary, never as passed, and `./test` runs them with
//! `--include-ignored` (as root, after installing what they need). A test that runs without
//! its part fails naming it.

use std::path::Path;

use natlab::environment;

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
pub fn lab(test: &str) {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    if let Err(why) = environment::check() {
        missing(test, &why);
    }
    SWEEP.call_once(|| {
        let removed = natlab::lab::sweep();
        if !removed.is_empty() {
            eprintln!("removed stale lab leftovers: {}", removed.join(", "));
        }
    });
}

/// For tests that need a port-mapping router: [`lab`], plus miniupnpd.
pub fn portmap(test: &str) {
    lab(test);
    if !Path::new(natlab::portmap::MINIUPNPD).is_file() {
        missing(
            test,
            "miniupnpd is not installed (apt-get install miniupnpd-nftables miniupnpd)",
        );
    }
}

/// For tests that need `program` (from the Debian package `package`) on the PATH.
pub fn program(test: &str, program: &str, package: &str) {
    if !environment::on_path(program) {
        missing(
            test,
            &format!("{program} is not installed (apt-get install {package})"),
        );
    }
}
