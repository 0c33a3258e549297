//! The `natpunch` binary as users run it. Tests that build labs need root; outside CI they skip
//! with a printed reason, under `CI=true` they must run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

#[path = "cli/daemon.rs"]
mod daemon;

fn natpunch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args(args)
        .output()
        .expect("natpunch runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

/// Namespaces of lab `lab`.
fn namespaces_of(lab: &str) -> Vec<String> {
    let prefix = format!("{}{lab}.", natlab::defaults::NETNS_PREFIX);
    natlab::netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

#[test]
fn help_and_version_describe_the_tool() {
    let help = natpunch(&["--help"]);
    assert!(help.status.success());
    assert!(stdout(&help).contains("lab"), "{}", stdout(&help));
    let lab_help = stdout(&natpunch(&["lab", "--help"]));
    for cmd in ["up", "exec", "down", "list", "selftest", "sweep"] {
        assert!(
            lab_help.contains(cmd),
            "`lab --help` lacks {cmd}: {lab_help}"
        );
    }
    assert!(!lab_help.contains("hold"), "internal commands stay hidden");
    let up_help = stdout(&natpunch(&["lab", "up", "--help"]));
    assert!(
        up_help.contains("NATPUNCH_LAB_NAME"),
        "flags show their environment variable: {up_help}"
    );
    let map_help = stdout(&natpunch(&["map", "--help"]));
    for cmd in ["probe", "list", "add", "delete", "keep"] {
        assert!(
            map_help.contains(cmd),
            "`map --help` lacks {cmd}: {map_help}"
        );
    }
    for (spec, problem) in [
        ("0", "not a port"),
        ("70000", "not a port"),
        ("6000:", "a port is missing"),
        ("6000/sctp", "unknown protocol `sctp`"),
    ] {
        let out = natpunch(&["map", "keep", spec]);
        assert!(
            !out.status.success() && stderr(&out).contains(problem),
            "{spec}: {}",
            stderr(&out)
        );
    }
    let help = stdout(&help);
    for cmd in ["connect", "accept"] {
        assert!(help.contains(cmd), "`--help` lacks {cmd}: {help}");
    }
    let connect_help = stdout(&natpunch(&["connect", "--help"]));
    for text in [
        "<PEER>",
        "NATPUNCH_DAEMON_SOCKET",
        "NATPUNCH_FDPASS",
        "ProxyUseFdpass=yes",
    ] {
        assert!(
            connect_help.contains(text),
            "`connect --help` lacks {text}: {connect_help}"
        );
    }
    let accept_help = stdout(&natpunch(&["accept", "--help"]));
    for text in ["--service", "--exec", "NATPUNCH_ONCE"] {
        assert!(
            accept_help.contains(text),
            "`accept --help` lacks {text}: {accept_help}"
        );
    }
    let version = natpunch(&["--version"]);
    assert_eq!(
        stdout(&version).trim(),
        format!("natpunch {}", env!("CARGO_PKG_VERSION"))
    );
}

/// A flag with a bad value: clap shows the value, natpunch says what is wrong with it, and
/// neither says it twice.
#[test]
fn bad_flag_values_are_named_once_with_what_is_wrong() {
    let cases: [(&[&str], &str, &str); 8] = [
        (
            &["relay", "--reservation-rate-per-ip", "0/10"],
            "0/10",
            "not a rate",
        ),
        (
            &["lab", "campaign", "--duration", "3weeks"],
            "3weeks",
            "unknown unit `weeks`",
        ),
        (
            &["lab", "campaign", "--server-outage", "45s"],
            "45s",
            "not AT:DOWN",
        ),
        (
            &["lab", "campaign", "--server-outage", "45s:0s"],
            "45s:0s",
            "`0s`: a duration must be above 0",
        ),
        (
            &["lab", "matrix", "--presets", "weird"],
            "weird",
            "unknown NAT preset (known: open,",
        ),
        (
            &["lab", "matrix", "--pairs", "weird:open"],
            "weird:open",
            "unknown NAT preset `weird`",
        ),
        (&["map", "keep", "70000"], "70000", "not a port (1-65535)"),
        (&["map", "keep", "6000:"], "6000:", "a port is missing"),
    ];
    // A flag for the peers that `natpunch peer` does not have: said before any lab is built.
    let out = natpunch(&["lab", "matrix", "--peer-arg=--no-such-flag"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--peer-arg: unknown flag --no-such-flag for `natpunch peer`"),
        "{}",
        stderr(&out)
    );
    let out = natpunch(&["lab", "up", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unexpected argument '--no-such-flag'"),
        "{}",
        stderr(&out)
    );
    for (args, value, reason) in cases {
        let out = natpunch(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(reason), "{args:?}: {err}");
        assert_eq!(
            err.matches(value).count(),
            1,
            "{args:?}: the value is shown once: {err}"
        );
    }
}

/// Output into a closed pipe ends natpunch quietly, like any Unix tool, not with a panic.
#[test]
fn a_closed_standard_output_ends_natpunch_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args(["lab", "list", "--json"])
        .stdout(writer)
        .output()
        .expect("natpunch runs");
    assert_eq!(
        out.status.signal(),
        Some(nix::libc::SIGPIPE),
        "{:?}: {}",
        out.status,
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

/// The lab's commands without root say so and what to do, before touching anything.
#[test]
#[ignore = "needs root (to run natpunch as nobody): ./test runs it"]
fn lab_commands_without_root_say_it_needs_root() {
    testkit::require::program(
        "lab_commands_without_root_say_it_needs_root",
        "setpriv",
        "util-linux",
    );
    let dir = Scratch::new("no-root");
    // A copy nobody may run, wherever the build directory is.
    let exe = dir.0.join("natpunch");
    std::fs::copy(env!("CARGO_BIN_EXE_natpunch"), &exe).expect("copy");
    for d in [&dir.0, &exe] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    let topology = repo_file("examples/labs/two-homes.toml");
    let two_homes = dir.0.join("two-homes.toml");
    std::fs::copy(topology, &two_homes).expect("copy");
    std::fs::set_permissions(
        &two_homes,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .expect("chmod");
    for args in [
        vec!["lab", "up", two_homes.to_str().expect("utf-8")],
        vec!["lab", "selftest"],
        vec!["lab", "matrix", "--trials", "1"],
    ] {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(&args)
            .output()
            .expect("setpriv runs");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("error: the NAT lab needs root") && err.contains("run it with sudo"),
            "{args:?}: {err}"
        );
        assert_eq!(err.matches("needs root").count(), 1, "{args:?}: {err}");
    }
}

/// Tests that need root or a system part are `#[ignore = "needs …"]`, so a plain `cargo test`
/// counts them as ignored, never as passed; none prints "skipping" and returns.
#[test]
fn tests_that_need_the_machine_are_ignored_with_a_reason_never_skipped_silently() {
    // Spelt in pieces, so that this test does not find itself.
    let needs = [
        concat!("require::", "lab("),
        concat!("require::", "portmap("),
        concat!("require::", "program("),
        concat!("TempPostgres", "::start("),
    ];
    let mut checked = 0;
    for file in [
        "crates/natpunch/tests/cli.rs",
        "crates/natlab/tests/lab.rs",
        "crates/api/tests/api.rs",
        "crates/daemon/tests/api.rs",
    ] {
        let text = std::fs::read_to_string(repo_file(file)).expect("test source");
        assert!(
            !text.contains(concat!("eprintln!(\"skip", "ping")),
            "{file} skips by printing and returning"
        );
        // Each test: its attributes, then its body up to the next test.
        let starts: Vec<usize> = text
            .match_indices(concat!("#[", "test]"))
            .chain(text.match_indices(concat!("#[", "tokio::test")))
            .map(|(i, _)| i)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for (k, &start) in starts.iter().enumerate() {
            let end = starts.get(k + 1).copied().unwrap_or(text.len());
            let test = &text[start..end];
            let Some(fn_at) = test.find("fn ") else {
                continue;
            };
            let (attrs, body) = test.split_at(fn_at);
            let name: String = body[3..].chars().take_while(|c| *c != '(').collect();
            if needs.iter().any(|n| body.contains(n)) {
                checked += 1;
                assert!(
                    attrs.contains("#[ignore = \"needs "),
                    "{file}: {name} needs the machine but is not #[ignore = \"needs …\"]"
                );
            }
        }
    }
    assert!(
        checked >= 30,
        "only {checked} tests found that need the machine"
    );
}

const A_PEER: &str = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN";

/// `natpunch connect` and `accept` without a daemon say so, where they looked, and how to
/// start one; with `--json`, as one JSON line.
#[test]
fn connect_and_accept_without_a_daemon_say_how_to_start_one() {
    let dir = Scratch::new("no-daemon");
    let socket = dir.0.join("daemon.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let expected = format!(
        "error: no natpunch daemon listens on {socket}: start one with `natpunch daemon --relay <relay multiaddr>`\n"
    );
    let out = natpunch(&["connect", A_PEER, "--socket", socket]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out), expected);
    assert!(out.stdout.is_empty());
    // The same through the variable, for accept.
    let out = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args(["accept", "--service", "echo"])
        .env("NATPUNCH_DAEMON_SOCKET", socket)
        .env_remove("NATPUNCH_JSON")
        .output()
        .expect("natpunch runs");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stderr(&out), expected);
    let out = natpunch(&["connect", A_PEER, "--socket", socket, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines: Vec<Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["event"], "error");
    assert!(
        lines[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("natpunch daemon --relay")),
        "{lines:?}"
    );
}

/// `--fdpass` hands the socket to ssh over standard output, so standard output must be a
/// socket: when it is not, natpunch says so before it asks the daemon for anything.
#[test]
fn connect_fdpass_needs_a_socket_on_standard_output() {
    let dir = Scratch::new("fdpass");
    let socket = dir.0.join("daemon.sock");
    let out = natpunch(&[
        "connect",
        A_PEER,
        "--fdpass",
        "--socket",
        socket.to_str().expect("utf-8 path"),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: --fdpass: standard output is not a socket")
            && err.contains("ProxyUseFdpass=yes"),
        "{err}"
    );
    assert!(!err.contains("daemon listens"), "checked first: {err}");
    let out = natpunch(&[
        "connect",
        A_PEER,
        "--fdpass",
        "--exec",
        "cat",
        "--socket",
        "/nonexistent",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--exec and --fdpass exclude each other"),
        "{}",
        stderr(&out)
    );
}

/// A server that does not answer is an error naming it, not a verdict about the network.
#[test]
fn nat_check_against_a_closed_port_is_an_error_not_a_verdict() {
    let closed = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let server = closed.to_string();
    let out = natpunch(&["nat", "check", "--server", &server, "--json"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("error: no STUN answer from {server}"))
            && err.contains("ICMP port unreachable"),
        "{err}"
    );
    assert!(!stdout(&out).contains("verdict"), "{}", stdout(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["error"]["kind"], "port_unreachable", "{v}");
    assert_eq!(v["error"]["server"], server.as_str(), "{v}");
}

/// A relay that can announce no address offers no HOP protocol: it says so at start, in
/// `--json` and in `/health`, and stops saying so once it has an address.
#[test]
fn relay_without_an_external_address_says_so_in_its_output_health_and_json() {
    let dir = Scratch::new("relay-external");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let run = |external: Option<String>| {
        let (port, telemetry) = (free().to_string(), free());
        let key = dir.0.join("relay.key");
        let mut args = vec![
            "relay",
            "--json",
            "--listen-ip",
            "127.0.0.1",
            "--port",
            &port,
            "--identity",
            key.to_str().expect("utf-8"),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        // No STUN reflector: its default port is another test's too.
        args.extend(["--telemetry-port".into(), telemetry.to_string()]);
        args.extend(["--stun-port".into(), "0".into()]);
        if let Some(e) = external {
            args.extend(["--external-addr".into(), e.replace("PORT", &port)]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_natpunch"))
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("relay starts");
        // The warning comes once the listeners are up (1 s); a loaded machine may take longer
        // to serve telemetry at all.
        std::thread::sleep(std::time::Duration::from_millis(2000));
        let health = http_get_within(
            ([127, 0, 0, 1], telemetry).into(),
            "/health",
            std::time::Duration::from_secs(15),
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
        let mut out = String::new();
        let mut err = String::new();
        use std::io::Read as _;
        let _ = child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out);
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err);
        let health = health.unwrap_or_else(|e| {
            panic!("telemetry on port {telemetry}: {e}\nstdout: {out}\nstderr: {err}")
        });
        (health, out, err)
    };
    let (health, out, err) = run(None);
    assert!(
        health.starts_with("HTTP/1.1 503") && health.contains("--external-addr"),
        "{health}"
    );
    assert_eq!(
        err.matches("warning: no external address").count(),
        1,
        "{err}"
    );
    assert!(err.contains("--external-addr"), "{err}");
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        events.iter().any(|e| e["event"] == "no-external-address"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("--external-addr"))),
        "{out}"
    );
    let (health, out, err) = run(Some("/ip4/127.0.0.1/tcp/PORT".into()));
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(!err.contains("warning"), "{err}");
    assert!(!out.contains("no-external-address"), "{out}");
}

#[test]
fn bad_topology_files_are_refused_with_the_problem_named_and_create_nothing() {
    let dir = std::env::temp_dir().join(format!("natpunch-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cases = [
        (
            "unknown-preset",
            "[router.r]\nnat = \"cone\"\n[host.h]\nupstream = \"r\"\n",
            "unknown NAT preset `cone`",
        ),
        (
            "loop",
            "[router.a]\nnat = \"cgnat\"\nupstream = \"b\"\n[router.b]\nnat = \"cgnat\"\nupstream = \"a\"\n",
            "router loop: a -> b -> a",
        ),
        (
            "missing",
            "[host.h]\nupstream = \"home\"\n",
            "upstream `home`, but there is no router",
        ),
        (
            "duplicate",
            "[router.x]\nnat = \"cgnat\"\n[host.x]\n",
            "duplicate name `x`",
        ),
    ];
    for (name, text, problem) in cases {
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, text).expect("write");
        let out = natpunch(&["lab", "up", file.to_str().expect("utf-8 path")]);
        assert!(!out.status.success(), "{name}: accepted");
        let err = stderr(&out);
        assert!(
            err.starts_with("error: ") && err.contains(problem),
            "{name}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
        assert!(namespaces_of(name).is_empty(), "{name}: namespaces created");
        assert!(
            !Path::new("/run/natpunch/labs")
                .join(format!("{name}.json"))
                .exists(),
            "{name}: state written"
        );
    }
    let missing = natpunch(&["lab", "up", "/nonexistent/lab.toml"]);
    assert!(stderr(&missing).contains("cannot read topology file /nonexistent/lab.toml"));
    let _ = std::fs::remove_dir_all(dir);
}

/// Removes a detached lab when a test ends, also when it fails.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = natlab::lab::down(&self.0);
    }
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn lab_up_exec_list_down_round_trip() {
    testkit::require::lab("lab_up_exec_list_down_round_trip");
    let name = natlab::lab::random_name();
    let _cleanup = Down(name.clone());
    let file = repo_file("examples/labs/two-homes.toml");
    let up = natpunch(&[
        "lab",
        "up",
        file.to_str().expect("path"),
        "--name",
        &name,
        "--json",
    ]);
    assert!(up.status.success(), "{}", stderr(&up));
    let plan: Value = serde_json::from_str(&stdout(&up)).expect("plan JSON");
    assert_eq!(plan["lab"], name.as_str());
    let alice = plan["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["name"] == "alice")
        .expect("alice");
    assert_eq!(alice["uplink"]["addrs"][0], "192.168.1.2");

    let addr = natpunch(&[
        "lab", "exec", &name, "alice", "--", "ip", "-brief", "addr", "show", "eth0",
    ]);
    assert!(
        stdout(&addr).contains("192.168.1.2/24"),
        "{}",
        stdout(&addr)
    );
    let code = natpunch(&["lab", "exec", &name, "alice", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code.status.code(), Some(3), "exit codes pass through");
    let unknown = natpunch(&["lab", "exec", &name, "carol", "--", "true"]);
    assert!(
        stderr(&unknown).contains("no node `carol` (nodes: home-a, home-b, alice, bob, relay)"),
        "{}",
        stderr(&unknown)
    );

    let list = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args(["lab", "list"])
        .env("NATPUNCH_JSON", "1")
        .output()
        .expect("list");
    let labs: Value = serde_json::from_str(&stdout(&list)).expect("list JSON via NATPUNCH_JSON");
    let entry = labs
        .as_array()
        .expect("array")
        .iter()
        .find(|l| l["name"] == name.as_str())
        .expect("listed");
    assert_eq!(entry["detached"], true);
    let holder = entry["delay_holder"]
        .as_u64()
        .expect("the delayed links have a holder process");
    let holder_id =
        natlab::lab::ProcessId::of(u32::try_from(holder).expect("pid")).expect("holder runs");

    let down = natpunch(&["lab", "down", &name]);
    assert!(down.status.success(), "{}", stderr(&down));
    assert!(namespaces_of(&name).is_empty(), "namespaces left");
    assert!(!holder_id.is_alive(), "holder outlived the lab");
    let again = natpunch(&["lab", "down", &name]);
    assert!(
        stderr(&again).contains(&format!("no lab named `{name}`")),
        "{}",
        stderr(&again)
    );
}

#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn selftest_json_reports_every_preset_as_configured() {
    testkit::require::lab("selftest_json_reports_every_preset_as_configured");
    let out = natpunch(&["lab", "selftest", "--json"]);
    let report: Value = serde_json::from_str(&stdout(&out)).expect("JSON report");
    let presets = report["presets"].as_array().expect("presets");
    let names: Vec<&str> = presets.iter().filter_map(|p| p["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "open",
            "full-cone",
            "restricted-cone",
            "port-restricted",
            "symmetric",
            "symmetric-sequential",
            "cgnat"
        ]
    );
    for p in presets {
        for key in ["mapping", "filtering", "port_allocation", "hairpin"] {
            assert!(
                p["configured"].get(key).is_some() && p["measured"].get(key).is_some(),
                "{key} in {p}"
            );
        }
        assert_eq!(p["ok"], true, "{p}");
    }
    let cgnat = &presets[6];
    assert_eq!(cgnat["udp_timeout"]["alive_before"], true);
    assert_eq!(cgnat["udp_timeout"]["alive_after"], false);
    assert_eq!(
        presets[4]["measured"]["mapping"],
        "address-and-port-dependent"
    );
    assert_eq!(presets[5]["measured"]["port_allocation"], "sequential");
    assert!(out.status.success(), "exit code 0 when every row matches");
}

/// `natpunch nat check` behind every lab preset (and the CGNAT chain) against `natpunch
/// stun-server` on a public host with two addresses: the classification equals what the
/// routers are configured to do, and `--lifetime` finds the CGNAT's 30 s UDP timeout.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn nat_check_classifies_every_lab_preset_as_configured() {
    use natlab::selftest::{expected_through, path_of, topology};
    use natlab::{Lab, LabOptions, Preset};
    testkit::require::lab("nat_check_classifies_every_lab_preset_as_configured");
    let lab = Lab::build(&topology(&Preset::ALL), LabOptions::default()).expect("lab");
    let addrs = lab
        .node("reflector")
        .expect("reflector")
        .uplink
        .addrs
        .clone();
    let (primary, alternate) = (format!("{}:3478", addrs[0]), format!("{}:3479", addrs[1]));
    let exe = env!("CARGO_BIN_EXE_natpunch");
    let server = lab
        .spawn(
            "reflector",
            exe,
            &[
                "stun-server",
                "--primary",
                &primary,
                "--alternate",
                &alternate,
            ],
        )
        .expect("server starts");
    server
        .wait_for("listening on", std::time::Duration::from_secs(10))
        .expect("server ready");
    // coturn as the other RFC 5780 server, on the same two addresses and other ports. Debian's
    // /etc/turnserver.conf says `no-rfc5780`, so coturn gets an empty configuration instead.
    testkit::require::program(
        "nat_check_classifies_every_lab_preset_as_configured",
        "turnserver",
        "coturn",
    );
    let coturn_primary = format!("{}:4478", addrs[0]);
    let pidfile = std::env::temp_dir().join(format!("natpunch-coturn-{}.pid", std::process::id()));
    let coturn = {
        let (ip0, ip1) = (addrs[0].to_string(), addrs[1].to_string());
        let coturn = lab
            .spawn(
                "reflector",
                "turnserver",
                &[
                    "-c",
                    "/dev/null",
                    "-L",
                    &ip0,
                    "-L",
                    &ip1,
                    "--listening-port",
                    "4478",
                    "--alt-listening-port",
                    "4479",
                    "--stun-only",
                    "--no-tls",
                    "--no-dtls",
                    "--no-cli",
                    "-z",
                    "--pidfile",
                    pidfile.to_str().expect("UTF-8 temp dir"),
                    "--log-file",
                    "stdout",
                ],
            )
            .expect("coturn starts");
        coturn
            .wait_for("Total General servers", std::time::Duration::from_secs(10))
            .expect("coturn ready");
        coturn
    };

    let check_against = |server: &str, preset: Preset, extra: &[&str]| -> Value {
        let host = format!("h-{preset}");
        let mut args = vec!["nat", "check", "--server", server, "--json"];
        args.extend_from_slice(extra);
        let out = lab
            .exec(&host, exe, &args)
            .unwrap_or_else(|e| panic!("{preset}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{preset}: {e}: {out}"))
    };
    let check = |preset: Preset, extra: &[&str]| check_against(&primary, preset, extra);
    std::thread::scope(|s| {
        let lifetime = s.spawn(|| check(Preset::Cgnat, &["--lifetime", "--lifetime-max", "45"]));
        // Our server's checks run through every router at once, then coturn's: two checks
        // through one sequential router at once would interleave their ports, and the step
        // each saw could be two.
        let coturn_primary = &coturn_primary;
        let check_against = &check_against;
        for server in ["natpunch", "coturn"] {
            let rows: Vec<_> = Preset::ALL
                .iter()
                .map(|&p| {
                    let row = s.spawn(move || match server {
                        "natpunch" => check(p, &[]),
                        _ => check_against(coturn_primary, p, &[]),
                    });
                    (p, row)
                })
                .collect();
            for (preset, row) in rows {
                let report = row.join().expect("check thread");
                let label = format!("{preset} against {server}");
                let chain: Vec<_> = path_of(preset).iter().filter_map(|p| p.config()).collect();
                let (want, _) = expected_through(&chain);
                let json = |v: &dyn erased::Json| v.to_json();
                assert_eq!(report["mapping"], json(&want.mapping), "{label}: {report}");
                assert_eq!(
                    report["filtering"],
                    json(&want.filtering),
                    "{label}: {report}"
                );
                assert_eq!(
                    report["port_allocation"],
                    json(&want.port_allocation),
                    "{label}: {report}"
                );
                let step =
                    (want.port_allocation == natlab::PortAllocation::Sequential).then_some(1);
                assert_eq!(
                    report["port_delta"],
                    serde_json::json!(step),
                    "{label}: {report}"
                );
                assert_eq!(report["hairpin"], want.hairpin, "{label}: {report}");
                assert_eq!(report["rfc5780"], true, "{label}: {report}");
                let public = lab
                    .public_addr(&format!("h-{preset}"))
                    .expect("public address");
                assert_eq!(report["public_addresses"][0], public.to_string(), "{label}");
            }
        }
        // coturn's RFC 5780 client agrees with our server about our routers.
        testkit::require::program(
            "nat_check_classifies_every_lab_preset_as_configured",
            "turnutils_natdiscovery",
            "coturn",
        );
        for (preset, mapping, filtering) in [
            (
                Preset::FullCone,
                "Endpoint Independent",
                "Endpoint Independent",
            ),
            (
                Preset::RestrictedCone,
                "Endpoint Independent",
                "Address Dependent",
            ),
            (
                Preset::Symmetric,
                "Address and Port Dependent",
                "Address and Port Dependent",
            ),
        ] {
            let ip = addrs[0].to_string();
            let out = lab
                .exec(
                    &format!("h-{preset}"),
                    "turnutils_natdiscovery",
                    &["-m", "-f", &ip],
                )
                .unwrap_or_else(|e| panic!("{preset}: natdiscovery: {e}"));
            assert!(
                out.contains(&format!("NAT with {mapping} Mapping!")),
                "{preset}: {out}"
            );
            assert!(
                out.contains(&format!("NAT with {filtering} Filtering!")),
                "{preset}: {out}"
            );
        }
        let report = lifetime.join().expect("lifetime thread");
        let estimate = report["mapping_lifetime"]["estimate_secs"]
            .as_f64()
            .expect("an estimate");
        assert!(
            (24.0..=36.0).contains(&estimate),
            "30 s timeout estimated as {estimate} s: {report}"
        );
    });
    drop(coturn);
    drop(server);
    let _ = std::fs::remove_file(pidfile);
}

/// Serialising a value to a JSON value, for comparing with parsed output.
mod erased {
    pub(crate) trait Json {
        fn to_json(&self) -> serde_json::Value;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("serialisable")
        }
    }
}

/// `natpunch bench stun` drives both servers and reports a ratio (figures are not asserted:
/// performance is measured, in docs/benchmarks.md).
#[test]
#[ignore = "needs coturn: ./test installs it and runs this"]
fn bench_stun_measures_both_servers_and_reports_a_ratio() {
    testkit::require::program(
        "bench_stun_measures_both_servers_and_reports_a_ratio",
        "turnserver",
        "coturn",
    );
    let out = natpunch(&[
        "bench",
        "stun",
        "--secs",
        "1",
        "--rounds",
        "1",
        "--clients",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let turn = &report["turns"][0];
    assert!(turn["natpunch"]["answered"].as_u64() > Some(0), "{report}");
    assert!(turn["coturn"]["answered"].as_u64() > Some(0), "{report}");
    assert!(
        report["median_ratio"]
            .as_f64()
            .is_some_and(|r| r > 0.0 && r.is_finite()),
        "{report}"
    );
}

/// Garbage never stops `natpunch stun-server`: every kind of bad datagram is counted, a valid
/// request after them is still answered, and SIGTERM prints the counters.
#[test]
fn stun_server_counts_garbage_and_keeps_answering() {
    use std::io::{BufRead as _, BufReader};
    use std::net::UdpSocket;
    let free = |ip: &str| {
        UdpSocket::bind((ip, 0))
            .and_then(|s| s.local_addr())
            .expect("port")
            .port()
    };
    let primary = format!("127.0.0.1:{}", free("127.0.0.1"));
    let alternate = format!("127.0.0.2:{}", free("127.0.0.2"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args([
            "stun-server",
            "--primary",
            &primary,
            "--alternate",
            &alternate,
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = lines.next().expect("a line").expect("text");
    assert!(ready.contains("listening on"), "{ready}");

    let client = UdpSocket::bind("127.0.0.1:0").expect("client");
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .expect("timeout");
    let good = stun::binding_request([7; 12], None, None);
    let mut bad_fingerprint = good.clone();
    let last = bad_fingerprint.len() - 1;
    bad_fingerprint[last] ^= 0x55;
    let garbage: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\n\r\n",
        &good[..12],
        &[0u8; 1400],
        &bad_fingerprint,
        &[],
    ];
    for g in garbage {
        client.send_to(g, &primary).expect("send");
    }
    client.send_to(&good, &primary).expect("send");
    let mut buf = [0u8; 1500];
    let (n, _) = client.recv_from(&mut buf).expect("still answers");
    let answer = stun::parse_binding_response(&buf[..n]).expect("a Binding response");
    assert_eq!(answer.transaction_id, [7; 12]);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let counters: Value =
        serde_json::from_str(&lines.next().expect("counters line").expect("text")).expect("JSON");
    assert!(child.wait().expect("exits").success());
    let c = &counters["counters"];
    assert_eq!(
        (
            &c["not_stun"],
            &c["truncated"],
            &c["oversized"],
            &c["malformed"],
            &c["answered"]
        ),
        (
            &Value::from(1),
            &Value::from(2),
            &Value::from(1),
            &Value::from(1),
            &Value::from(1)
        ),
        "{counters}"
    );
}

/// Whether a datagram from the lab internet (node `peer`) to `to` arrives at alice's UDP port
/// `internal`.
fn udp_reaches(lab: &natlab::Lab, internal: u16, to: std::net::SocketAddrV4) -> bool {
    use std::net::UdpSocket;
    let sock = lab
        .run_in("alice", || UdpSocket::bind(("0.0.0.0", internal)))
        .expect("enter alice")
        .expect("bind");
    sock.set_read_timeout(Some(std::time::Duration::from_millis(800)))
        .expect("timeout");
    lab.run_in("peer", || -> std::io::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.send_to(b"through the mapping", to).map(drop)
    })
    .expect("enter peer")
    .expect("send");
    let mut buf = [0u8; 64];
    matches!(sock.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"through the mapping")
}

/// Whether a TCP connection from the lab internet (node `peer`) to `to` reaches alice's port
/// `internal` and carries data.
fn tcp_reaches(lab: &natlab::Lab, internal: u16, to: std::net::SocketAddrV4) -> bool {
    use std::io::{Read as _, Write as _};
    use std::net::{TcpListener, TcpStream};
    let listener = lab
        .run_in("alice", || TcpListener::bind(("0.0.0.0", internal)))
        .expect("enter alice")
        .expect("listen");
    let sent = lab
        .run_in("peer", || -> std::io::Result<()> {
            let mut s = TcpStream::connect_timeout(&to.into(), std::time::Duration::from_secs(2))?;
            s.write_all(b"tcp through the mapping")
        })
        .expect("enter peer");
    if sent.is_err() {
        return false;
    }
    let (mut conn, _) = listener.accept().expect("accept");
    let mut got = String::new();
    conn.read_to_string(&mut got).expect("read");
    got == "tcp through the mapping"
}

/// `natpunch map` against real miniupnpd, for each of PCP, NAT-PMP and UPnP: add (UDP and TCP),
/// a host on the lab internet reaches the mapped ports, list shows the mapping, asking again
/// keeps the external port, a second LAN host asking for the same port gets another one without
/// breaking the first, delete removes it from the router.
#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn map_add_list_renew_conflict_delete_with_every_protocol() {
    use std::net::SocketAddrV4;

    use natlab::{Lab, LabOptions, Topology};
    testkit::require::portmap("map_add_list_renew_conflict_delete_with_every_protocol");
    let text =
        std::fs::read_to_string(repo_file("examples/labs/portmap-home.toml")).expect("example");
    let topology = Topology::from_toml(&text).expect("topology");
    let lab = Lab::build(&topology, LabOptions::default()).expect("lab");
    let exe = env!("CARGO_BIN_EXE_natpunch");
    let state_dir = std::env::temp_dir().join(format!("natpunch-map-test-{}", std::process::id()));
    let map = |host: &str, args: &[&str]| -> Value {
        let state = state_dir.join(format!("{host}.json"));
        let mut all = vec!["map"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--json", "--state", state.to_str().expect("utf-8")]);
        let out = lab
            .exec(host, exe, &all)
            .unwrap_or_else(|e| panic!("{host}: natpunch {all:?}: {e}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{all:?}: {e}: {out}"))
    };
    let public = lab.public_addr("alice").expect("public address");

    let probe = map("alice", &["probe"]);
    for p in ["pcp", "nat_pmp", "upnp"] {
        assert!(probe[p].is_object(), "{p} offered: {probe}");
    }
    assert_eq!(probe["external_ip"], public.to_string());
    assert_eq!(probe["behind_another_nat"], false);

    for (via, port) in [("pcp", 7000u16), ("natpmp", 7100), ("upnp", 7200)] {
        let p = port.to_string();
        let tcp_port = (port + 1).to_string();
        let udp = map("alice", &["add", &p, "--via", via, "--lifetime", "600"]);
        assert_eq!(
            udp["external_port"], port,
            "{via}: the internal port is free: {udp}"
        );
        assert_eq!(udp["external_ip"], public.to_string(), "{via}: {udp}");
        let tcp = map("alice", &["add", &tcp_port, "--via", via, "--proto", "tcp"]);
        assert_eq!(tcp["protocol"], "tcp", "{via}: {tcp}");
        assert!(
            udp_reaches(&lab, port, SocketAddrV4::new(public, port)),
            "{via}: UDP reaches the mapped port"
        );
        let tcp_external =
            u16::try_from(tcp["external_port"].as_u64().expect("port")).expect("u16");
        assert!(
            tcp_reaches(&lab, port + 1, SocketAddrV4::new(public, tcp_external)),
            "{via}: TCP reaches the mapped port"
        );

        let listed = map("alice", &["list"]);
        let recorded = listed["recorded"].as_array().expect("recorded");
        assert!(
            recorded
                .iter()
                .any(|m| m["external_port"] == port && m["protocol"] == "udp"),
            "{via}: {listed}"
        );
        let in_table = |listed: &Value, client: &str, external: u64| {
            listed["upnp"]
                .as_array()
                .expect("upnp table")
                .iter()
                .any(|e| {
                    e["internal_client"] == client
                        && e["external_port"] == external
                        && e["protocol"] == "udp"
                })
        };
        assert!(
            in_table(&listed, "192.168.1.2", u64::from(port)),
            "{via}: router table: {listed}"
        );

        let renewed = map("alice", &["add", &p, "--via", via, "--lifetime", "600"]);
        assert_eq!(
            renewed["external_port"], port,
            "{via}: renewal keeps the port"
        );
        if via == "pcp" {
            assert_eq!(
                renewed["nonce"], udp["nonce"],
                "PCP renews with the same nonce"
            );
        }

        let carol = map("carol", &["add", &p, "--via", via, "--lifetime", "600"]);
        assert_ne!(
            carol["external_port"], port,
            "{via}: carol gets another port: {carol}"
        );
        assert!(
            udp_reaches(&lab, port, SocketAddrV4::new(public, port)),
            "{via}: alice's mapping still works"
        );

        map("alice", &["delete", &p]);
        map("alice", &["delete", &tcp_port, "--proto", "tcp"]);
        let listed = map("alice", &["list"]);
        assert!(
            !listed["recorded"]
                .as_array()
                .expect("recorded")
                .iter()
                .any(|m| m["external_port"] == port),
            "{via}: {listed}"
        );
        assert!(
            !in_table(&listed, "192.168.1.2", u64::from(port)),
            "{via}: gone from the router: {listed}"
        );
        assert!(
            !udp_reaches(&lab, port, SocketAddrV4::new(public, port)),
            "{via}: the deleted mapping no longer forwards"
        );
        let carol_port = carol["external_port"].as_u64().expect("port");
        assert!(
            in_table(&listed, "192.168.1.3", carol_port),
            "{via}: carol's stays: {listed}"
        );
        map("carol", &["delete", &p]);
    }
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// `natpunch lab renumber` and `lab reboot` on a detached lab: the new address is reported and
/// recorded, a bad address or a host is refused with a clear error, and a reboot leaves a
/// fresh miniupnpd answering.
#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn lab_renumber_and_reboot_commands_act_on_a_detached_lab() {
    testkit::require::portmap("lab_renumber_and_reboot_commands_act_on_a_detached_lab");
    let name = natlab::lab::random_name();
    let file = repo_file("examples/labs/portmap-home.toml");
    let up = natpunch(&["lab", "up", file.to_str().expect("utf-8"), "--name", &name]);
    let _down = Down(name.clone());
    assert!(up.status.success(), "{}", stderr(&up));
    let run = |args: &[&str]| {
        let out = natpunch(args);
        (out.status.success(), stdout(&out), stderr(&out))
    };
    let (ok, out, err) = run(&[
        "lab",
        "renumber",
        &name,
        "home",
        "--ip",
        "11.99.7.7",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert!(ok);
    assert_eq!(report["old"], "11.99.0.10");
    assert_eq!(report["new"], "11.99.7.7");
    let state = natlab::lab::load_state(&name).expect("state");
    assert_eq!(
        state.plan.public_addr_of("alice").map(|a| a.to_string()),
        Some("11.99.7.7".to_owned())
    );
    let (ok, _, err) = run(&["lab", "renumber", &name, "home", "--ip", "11.99.0.11"]);
    assert!(
        !ok && err.contains("in use"),
        "peer's address is taken: {err}"
    );
    let (ok, _, err) = run(&["lab", "renumber", &name, "alice"]);
    assert!(!ok && err.contains("only routers"), "{err}");
    let record = natlab::portmap::Files::of(&name, "home").process();
    let daemon = || std::fs::read_to_string(&record).expect("miniupnpd's process record");
    let before = daemon();
    let (ok, out, err) = run(&["lab", "reboot", &name, "home", "--down-secs", "0.2"]);
    assert!(ok && out.contains("rebooted home"), "{out} {err}");
    assert_ne!(daemon(), before, "the reboot started another miniupnpd");
    let exe = env!("CARGO_BIN_EXE_natpunch");
    let (ok, out, err) = run(&[
        "lab", "exec", &name, "alice", "--", exe, "map", "probe", "--json",
    ]);
    let probe: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert!(ok, "{err}");
    assert_eq!(
        probe["external_ip"], "11.99.7.7",
        "the new miniupnpd answers: {probe}"
    );
    let down = natpunch(&["lab", "down", &name]);
    assert!(down.status.success(), "{}", stderr(&down));
    assert!(namespaces_of(&name).is_empty());
}

/// `natpunch map keep` against real miniupnpd, for each of PCP, NAT-PMP and UPnP: the mappings
/// are made and forward; the router reboots and they are made again within 5 s of it being
/// back, with their ports; the router gets a new external address and the change is reported
/// within 5 s, with the mappings forwarding at the new address; Ctrl-C deletes them on the
/// router and in the record. The check runs every 60 s, so what is measured is the
/// announcements, NOTIFYs and epochs.
#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn map_keep_survives_router_reboot_and_renumbering_with_every_protocol() {
    use std::net::SocketAddrV4;
    use std::time::{Duration, Instant};

    use natlab::{Lab, LabOptions, LabProcess, Topology};
    testkit::require::portmap(
        "map_keep_survives_router_reboot_and_renumbering_with_every_protocol",
    );
    /// Waits until the JSON lines `keep` printed after the first `skip` satisfy `done`.
    fn wait_events(
        keep: &LabProcess,
        skip: usize,
        limit: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let events: Vec<Value> = keep
                .output()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .skip(skip)
                .collect();
            if done(&events) {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "not within {limit:?}: {}",
                keep.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let of_kind = |events: &[Value], kind: &str| -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .cloned()
            .collect()
    };
    let count = |keep: &LabProcess| {
        keep.output()
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok())
            .count()
    };
    let text =
        std::fs::read_to_string(repo_file("examples/labs/portmap-home.toml")).expect("example");
    let topology = Topology::from_toml(&text).expect("topology");
    let mut lab = Lab::build(&topology, LabOptions::default()).expect("lab");
    let exe = env!("CARGO_BIN_EXE_natpunch");
    let state =
        std::env::temp_dir().join(format!("natpunch-keep-test-{}.json", std::process::id()));
    let state_arg = state.to_str().expect("utf-8").to_owned();

    for (via, udp) in [("pcp", 8000u16), ("natpmp", 8100), ("upnp", 8200)] {
        let tcp = udp + 1;
        let specs = [format!("{udp}/udp"), format!("{tcp}/tcp")];
        let keep = lab
            .spawn(
                "alice",
                exe,
                &[
                    "map",
                    "keep",
                    &specs[0],
                    &specs[1],
                    "--via",
                    via,
                    "--lifetime",
                    "120",
                    "--check-secs",
                    "60",
                    "--json",
                    "--state",
                    &state_arg,
                ],
            )
            .expect("map keep");
        let mapped = wait_events(&keep, 0, Duration::from_secs(10), |e| {
            of_kind(e, "mapped").len() == 2
        });
        let public = lab.public_addr("alice").expect("public address");
        for m in of_kind(&mapped, "mapped") {
            assert_eq!(
                m["mapping"]["method"],
                if via == "natpmp" { "nat-pmp" } else { via }
            );
            assert_eq!(
                m["mapping"]["external_ip"],
                public.to_string(),
                "{via}: {m}"
            );
        }
        assert!(
            udp_reaches(&lab, udp, SocketAddrV4::new(public, udp)),
            "{via}: UDP forwards"
        );
        assert!(
            tcp_reaches(&lab, tcp, SocketAddrV4::new(public, tcp)),
            "{via}: TCP forwards"
        );

        // Reboot: the mappings are gone until keep makes them again. A router that restarts
        // within a few seconds of its last answer cannot be told from clock jitter by the epoch
        // (RFC 6887 §8.5 allows 2 s either way, and epochs are whole seconds; keep renews on
        // the announcement then, and says "renewed"). A freshly started miniupnpd announces
        // itself, and keep renews on that, so wait for 4.5 s without a word from keep.
        let mut seen = count(&keep);
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(4500) {
            std::thread::sleep(Duration::from_millis(50));
            let now = count(&keep);
            if now != seen {
                seen = now;
                quiet = Instant::now();
            }
        }
        lab.reboot_router("home", Duration::from_secs(1))
            .expect("reboot");
        let back = Instant::now();
        let after = wait_events(&keep, seen, Duration::from_secs(5), |e| {
            of_kind(e, "remapped").len() == 2
        });
        println!(
            "{via}: re-mapped {:?} after the router was back",
            back.elapsed()
        );
        assert!(
            !of_kind(&after, "gateway-lost-state").is_empty(),
            "{via}: the loss is reported: {after:?}"
        );
        for r in of_kind(&after, "remapped") {
            assert_eq!(
                r["external_port"], r["previous_port"],
                "{via}: same port: {r}"
            );
        }
        assert!(
            udp_reaches(&lab, udp, SocketAddrV4::new(public, udp)),
            "{via}: UDP after reboot"
        );
        assert!(
            tcp_reaches(&lab, tcp, SocketAddrV4::new(public, tcp)),
            "{via}: TCP after reboot"
        );

        // A new external address: reported, and the mappings forward at it.
        let seen = count(&keep);
        let moved = Instant::now();
        let new = lab.renumber_router("home", None).expect("renumber");
        let new_text = new.to_string();
        let after = wait_events(&keep, seen, Duration::from_secs(5), |e| {
            let reported = e
                .iter()
                .any(|x| x["event"] == "external-ip-changed" && x["new"] == new_text.as_str());
            // Both mappings answered at the new address since.
            let at_new = |proto: &str| {
                e.iter().any(|x| {
                    x["mapping"]["external_ip"] == new_text.as_str()
                        && x["mapping"]["protocol"] == proto
                })
            };
            reported && at_new("udp") && at_new("tcp")
        });
        println!(
            "{via}: new address {new} reported {:?} after the change",
            moved.elapsed()
        );
        assert!(
            of_kind(&after, "failed").is_empty(),
            "{via}: nothing failed: {after:?}"
        );
        assert!(
            udp_reaches(&lab, udp, SocketAddrV4::new(new, udp)),
            "{via}: UDP at {new}"
        );
        assert!(
            tcp_reaches(&lab, tcp, SocketAddrV4::new(new, tcp)),
            "{via}: TCP at {new}"
        );

        // Ctrl-C: both deleted on the router, the record emptied, a clean exit.
        let pid = keep.pid().expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
            nix::sys::signal::Signal::SIGINT,
        )
        .expect("SIGINT");
        wait_events(&keep, 0, Duration::from_secs(5), |e| {
            of_kind(e, "released").len() == 2
        });
        let code = keep.wait().expect("wait");
        assert_eq!(code, Some(0), "{via}: map keep exits cleanly");
        assert!(
            !udp_reaches(&lab, udp, SocketAddrV4::new(new, udp)),
            "{via}: deleted"
        );
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(&state).expect("record")).expect("json");
        assert_eq!(
            record,
            serde_json::json!([]),
            "{via}: the record is empty again"
        );
    }
    let _ = std::fs::remove_file(&state);
}

/// Whether a libp2p dial from node `from` to `addr` (with `/p2p/ID`) reaches that peer within
/// 10 s.
fn libp2p_reaches(lab: &natlab::Lab, from: &str, addr: &str) -> Result<(), String> {
    use futures::StreamExt as _;
    use libp2p::swarm::SwarmEvent;
    use libp2p::{Multiaddr, ping};
    use std::time::Duration;

    let addr: Multiaddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    lab.run_in(from, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let key = libp2p::identity::Keypair::generate_ed25519();
            let mut swarm =
                p2p::host::swarm(key, Duration::from_secs(10), |_| ping::Behaviour::default())?;
            swarm.dial(addr.clone()).map_err(|e| e.to_string())?;
            let wait = async {
                loop {
                    match swarm.select_next_some().await {
                        SwarmEvent::ConnectionEstablished { .. } => return Ok(()),
                        SwarmEvent::OutgoingConnectionError { error, .. } => {
                            return Err(format!("{addr}: {error}"));
                        }
                        _ => {}
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(10), wait)
                .await
                .map_err(|_| format!("{addr}: no connection within 10 s"))?
        })
    })
    .map_err(|e| e.to_string())?
}

/// `natpunch peer listen --port-mapping` behind a miniupnpd router that grants PCP mappings
/// for 20 s only: 25 s after its mappings were made (past the first lifetime) a host on the lab
/// internet still dials the mapped TCP and QUIC addresses the peer printed, and the peer printed
/// each mapping's renewals; the router reboots, the peer reports the loss and the mappings made
/// again, and the addresses it offers then are dialled again; the router gets a new external
/// address, and the peer offers (and is dialled at) the new addresses in place of the old ones;
/// Ctrl-C deletes the mappings.
#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn peer_listen_holds_its_port_mappings_through_renewals_and_a_router_reboot() {
    use std::time::{Duration, Instant};

    use natlab::{Lab, LabOptions, LabProcess, Topology};
    testkit::require::portmap(
        "peer_listen_holds_its_port_mappings_through_renewals_and_a_router_reboot",
    );
    fn events(p: &LabProcess) -> Vec<Value> {
        p.output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    /// Holder reports of `kind` (renewed, remapped, …).
    fn updates(events: &[Value], kind: &str) -> Vec<Value> {
        events
            .iter()
            .filter(|e| e["event"] == "port-map-update" && e["update"]["event"] == kind)
            .map(|e| e["update"].clone())
            .collect()
    }
    /// The address each mapping gives now: the last `port-mapped` per internal endpoint, with
    /// the peer's ID.
    fn offered(events: &[Value], id: &str) -> Vec<String> {
        let mut by_internal: Vec<(String, String)> = Vec::new();
        for e in events.iter().filter(|e| e["event"] == "port-mapped") {
            let internal = e["internal"].as_str().expect("internal").to_owned();
            let external = format!("{}/p2p/{id}", e["external"].as_str().expect("external"));
            by_internal.retain(|(i, _)| *i != internal);
            by_internal.push((internal, external));
        }
        by_internal.into_iter().map(|(_, e)| e).collect()
    }
    fn wait_until(p: &LabProcess, limit: Duration, done: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(&events(p)) {
            assert!(
                Instant::now() < deadline,
                "not within {limit:?}: {}",
                p.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    let topology = Topology::from_toml(
        r#"
        [router.home]
        nat = "port-restricted"

        [router.home.portmap]
        min_lifetime_secs = 10
        max_lifetime_secs = 20

        [host.alice]
        upstream = "home"

        [host.relay]

        [host.peer]
        "#,
    )
    .expect("topology");
    let mut lab = Lab::build(&topology, LabOptions::default()).expect("lab");
    let dir = Scratch::new("peer-portmap");
    let exe = env!("CARGO_BIN_EXE_natpunch");
    let args = labrun::args::relay(dir.0.join("relay.key"), 4001, None).expect("relay flags");
    let relay = lab.spawn("relay", exe, &args).expect("relay");
    let line = relay
        .wait_for("\"event\":\"external-address\"", Duration::from_secs(20))
        .expect("the relay's address");
    let relay_addr = serde_json::from_str::<Value>(&line).expect("json")["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let alice = lab
        .spawn(
            "alice",
            exe,
            &[
                "peer",
                "listen",
                "--json",
                "--port-mapping",
                "--relay",
                &relay_addr,
            ],
        )
        .expect("peer listen");
    let reserved = alice
        .wait_for("\"event\":\"reserved\"", Duration::from_secs(30))
        .expect("the peer reserves");
    let id = serde_json::from_str::<Value>(&reserved).expect("json")["address"]
        .as_str()
        .and_then(|a| a.rsplit('/').next())
        .expect("peer id")
        .to_owned();
    let mapped_at = Instant::now();
    let first = offered(&events(&alice), &id);
    let public = lab
        .public_addr("alice")
        .expect("public address")
        .to_string();
    assert_eq!(first.len(), 2, "TCP and QUIC mapped: {}", alice.output());
    for a in &first {
        assert!(a.starts_with(&format!("/ip4/{public}/")), "{a}");
    }

    // Past the first lifetime: the mappings were renewed and still forward.
    std::thread::sleep(Duration::from_secs(25).saturating_sub(mapped_at.elapsed()));
    for a in &first {
        libp2p_reaches(&lab, "peer", a)
            .unwrap_or_else(|e| panic!("25 s after mapping: {e}\n{}", alice.output()));
    }
    let renewed = updates(&events(&alice), "renewed");
    for port in ["tcp", "udp"] {
        let n = renewed
            .iter()
            .filter(|u| u["mapping"]["protocol"] == port && u["lifetime_secs"] == 20)
            .count();
        assert!(n >= 2, "{port}: renewed at 10 and 20 s: {renewed:?}");
    }

    // The router reboots: the peer makes its mappings again and offers what they give.
    let seen = events(&alice).len();
    lab.reboot_router("home", Duration::from_secs(1))
        .expect("reboot");
    let back = Instant::now();
    wait_until(&alice, Duration::from_secs(10), |e| {
        let after = e.get(seen..).unwrap_or_default();
        updates(after, "remapped").len() == 2
    });
    println!("re-mapped {:?} after the router was back", back.elapsed());
    let after = events(&alice);
    assert!(
        !updates(&after[seen..], "gateway-lost-state").is_empty(),
        "the loss is reported: {}",
        alice.output()
    );
    let now = offered(&after, &id);
    assert_eq!(now.len(), 2, "{}", alice.output());
    for a in &now {
        libp2p_reaches(&lab, "peer", a)
            .unwrap_or_else(|e| panic!("after the reboot: {e}\n{}", alice.output()));
    }

    // A new external address: the peer offers the mappings' new addresses instead of the old.
    let seen = events(&alice).len();
    let new = lab
        .renumber_router("home", None)
        .expect("renumber")
        .to_string();
    wait_until(&alice, Duration::from_secs(10), |e| {
        let after = e.get(seen..).unwrap_or_default();
        after
            .iter()
            .filter(|x| {
                x["event"] == "port-mapped"
                    && x["previous"].is_string()
                    && x["external"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(&format!("/ip4/{new}/")))
            })
            .count()
            == 2
    });
    let after = events(&alice);
    let now = offered(&after, &id);
    for a in &now {
        assert!(a.starts_with(&format!("/ip4/{new}/")), "{a}");
        libp2p_reaches(&lab, "peer", a)
            .unwrap_or_else(|e| panic!("at the new address: {e}\n{}", alice.output()));
    }

    // Ctrl-C: the mappings are deleted on the router.
    let pid = alice.pid().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    wait_until(&alice, Duration::from_secs(10), |_| !alice.is_running());
    let output = alice.output();
    let code = alice.wait().expect("wait");
    assert_eq!(code, Some(0), "{output}");
    let mapped: Vec<Value> = after
        .iter()
        .filter(|e| e["event"] == "port-mapped" && e["previous"].is_string())
        .cloned()
        .collect();
    assert_eq!(mapped.len(), 2);
    for m in &mapped {
        let internal: std::net::SocketAddrV4 = m["internal"]
            .as_str()
            .expect("internal")
            .parse()
            .expect("internal");
        let external: Vec<&str> = m["external"]
            .as_str()
            .expect("external")
            .split('/')
            .collect();
        let to = std::net::SocketAddrV4::new(
            external[2].parse().expect("ip"),
            external[4].parse().expect("port"),
        );
        let reaches = if external[3] == "tcp" {
            tcp_reaches(&lab, internal.port(), to)
        } else {
            udp_reaches(&lab, internal.port(), to)
        };
        assert!(!reaches, "{m}: deleted on the router");
    }
}

/// `natpunch map ARGS --wait-ms 600 --state STATE` in node `host`: (success, stdout, stderr).
fn map_in(lab: &natlab::Lab, host: &str, state: &Path, args: &[&str]) -> (bool, String, String) {
    let mut cmd = lab
        .command(host, env!("CARGO_BIN_EXE_natpunch"))
        .expect("command");
    cmd.arg("map").args(args).args([
        "--wait-ms",
        "600",
        "--state",
        state.to_str().expect("utf-8"),
    ]);
    let out = cmd.output().expect("natpunch runs");
    (out.status.success(), stdout(&out), stderr(&out))
}

/// Three miniupnpd routers: one speaking everything with PCP lifetimes clamped to 120–3600 s,
/// one without PCP, one with UPnP only. PCP lifetimes are clamped (NAT-PMP and UPnP get what
/// they ask for from miniupnpd); `--via auto` takes the best protocol each router speaks; asking
/// for a protocol the router lacks fails with the protocol named.
#[test]
#[ignore = "needs root, the NAT lab and miniupnpd: ./test runs it"]
fn map_add_clamps_pcp_lifetimes_and_falls_back_to_what_the_router_speaks() {
    use natlab::{Lab, LabOptions, Topology};
    testkit::require::portmap(
        "map_add_clamps_pcp_lifetimes_and_falls_back_to_what_the_router_speaks",
    );
    let topology = Topology::from_toml(
        r#"
        [router.full]
        nat = "port-restricted"
        [router.full.portmap]
        min_lifetime_secs = 120
        max_lifetime_secs = 3600
        [router.pmp]
        nat = "port-restricted"
        [router.pmp.portmap]
        pcp = false
        [router.igd]
        nat = "port-restricted"
        [router.igd.portmap]
        pcp = false
        natpmp = false
        [host.a]
        upstream = "full"
        [host.b]
        upstream = "pmp"
        [host.c]
        upstream = "igd"
        "#,
    )
    .expect("topology");
    let lab = Lab::build(&topology, LabOptions::default()).expect("lab");
    let dir = std::env::temp_dir().join(format!("natpunch-fallback-{}", std::process::id()));
    let map = |host: &str, args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--json");
        map_in(&lab, host, &dir.join(format!("{host}.json")), &all)
    };
    let json = |(ok, out, err): (bool, String, String)| -> Value {
        assert!(ok, "{out} {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    };

    for (via, asked, granted) in [
        ("pcp", "30", 120),
        ("pcp", "100000", 3600),
        ("natpmp", "30", 30),
        ("upnp", "100000", 100_000),
    ] {
        let m = json(map(
            "a",
            &["add", "9000", "--via", via, "--lifetime", asked],
        ));
        assert_eq!(m["lifetime_secs"], granted, "{via} asked {asked}: {m}");
    }

    let probe = json(map("b", &["probe"]));
    assert!(
        probe["pcp"].is_null() && probe["nat_pmp"].is_object(),
        "{probe}"
    );
    let problems = probe["problems"].to_string();
    assert!(problems.contains("pcp: no answer"), "{problems}");
    assert!(!problems.contains("pcp: pcp:"), "named once: {problems}");
    let m = json(map("b", &["add", "9000"]));
    assert_eq!(m["method"], "nat-pmp", "{m}");
    let m = json(map("c", &["add", "9000"]));
    assert_eq!(m["method"], "upnp", "{m}");
    let (ok, _, err) = map("c", &["add", "9001", "--via", "natpmp"]);
    assert!(
        !ok && err.contains("nat-pmp: no answer from 192.168."),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What miniupnpd never does, from testkit's fake IGD running in a lab router's namespace: an
/// external address in 100.64/10 is flagged as behind another NAT, and a router that only grants
/// permanent leases (725) gets one after the limited lease is refused.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn map_handles_an_igd_behind_cgnat_that_only_grants_permanent_leases() {
    use natlab::{Lab, LabOptions, Topology};
    use testkit::igd::{FakeIgd, FakeIgdConfig};
    testkit::require::lab("map_handles_an_igd_behind_cgnat_that_only_grants_permanent_leases");
    let topology = Topology::from_toml(
        r#"
        [router.home]
        nat = "port-restricted"
        [host.alice]
        upstream = "home"
        "#,
    )
    .expect("topology");
    let lab = Lab::build(&topology, LabOptions::default()).expect("lab");
    let lan_ip = lab.node("alice").expect("alice").uplink.gateway;
    let igd = lab
        .run_in("home", || {
            FakeIgd::start(FakeIgdConfig {
                lan_ip,
                external_ip: "100.64.0.7".parse().expect("ip"),
                only_permanent_leases: true,
                multicast_ssdp: true,
                ssdp_unicast_port: None,
            })
        })
        .expect("enter home")
        .expect("fake IGD");
    let state = std::env::temp_dir().join(format!("natpunch-fake-igd-{}.json", std::process::id()));
    let map = |args: &[&str]| map_in(&lab, "alice", &state, args);

    let (ok, out, err) = map(&["probe", "--json"]);
    let probe: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    assert!(ok && probe["upnp"].is_object(), "{probe}");
    assert_eq!(probe["external_ip"], "100.64.0.7");
    assert_eq!(probe["behind_another_nat"], true, "{probe}");
    let (_, text, _) = map(&["probe"]);
    assert!(text.contains("another NAT is in front"), "{text}");

    let (ok, out, err) = map(&["add", "6000", "--lifetime", "600", "--json"]);
    assert!(ok, "{out} {err}");
    assert!(
        err.contains("not global; another NAT is in front"),
        "auto warns: {err}"
    );
    let mapped: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(mapped["method"], "upnp");
    assert_eq!(mapped["lifetime_secs"], 0, "a permanent lease: {mapped}");
    let adds: Vec<(Option<u16>, String)> = igd
        .requests()
        .into_iter()
        .filter(|c| c.action == "AddPortMapping")
        .map(|c| {
            let lease = c
                .args
                .iter()
                .find(|(k, _)| k == "NewLeaseDuration")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            (c.error_code, lease)
        })
        .collect();
    assert_eq!(
        adds,
        [(Some(725), "600".to_owned()), (None, "0".to_owned())],
        "refused with 725, then asked for a permanent lease"
    );
    let table = igd.mappings();
    assert!(
        table.iter().any(|m| m.external_port == 6000
            && m.internal_client == "192.168.1.2"
            && m.lease_secs == 0),
        "{table:?}"
    );
    let (ok, _, err) = map(&["delete", "6000"]);
    assert!(ok, "{err}");
    assert!(igd.mappings().is_empty(), "deleted on the IGD");
    let _ = std::fs::remove_file(&state);
}

/// `natpunch lab matrix` with natpunch's engine: port-restricted pairs punch through over TCP
/// and over QUIC in at least 19 of 20 trials each and leave exactly one direct connection;
/// symmetric pairs end FAILED on both sides, every attempt recorded, well before stock
/// rust-libp2p gives up (30.8 s over TCP, 15.8 s over QUIC); a TCP punch from a public host
/// towards a symmetric listener succeeds in its first attempt, reversed since both peers know
/// their mapping class; natpunch's engine punches with stock rust-libp2p's on the other side,
/// in both roles.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn lab_matrix_punches_port_restricted_pairs_and_fails_symmetric_ones_fast() {
    testkit::require::lab("lab_matrix_punches_port_restricted_pairs_and_fails_symmetric_ones_fast");
    let dir = std::env::temp_dir().join(format!("natpunch-matrix-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let matrix_with = |pair: &str, trials: &str, out: &Path, more: &[&str]| -> Value {
        let (pair, transport) = pair.split_once('/').unwrap_or((pair, "both"));
        let mut args = vec![
            "lab",
            "matrix",
            "--pairs",
            pair,
            "--transport",
            transport,
            "--trials",
            trials,
            "--parallel",
            "4",
            "--json",
            "--trials-out",
            out.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(more);
        let o = natpunch(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
    };
    let matrix = |pair: &str, trials: &str, out: &Path| matrix_with(pair, trials, out, &[]);
    let trials_of = |path: &Path| -> Vec<Value> {
        std::fs::read_to_string(path)
            .expect("trials")
            .lines()
            .map(|l| serde_json::from_str(l).expect("trial"))
            .collect()
    };

    let pr = dir.join("pr.jsonl");
    let report = matrix("port-restricted:port-restricted", "20", &pr);
    let cells = report["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 2, "tcp and quic: {report}");
    for cell in cells {
        assert_eq!(cell["trials"], 20, "{cell}");
        assert!(cell["success"].as_u64() >= Some(19), "≥ 95%: {cell}");
        assert_eq!(
            cell["one_direct_connection"], cell["success"],
            "exactly one direct connection after each success: {cell}"
        );
        assert_eq!(cell["complete_records"], 20, "{cell}");
        assert!(
            cell["median_ms"].as_f64().is_some_and(|m| m > 0.0),
            "{cell}"
        );
    }
    for t in trials_of(&pr) {
        for side in ["dialer", "listener"] {
            let r = &t[side];
            assert_eq!(r["side"], side, "{t}");
            if r["outcome"] == "SUCCESS" {
                assert_eq!(r["transport"], t["transport"], "{t}");
                assert!(r["direct_rtt_ms"].as_f64().is_some(), "{t}");
            }
        }
    }

    let sy = dir.join("sy.jsonl");
    let report = matrix("symmetric:symmetric", "3", &sy);
    for cell in report["cells"].as_array().expect("cells") {
        assert_eq!(cell["outcomes"], serde_json::json!({"FAILED": 3}), "{cell}");
        assert_eq!(
            cell["listener_outcomes"],
            serde_json::json!({"FAILED": 3}),
            "{cell}"
        );
        assert_eq!(cell["complete_records"], 3, "{cell}");
    }
    for t in trials_of(&sy) {
        for side in ["dialer", "listener"] {
            let r = &t[side];
            let attempts = r["attempts"].as_array().expect("attempts");
            assert_eq!(attempts.len(), 3, "every attempt recorded: {t}");
            assert!(
                attempts.iter().all(|a| a["outcome"] != "SUCCESS"
                    && a["outcome"] != "UNKNOWN"
                    && a["ended_ms"].as_f64().is_some()),
                "{t}"
            );
            let ended = r["ended_ms"].as_f64().expect("ended");
            assert!(ended < 15_800.0, "{side} gave up after {ended} ms: {t}");
        }
    }

    // A public dialer and a symmetric listener: a TCP simultaneous open cannot work (the
    // listener's packets arrive from a port the dialer never aimed at, on its listener); both
    // peers know their mapping class (the lab's STUN server), so the first attempt is already
    // reversed and succeeds.
    let os = dir.join("os.jsonl");
    let report = matrix("open:symmetric/tcp", "2", &os);
    let cell = &report["cells"][0];
    assert_eq!(cell["success"], 2, "{cell}");
    assert_eq!(
        cell["attempts_needed"],
        serde_json::json!({"1": 2}),
        "{cell}"
    );
    for t in trials_of(&os) {
        let attempts = t["dialer"]["attempts"].as_array().expect("attempts");
        assert_eq!(attempts[0]["reversed"], true, "{t}");
        assert_eq!(attempts[0]["outcome"], "SUCCESS", "{t}");
        assert_eq!(t["dialer"]["local_mapping"], "none", "{t}");
    }

    // QUIC between a port-restricted cone and a symmetric NAT, both ways: no simultaneous dial
    // gets through; birthday probing finds a pair on the first attempt and the easy side's dial
    // of the probed port is the direct connection.
    let bq = dir.join("bq.jsonl");
    let report = matrix(
        "port-restricted:symmetric,symmetric:port-restricted/quic",
        "3",
        &bq,
    );
    for cell in report["cells"].as_array().expect("cells") {
        let direct = cell["birthday_direct"].as_u64().expect("birthday_direct");
        assert!(direct >= 2, "{cell}");
        assert!(cell["success"].as_u64() >= Some(direct), "{cell}");
        assert!(
            cell["probes_max"].as_u64().is_some_and(|p| p <= 2048),
            "within the budget: {cell}"
        );
    }
    for t in trials_of(&bq) {
        if t["dialer"]["outcome"] != "SUCCESS" {
            continue;
        }
        let roles: Vec<&Value> = ["dialer", "listener"]
            .iter()
            .map(|side| &t[*side]["attempts"][0]["birthday"]["role"])
            .collect();
        let want = if t["a"] == "symmetric" {
            ["hard", "easy"]
        } else {
            ["easy", "hard"]
        };
        assert_eq!(roles, want, "{t}");
    }

    // Port prediction over QUIC: a symmetric NAT that allocates ports in order, both ways,
    // its session table bounded to 128 flows and the peers told so. The hard peer finds where
    // its next mapping will be (two fresh ones at the lab's STUN server) and says so; the
    // easy peer probes that window first and hits there with a few dozen probes (its first
    // probes also let in the hard peer's own dial, from its next mapping, which may connect
    // first). The hard peer opens 112 sockets (the table less 16).
    let sq = dir.join("sq.jsonl");
    let report = matrix_with(
        "port-restricted:symmetric-sequential,symmetric-sequential:port-restricted/quic",
        "2",
        &sq,
        &["--max-sessions", "128", "--peer-arg=--session-table=128"],
    );
    assert_eq!(
        report["conditions"]["hard_sessions"], "128 drop",
        "{report}"
    );
    for cell in report["cells"].as_array().expect("cells") {
        let predicted = cell["predicted_hits"].as_u64().expect("predicted_hits");
        assert!(predicted >= 1, "{cell}");
        // The simultaneous connection and the one through the probed port may both come up;
        // one stays on each side (the hard peer keeps its probed port's listener while the
        // connection kept may still come in on it).
        assert_eq!(
            cell["one_direct_connection"], cell["success"],
            "exactly one direct connection after every success: {cell}"
        );
    }
    for t in trials_of(&sq) {
        let (hard, easy) = if t["a"] == "symmetric-sequential" {
            ("dialer", "listener")
        } else {
            ("listener", "dialer")
        };
        let h = &t[hard]["attempts"][0]["birthday"];
        let e = &t[easy]["attempts"][0]["birthday"];
        assert_eq!(h["sockets"], 112, "{t}");
        assert!(
            h["predicted"].as_u64().is_some(),
            "the hard peer predicted: {t}"
        );
        assert_eq!(e["predicted"], h["predicted"], "{t}");
        if e["in_window"] == true {
            assert!(e["probes"].as_u64().is_some_and(|p| p <= 100), "{t}");
        }
    }

    // natpunch's engine with stock rust-libp2p's on the other side, both ways: plain DCUtR,
    // first attempt.
    for (dialer, listener) in [("natpunch", "stock"), ("stock", "natpunch")] {
        let mixed = dir.join(format!("{dialer}-{listener}.jsonl"));
        let report = matrix_with(
            "port-restricted:port-restricted",
            "2",
            &mixed,
            &["--dialer-engine", dialer, "--listener-engine", listener],
        );
        for cell in report["cells"].as_array().expect("cells") {
            assert_eq!(cell["success"], 2, "{dialer} dials {listener}: {cell}");
            assert_eq!(
                cell["attempts_needed"],
                serde_json::json!({"1": 2}),
                "{cell}"
            );
        }
        for t in trials_of(&mixed) {
            assert_eq!(t["dialer"]["engine"], dialer, "{t}");
            assert_eq!(t["listener"]["engine"], listener, "{t}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `natpunch lab matrix` over TCP: from behind a full-cone or restricted-cone NAT into a
/// symmetric listener, the first attempt goes direct (reversed: the listener dials as the
/// connection's dialer, the dialer's own SYN opening its NAT's filter towards the listener),
/// in about the time of a punch between cones; the other way round (symmetric dialer, cone
/// listener) the first attempt stays a simultaneous open and goes direct too. Each side's
/// record says its mapping class, learnt from the lab's RFC 5780 server, and the remote's.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn tcp_from_cone_nats_into_a_symmetric_listener_goes_direct_on_the_first_attempt() {
    testkit::require::lab(
        "tcp_from_cone_nats_into_a_symmetric_listener_goes_direct_on_the_first_attempt",
    );
    let out = std::env::temp_dir().join(format!("natpunch-classes-{}.jsonl", std::process::id()));
    let o = natpunch(&[
        "lab",
        "matrix",
        "--pairs",
        "full-cone:symmetric,restricted-cone:symmetric,symmetric:full-cone",
        "--transport",
        "tcp",
        "--trials",
        "2",
        "--parallel",
        "3",
        "--json",
        "--trials-out",
        out.to_str().expect("utf-8"),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: Value =
        serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)));
    let cells = report["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 3, "{report}");
    for cell in cells {
        assert_eq!(cell["success"], 2, "{cell}");
        assert_eq!(
            cell["attempts_needed"],
            serde_json::json!({"1": 2}),
            "{cell}"
        );
        // Three relayed round trips of signalling and the handshake: far from the 3.6 s of a
        // second attempt.
        let p95 = cell["p95_ms"].as_f64().expect("p95");
        assert!(p95 < 1000.0, "{cell}");
    }
    let trials: Vec<Value> = std::fs::read_to_string(&out)
        .expect("trials")
        .lines()
        .map(|l| serde_json::from_str(l).expect("trial"))
        .collect();
    for t in &trials {
        let into_symmetric = t["b"] == "symmetric";
        let (a, b) = (&t["dialer"], &t["listener"]);
        assert_eq!(a["attempts"][0]["reversed"], into_symmetric, "{t}");
        assert_eq!(b["attempts"][0]["reversed"], into_symmetric, "{t}");
        let (cone, symmetric) = if into_symmetric { (a, b) } else { (b, a) };
        assert_eq!(cone["local_mapping"], "endpoint-independent", "{t}");
        assert_eq!(
            symmetric["local_mapping"], "address-and-port-dependent",
            "{t}"
        );
        for (r, other) in [(a, b), (b, a)] {
            assert_eq!(r["local_mapping_source"], "rfc5780", "{t}");
            assert_eq!(r["remote_mapping"], other["local_mapping"], "{t}");
        }
    }
    let _ = std::fs::remove_file(&out);
}

/// `natpunch relay` under a flood of reservation and circuit requests beyond its limits, on
/// loopback: the excess is refused with RESOURCE_LIMIT_EXCEEDED, the relay holds no more
/// reservations and circuits than allowed, its memory stays bounded, and a circuit that existed
/// before the flood still carries pings after it.
#[test]
fn relay_refuses_a_flood_beyond_its_limits_and_keeps_existing_circuits() {
    use std::time::{Duration, Instant};

    use futures::StreamExt as _;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
    use libp2p::{Multiaddr, PeerId, Swarm, noise, ping, relay, tcp, yamux};

    #[derive(NetworkBehaviour)]
    struct Client {
        relay: relay::client::Behaviour,
        ping: ping::Behaviour,
    }

    fn client() -> Swarm<Client> {
        libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_relay_client(noise::Config::new, yamux::Config::default)
            .expect("relay client")
            .with_behaviour(|_, relay| Client {
                relay,
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_millis(300)),
                ),
            })
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build()
    }

    /// The next successful ping from `from`.
    async fn wait_ping(d: &mut Swarm<Client>, from: PeerId) {
        loop {
            if let SwarmEvent::Behaviour(ClientEvent::Ping(ping::Event {
                peer,
                result: Ok(_),
                ..
            })) = d.select_next_some().await
                && peer == from
            {
                return;
            }
        }
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let telemetry = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let key = std::env::temp_dir().join(format!("natpunch-flood-{}.key", std::process::id()));
    let mut relay_proc = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args([
            "relay",
            "--listen-ip",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--external-addr",
            &format!("/ip4/127.0.0.1/tcp/{port}"),
            "--max-reservations",
            "4",
            "--max-circuits",
            "2",
            "--telemetry-port",
            &telemetry.to_string(),
            "--identity",
            key.to_str().expect("utf-8"),
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("relay");
    let pid = relay_proc.id();
    let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Value>::new()));
    let reader = {
        let events = std::sync::Arc::clone(&events);
        let out = relay_proc.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    events.lock().expect("events").push(v);
                }
            }
        })
    };
    let relay_id: PeerId = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = events.lock().expect("events").iter().find_map(|e| {
                e["address"]
                    .as_str()
                    .and_then(|a| a.rsplit('/').next())
                    .and_then(|id| id.parse().ok())
            });
            if let Some(id) = found {
                break id;
            }
            assert!(Instant::now() < deadline, "the relay did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let relay_addr: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{relay_id}")
        .parse()
        .expect("addr");
    let circuit = relay_addr.clone().with(Protocol::P2pCircuit);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let count = |kind: &str, status: &str| {
        events
            .lock()
            .expect("events")
            .iter()
            .filter(|e| e["event"] == kind && e["status"] == status)
            .count()
    };

    runtime.block_on(async {
        // A listener reserves, a dialer reaches it through the relay; both keep pinging.
        let mut listener = client();
        let listener_id = *listener.local_peer_id();
        listener.listen_on(circuit.clone()).expect("reserve");
        loop {
            if let SwarmEvent::Behaviour(ClientEvent::Relay(
                relay::client::Event::ReservationReqAccepted { .. },
            )) = listener.select_next_some().await
            {
                break;
            }
        }
        let l = tokio::spawn(async move {
            loop {
                listener.select_next_some().await;
            }
        });
        let mut dialer = client();
        dialer
            .dial(circuit.clone().with(Protocol::P2p(listener_id)))
            .expect("dial");
        tokio::time::timeout(Duration::from_secs(10), wait_ping(&mut dialer, listener_id))
            .await
            .expect("a ping through the circuit");
        let before = rss_kib(pid);

        // The flood: 60 reservations and 30 circuits, all from 127.0.0.1.
        let mut flood = Vec::new();
        for _ in 0..60 {
            let mut s = client();
            s.listen_on(circuit.clone()).expect("reserve");
            flood.push(s);
        }
        for _ in 0..30 {
            let mut s = client();
            s.dial(circuit.clone().with(Protocol::P2p(listener_id)))
                .expect("dial");
            flood.push(s);
        }
        let drive = tokio::spawn(async move {
            let mut all = futures::stream::select_all(flood.iter_mut().map(|s| s.boxed()));
            let deadline = tokio::time::sleep(Duration::from_secs(6));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    Some(_) = all.next() => {}
                }
            }
            drop(all);
            flood.len()
        });
        // Meanwhile the existing circuit keeps working.
        let pings = tokio::time::timeout(Duration::from_secs(6), async {
            let mut n = 0;
            while n < 5 {
                wait_ping(&mut dialer, listener_id).await;
                n += 1;
            }
            n
        })
        .await
        .expect("pings during the flood");
        assert_eq!(pings, 5);
        assert_eq!(drive.await.expect("flood"), 90);
        tokio::time::timeout(Duration::from_secs(5), wait_ping(&mut dialer, listener_id))
            .await
            .expect("a ping through the circuit after the flood");
        let after = rss_kib(pid);
        assert!(
            after < before + 64 * 1024,
            "relay memory grew from {before} KiB to {after} KiB"
        );
        l.abort();
    });

    let reservations_refused = count("reservation-denied", "ResourceLimitExceeded");
    let circuits_refused = count("circuit-denied", "ResourceLimitExceeded");
    assert!(
        reservations_refused >= 55,
        "60 reservations, at most 4 held (one is the listener's): {reservations_refused} refused"
    );
    assert!(
        circuits_refused >= 29,
        "30 circuits on top of one, at most 2 open: {circuits_refused} refused"
    );
    let metrics = {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", telemetry)).expect("telemetry");
        s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text
    };
    let gauge = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    assert!(gauge("natpunch_relay_reservations") <= 4.0, "{metrics}");
    assert!(gauge("natpunch_relay_circuits") <= 2.0, "{metrics}");
    let _ = relay_proc.kill();
    let _ = relay_proc.wait();
    let _ = reader.join();
    let _ = std::fs::remove_file(&key);
}

/// A `natpunch server` child, ended by its PID when dropped.
struct ServerProc {
    child: std::process::Child,
    /// Kept open: the server prints its stop there.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
    grpc: std::net::SocketAddr,
    telemetry: Option<std::net::SocketAddr>,
}

impl ServerProc {
    fn start(database_url: &str, extra: &[&str]) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_natpunch"))
            .args([
                "server",
                "--listen-ip",
                "127.0.0.1",
                "--port",
                "0",
                "--json",
            ])
            .args(["--telemetry-host", "127.0.0.1"])
            .args(["--database-url", database_url])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("natpunch server");
        let mut line = String::new();
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut line).expect("the listening line");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert_eq!(v["event"], "listening", "{v}");
        Self {
            child,
            _stdout: stdout,
            grpc: v["grpc"].as_str().expect("grpc").parse().expect("addr"),
            telemetry: v["telemetry"].as_str().map(|t| t.parse().expect("addr")),
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("kill");
    }

    fn wait(mut self) -> std::process::ExitStatus {
        let status = self.child.wait().expect("wait");
        std::mem::forget(self);
        status
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory under the system's temporary one, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("natpunch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// [`http_get`], trying again while the server is not listening yet, for up to `wait`; the
/// last connection error if it never listened.
fn http_get_within(
    addr: std::net::SocketAddr,
    path: &str,
    wait: std::time::Duration,
) -> std::io::Result<String> {
    let until = std::time::Instant::now() + wait;
    loop {
        match std::net::TcpStream::connect(addr) {
            Ok(_) => return Ok(http_get(addr, path)),
            Err(e) if std::time::Instant::now() >= until => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("telemetry");
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

/// Sends `keys` as reports, `tasks` at a time; returns the keys acknowledged and the keys whose
/// request failed (the server went away), which a client keeps to send again. A sender stops
/// at its first failure; keys never tried are neither.
async fn send_reports(
    grpc: std::net::SocketAddr,
    host: libp2p::PeerId,
    keys: Vec<String>,
    tasks: usize,
) -> (Vec<String>, Vec<String>) {
    use api::pb::punchr_service_client::PunchrServiceClient;
    use std::sync::{Arc, Mutex};
    let queue = Arc::new(Mutex::new(keys));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::new(Mutex::new(Vec::new()));
    // The server crate has its own peer-ID type (it does not link libp2p).
    let ours = |p: libp2p::PeerId| api::peer_id::PeerId::from_bytes(&p.to_bytes()).expect("peer");
    let (host, remote, relay) = (ours(host), ours(peer_id()), ours(peer_id()));
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (queue, acked, kept) = (queue.clone(), acked.clone(), kept.clone());
        let (host, remote, relay) = (host.clone(), remote.clone(), relay.clone());
        handles.push(tokio::spawn(async move {
            let mut client = PunchrServiceClient::connect(format!("http://{grpc}"))
                .await
                .ok();
            loop {
                let Some(key) = queue.lock().expect("queue").pop() else {
                    return;
                };
                let sent = match client.as_mut() {
                    Some(c) => c
                        .track_hole_punch(api::sample::report(
                            &host,
                            &remote,
                            &relay,
                            "key",
                            Some(&key),
                        ))
                        .await
                        .map_err(|e| eprintln!("{key}: {e}"))
                        .is_ok(),
                    None => false,
                };
                if sent {
                    acked.lock().expect("acked").push(key);
                } else {
                    kept.lock().expect("kept").push(key);
                    return;
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("sender");
    }
    let acked = acked.lock().expect("acked").clone();
    let kept = kept.lock().expect("kept").clone();
    (acked, kept)
}

fn peer_id() -> libp2p::PeerId {
    libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
}

async fn register_host(grpc: std::net::SocketAddr, host: libp2p::PeerId) {
    let mut client =
        api::pb::punchr_service_client::PunchrServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect");
    client
        .register(api::pb::RegisterRequest {
            client_id: host.to_bytes(),
            agent_version: "natpunch-test".into(),
            protocols: vec![],
            api_key: "key".into(),
        })
        .await
        .expect("register");
}

/// Restart (SIGTERM) and SIGKILL under load, on `url`: every acknowledged report is stored
/// exactly once, every report is whole, and the database is consistent.
async fn server_survives(url: &str) {
    use api::store::{Backend, SqlStore, Store as _};
    use nix::sys::signal::Signal;

    let host = peer_id();
    let server = ServerProc::start(url, &[]);
    register_host(server.grpc, host).await;
    let keys: Vec<String> = (0..40).map(|i| format!("restart-{i}")).collect();
    let (acked_a, kept) = send_reports(server.grpc, host, keys, 4).await;
    assert!(kept.is_empty() && acked_a.len() == 40, "{kept:?}");
    let telemetry = server.telemetry.expect("telemetry");
    let metrics = http_get(telemetry, "/metrics");
    assert!(
        metrics.contains(r#"natpunch_server_requests_total{method="TrackHolePunch",code="OK"} 40"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"natpunch_server_results_total{outcome="SUCCESS",transport="quic"} 40"#),
        "{metrics}"
    );
    assert!(metrics.contains("natpunch_server_request_duration_seconds_bucket"));
    assert!(http_get(telemetry, "/health").ends_with("ok\n"));
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success(), "a clean stop on SIGTERM");

    // SIGKILL in the middle of a load of 16 concurrent senders.
    let server = ServerProc::start(url, &[]);
    let keys: Vec<String> = (0..100_000).map(|i| format!("load-{i}")).collect();
    let grpc = server.grpc;
    let load = tokio::spawn(send_reports(grpc, host, keys, 16));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    server.signal(Signal::SIGKILL);
    let _ = server.wait();
    let (acked_b, kept) = load.await.expect("load");
    assert!(
        !acked_b.is_empty(),
        "some reports went through before the kill"
    );
    assert!(!kept.is_empty(), "the kill interrupted the load");
    // Restarted, the server takes what the clients kept, plus a few already acknowledged.
    let server = ServerProc::start(url, &[]);
    let mut resend = kept.clone();
    resend.extend(acked_b.iter().take(20).cloned());
    let (acked_c, still) = send_reports(server.grpc, host, resend, 4).await;
    assert!(
        still.is_empty(),
        "{} reports refused after the restart",
        still.len()
    );
    drop(server);

    let store = SqlStore::open(url).await.expect("open the database");
    let counts = store.counts().await.expect("counts");
    let total = acked_a.len() + acked_b.len() + kept.len();
    assert_eq!(
        counts.results,
        i64::try_from(total).expect("count"),
        "every acknowledged or kept report once, no more ({} acked before the kill, {} resent)",
        acked_b.len(),
        acked_c.len()
    );
    // Whole reports only: 2 attempts, 1 latency, 1 mapping, 1 network row and 3 address links
    // each.
    assert_eq!(counts.attempts, 2 * counts.results);
    assert_eq!(counts.latencies, counts.results);
    assert_eq!(counts.mappings, counts.results);
    assert_eq!(counts.networks, counts.results);
    assert_eq!(counts.result_addrs, 3 * counts.results);
    let (keys,): (i64,) =
        sqlx::query_as("SELECT count(DISTINCT idempotency_key) FROM hole_punch_results")
            .fetch_one(store.pool())
            .await
            .expect("keys");
    assert_eq!(keys, counts.results);
    if store.backend() == Backend::Sqlite {
        let (check,): (String,) = sqlx::query_as("PRAGMA integrity_check")
            .fetch_one(store.pool())
            .await
            .expect("integrity");
        assert_eq!(check, "ok");
        let orphans = sqlx::query("PRAGMA foreign_key_check")
            .fetch_all(store.pool())
            .await
            .expect("foreign keys");
        assert!(
            orphans.is_empty(),
            "{} rows break a foreign key",
            orphans.len()
        );
    }
    store.close().await;
}

/// Two `natpunch server` replicas on one PostgreSQL serve one campaign: 16 clients at once,
/// each asking both replicas in turn, get no remote more often than the per-remote cap allows
/// and no remote's address twice; both checked in SQL afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and PostgreSQL (a private server runs as the postgres user): ./test runs it"]
async fn server_replicas_on_one_postgresql_keep_the_allocation_rules_between_them() {
    use api::pb::punchr_service_client::PunchrServiceClient;
    use api::store::{ConnectionEvent, SqlStore, Store as _};

    const CAP: i64 = 5;
    let pg = api::postgres::TempPostgres::start()
        .unwrap_or_else(|e| panic!("a private PostgreSQL server: {e}"));
    let url = pg.new_database().expect("database");
    // What the honeypot saw: 4 remotes, each with 2 relayed addresses.
    let store = SqlStore::open(&url).await.expect("open the database");
    let (honeypot, relay) = (api::sample::peer_id(), api::sample::peer_id());
    let now = api::server::now_ns();
    for _ in 0..4 {
        let addrs: Vec<api::report::Addr> = [4001, 4002]
            .iter()
            .map(|&port| api::report::Addr::of(&api::sample::relay_addr(&relay, port)))
            .collect();
        let conn: api::multiaddr::Multiaddr = "/ip4/203.0.113.50/tcp/4001".parse().expect("addr");
        let event = ConnectionEvent {
            local: honeypot.to_string(),
            remote: api::sample::peer_id().to_string(),
            agent_version: Some("remote/1".into()),
            protocols: vec![],
            conn_addr: api::report::Addr::of(&conn),
            addrs,
            opened_at: now,
        };
        store.record_connection(&event, now).await.expect("seen");
    }
    let cap = CAP.to_string();
    let args = ["--per-remote", &cap, "--telemetry-port", "0"];
    let replicas = [
        ServerProc::start(&url, &args),
        ServerProc::start(&url, &args),
    ];
    let grpc: Vec<std::net::SocketAddr> = replicas.iter().map(|r| r.grpc).collect();
    let mut clients = Vec::new();
    for n in 0..16 {
        let grpc = grpc.clone();
        clients.push(tokio::spawn(async move {
            let host = peer_id();
            register_host(grpc[n % 2], host).await;
            let mut served = [0u32; 2];
            // Until neither replica has anything left for this client.
            let mut empty = 0;
            let mut k = n;
            while empty < 2 {
                let replica = k % 2;
                k += 1;
                let mut client = PunchrServiceClient::connect(format!("http://{}", grpc[replica]))
                    .await
                    .expect("connect");
                let ask = api::pb::GetAddrInfoRequest {
                    host_id: host.to_bytes(),
                    all_host_ids: vec![host.to_bytes()],
                    api_key: "key".into(),
                };
                match client.get_addr_info(ask).await {
                    Ok(_) => {
                        served[replica] += 1;
                        empty = 0;
                    }
                    Err(s) if s.code() == tonic::Code::NotFound => empty += 1,
                    Err(s) => panic!("replica {replica}: {s}"),
                }
            }
            served
        }));
    }
    let mut served = [0u32; 2];
    for c in clients {
        let s = c.await.expect("client");
        served[0] += s[0];
        served[1] += s[1];
    }
    drop(replicas);
    assert!(
        served[0] > 0 && served[1] > 0,
        "both replicas served: {served:?}"
    );
    let count = |sql: &'static str| {
        let store = &store;
        async move {
            sqlx::query_as::<_, (i64,)>(sql)
                .fetch_one(store.pool())
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"))
                .0
        }
    };
    let allocations = count("SELECT count(*) FROM allocations").await;
    assert_eq!(
        allocations,
        i64::from(served[0] + served[1]),
        "one row per answer"
    );
    // 16 clients want each of the 4 remotes: the cap, not the demand, ends it.
    let (most, least): (i64, i64) = sqlx::query_as(
        "SELECT max(n), min(n) FROM (SELECT count(*) AS n FROM allocations GROUP BY remote_id) c",
    )
    .fetch_one(store.pool())
    .await
    .expect("per remote");
    assert_eq!(
        (most, least),
        (CAP, CAP),
        "every remote served exactly the cap"
    );
    assert_eq!(allocations, 4 * CAP);
    let twice = count(
        "SELECT count(*) FROM (SELECT a.local_id, a.remote_id, ax.multi_address_id \
         FROM allocations a JOIN allocations_x_multi_addresses ax ON ax.allocation_id = a.id \
         GROUP BY 1, 2, 3 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(
        twice, 0,
        "no client was served the same address of a remote twice"
    );
    store.close().await;
}

/// The figures a page shows: each `data-figure` name with its `data-value`, outside scripts.
fn page_figures(dom: &str) -> std::collections::BTreeMap<String, String> {
    let unescape = |s: &str| {
        s.replace("&quot;", "\"")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&")
    };
    let mut shown = String::new();
    let mut rest = dom;
    while let Some(start) = rest.find("<script") {
        shown.push_str(&rest[..start]);
        rest = rest[start..]
            .find("</script>")
            .map_or("", |end| &rest[start + end..]);
    }
    shown.push_str(rest);
    let mut figures = std::collections::BTreeMap::new();
    let mut rest = shown.as_str();
    while let Some(at) = rest.find("data-figure=\"") {
        rest = &rest[at + "data-figure=\"".len()..];
        let Some(end) = rest.find('"') else { break };
        let name = unescape(&rest[..end]);
        rest = &rest[end + 1..];
        if let Some(value) = rest.strip_prefix(" data-value=\"")
            && let Some(end) = value.find('"')
        {
            figures.insert(name, unescape(&value[..end]));
        }
    }
    figures
}

/// The server's live dashboard in headless Chromium: every figure on the page (totals, the
/// NAT-pair × transport matrix, outcomes, time to direct, agent versions) equals a query on the
/// same database, and a phone-sized screenshot (kept under the target directory) shows the bars.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium (apt install chromium): ./test runs it"]
async fn the_dashboard_in_chromium_shows_what_the_database_holds() {
    use api::store::dashboard::{TIME_BINS_MS, transport_of};
    use api::store::{Host, SqlStore, Store as _};
    use std::collections::BTreeMap;

    testkit::require::program(
        "the_dashboard_in_chromium_shows_what_the_database_holds",
        "chromium",
        "chromium",
    );
    let dir = Scratch::new("dashboard");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let store = SqlStore::open(&url).await.expect("open the database");
    let (remote, relay) = (api::sample::peer_id(), api::sample::peer_id());
    let hosts = [api::sample::peer_id(), api::sample::peer_id()];
    for (host, agent) in hosts.iter().zip(["natpunch/0.1.0", "go-punchr/0.9.0"]) {
        let host = Host {
            peer: &host.to_string(),
            agent_version: agent,
            protocols: &[],
        };
        store
            .register("key", true, host, api::server::now_ns())
            .await
            .expect("register")
            .expect("open registration");
    }
    let auth = store.authorize("key").await.expect("auth").expect("key");
    let nats = [
        "endpoint-independent",
        "address-and-port-dependent",
        "address-dependent",
    ];
    for i in 0..60usize {
        let key = format!("dash-{i}");
        let request = api::sample::report(&hosts[i % 3 / 2], &remote, &relay, "key", Some(&key));
        let mut r = api::report::Report::from_request(&request).expect("valid");
        r.client_nat = Some(nats[i % 3].to_owned());
        r.remote_nat = (i % 4 == 0).then(|| nats[(i / 4) % 3].to_owned());
        r.protocols = if i % 2 == 0 { vec![4, 6] } else { vec![4, 461] };
        r.outcome = ["SUCCESS", "SUCCESS", "FAILED", "SUCCESS", "NO_CONNECTION"][i % 5];
        r.time_to_direct = (r.outcome == "SUCCESS").then_some(0.04 * i as f64);
        store
            .track(auth, &r, api::server::now_ns())
            .await
            .expect("stored");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
        .to_string();
    let server = ServerProc::start(&url, &["--telemetry-port", &port]);
    let telemetry = server.telemetry.expect("telemetry");
    let page = format!("http://{telemetry}/");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ];
    let dom = Command::new("chromium")
        .args(common)
        .args(["--virtual-time-budget=10000", "--dump-dom", &page])
        .output()
        .expect("chromium runs");
    let dom = stdout(&dom);
    assert!(
        dom.contains("data-generated-at="),
        "the figures were drawn: {dom}"
    );
    let shown = page_figures(&dom);

    // What the database says, asked here in SQL.
    let pool = store.pool();
    let one = |sql: &'static str| async move {
        sqlx::query_as::<_, (i64,)>(sql)
            .fetch_one(pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .0
    };
    let mut want: BTreeMap<String, String> = BTreeMap::new();
    let results = one("SELECT count(*) FROM hole_punch_results").await;
    let successes = one("SELECT count(*) FROM hole_punch_results WHERE outcome = 'SUCCESS'").await;
    want.insert("results".into(), results.to_string());
    want.insert("successes".into(), successes.to_string());
    for (outcome, n) in sqlx::query_as::<_, (String, i64)>(
        "SELECT outcome, count(*) FROM hole_punch_results GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("outcomes")
    {
        want.insert(format!("outcome:{outcome}"), n.to_string());
    }
    let mut cells: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for (client, remote, filters, n, ok) in sqlx::query_as::<_, (String, String, String, i64, i64)>(
        "SELECT coalesce(client_nat, 'unknown'), coalesce(remote_nat, 'unknown'), \
         protocol_filters, count(*), sum(outcome = 'SUCCESS') FROM hole_punch_results \
         GROUP BY 1, 2, 3",
    )
    .fetch_all(pool)
    .await
    .expect("cells")
    {
        let filters: Vec<i32> = serde_json::from_str(&filters).expect("JSON filters");
        let cell = cells
            .entry(format!(
                "cell:{client}|{remote}|{}",
                transport_of(&filters, None)
            ))
            .or_default();
        cell.0 += n;
        cell.1 += ok;
    }
    for (key, (n, ok)) in cells {
        want.insert(format!("{key}:n"), n.to_string());
        want.insert(format!("{key}:successes"), ok.to_string());
    }
    let mut bins = vec![0i64; TIME_BINS_MS.len() + 1];
    for (t,) in sqlx::query_as::<_, (f64,)>(
        "SELECT time_to_direct FROM hole_punch_results \
         WHERE outcome = 'SUCCESS' AND time_to_direct IS NOT NULL",
    )
    .fetch_all(pool)
    .await
    .expect("times")
    {
        let k = TIME_BINS_MS
            .iter()
            .position(|&ms| t * 1000.0 < f64::from(ms))
            .unwrap_or(TIME_BINS_MS.len());
        bins[k] += 1;
    }
    for (k, n) in bins.iter().enumerate() {
        want.insert(format!("ttd:{k}"), n.to_string());
    }
    for (agent, hosts, reports) in sqlx::query_as::<_, (String, i64, i64)>(
        "SELECT p.agent_version, count(DISTINCT r.local_id), count(*) \
         FROM hole_punch_results r JOIN peers p ON p.id = r.local_id GROUP BY 1",
    )
    .fetch_all(pool)
    .await
    .expect("agents")
    {
        want.insert(format!("agent:{agent}:hosts"), hosts.to_string());
        want.insert(format!("agent:{agent}:reports"), reports.to_string());
    }
    let buckets: i64 = shown
        .iter()
        .filter(|(k, _)| k.starts_with("bucket:"))
        .map(|(_, v)| v.parse::<i64>().expect("a count"))
        .sum();
    assert_eq!(
        buckets, results,
        "the bars over time add up to every report"
    );
    let rate: f64 = shown["success-rate"].parse().expect("a rate");
    assert!(
        (rate - successes as f64 / results as f64).abs() < 1e-9,
        "{rate}"
    );
    let counted: BTreeMap<String, String> = shown
        .into_iter()
        .filter(|(k, _)| !k.starts_with("bucket:") && k != "success-rate" && k != "reports-per-sec")
        .collect();
    assert_eq!(counted, want, "the page's figures against SQL");

    // A phone's screen: the page fits, and the bars are drawn (the successes in green).
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-phone.png");
    let out = Command::new("chromium")
        .args(common)
        .args(["--virtual-time-budget=10000", "--window-size=412,2200"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&page)
        .output()
        .expect("chromium runs");
    assert!(shot.exists(), "no screenshot: {}", stderr(&out));
    eprintln!("the dashboard on a phone: {}", shot.display());
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let green = buf[..info.buffer_size()]
        .chunks(info.color_type.samples())
        .filter(|p| p.len() >= 3 && p[..3] == [0x2f, 0x8f, 0x5b])
        .count();
    assert!(
        green > 500,
        "the success bars are drawn: {green} green pixels"
    );
    drop(server);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_keeps_every_acknowledged_report_through_restart_and_sigkill_on_sqlite() {
    let dir = Scratch::new("server-sqlite");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    server_survives(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and PostgreSQL (a private server runs as the postgres user): ./test runs it"]
async fn server_keeps_every_acknowledged_report_through_restart_and_sigkill_on_postgresql() {
    let pg = api::postgres::TempPostgres::start()
        .unwrap_or_else(|e| panic!("a private PostgreSQL server: {e}"));
    let url = pg.new_database().expect("database");
    server_survives(&url).await;
}

#[tokio::test]
async fn server_speaks_tls_when_given_a_certificate() {
    use api::pb::punchr_service_client::PunchrServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

    api::server::install_tls_provider();
    let dir = Scratch::new("server-tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    std::fs::write(dir.0.join("cert.pem"), &cert_pem).expect("cert file");
    std::fs::write(dir.0.join("key.pem"), &key_pem).expect("key file");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let cert_path = dir.0.join("cert.pem").display().to_string();
    let key_path = dir.0.join("key.pem").display().to_string();
    let server = ServerProc::start(
        &url,
        &[
            "--tls-cert",
            &cert_path,
            "--tls-key",
            &key_path,
            "--telemetry-port",
            "0",
        ],
    );
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = Endpoint::from_shared(format!("https://{}", server.grpc))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("a TLS connection");
    let mut client = PunchrServiceClient::new(channel);
    let answer = client
        .register(api::pb::RegisterRequest {
            client_id: peer_id().to_bytes(),
            agent_version: "tls".into(),
            protocols: vec![],
            api_key: "key".into(),
        })
        .await
        .expect("register over TLS");
    assert!(answer.into_inner().db_peer_id > 0);
    // Plaintext gets nowhere.
    let plain = PunchrServiceClient::connect(format!("http://{}", server.grpc)).await;
    if let Ok(mut plain) = plain {
        let r = plain
            .register(api::pb::RegisterRequest {
                client_id: peer_id().to_bytes(),
                agent_version: "plain".into(),
                protocols: vec![],
                api_key: "key".into(),
            })
            .await;
        assert!(r.is_err(), "a plaintext request is not served");
    }
    let half = natpunch(&["server", "--tls-cert", &cert_path]);
    assert!(!half.status.success());
    assert!(stderr(&half).contains("--tls-key"), "{}", stderr(&half));
}

/// A lab with the measurement system's fixed parts on the relay's node: the relay, and the
/// honeypot recording into a SQLite file; targets are added one by one.
struct MeasurementLab {
    /// First, so that they end before the lab is removed (fields drop in order).
    processes: Vec<natlab::LabProcess>,
    lab: natlab::Lab,
    dir: PathBuf,
    relay_addr: String,
    relay_ip: String,
    honeypot_addr: String,
    db: String,
}

/// The lab DHT's protocol name in these tests.
const LAB_DHT: &str = "/natpunch/lab/kad/1.0.0";

impl MeasurementLab {
    /// What every process of the lab (relay, honeypot, targets) printed so far.
    fn outputs(&self) -> String {
        self.processes
            .iter()
            .map(natlab::LabProcess::output)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    fn start(presets: &[natlab::Preset], dir: &Path) -> Self {
        use std::time::Duration;
        let exe = env!("CARGO_BIN_EXE_natpunch");
        let lab = natlab::Lab::build(
            &labrun::matrix::topology(presets, 0),
            natlab::LabOptions::default(),
        )
        .expect("lab");
        let path = |name: &str| dir.join(name).display().to_string();
        let args = labrun::args::relay(dir.join("relay.key"), 4001, None).expect("relay flags");
        let relay = lab.spawn("relay", exe, &args).expect("relay");
        let line = relay
            .wait_for("\"event\":\"external-address\"", Duration::from_secs(20))
            .expect("the relay's address");
        let relay_addr = serde_json::from_str::<Value>(&line).expect("json")["address"]
            .as_str()
            .expect("address")
            .to_owned();
        let relay_ip = lab.public_addr("relay").expect("relay address").to_string();
        let db = format!("sqlite://{}", path("natpunch.db"));
        let honeypot = lab
            .spawn(
                "relay",
                exe,
                &[
                    "honeypot",
                    "--json",
                    "--port",
                    "11000",
                    "--identity",
                    &path("honeypot.key"),
                    "--protocol",
                    LAB_DHT,
                    "--database-url",
                    &db,
                ],
            )
            .expect("honeypot");
        let line = honeypot
            .wait_for(
                &format!("/ip4/{relay_ip}/tcp/11000"),
                Duration::from_secs(20),
            )
            .expect("the honeypot listens");
        let v: Value = serde_json::from_str(&line).expect("json");
        let honeypot_addr = format!(
            "{}/p2p/{}",
            v["address"].as_str().expect("address"),
            v["peer_id"].as_str().expect("peer id")
        );
        Self {
            processes: vec![relay, honeypot],
            lab,
            dir: dir.to_owned(),
            relay_addr,
            relay_ip,
            honeypot_addr,
            db,
        }
    }

    fn honeypot(&self) -> &natlab::LabProcess {
        &self.processes[1]
    }

    /// A target behind `preset` that reserves on the relay and joins the DHT through the
    /// honeypot; its peer ID and the honeypot's record of it.
    fn target(&mut self, preset: natlab::Preset) -> (String, Value) {
        use std::time::Duration;
        let target = self
            .lab
            .spawn(
                &labrun::matrix::host('b', preset),
                env!("CARGO_BIN_EXE_natpunch"),
                &[
                    "peer",
                    "listen",
                    "--json",
                    "--relay",
                    &self.relay_addr,
                    "--dht-bootstrap",
                    &self.honeypot_addr,
                    "--dht-protocol",
                    LAB_DHT,
                ],
            )
            .expect("target");
        let reserved = target
            .wait_for("\"event\":\"reserved\"", Duration::from_secs(30))
            .expect("the target reserves");
        let id = serde_json::from_str::<Value>(&reserved).expect("json")["address"]
            .as_str()
            .and_then(|a| a.rsplit('/').next())
            .expect("peer id")
            .to_owned();
        let seen = self
            .honeypot()
            .wait_for(&format!("\"peer_id\":\"{id}\""), Duration::from_secs(30))
            .expect("the honeypot sees the target");
        self.processes.push(target);
        (id, serde_json::from_str(&seen).expect("json"))
    }
}

/// The honeypot in the lab: a peer behind a port-restricted NAT that reserves on the relay and
/// joins the lab's DHT through the honeypot is recorded with its relayed address, and the store
/// then hands it out to a client.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn honeypot_records_a_natted_peer_with_its_relay_address_for_the_server() {
    use api::store::{Allocated, Host, Rules, SqlStore, Store as _};
    use std::time::Duration;

    testkit::require::lab("honeypot_records_a_natted_peer_with_its_relay_address_for_the_server");
    let dir = Scratch::new("honeypot");
    let mut lab = MeasurementLab::start(&[natlab::Preset::PortRestricted], &dir.0);
    let (target_id, seen) = lab.target(natlab::Preset::PortRestricted);
    assert_eq!(seen["event"], "seen");
    assert_eq!(seen["dcutr"], true, "{seen}");
    let relayed = seen["relay_addrs"].as_array().expect("relay addresses");
    assert!(
        relayed
            .iter()
            .any(|a| a.as_str().is_some_and(|a| a.starts_with(&lab.relay_addr))),
        "the relayed address is recorded: {seen}"
    );
    assert!(
        seen["agent_version"]
            .as_str()
            .is_some_and(|a| a.starts_with("natpunch/")),
        "{seen}"
    );

    // The store hands the target to a registered client, with its relayed address.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = SqlStore::open(&lab.db).await.expect("store");
        let host = peer_id().to_base58();
        let now = api::server::now_ns();
        let h = Host {
            peer: &host,
            agent_version: "test",
            protocols: &[],
        };
        store.register("key", true, h, now).await.expect("register");
        let auth = store.authorize("key").await.expect("auth").expect("key");
        let mut served = None;
        for _ in 0..50 {
            match store
                .allocate(
                    auth,
                    std::slice::from_ref(&host),
                    Rules::default(),
                    api::server::now_ns(),
                )
                .await
                .expect("allocate")
            {
                Allocated::Served(a) => {
                    served = Some(a);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let served = served.expect("the target is handed out");
        assert_eq!(served.remote, target_id);
        assert!(
            served.addrs.iter().all(|a| a.contains("/p2p-circuit")),
            "{served:?}"
        );
        store.close().await;
    });
}

/// The resident memory of process `pid`, KiB (0 when it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The value of `series` (name and labels, as printed) in a `/metrics` answer.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// A child process, killed by its PID when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Short-lived libp2p peers that visit a honeypot: each a fresh identity that connects over
/// TCP, completes identify both ways, moves (pushes new addresses, as a relayed peer does when
/// it changes relays) a few times, and leaves.
mod visitors {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use futures::StreamExt as _;
    use libp2p::multiaddr::Protocol;
    use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
    use libp2p::{Multiaddr, Swarm, identify, noise, tcp, yamux};

    #[derive(NetworkBehaviour)]
    pub(crate) struct Visitor {
        identify: identify::Behaviour,
    }

    /// What a visitor announces: its agent version, and `window` addresses at a time out of
    /// `addrs`, the window sliding by one address with each move.
    #[derive(Clone)]
    pub(crate) struct Announce {
        pub(crate) agent: String,
        pub(crate) addrs: Vec<Multiaddr>,
        pub(crate) window: usize,
    }

    impl Announce {
        /// Moves a visit makes.
        fn moves(&self) -> usize {
            self.addrs.len().saturating_sub(self.window)
        }
    }

    fn visitor(announce: &Announce) -> Swarm<Visitor> {
        let mut s = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .expect("tcp")
            .with_behaviour(|key| Visitor {
                identify: identify::Behaviour::new(
                    identify::Config::new("/ipfs/0.1.0".into(), key.public())
                        .with_agent_version(announce.agent.clone()),
                ),
            })
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(10)))
            .build();
        for a in announce.addrs.iter().take(announce.window) {
            s.add_external_address(a.clone());
        }
        s
    }

    /// The next identify event of `s`; `None` when the connection failed or closed.
    async fn next_identify(s: &mut Swarm<Visitor>) -> Option<identify::Event> {
        loop {
            match s.select_next_some().await {
                SwarmEvent::Behaviour(VisitorEvent::Identify(e)) => return Some(e),
                SwarmEvent::OutgoingConnectionError { .. }
                | SwarmEvent::ConnectionClosed { .. } => return None,
                _ => {}
            }
        }
    }

    /// A fresh visitor connected to `target` (with `/p2p/<id>`), once identify has run both
    /// ways and every move was pushed.
    pub(crate) async fn arrive(target: &Multiaddr, announce: &Announce) -> Option<Swarm<Visitor>> {
        let Some(Protocol::P2p(honeypot)) = target.iter().last() else {
            panic!("{target} lacks /p2p/<peer id>");
        };
        let mut s = visitor(announce);
        s.dial(target.clone()).ok()?;
        let (mut sent, mut received) = (false, false);
        while !(sent && received) {
            match next_identify(&mut s).await? {
                identify::Event::Sent { .. } => sent = true,
                identify::Event::Received { .. } => received = true,
                _ => {}
            }
        }
        for m in 0..announce.moves() {
            s.remove_external_address(&announce.addrs[m]);
            s.add_external_address(announce.addrs[m + announce.window].clone());
            s.behaviour_mut().identify.push([honeypot]);
            while !matches!(next_identify(&mut s).await?, identify::Event::Pushed { .. }) {}
        }
        Some(s)
    }

    /// One visit to `target`: arrive, then leave cleanly (so that the honeypot reads all that
    /// was sent; a peer that leaves at once may still be missed: its connection can end before
    /// the honeypot has handled the last identify message). True when it ran to the end.
    pub(crate) async fn visit(target: &Multiaddr, announce: &Announce) -> bool {
        let run = async {
            let mut s = arrive(target, announce).await?;
            let honeypot = *s.connected_peers().next()?;
            let _ = s.disconnect_peer_id(honeypot);
            loop {
                if let SwarmEvent::ConnectionClosed { .. } = s.select_next_some().await {
                    return Some(());
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), run)
            .await
            .ok()
            .flatten()
            .is_some()
    }

    /// `concurrency` visitors at a time for `duration`; the visits that completed.
    pub(crate) async fn stream(
        target: Multiaddr,
        announce: Announce,
        concurrency: usize,
        duration: Duration,
    ) -> usize {
        let done = Arc::new(AtomicUsize::new(0));
        let until = tokio::time::Instant::now() + duration;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let (target, announce, done) = (target.clone(), announce.clone(), Arc::clone(&done));
            tasks.spawn(async move {
                while tokio::time::Instant::now() < until {
                    if visit(&target, &announce).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        done.load(Ordering::Relaxed)
    }
}

/// `natpunch honeypot` recording into PostgreSQL, the database down for 60 s under a stream of
/// sightings: new peers, each a fresh identity that connects, identifies, moves nine times
/// (identify pushes of new relayed addresses) and leaves, announcing as much as identify
/// allows (a 3 KiB agent version). The sightings the store cannot take are dropped and counted
/// in `/metrics` instead of piling up, so the honeypot's memory stays bounded; once the
/// database is back, what was queued is written and new peers are recorded again.
#[test]
#[ignore = "needs root and PostgreSQL (a private server runs as the postgres user): ./test runs it"]
fn honeypot_memory_stays_bounded_through_a_database_outage_and_it_records_again_after() {
    use std::time::{Duration, Instant};

    use api::store::{SqlStore, Store as _};
    use libp2p::Multiaddr;

    /// Visitors connecting at once.
    const CONCURRENCY: usize = 24;
    /// How long the database is down.
    const OUTAGE: Duration = Duration::from_secs(60);
    /// Address changes each visitor pushes: a sighting each.
    const MOVES: usize = 9;
    /// How much the honeypot's memory may grow over the outage. Its queue of sightings holds
    /// 1024 at most, each a 3.5 KiB agent version and eight addresses: measured +6 MiB over
    /// 13 000 to 19 000 sightings; the rest is room for the allocator and the visitors'
    /// connections.
    const GROWTH_KIB: u64 = 24 * 1024;
    /// What each sighting of the outage cost when the queue was unbounded (measured 5.5 KiB:
    /// +85 MiB over 15 900 sightings): the outage must bring enough sightings that an unbounded
    /// honeypot would break the bound.
    const UNBOUNDED_KIB_PER_SIGHTING: f64 = 5.0;
    const SEEN: &str = r#"natpunch_honeypot_peers_seen_total{dcutr="false"}"#;
    const RECORDED: &str = "natpunch_honeypot_recorded_total";
    const QUEUED: &str = "natpunch_honeypot_sightings_queued";
    const QUEUE_FULL: &str = r#"natpunch_honeypot_sightings_dropped_total{reason="queue_full"}"#;

    let mut pg = api::postgres::TempPostgres::start()
        .unwrap_or_else(|e| panic!("a private PostgreSQL server: {e}"));
    let url = pg.new_database().expect("database");
    let dir = Scratch::new("honeypot-outage");
    let telemetry = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let child = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args([
            "honeypot",
            "--json",
            "--listen-ip",
            "127.0.0.1",
            "--port",
            "0",
            "--protocol",
            "/natpunch/test/kad/1.0.0",
            "--crawl-secs",
            "3600",
            "--telemetry-host",
            "127.0.0.1",
            "--telemetry-port",
            &telemetry.port().to_string(),
            "--database-url",
            &url,
            "--identity",
        ])
        .arg(dir.0.join("honeypot.key"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.0.join("honeypot.err")).expect("stderr file"))
        .spawn()
        .expect("natpunch honeypot");
    let mut honeypot = Killed(child);
    let pid = honeypot.0.id();
    // The listening line names the TCP address; the rest of stdout (a line per sighting) is
    // read and dropped, so that the honeypot never blocks on a full pipe.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<String>();
    let out = honeypot.0.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if line.contains("\"event\":\"listening\"") && line.contains("/tcp/") {
                let v: Value = serde_json::from_str(&line).expect("json");
                let _ = addr_tx.send(format!(
                    "{}/p2p/{}",
                    v["address"].as_str().expect("address"),
                    v["peer_id"].as_str().expect("peer id")
                ));
            }
        }
    });
    let target: Multiaddr = addr_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the honeypot listens")
        .parse()
        .expect("address");
    let metrics = || http_get(telemetry, "/metrics");
    let relay = libp2p::PeerId::random();
    let announce = visitors::Announce {
        agent: format!("visitor/{}", "x".repeat(3500)),
        addrs: (1..=4 + MOVES)
            .map(|i| {
                format!("/ip4/198.51.100.{i}/tcp/4001/p2p/{relay}/p2p-circuit")
                    .parse()
                    .expect("address")
            })
            .collect(),
        window: 4,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();

    // Warm up with the database up, until everything seen is written (or dropped: even an
    // up database takes fewer sightings a second than these visitors make).
    let warm = runtime.block_on(visitors::stream(
        target.clone(),
        announce.clone(),
        CONCURRENCY,
        Duration::from_secs(1),
    ));
    assert!(warm > 0, "no visitor got through to the honeypot");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (seen_before, recorded_before, dropped_before) = loop {
        let m = metrics();
        let (seen, recorded, dropped) = (
            metric(&m, SEEN),
            metric(&m, RECORDED),
            metric(&m, QUEUE_FULL),
        );
        if metric(&m, QUEUED) == 0.0 && recorded + dropped >= seen {
            break (seen, recorded, dropped);
        }
        assert!(
            Instant::now() < deadline,
            "warm-up sightings not written: {m}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let before = rss_kib(pid);
    eprintln!(
        "warm-up: {warm} visits, {seen_before} sightings, {recorded_before} recorded, \
         {dropped_before} dropped (queue full) in {:.0} s; RSS {before} KiB",
        started.elapsed().as_secs_f64()
    );

    // The outage, under a steady stream of sightings; memory is sampled all along.
    pg.stop();
    let outage = Instant::now();
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = std::sync::Arc::clone(&sampling);
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(250));
            }
            peak
        })
    };
    // At least OUTAGE, longer on a machine too slow to bring enough sightings in that time.
    let enough = 2.0 * GROWTH_KIB as f64 / UNBOUNDED_KIB_PER_SIGHTING;
    let mut visits = 0;
    loop {
        visits += runtime.block_on(visitors::stream(
            target.clone(),
            announce.clone(),
            CONCURRENCY,
            Duration::from_secs(10),
        ));
        let seen = metric(&metrics(), SEEN) - seen_before;
        if outage.elapsed() >= 3 * OUTAGE || (outage.elapsed() >= OUTAGE && seen >= enough) {
            break;
        }
    }
    let during = metrics();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let seen = metric(&during, SEEN) - seen_before;
    let dropped = metric(&during, QUEUE_FULL) - dropped_before;
    eprintln!(
        "outage of {:.0} s: {visits} visits, {seen} sightings, {dropped} dropped (queue full), \
         {} queued; RSS peak {peak} KiB (+{} KiB, {:.2} KiB a sighting)",
        outage.elapsed().as_secs_f64(),
        metric(&during, QUEUED),
        peak.saturating_sub(before),
        peak.saturating_sub(before) as f64 / seen.max(1.0)
    );

    // The database is back: what was queued is written, and a new peer is recorded again.
    pg.start_again().expect("PostgreSQL starts again");
    let back = Instant::now();
    let deadline = back + Duration::from_secs(90);
    while metric(&metrics(), RECORDED) <= recorded_before {
        assert!(
            Instant::now() < deadline,
            "nothing written after the outage: {}",
            metrics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let resumed = back.elapsed();
    // The queue drains, and the swarm has no sightings of the stream left to hand over (a
    // new one must not find the queue full).
    let mut last_seen = f64::NAN;
    loop {
        let m = metrics();
        let seen = metric(&m, SEEN);
        if metric(&m, QUEUED) == 0.0 && seen == last_seen {
            break;
        }
        last_seen = seen;
        assert!(
            Instant::now() < deadline,
            "the queue did not drain after the outage: {m}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let drained = back.elapsed();
    let after_outage = visitors::Announce {
        agent: "visitor/after-the-outage".into(),
        addrs: Vec::new(),
        window: 0,
    };
    // The new peer stays connected until it is recorded, so none of what it sent is lost.
    let recorded = runtime.block_on(async {
        let store = SqlStore::open(&url).await.expect("open the database");
        let mut visitor = tokio::time::timeout(
            Duration::from_secs(10),
            visitors::arrive(&target, &after_outage),
        )
        .await
        .ok()
        .flatten()
        .expect("a visit after the outage");
        let peer = visitor.local_peer_id().to_base58();
        let stay = tokio::spawn(async move {
            use futures::StreamExt as _;
            loop {
                visitor.select_next_some().await;
            }
        });
        let mut agent = None;
        while agent.is_none() && back.elapsed() < Duration::from_secs(90) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            agent = store.agent_of(&peer).await.expect("agent_of");
        }
        stay.abort();
        store.close().await;
        agent
    });
    let after = rss_kib(pid);
    let end = metrics();
    eprintln!(
        "after: writing again {:.1} s after the restart, queue drained after {:.1} s, the new \
         peer recorded after {:.1} s; RSS {after} KiB; {} recorded, {} dropped since the \
         outage, {} record errors, {} given up; {:.0} s in all",
        resumed.as_secs_f64(),
        drained.as_secs_f64(),
        back.elapsed().as_secs_f64(),
        metric(&end, RECORDED),
        metric(&end, QUEUE_FULL) - metric(&during, QUEUE_FULL),
        metric(&end, "natpunch_honeypot_record_errors_total"),
        metric(
            &end,
            r#"natpunch_honeypot_sightings_dropped_total{reason="gave_up"}"#
        ),
        started.elapsed().as_secs_f64()
    );

    drop(honeypot);
    let _ = reader.join();
    assert!(
        seen * UNBOUNDED_KIB_PER_SIGHTING > GROWTH_KIB as f64,
        "only {seen} sightings during the outage: too few to tell a bounded honeypot's memory \
         from an unbounded one's"
    );
    assert!(
        peak.saturating_sub(before) < GROWTH_KIB,
        "memory grew from {before} KiB to {peak} KiB over {seen} sightings"
    );
    assert!(dropped > 0.0, "nothing dropped during the outage: {during}");
    assert_eq!(
        recorded.as_deref(),
        Some("visitor/after-the-outage"),
        "a peer seen after the outage is recorded: {end}"
    );
}

/// The measurement system in the lab, end to end: a client behind a port-restricted NAT,
/// started before the server is up, takes the two targets the honeypot recorded, punches them
/// and delivers both reports exactly once.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn client_punches_what_the_server_serves_and_delivers_every_report_once() {
    use api::store::{SqlStore, Store as _};
    use natlab::Preset;
    use std::time::Duration;

    testkit::require::lab("client_punches_what_the_server_serves_and_delivers_every_report_once");
    let dir = Scratch::new("client");
    let exe = env!("CARGO_BIN_EXE_natpunch");
    let presets = [Preset::PortRestricted, Preset::FullCone];
    let mut lab = MeasurementLab::start(&presets, &dir.0);
    let targets: Vec<String> = presets.iter().map(|p| lab.target(*p).0).collect();
    // The client starts first: it keeps trying to register until the server is up.
    let server_url = format!("http://{}:10000", lab.relay_ip);
    let keys = lab.dir.join("client").display().to_string();
    let client = lab
        .lab
        .spawn(
            &labrun::matrix::host('a', Preset::PortRestricted),
            exe,
            &[
                "client",
                "--json",
                "--server",
                &server_url,
                "--api-key",
                "lab-key",
                "--host-count",
                "2",
                "--punches",
                "2",
                "--idle-secs",
                "1",
                "--keys-dir",
                &keys,
            ],
        )
        .expect("client");
    client
        .wait_for("\"call\":\"Register\"", Duration::from_secs(20))
        .expect("the client finds no server");
    let server = lab
        .lab
        .spawn(
            "relay",
            exe,
            &[
                "server",
                "--json",
                "--port",
                "10000",
                "--listen-ip",
                "0.0.0.0",
                "--telemetry-port",
                "0",
                "--database-url",
                &lab.db,
            ],
        )
        .expect("server");
    server
        .wait_for("\"event\":\"listening\"", Duration::from_secs(20))
        .expect("the server listens");
    while client.is_running() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let client_out = client.output();
    let code = client.wait().expect("the client ends");
    assert_eq!(
        code,
        Some(0),
        "the client exits once both reports are delivered: {client_out}"
    );
    drop(server);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let store = SqlStore::open(&lab.db).await.expect("store");
        assert_eq!(store.counts().await.expect("counts").results, 2);
        let rows = store.results().await.expect("results");
        let mut remotes: Vec<&str> = rows.iter().map(|r| r.remote.as_str()).collect();
        remotes.sort_unstable();
        let mut expected: Vec<&str> = targets.iter().map(String::as_str).collect();
        expected.sort_unstable();
        assert_eq!(remotes, expected, "each target punched once");
        for r in &rows {
            assert_eq!(
                r.outcome,
                "SUCCESS",
                "{rows:?}\nthe client said:\n{client_out}\nthe lab said:\n{}",
                lab.outputs()
            );
            assert!(r.transport.is_some(), "{rows:?}");
        }
        let techniques: Vec<(Option<String>,)> =
            sqlx::query_as("SELECT technique FROM hole_punch_results")
                .fetch_all(store.pool())
                .await
                .expect("techniques");
        assert!(techniques.iter().all(|t| t.0.is_some()), "{techniques:?}");
        store.close().await;
    });
    assert!(
        std::fs::read_dir(lab.dir.join("client/spool"))
            .expect("spool")
            .filter_map(Result::ok)
            .all(|e| e.path().extension().is_none_or(|x| x != "pb")),
        "the spool is empty"
    );
}

/// A short campaign with the server killed for 30 s in the middle: the honeypot records every
/// target, the clients report every NAT pair with the outcomes of the hole-punching matrix
/// (port-restricted pairs succeed, pairs with a symmetric NAT fail), every punch made is in the
/// database exactly once, and the HTML report has its plots.
#[test]
#[ignore = "needs root and the NAT lab (nftables, conntrack, iproute2): ./test runs it"]
fn lab_campaign_survives_a_server_outage_and_reports_every_nat_pair() {
    testkit::require::lab("lab_campaign_survives_a_server_outage_and_reports_every_nat_pair");
    let dir = Scratch::new("campaign");
    let work = dir.0.join("work");
    let html = dir.0.join("report.html");
    let out = natpunch(&[
        "lab",
        "campaign",
        "--punches",
        "36",
        "--presets",
        "port-restricted,symmetric",
        "--rtt-ms",
        "20",
        "--server-outage",
        "5s:30s",
        "--json",
        "--work-dir",
        work.to_str().expect("utf-8"),
        "--report",
        html.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    assert!(
        stderr(&out).contains("killing the server for 30 s"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("the server is back"),
        "{}",
        stderr(&out)
    );
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert_eq!(v["targets_recorded"], v["targets"], "{v}");
    assert_eq!(v["targets"], 2);
    assert_eq!(v["punches"], 36, "{v}");
    assert_eq!(v["stored"], 36, "every punch made is stored, once: {v}");
    // The relay and the honeypot both see each target over QUIC: the port-restricted NAT maps
    // the same port to both (endpoint-independent), the symmetric one another port to each.
    let nats = v["remote_nat"].as_array().expect("remote_nat");
    assert_eq!(nats.len(), 2, "{v}");
    for t in nats {
        let want = match t["target"].as_str() {
            Some("port-restricted") => "endpoint-independent",
            Some("symmetric") => "endpoint-dependent",
            other => panic!("a target behind {other:?}: {v}"),
        };
        assert_eq!(t["observed"], want, "{t}");
        assert_eq!(t["verdict"], "match", "{t}");
        assert!(t["reports"].as_u64().is_some_and(|n| n > 0), "{t}");
    }
    let cells = v["matrix"].as_array().expect("matrix");
    for c in cells {
        let want = if c["target_nat"] == "symmetric" {
            "endpoint-dependent"
        } else {
            "endpoint-independent"
        };
        assert_eq!(
            c["remote_nat"], want,
            "the matrix shows the target as seen: {c}"
        );
    }
    let pair = |c: &str, t: &str| -> (u64, u64) {
        cells
            .iter()
            .filter(|x| x["client_nat"] == c && x["target_nat"] == t)
            .fold((0, 0), |(n, s), x| {
                (
                    n + x["trials"].as_u64().unwrap_or(0),
                    s + x["success"].as_u64().unwrap_or(0),
                )
            })
    };
    let cell = |c: &str, t: &str, transport: &str| -> (u64, u64) {
        cells
            .iter()
            .filter(|x| x["client_nat"] == c && x["target_nat"] == t && x["transport"] == transport)
            .fold((0, 0), |(n, s), x| {
                (
                    n + x["trials"].as_u64().unwrap_or(0),
                    s + x["success"].as_u64().unwrap_or(0),
                )
            })
    };
    let mut hard_quic = 0;
    for (c, t) in [
        ("port-restricted", "port-restricted"),
        ("port-restricted", "symmetric"),
        ("symmetric", "port-restricted"),
        ("symmetric", "symmetric"),
    ] {
        let (n, s) = pair(c, t);
        assert!(n > 0, "{c} × {t} was punched: {v}");
        if c == "symmetric" && t == "symmetric" {
            assert_eq!(s, 0, "{c} × {t} fails as in the lab matrix: {v}");
        } else if c == "symmetric" || t == "symmetric" {
            // Over TCP nothing joins them; over QUIC birthday probing does.
            assert_eq!(cell(c, t, "tcp").1, 0, "{c} × {t} over TCP fails: {v}");
            let (n, s) = cell(c, t, "quic");
            hard_quic += n;
            assert!(
                n == 0 || (s > 0 && s + 1 >= n),
                "{c} × {t} over QUIC goes direct by birthday probing: {v}"
            );
        } else {
            assert_eq!(s, n, "{c} × {t} succeeds as in the lab matrix: {v}");
        }
    }
    assert!(
        hard_quic > 0,
        "a port-restricted × symmetric pair over QUIC: {v}"
    );
    // The clients measured their NATs with the lab's STUN server, as configured.
    let measured = &v["measured_nat"];
    assert_eq!(
        measured["port-restricted"], "endpoint-independent/address-and-port-dependent",
        "{v}"
    );
    assert!(
        measured["symmetric"]
            .as_str()
            .is_some_and(|m| !m.starts_with("endpoint-independent")),
        "a symmetric NAT maps per destination: {v}"
    );
    // Its reports carry the mappings it made.
    let db = work.join("campaign.db");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (mappings, rows, mapped_rows) = rt.block_on(async {
        let store = api::store::SqlStore::open(&format!("sqlite://{}", db.display()))
            .await
            .expect("store");
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM port_mappings")
            .fetch_one(store.pool())
            .await
            .expect("count");
        let rows = store.results().await.expect("results");
        let mapped_rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT l.multi_hash, r.multi_hash, h.outcome, \
             (SELECT count(*) FROM port_mappings m WHERE m.hole_punch_result_id = h.id) \
             FROM hole_punch_results h JOIN peers l ON l.id = h.local_id \
             JOIN peers r ON r.id = h.remote_id",
        )
        .fetch_all(store.pool())
        .await
        .expect("punches and their mappings");
        store.close().await;
        (n, rows, mapped_rows)
    });
    assert!(mappings > 0, "the port-mapped client reports its mappings");
    // The client whose router maps its port is reached even from behind a symmetric NAT: every
    // punch it made with its ports mapped went direct. (A punch whose mapping the router had
    // not answered in time is punched without, as any other; the campaign's load can do that.)
    let peer_nat = |id: &str| v["peers"][id].as_str().unwrap_or("unknown").to_owned();
    for t in ["port-restricted", "symmetric"] {
        let c = "port-restricted+portmap";
        let mapped: Vec<&(String, String, String, i64)> = mapped_rows
            .iter()
            .filter(|(local, remote, _, m)| peer_nat(local) == c && peer_nat(remote) == t && *m > 0)
            .collect();
        assert!(
            !mapped.is_empty(),
            "{c} × {t} was punched with mapped ports: {v}"
        );
        for (_, _, outcome, _) in &mapped {
            assert!(
                outcome == "SUCCESS" || outcome == "CONNECTION_REVERSED",
                "{c} × {t} with mapped ports: {outcome}: {v}"
            );
        }
    }
    clients_punch_under_their_own_labels(&work, &v, &rows);
    let page = std::fs::read_to_string(&html).expect("report");
    assert!(page.contains(r#"<svg id="outcomes""#) && page.contains(r#"<svg id="cdf""#));
    assert!(page.contains(r#"data-transport="#));
    assert!(
        page.contains(r#"<table id="remote-nats">"#)
            && page.contains("<td>symmetric</td><td>endpoint-dependent</td>"),
        "the report shows the targets' NATs as seen"
    );
    browser_shows_the_plots(&html, &dir.0);
}

/// Every reporting host in the database is one of the keys a client's directory holds, and the
/// campaign labels it with that client's NAT: the labels come from the keys the clients used.
fn clients_punch_under_their_own_labels(work: &Path, v: &Value, rows: &[api::store::ResultRow]) {
    let mut key_nat = std::collections::HashMap::new();
    for dir in std::fs::read_dir(work).expect("work dir").flatten() {
        let name = dir.file_name().to_string_lossy().into_owned();
        let Some(nat) = name.strip_prefix("client-") else {
            continue;
        };
        for key in std::fs::read_dir(dir.path()).expect("keys").flatten() {
            if key.path().extension().is_some_and(|e| e == "key") {
                let bytes = std::fs::read(key.path()).expect("key");
                let id = libp2p::identity::Keypair::from_protobuf_encoding(&bytes)
                    .expect("a key")
                    .public()
                    .to_peer_id()
                    .to_base58();
                key_nat.insert(id, nat.to_owned());
            }
        }
        let strays: Vec<_> = std::fs::read_dir(dir.path())
            .expect("keys")
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(strays.is_empty(), "temporary key files left: {strays:?}");
    }
    assert!(!key_nat.is_empty(), "the clients' keys are in the work dir");
    assert!(!rows.is_empty());
    for r in rows {
        let nat = key_nat
            .get(&r.local)
            .unwrap_or_else(|| panic!("{} reported but is no client key", r.local));
        assert_eq!(
            v["peers"][&r.local].as_str(),
            Some(nat.as_str()),
            "the campaign labels {} with its client's NAT: {v}",
            r.local
        );
    }
    let unknown: Vec<_> = v["matrix"]
        .as_array()
        .expect("matrix")
        .iter()
        .filter(|c| c["client_nat"] == "unknown" || c["target_nat"] == "unknown")
        .collect();
    assert!(
        unknown.is_empty(),
        "every punch has its labels: {unknown:?}"
    );
}

/// Headless Chromium opens the report: its DOM has the plots, and a screenshot shows the
/// outcome bars in their colours (SUCCESS green, FAILED red).
fn browser_shows_the_plots(html: &Path, dir: &Path) {
    testkit::require::program("browser_shows_the_plots", "chromium", "chromium");
    let chromium = "chromium";
    let url = format!("file://{}", html.display());
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
    ];
    let dom = Command::new(chromium)
        .args(common)
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium runs");
    let dom = stdout(&dom);
    assert!(
        dom.contains("<svg id=\"outcomes\"") && dom.contains("<polyline"),
        "{dom}"
    );
    let shot = dir.join("report.png");
    let out = Command::new(chromium)
        .args(common)
        .args(["--window-size=1200,1400"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&url)
        .output()
        .expect("chromium runs");
    assert!(shot.exists(), "no screenshot: {}", stderr(&out));
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&shot).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let step = info.color_type.samples();
    let count = |rgb: [u8; 3]| {
        buf[..info.buffer_size()]
            .chunks(step)
            .filter(|p| p.len() >= 3 && p[..3] == rgb)
            .count()
    };
    // The bars: SUCCESS #2e7d32 and FAILED #c62828, a few thousand pixels each.
    let (green, red) = (count([0x2e, 0x7d, 0x32]), count([0xc6, 0x28, 0x28]));
    assert!(
        green > 500 && red > 500,
        "the outcome bars are drawn: {green} green, {red} red pixels"
    );
}

/// The campaign on PostgreSQL (a private server, reached from the lab over its Unix socket).
#[test]
#[ignore = "needs root, the NAT lab and PostgreSQL: ./test runs it"]
fn lab_campaign_runs_on_postgresql() {
    testkit::require::lab("lab_campaign_runs_on_postgresql");
    assert!(
        api::postgres::bin_dir().is_some(),
        "lab_campaign_runs_on_postgresql: PostgreSQL is not installed (apt-get install postgresql)"
    );
    let dir = Scratch::new("campaign-pg");
    let out = natpunch(&[
        "lab",
        "campaign",
        "--punches",
        "6",
        "--presets",
        "port-restricted",
        "--no-port-mapped-client",
        "--rtt-ms",
        "20",
        "--postgres",
        "--json",
        "--work-dir",
        dir.0.join("work").to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).expect("json");
    assert!(
        v["database"]
            .as_str()
            .is_some_and(|d| d.starts_with("postgres://")),
        "{v}"
    );
    assert_eq!(v["punches"], 6);
    assert_eq!(v["stored"], 6, "{v}");
    assert_eq!(v["outcomes"]["SUCCESS"], 6, "{v}");
}

/// A client whose API key the server refuses stops at once with the server's words.
#[test]
fn client_stops_with_a_clear_message_when_the_key_is_refused() {
    let dir = Scratch::new("client-refused");
    let url = format!("sqlite://{}", dir.0.join("natpunch.db").display());
    let server = ServerProc::start(&url, &["--closed-registration", "--telemetry-port", "0"]);
    let out = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args(["client", "--server", &format!("http://{}", server.grpc)])
        .args([
            "--api-key",
            "not-issued",
            "--host-count",
            "1",
            "--telemetry-port",
            "0",
        ])
        .arg("--keys-dir")
        .arg(dir.0.join("keys"))
        .output()
        .expect("client runs");
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("refused the API key") && err.contains("unauthorized"),
        "{err}"
    );
}

/// Runs `natpunch args…` with state and config directories in `dir`, ending it (and failing)
/// if it has not exited within 60 s: every error path below must fail fast.
fn natpunch_failing_fast(dir: &Path, args: &[&str]) -> Output {
    use std::io::Read as _;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_natpunch"))
        .args(args)
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env_remove("NATPUNCH_JSON")
        .env_remove("NATPUNCH_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("natpunch runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`natpunch {}` did not fail within 60 s", args.join(" "));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut stdout);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut stderr);
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Every error path that needs neither root nor the network: each fails with one `error: `
/// message that names its cause (`needle`) once, with no clause (the parts between `: `) and
/// no OS error said twice.
#[test]
fn cli_errors_say_each_thing_once() {
    let scratch = Scratch::new("errors-once");
    let dir = scratch.0.as_path();
    let path = |name: &str| dir.join(name).to_str().expect("utf-8 path").to_owned();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).expect("write");
        path(name)
    };
    let weird = write(
        "weird.toml",
        "[router.home]\nnat = \"weird\"\n[host.alice]\nupstream = \"home\"\n",
    );
    let open_router = write("open-router.toml", "[router.home]\nnat = \"open\"\n");
    let short_timeout = write(
        "short-timeout.toml",
        "[router.home]\nnat = { preset = \"cgnat\", udp_timeout_secs = 1 }\n",
    );
    let not_toml = write("not-toml.toml", "[router.home\nnat = \"cgnat\"\n");
    let garbage = write("garbage", "this is neither a key nor a mapping record\n");
    // A regular file where a directory is expected: ENOTDIR, also for root.
    let file = write("file", "");
    let under_file = |name: &str| format!("{file}/{name}");
    let missing_dir = |name: &str| path(&format!("missing/{name}"));
    let lab = format!("no-such-lab-{}", std::process::id() % 100_000);
    let sqlite_in_missing_dir = format!("sqlite://{}", missing_dir("natpunch.db"));
    let sqlite = format!("sqlite://{}", path("natpunch.db"));
    let relay = "/ip4/127.0.0.1/tcp/1";

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["lab".into(), "up".into(), missing_dir("lab.toml")],
            "(os error 2)",
        ),
        (vec!["lab".into(), "up".into(), path("")], "(os error 21)"),
        (
            vec!["lab".into(), "up".into(), weird.clone()],
            "unknown NAT preset `weird`",
        ),
        (
            vec!["lab".into(), "up".into(), open_router],
            "cannot have mapping or filtering `none`",
        ),
        (
            vec!["lab".into(), "up".into(), short_timeout],
            "timeout of 1 s is out of range",
        ),
        (
            vec!["lab".into(), "up".into(), not_toml],
            "TOML parse error",
        ),
        (
            vec!["lab".into(), "down".into(), lab.clone()],
            "no lab named",
        ),
        (
            vec![
                "lab".into(),
                "exec".into(),
                lab.clone(),
                "alice".into(),
                "--".into(),
                "true".into(),
            ],
            "no lab named",
        ),
        (
            vec![
                "map".into(),
                "delete".into(),
                "5000".into(),
                "--gateway".into(),
                "127.0.0.1".into(),
                "--state".into(),
                garbage.clone(),
            ],
            "is not a mapping record",
        ),
        (
            vec![
                "map".into(),
                "add".into(),
                "5000".into(),
                "--via".into(),
                "pcp".into(),
                "--gateway".into(),
                "127.0.0.1".into(),
                "--state".into(),
                path(""),
            ],
            "(os error 21)",
        ),
        (
            vec![
                "map".into(),
                "keep".into(),
                "5000".into(),
                "--via".into(),
                "pcp".into(),
                "--gateway".into(),
                "127.0.0.1".into(),
                "--state".into(),
                under_file("mappings.json"),
            ],
            "(os error 20)",
        ),
        (
            vec![
                "peer".into(),
                "listen".into(),
                "--relay".into(),
                relay.into(),
                "--identity".into(),
                under_file("peer.key"),
            ],
            "(os error 20)",
        ),
        (
            vec![
                "peer".into(),
                "listen".into(),
                "--relay".into(),
                relay.into(),
                "--identity".into(),
                garbage.clone(),
            ],
            "is not a libp2p private key",
        ),
        (
            vec![
                "relay".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--identity".into(),
                under_file("relay.key"),
            ],
            "(os error 20)",
        ),
        (
            vec![
                "honeypot".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--identity".into(),
                path("honeypot.key"),
                "--database-url".into(),
                sqlite_in_missing_dir.clone(),
            ],
            "unable to open database file",
        ),
        (
            vec![
                "client".into(),
                "--api-key".into(),
                "k".into(),
                "--host-count".into(),
                "1".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--keys-dir".into(),
                under_file("keys"),
            ],
            "(os error 20)",
        ),
        (
            vec![
                "client".into(),
                "--api-key".into(),
                "k".into(),
                "--host-count".into(),
                "257".into(),
            ],
            "--host-count must be between 1 and 256",
        ),
        (
            vec![
                "client".into(),
                "--api-key".into(),
                "k".into(),
                "--host-count".into(),
                "1".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--keys-dir".into(),
                path("keys"),
                "--spool".into(),
                under_file("spool"),
            ],
            "(os error 20)",
        ),
        (
            vec![
                "server".into(),
                "--port".into(),
                "0".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--database-url".into(),
                sqlite_in_missing_dir,
            ],
            "unable to open database file",
        ),
        (
            vec![
                "server".into(),
                "--port".into(),
                "0".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--database-url".into(),
                "mysql://natpunch@db/natpunch".into(),
            ],
            "mysql://natpunch@db/natpunch",
        ),
        (
            vec![
                "server".into(),
                "--port".into(),
                "0".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--database-url".into(),
                sqlite.clone(),
                "--tls-cert".into(),
                missing_dir("cert.pem"),
                "--tls-key".into(),
                missing_dir("key.pem"),
            ],
            "(os error 2)",
        ),
        (
            // TEST-NET-3: never an address of this host, so binding fails at once.
            vec![
                "server".into(),
                "--listen-ip".into(),
                "203.0.113.1".into(),
                "--port".into(),
                "0".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--database-url".into(),
                sqlite,
            ],
            "(os error 99)",
        ),
        (
            vec![
                "stun-server".into(),
                "--primary".into(),
                "203.0.113.1:3478".into(),
                "--alternate".into(),
                "203.0.113.2:3479".into(),
            ],
            "(os error 99)",
        ),
        (
            vec![
                "stun-server".into(),
                "--primary".into(),
                "127.0.0.1:3478".into(),
                "--alternate".into(),
                "127.0.0.1:3479".into(),
            ],
            "must differ in both IP address and port",
        ),
        (
            vec![
                "nat".into(),
                "check".into(),
                "--server".into(),
                "no-port-here".into(),
            ],
            "invalid socket address",
        ),
        (
            // Nothing listens on port 1: the cause, not a pool timeout.
            vec![
                "server".into(),
                "--port".into(),
                "0".into(),
                "--telemetry-port".into(),
                "0".into(),
                "--database-url".into(),
                "postgres://natpunch@127.0.0.1:1/natpunch".into(),
            ],
            "Connection refused",
        ),
        (
            vec![
                "connect".into(),
                A_PEER.into(),
                "--socket".into(),
                missing_dir("daemon.sock"),
            ],
            "start one with `natpunch daemon --relay",
        ),
        (
            vec![
                "connect".into(),
                A_PEER.into(),
                "--fdpass".into(),
                "--socket".into(),
                missing_dir("daemon.sock"),
            ],
            "standard output is not a socket",
        ),
        (
            vec![
                "lab".into(),
                "campaign".into(),
                "--postgres".into(),
                "--database-url".into(),
                "sqlite://x.db".into(),
            ],
            "--postgres starts its own database",
        ),
    ];
    let os_error = |text: &str| -> Vec<String> {
        text.match_indices("(os error ")
            .filter_map(|(at, _)| {
                text[at..]
                    .find(')')
                    .map(|end| text[at..=at + end].to_owned())
            })
            .collect()
    };
    let mut problems = Vec::new();
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let shown = format!("natpunch {}", args.join(" "));
        let out = natpunch_failing_fast(dir, &args);
        let err = stderr(&out);
        if out.status.success() {
            problems.push(format!("{shown}: succeeded: {err}"));
            continue;
        }
        let Some(message) = err.trim_end().strip_prefix("error: ") else {
            problems.push(format!(
                "{shown}: stderr does not start with `error: `: {err}"
            ));
            continue;
        };
        if !message.contains(needle) {
            problems.push(format!("{shown}: the cause `{needle}` is missing: {err}"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for clause in message.split(": ").map(str::trim).filter(|c| !c.is_empty()) {
            if !seen.insert(clause) {
                problems.push(format!("{shown}: `{clause}` is said twice: {err}"));
            }
        }
        let mut os_errors = std::collections::BTreeSet::new();
        for e in os_error(message) {
            if !os_errors.insert(e.clone()) {
                problems.push(format!("{shown}: `{e}` is said twice: {err}"));
            }
        }
    }
    // Said once, and a password never: the server names its database URL only through the
    // redacted form.
    let out = natpunch_failing_fast(
        dir,
        &[
            "server",
            "--port",
            "0",
            "--telemetry-port",
            "0",
            "--database-url",
            "mysql://natpunch:secret@db/natpunch",
        ],
    );
    let err = stderr(&out);
    if err.contains("secret") || err.matches("mysql://").count() != 1 {
        problems.push(format!("the database URL is shown once, redacted: {err}"));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
