//! The kernel hooks and the enforcer, end to end: real eBPF programs attached at the cgroup2
//! root, a real daemon, processes placed in governed cgroups by `agentgate exec`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use agentgate_tests::{
    ECONNREFUSED, EPERM, EchoServer, Gate, HostAddress, probe_ungoverned, run, stdout, udp_echo,
    wait_for,
};
use serde_json::{Value, json};

fn config(echo: &EchoServer, extra: &str) -> String {
    format!(
        "agents:
  - name: bot
    cgroup: {{base}}/bot
    roles: [analyst]
    targets: [echo]
  - name: recorder
    cgroup: {{base}}/recorder
    targets: [echo]
    unknown_destinations: record
targets:
  - name: echo
    match: [\"{}\"]
    protocol: tcp
{extra}",
        echo.addr
    )
}

/// `bot` and another agent, both allowed to reach `echo`, each with extra settings.
fn two_agents(echo: &EchoServer, bot: &str, other: &str, other_settings: &str) -> String {
    format!(
        "agents:
  - name: bot
    cgroup: {{base}}/bot
    targets: [echo]
    {bot}
  - name: {other}
    cgroup: {{base}}/{other}
    targets: [echo]
    {other_settings}
targets:
  - name: echo
    match: [\"{}\"]
    protocol: tcp
",
        echo.addr
    )
}

fn ok(v: &Value) -> bool {
    v["ok"] == true
}

fn errno(v: &Value) -> i64 {
    v["errno"].as_i64().unwrap_or(0)
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_default())
        .collect()
}

#[test]
fn governed_process_is_redirected_and_ungoverned_is_untouched() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let spec = format!("tcp:{}", echo.addr);

    let governed = gate.probe("bot", &[&spec]);
    assert!(ok(&governed[0]), "{governed:?}");
    // getpeername shows the address the agent asked for, not the enforcer's.
    assert_eq!(
        governed[0]["peer"],
        serde_json::json!(["127.0.0.1", echo.addr.port()])
    );

    let outside = probe_ungoverned(&[&spec, &format!("tcp:127.0.0.1:{}", gate.port)]);
    assert!(ok(&outside[0]), "{outside:?}");

    // Exactly one session: the governed connection. It carries identity and byte counts.
    let sessions = gate.sessions_ended(1);
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let s = &sessions[0];
    assert_eq!(s["agent"], "bot");
    assert_eq!(s["roles"], serde_json::json!(["analyst"]));
    assert_eq!(s["target"], "echo");
    assert_eq!(s["decision"], "allow");
    assert_eq!(s["original_destination"], echo.addr.to_string());
    assert_eq!(s["bytes_up"], 15);
    assert_eq!(s["bytes_down"], 15);
    assert!(
        s["exe"].as_str().unwrap_or_default().contains("python3"),
        "{s}"
    );
    assert!(
        s["cmdline"]
            .as_str()
            .unwrap_or_default()
            .contains("probe.py"),
        "{s}"
    );
    assert!(
        s["cgroup"].as_str().unwrap_or_default().ends_with("/bot"),
        "{s}"
    );
    assert_eq!(s["uid"], 0);

    // The ungoverned process's direct connect to the enforcer had no flow record: closed, noted.
    assert!(!ok(&outside[1]), "{outside:?}");
    gate.wait_event("a no_flow_record event", |e| e["kind"] == "no_flow_record");
}

#[test]
fn bulk_streams_are_relayed_intact_and_counted() {
    // Large enough that both directions fill whole relay buffers and are spliced.
    const BULK: u64 = 8 * 1024 * 1024;
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let got = gate.probe("bot", &[&format!("bulk:{}", echo.addr)]);
    assert!(ok(&got[0]), "echo differs from what was sent: {got:?}");
    assert_eq!(got[0]["echoed"], BULK);
    let sessions = gate.sessions_ended(1);
    assert_eq!(sessions[0]["bytes_up"], BULK, "{sessions:?}");
    assert_eq!(sessions[0]["bytes_down"], BULK, "{sessions:?}");
    assert!(sessions[0]["error"].is_null(), "{sessions:?}");
}

#[test]
fn grandchild_cgroup_stays_governed() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let grandchild = gate.cgroup_dir(&format!("{}/bot/worker/task", gate.cgroup_base));
    let sh = format!(
        "mkdir -p {g} && echo $$ > {g}/cgroup.procs && exec python3 {p} tcp:{e} tcp:127.0.0.1:1",
        g = grandchild.display(),
        p = agentgate_tests::probe_script().display(),
        e = echo.addr
    );
    let out = run(&mut gate.exec("bot", &["sh", "-c", &sh]));
    let lines = json_lines(&stdout(&out));
    assert_eq!(lines.len(), 2, "{}", stdout(&out));
    assert!(ok(&lines[0]), "{lines:?}");
    assert_eq!(
        errno(&lines[1]),
        EPERM,
        "unknown destination from a grandchild must be refused: {lines:?}"
    );
    let sessions = gate.sessions_ended(1);
    assert!(
        sessions[0]["cgroup"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/bot/worker/task")
    );
    assert_eq!(sessions[0]["agent"], "bot");
}

#[test]
fn ipv6_and_v4_mapped_connects_are_governed() {
    let echo4 = EchoServer::start("127.0.0.1:0");
    let echo6 = EchoServer::start("[::1]:0");
    let extra = format!(
        "  - name: echo6\n    match: [\"{}\"]\n    protocol: tcp\n",
        echo6.addr
    );
    let cfg = config(&echo4, &extra).replacen("targets: [echo]", "targets: [echo, echo6]", 1);
    let gate = Gate::start(&cfg);
    let probes = gate.probe(
        "bot",
        &[
            &format!("tcp:{}", echo6.addr),
            &format!("tcp6:[::ffff:127.0.0.1]:{}", echo4.addr.port()),
            "tcp:[::1]:1",
            "tcp6:[::ffff:127.0.0.1]:1",
        ],
    );
    assert!(
        ok(&probes[0]),
        "native IPv6 to an allowed target: {probes:?}"
    );
    assert_eq!(
        probes[0]["peer"],
        serde_json::json!(["::1", echo6.addr.port()])
    );
    assert!(
        ok(&probes[1]),
        "v4-mapped to an allowed IPv4 target: {probes:?}"
    );
    assert_eq!(
        probes[1]["peer"],
        serde_json::json!(["::ffff:127.0.0.1", echo4.addr.port()])
    );
    assert_eq!(errno(&probes[2]), EPERM, "{probes:?}");
    assert_eq!(
        errno(&probes[3]),
        EPERM,
        "v4-mapped unknown destination: {probes:?}"
    );
    let sessions = gate.sessions_ended(2);
    let targets: Vec<&str> = sessions
        .iter()
        .filter_map(|s| s["target"].as_str())
        .collect();
    assert!(
        targets.contains(&"echo6") && targets.contains(&"echo"),
        "{sessions:?}"
    );
}

#[test]
fn udp_is_refused_except_to_resolvers() {
    let echo = EchoServer::start("127.0.0.1:0");
    let resolver = udp_echo("127.0.0.1:0");
    let other = udp_echo("127.0.0.1:0");
    let gate = Gate::start(&config(
        &echo,
        &format!("dns_resolvers: [\"{resolver}\"]\n"),
    ));
    let probes = gate.probe(
        "bot",
        &[
            &format!("udp:{resolver}"),
            &format!("udp:{other}"),
            &format!("udpc:{other}"),
            &format!("udpc:{resolver}"),
        ],
    );
    assert!(ok(&probes[0]), "resolver must answer: {probes:?}");
    assert_eq!(
        errno(&probes[1]),
        EPERM,
        "sendto another UDP port: {probes:?}"
    );
    assert_eq!(
        errno(&probes[2]),
        EPERM,
        "connected UDP to another port: {probes:?}"
    );
    assert!(ok(&probes[3]), "connected UDP to the resolver: {probes:?}");
    // The same UDP destination works for an ungoverned process.
    assert!(ok(&probe_ungoverned(&[&format!("udp:{other}")])[0]));
    let e = gate.wait_event("a UDP refusal event", |e| {
        e["detail"]["reason"] == "udp_not_to_resolver"
    });
    assert_eq!(e["agent"], "bot");
    assert_eq!(e["destination"], other.to_string());
}

/// Sends a datagram to the resolver `to` with a socket carrying `option` (level, name, bytes),
/// and says what `sendto` returned: "sent", or the errno.
const ROUTED_DATAGRAM: &str = r#"
import socket, sys, json
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
out = []
for level, name, value in json.loads(sys.argv[3]):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if value:
        s.setsockopt(level, name, bytes.fromhex(value))
    try:
        s.sendto(b"routed", (sys.argv[1], int(sys.argv[2])))
        out.append("sent")
    except OSError as e:
        out.append(e.errno)
print(json.dumps(out))
"#;

#[test]
fn packets_routed_past_the_address_the_hooks_checked_are_dropped() {
    // A UDP socket may send only to resolvers, but an IPv6 routing header (settable without
    // privileges) or IPv4 source routing (root) sends the datagram to the header's address,
    // after `sendmsg` saw the resolver's. The egress program drops them by what the packet
    // carries.
    let _far6 = HostAddress::add("fd00:a9::2");
    let _far4 = HostAddress::add("192.0.2.77");
    let _near6 = HostAddress::add("fd00:a9::53");
    let echo = EchoServer::start("127.0.0.1:0");
    let resolver6 = udp_echo("[fd00:a9::53]:0");
    let resolver4 = udp_echo("127.0.0.1:0");
    let gate = Gate::start(&config(
        &echo,
        &format!("dns_resolvers: [\"{resolver6}\", \"{resolver4}\"]\n"),
    ));
    // IPV6_RTHDR (57): a segment routing header (type 4) whose one segment is `fd00:a9::2`.
    let srh = "0002040000000000fd0000a9000000000000000000000002";
    // IP_OPTIONS (4): a no-op, then loose source routing (131) through 192.0.2.77.
    let lsrr = "01830704c000024d";
    let send = |who: &str, to: SocketAddr, options: &str| -> Vec<Value> {
        let argv = [
            "python3",
            "-c",
            ROUTED_DATAGRAM,
            &to.ip().to_string(),
            &to.port().to_string(),
            options,
        ];
        let o = match who {
            "bot" => run(&mut gate.exec("bot", &argv)),
            _ => run(Command::new(argv[0]).args(&argv[1..])),
        };
        serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {o:?}"))
    };
    let v6 = format!(r#"[[41, 57, ""], [41, 57, "{srh}"]]"#);
    let v4 = format!(r#"[[0, 4, ""], [0, 4, "{lsrr}"]]"#);
    assert_eq!(
        send("bot", resolver6, &v6),
        vec![json!("sent"), json!(EPERM)]
    );
    assert_eq!(
        send("bot", resolver4, &v4),
        vec![json!("sent"), json!(EPERM)]
    );
    let e = gate.wait_event("the dropped routed datagram", |e| {
        e["kind"] == "kernel_deny"
            && e["detail"]["reason"] == "outbound_packet"
            && e["destination"]
                .as_str()
                .is_some_and(|d| d.contains("fd00:a9::2"))
    });
    assert_eq!(e["agent"], "bot", "{e}");
    gate.wait_event("the dropped source-routed datagram", |e| {
        e["detail"]["reason"] == "outbound_packet"
            && e["destination"]
                .as_str()
                .is_some_and(|d| d.starts_with("192.0.2.77:"))
    });
    // Ungoverned processes are not touched.
    assert_eq!(
        send("host", resolver6, &v6),
        vec![json!("sent"), json!("sent")]
    );
    assert_eq!(
        send("host", resolver4, &v4),
        vec![json!("sent"), json!("sent")]
    );
}

#[test]
fn direct_connects_to_the_enforcer_are_refused() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let p = gate.port;
    let probes = gate.probe(
        "recorder", // even an agent that records unknown destinations
        &[
            &format!("tcp:127.0.0.1:{p}"),
            &format!("tcp:[::1]:{p}"),
            &format!("tcp:0.0.0.0:{p}"),
            &format!("tcp:127.0.0.2:{p}"),
            &format!("tcp6:[::ffff:127.0.0.1]:{p}"),
        ],
    );
    for pr in &probes {
        assert_eq!(errno(pr), EPERM, "{probes:?}");
    }
    gate.wait_event("an enforcer-direct refusal", |e| {
        e["detail"]["reason"] == "direct_connect_to_enforcer"
    });
}

#[test]
fn unknown_destinations_are_refused_or_recorded_per_agent() {
    let echo = EchoServer::start("127.0.0.1:0");
    let elsewhere = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let spec = format!("tcp:{}", elsewhere.addr);

    let refused = gate.probe("bot", &[&spec]);
    assert_eq!(errno(&refused[0]), EPERM, "{refused:?}");
    let e = gate.wait_event("an unknown-destination refusal", |e| {
        e["detail"]["reason"] == "unknown_destination"
    });
    assert_eq!(e["agent"], "bot");
    assert_eq!(e["destination"], elsewhere.addr.to_string());
    assert!(
        e["exe"].as_str().unwrap_or_default().contains("python3"),
        "{e}"
    );

    let recorded = gate.probe("recorder", &[&spec]);
    assert!(ok(&recorded[0]), "{recorded:?}");
    assert_eq!(
        recorded[0]["peer"],
        serde_json::json!(["127.0.0.1", elsewhere.addr.port()])
    );
    let sessions = gate.sessions_ended(1);
    assert_eq!(sessions[0]["agent"], "recorder");
    assert_eq!(sessions[0]["decision"], "record");
    assert!(sessions[0]["target"].is_null());
    assert_eq!(sessions[0]["bytes_down"], 15);
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused_and_leaves_the_first_ones_sessions_open() {
    // A second daemon would take the first one's open sessions for ones a killed daemon left,
    // and end them as interrupted.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let script = format!(
        "import socket, sys, time\ns = socket.create_connection(('127.0.0.1', {}))\ns.sendall(b'hi'); s.recv(2)\nprint('open', flush=True)\nsys.stdin.read()",
        echo.addr.port()
    );
    let mut held = gate
        .exec("bot", &["python3", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(held.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "open");
    let mut second = Command::new(agentgate_tests::agentgate_bin())
        .args(["run", "--config"])
        .arg(&gate.config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while second.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Still running: it serves beside the first; stopped here, failed below.
    let _ = second.kill();
    let second = second.wait_with_output().unwrap();
    assert!(
        second.status.code().is_some_and(|c| c != 0),
        "{}",
        agentgate_tests::show(&second)
    );
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("another agentgate daemon"),
        "{}",
        agentgate_tests::show(&second)
    );
    let sessions = gate.cli_json(&["sessions", "list", "--json"]);
    let open = sessions.as_array().unwrap();
    assert_eq!(open.len(), 1, "{sessions}");
    assert!(open[0]["ended"].is_null(), "still open: {sessions}");
    drop(held.stdin.take());
    let _ = held.wait();
    gate.sessions_ended(1);
}

#[test]
fn killed_daemon_fails_closed_and_a_restart_readopts() {
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    let spec = format!("tcp:{}", echo.addr);
    assert!(ok(&gate.probe("bot", &[&spec])[0]));

    gate.kill9();
    let governed = gate.probe("bot", &[&spec]);
    assert_eq!(
        errno(&governed[0]),
        ECONNREFUSED,
        "governed connect must be refused while the daemon is down: {governed:?}"
    );
    assert!(
        ok(&probe_ungoverned(&[&spec])[0]),
        "ungoverned traffic is unaffected"
    );
    let status = gate.cli(&["status"]);
    assert!(!status.status.success());
    assert!(
        stdout(&status).contains("fail closed"),
        "{}",
        stdout(&status)
    );

    gate.spawn();
    let st = gate.cli_json(&["status", "--json"]);
    assert_eq!(st["daemon"]["adopted_pinned_state"], true, "{st}");
    assert!(
        ok(&gate.probe("bot", &[&spec])[0]),
        "served again after restart"
    );
    assert!(
        gate.log().contains("re-adopting pinned programs"),
        "{}",
        gate.log()
    );
}

#[test]
fn a_stopped_daemon_leaves_governed_connects_refused_in_the_kernel() {
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    let spec = format!("tcp:{}", echo.addr);
    assert!(ok(&gate.probe("bot", &[&spec])[0]));

    gate.stop();
    // Another process takes the stopped daemon's port: governed connects must not reach it.
    let squatter = {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
            sockopt::ReuseAddr,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            // CLOEXEC: a daemon that a parallel test spawns must not inherit this listener and
            // keep the port taken after it is dropped.
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        setsockopt(&fd, ReuseAddr, &true).unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::new(127, 0, 0, 1, gate.port),
        )
        .unwrap();
        listen(&fd, nix::sys::socket::Backlog::new(16).unwrap()).unwrap();
        std::net::TcpListener::from(fd)
    };
    let governed = gate.probe("bot", &[&spec]);
    assert_eq!(errno(&governed[0]), EPERM, "{governed:?}");
    assert!(
        squatter.accept().is_err(),
        "a governed connect reached the process on the daemon's port"
    );
    drop(squatter);
    assert!(ok(&probe_ungoverned(&[&spec])[0]));

    gate.spawn();
    assert!(
        ok(&gate.probe("bot", &[&spec])[0]),
        "served again after restart"
    );
}

#[test]
fn connects_that_fail_after_the_hook_cannot_fill_the_pending_map() {
    // A second socket bound to the address of a live gated connection makes the same 4-tuple
    // after the rewrite: its connect fails (EADDRNOTAVAIL) after the hook saved a pending
    // record. More of those than the map holds must not refuse everyone's connects.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let script = r#"
import socket, sys
port = int(sys.argv[1])
def bound(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", p))
    return s
a = bound(0)
a.connect(("127.0.0.1", port))
failed = 0
for _ in range(20000):
    b = bound(a.getsockname()[1])
    try:
        b.connect(("127.0.0.1", port))
    except OSError:
        failed += 1
    b.close()
print(failed)
"#;
    let port = echo.addr.port().to_string();
    let o = gate
        .exec("bot", &["python3", "-c", script, &port])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let failed: u32 = stdout(&o).trim().parse().unwrap_or(0);
    assert!(
        failed > 16384, // MAX_PENDING
        "the colliding connects did fail: {failed}"
    );
    let after = gate.probe("recorder", &[&format!("tcp:{}", echo.addr)]);
    assert!(
        ok(&after[0]),
        "another agent's connect after the flood: {after:?}"
    );
}

#[test]
fn a_restart_with_an_agent_removed_keeps_its_running_processes_refused() {
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    // A `bot` process that outlives the daemon, connecting once told to.
    let go = gate.dir.join("go");
    let script = r#"
import os, socket, sys, time
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
s = socket.socket()
try:
    s.connect(("127.0.0.1", int(sys.argv[2])))
    print("connected")
except OSError as e:
    print("errno", e.errno)
"#;
    let port = echo.addr.port().to_string();
    let mut waiting = gate
        .exec(
            "bot",
            &["python3", "-c", script, go.to_str().unwrap(), &port],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(waiting.stdout.take().unwrap()));
    assert_eq!(lines.next().unwrap().unwrap(), "ready");

    // The operator removes `bot` from the configuration and restarts the daemon.
    gate.stop();
    let text = std::fs::read_to_string(&gate.config).unwrap();
    let start = text.find("  - name: bot").unwrap();
    let end = text.find("  - name: recorder").unwrap();
    std::fs::write(&gate.config, format!("{}{}", &text[..start], &text[end..])).unwrap();
    gate.spawn();

    std::fs::write(&go, "").unwrap();
    let result = lines.next().and_then(Result::ok).unwrap_or_default();
    waiting.wait().unwrap();
    assert_eq!(
        result,
        format!("errno {EPERM}"),
        "a process of the removed agent must stay refused"
    );
    assert!(gate.log().contains("in no agent now"), "{}", gate.log());
    gate.wait_event("the orphan's refusal", |e| {
        e["detail"]["orphaned_cgroup"] == true
    });
    assert!(ok(&probe_ungoverned(&[&format!("tcp:{}", echo.addr)])[0]));
}

#[test]
fn an_attached_cgroup_created_again_stays_governed() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let service = format!("{}/restarted", gate.cgroup_base);
    let dir = gate.cgroup_dir(&service);
    std::fs::create_dir_all(&dir).unwrap();
    let out = gate.cli(&["attach", "--agent", "bot", "--cgroup", &service]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What systemd does when it restarts a service: the cgroup is removed and made again,
    // with a new id.
    std::fs::remove_dir(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let line = wait_for(
        "the daemon to follow the new cgroup",
        Duration::from_secs(5),
        || {
            gate.log()
                .lines()
                .find(|l| l.contains("was created again"))
                .map(str::to_string)
        },
    );
    // Noticed by the watch on the parent directory as the cgroup was made, not by the poll
    // that backs it up (which left a restarted service ungoverned for up to 250 ms).
    assert!(line.contains("inotify"), "{line}");
    let sh = format!(
        "echo $$ > {}/cgroup.procs && exec python3 {} tcp:127.0.0.1:1",
        dir.display(),
        agentgate_tests::probe_script().display(),
    );
    let lines = json_lines(&stdout(&run(Command::new("sh").args(["-c", &sh]))));
    assert_eq!(
        errno(&lines[0]),
        EPERM,
        "the service's new cgroup is governed (refused, not ECONNREFUSED): {lines:?}"
    );
}

#[test]
fn connection_without_flow_record_is_closed() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    // An ungoverned process (no hook, so no record) connects straight to the listener.
    let out = probe_ungoverned(&[
        &format!("tcp:127.0.0.1:{}", gate.port),
        &format!("tcp:[::1]:{}", gate.port),
    ]);
    for pr in &out {
        assert!(!ok(pr), "{out:?}");
        assert!(
            pr["echo"].as_str().unwrap_or_default().is_empty(),
            "no byte may come back: {out:?}"
        );
    }
    gate.wait_event("no_flow_record", |e| e["kind"] == "no_flow_record");
    let sessions = gate.cli_json(&["sessions", "list", "--json"]);
    assert_eq!(
        sessions.as_array().map(Vec::len),
        Some(0),
        "nothing was relayed: {sessions}"
    );
}

#[test]
fn exec_passes_exit_code_stdio_and_user() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let out = run(&mut gate.exec("bot", &["sh", "-c", "id -u; cat /proc/self/cgroup; exit 7"]));
    assert_eq!(out.status.code(), Some(7));
    let text = stdout(&out);
    assert!(text.starts_with("0\n"), "{text}");
    assert!(
        text.contains(&format!("{}/bot", gate.cgroup_base)),
        "{text}"
    );

    let script = agentgate_tests::probe_script();
    let target = format!("tcp:{}", echo.addr);
    let mut as_nobody = Command::new(agentgate_tests::agentgate_bin());
    as_nobody
        .args(["exec", "--config"])
        .arg(&gate.config)
        .args(["--agent", "bot", "--user", "nobody", "--", "python3"])
        .arg(&script)
        .arg(&target);
    let out = run(&mut as_nobody);
    assert!(stdout(&out).contains("\"ok\": true"), "{}", stdout(&out));
    let sessions = gate.sessions_ended(1);
    assert_eq!(
        sessions[0]["uid"], 65534,
        "the agent ran as nobody: {:?}",
        sessions[0]
    );

    let unknown = run(&mut gate.exec("nobody-configured", &["true"]));
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown agent"));
}

#[test]
fn exec_refuses_when_nothing_governs_the_agent() {
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    gate.kill9();
    let out = gate.cli(&["uninstall"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&mut gate.exec("bot", &["true"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not governed right now"), "{err}");
}

#[test]
fn attach_governs_an_existing_cgroup() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let service = format!("{}/service", gate.cgroup_base);
    let dir = gate.cgroup_dir(&service);
    std::fs::create_dir_all(&dir).expect("create service cgroup");
    let dir_s = dir.to_str().unwrap_or_default();
    let out = gate.cli(&["attach", "--agent", "bot", "--cgroup", dir_s]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let sh = format!(
        "echo $$ > {}/cgroup.procs && exec python3 {} tcp:{} tcp:127.0.0.1:1",
        dir.display(),
        agentgate_tests::probe_script().display(),
        echo.addr
    );
    let lines = json_lines(&stdout(&run(Command::new("sh").args(["-c", &sh]))));
    assert!(ok(&lines[0]), "{lines:?}");
    assert_eq!(errno(&lines[1]), EPERM, "{lines:?}");
    let s = gate.sessions_ended(1);
    assert_eq!(s[0]["agent"], "bot");
    let st = gate.cli_json(&["status", "--json"]);
    let governed = st["daemon"]["governed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        governed.iter().any(|g| g["cgroup"] == service.as_str()),
        "{st}"
    );

    let bad = gate.cli(&["attach", "--agent", "ghost", "--cgroup", dir_s]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown agent"));

    let out = gate.cli(&["detach", "--cgroup", &service]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&stdout(&run(Command::new("sh").args(["-c", &sh]))));
    assert!(ok(&lines[0]) && !ok(&lines[1]), "{lines:?}");
    assert_eq!(
        errno(&lines[1]),
        111,
        "after detach the process is ungoverned: {lines:?}"
    );
    wait_for(
        "no new session after detach",
        Duration::from_secs(2),
        || {
            let s = gate.cli_json(&["sessions", "list", "--json"]);
            (s.as_array().map(Vec::len) == Some(1)).then_some(())
        },
    );
}

#[test]
fn check_config_reports_file_line_and_key() {
    let dir = std::env::temp_dir().join(agentgate_tests::unique("cfg"));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.yaml");
    let check = |path: &std::path::Path| {
        run(Command::new(agentgate_tests::agentgate_bin())
            .arg("check-config")
            .arg(path))
    };
    std::fs::write(
        &bad,
        "agents:\n  - name: a\n    cgroup: x\n    targets: [nope]\n",
    )
    .expect("write");
    let out = check(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agents[0].targets[0]") && err.contains("unknown target `nope`"),
        "{err}"
    );

    std::fs::write(&bad, "listen:\n  port: banana\n").expect("write");
    let out = check(&bad);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.yaml:2:"),
        "errors name file and line: {err}"
    );

    let out = check(&agentgate_tests::workspace_root().join("policies/default.yaml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_governed_agent_looping_on_refused_connects_cannot_flood_the_record() {
    // Each refused connect is a kernel event. Recorded one by one, a loop would fill the state
    // directory's disk: each agent gets `burst` records then `per_second`, and the rest are
    // counted in `events_suppressed` (or `kernel_events_suppressed` when over the agent's share
    // of the kernel's ring buffer, `kernel_events_lost` when the ring buffer was full).
    let echo = EchoServer::start("127.0.0.1:0");
    let resolver = udp_echo("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, "events: {burst: 50, per_second: 10}\n"));
    const ATTEMPTS: u64 = 5000;
    let script = format!(
        r#"
import errno, socket, time
refused = 0
began = time.monotonic()
for _ in range({ATTEMPTS}):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 9))
    except PermissionError:
        refused += 1
    s.close()
print(refused, time.monotonic() - began)
"#
    );
    let out = run(&mut gate.exec("bot", &["python3", "-c", &script]));
    let text = stdout(&out);
    let mut fields = text.split_whitespace();
    let refused: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let seconds: f64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0.0);
    assert_eq!(refused, ATTEMPTS, "every connect refused: {text}");

    // Another agent's refusal is still recorded: the flood spent only the bot's burst.
    let other = gate.probe("recorder", &[&format!("udp:{resolver}")]);
    assert_eq!(errno(&other[0]), EPERM, "{other:?}");
    gate.wait_event("the other agent's refusal", |e| {
        e["kind"] == "kernel_deny" && e["agent"] == "recorder"
    });

    // Every refusal is accounted for: recorded, counted as left out, or counted as lost.
    let (recorded, left_out, lost) = wait_for(
        "every refusal recorded or counted",
        Duration::from_secs(15),
        || {
            let c = refusals_accounted(&gate, "bot");
            (c.recorded + c.left_out + c.kernel_suppressed + c.lost == ATTEMPTS).then_some((
                c.recorded,
                c.left_out + c.kernel_suppressed,
                c.lost,
            ))
        },
    );
    // The loop took `seconds`; the record may hold the burst plus the rate over that time (and
    // over the moments until the daemon had read the last of them).
    let allowed = 50 + (10.0 * (seconds + 2.0)).ceil() as u64;
    assert!(
        recorded >= 50 && recorded <= allowed,
        "recorded {recorded} refusals of {ATTEMPTS} in {seconds:.2} s (at most {allowed}); left out {left_out}, lost {lost}"
    );
    assert!(left_out > 0, "the rest were counted as left out");

    // Any local user can connect to the gate's listener without a flow record: the same limits.
    const DIRECT: u64 = 300;
    let script = format!(
        r#"
import socket
for _ in range({DIRECT}):
    s = socket.create_connection(("127.0.0.1", {port}))
    s.recv(1)
    s.close()
"#,
        port = gate.port
    );
    run(Command::new("python3").args(["-c", &script]));
    let (recorded, left_out) = wait_for(
        "every connection without a flow record recorded or counted",
        Duration::from_secs(15),
        || {
            let v = gate.cli_json(&["events", "--limit", "100000", "--json"]);
            let events = v.as_array()?;
            let recorded = events
                .iter()
                .filter(|e| e["kind"] == "no_flow_record")
                .count() as u64;
            let left_out: u64 = events
                .iter()
                .filter(|e| {
                    e["kind"] == "events_suppressed" && e["detail"]["of_kind"] == "no_flow_record"
                })
                .map(|e| e["detail"]["count"].as_u64().unwrap_or(0))
                .sum();
            (recorded + left_out == DIRECT).then_some((recorded, left_out))
        },
    );
    assert!(
        recorded < DIRECT && left_out > 0,
        "no flow record: {recorded} recorded, {left_out} left out"
    );
    assert!(
        gate.log()
            .contains("events over the recording limit were counted, not recorded"),
        "{}",
        gate.log()
    );
}

/// How one agent's kernel refusals show in the record.
struct Refusals {
    /// `kernel_deny` events of the agent.
    recorded: u64,
    /// Counted by the daemon's limiter (`events_suppressed` of `kernel_deny`).
    left_out: u64,
    /// Counted in the kernel, over the agent's share of the ring (`kernel_events_suppressed`).
    kernel_suppressed: u64,
    /// Found the ring full (`kernel_events_lost`, any agent's).
    lost: u64,
    /// The agent's `kernel_deny` events.
    events: Vec<Value>,
}

fn refusals_accounted(gate: &Gate, agent: &str) -> Refusals {
    let v = gate.cli_json(&["events", "--limit", "100000", "--json"]);
    let all = v.as_array().cloned().unwrap_or_default();
    let of_agent = |kind: &str| {
        all.iter()
            .filter(|e| e["agent"] == agent && e["kind"] == kind)
            .cloned()
            .collect::<Vec<_>>()
    };
    let count = |events: &[Value]| -> u64 {
        events
            .iter()
            .map(|e| e["detail"]["count"].as_u64().unwrap_or(0))
            .sum()
    };
    let left_out = of_agent("events_suppressed");
    for e in &left_out {
        assert_eq!(e["detail"]["of_kind"], "kernel_deny", "{e}");
    }
    let lost: Vec<Value> = all
        .iter()
        .filter(|e| e["kind"] == "kernel_events_lost")
        .cloned()
        .collect();
    let events = of_agent("kernel_deny");
    Refusals {
        recorded: events.len() as u64,
        left_out: count(&left_out),
        kernel_suppressed: count(&of_agent("kernel_events_suppressed")),
        lost: count(&lost),
        events,
    }
}

/// Stops a process (SIGSTOP) until dropped, even when the test fails meanwhile.
struct Stopped(nix::unistd::Pid);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

#[test]
fn one_agents_flood_of_refusals_cannot_push_another_agents_out_of_the_kernel_ring() {
    // Every agent's kernel refusals go through one ring buffer. An agent looping on refused
    // connects while the daemon reads slowly (here: not at all, it is stopped) used to fill it,
    // and another agent's refusals were then only counted in `kernel_events_lost`, with no
    // agent, destination or reason. Each agent now has its share of the ring; the refusals of
    // an agent over its share are counted for that agent (`kernel_events_suppressed`).
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&two_agents(&echo, "", "other", ""));
    const FLOOD: u64 = 40_000;
    let script = format!(
        r#"
import socket, sys
refused = 0
for i in range({FLOOD}):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", 9))
    except PermissionError:
        refused += 1
    s.close()
    if i == {FLOOD} // 2:
        print("halfway", flush=True)
print(refused, flush=True)
"#
    );
    let stopped = Stopped::new(gate.pid().unwrap());
    let mut flood = gate
        .exec("bot", &["python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(flood.stdout.take().unwrap()));
    let halfway = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(halfway, "halfway", "the flood runs");
    // 20000 refusals so far: more than the old ring held (256 KiB of 80-byte entries, 3276).
    let specs: Vec<String> = (1..=5)
        .map(|i| format!("tcp:127.0.0.{}:{}", i + 1, 7000 + i))
        .collect();
    let specs: Vec<&str> = specs.iter().map(String::as_str).collect();
    let other = gate.probe("other", &specs);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(flood.wait().unwrap().success());
    assert_eq!(
        rest.last().map(String::as_str),
        Some(FLOOD.to_string().as_str()),
        "every connect of the flood refused: {rest:?}"
    );
    for p in &other {
        assert_eq!(errno(p), EPERM, "{other:?}");
    }
    drop(stopped);

    // The other agent's refusals are all recorded, each with its destination.
    let mut destinations: Vec<String> = wait_for(
        "the other agent's refusals recorded",
        Duration::from_secs(15),
        || {
            let c = refusals_accounted(&gate, "other");
            (c.recorded >= 5).then_some(c)
        },
    )
    .events
    .iter()
    .map(|e| e["destination"].as_str().unwrap_or_default().to_string())
    .collect();
    destinations.sort();
    let want: Vec<String> = specs
        .iter()
        .map(|s| s.trim_start_matches("tcp:").to_string())
        .collect();
    assert_eq!(destinations, want);

    // The flood is accounted for: recorded, left out by the daemon's limiter, or counted in
    // the kernel for this agent; none found the ring full.
    let c = wait_for(
        "every refusal of the flood recorded or counted",
        Duration::from_secs(15),
        || {
            let c = refusals_accounted(&gate, "bot");
            (c.recorded + c.left_out + c.kernel_suppressed + c.lost == FLOOD).then_some(c)
        },
    );
    assert_eq!(c.lost, 0, "no refusal found the ring full");
    assert!(
        c.kernel_suppressed > FLOOD / 2,
        "most of the flood counted in the kernel for this agent: {} of {FLOOD}",
        c.kernel_suppressed
    );
}

#[test]
fn a_socket_connected_before_exec_is_not_passed_to_the_governed_command() {
    // A wrapper that connects first and then runs the agent under the gate would hand it an
    // ungoverned connection: `exec` closes inherited descriptors unless told `--keep-fds`.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let child = r#"
import os, socket
try:
    s = socket.socket(fileno=3)
    s.sendall(b"ping")
    print("used:" + s.recv(4).decode())
except OSError as e:
    print("closed:" + str(e.errno))
"#;
    let port = echo.addr.port();
    let run_wrapped = |extra: &str| {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} && exec {bin} exec --config {config} --agent bot {extra} -- python3 -c '{child}'",
            bin = agentgate_tests::agentgate_bin().display(),
            config = gate.config.display(),
        );
        stdout(&run(Command::new("bash").args(["-c", &script])))
    };
    let out = run_wrapped("");
    assert_eq!(out.trim(), "closed:9", "EBADF expected: {out}");
    // The operator may opt out, knowing the connection is not governed.
    let out = run_wrapped("--keep-fds");
    assert_eq!(out.trim(), "used:ping", "{out}");
    // A connection handed over as standard input (inetd style) is refused outright.
    let script = format!(
        "exec 0<>/dev/tcp/127.0.0.1/{port} && exec {bin} exec --config {config} --agent bot -- python3 -c 'print(1)'",
        bin = agentgate_tests::agentgate_bin().display(),
        config = gate.config.display(),
    );
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("standard input) is a network socket"), "{err}");
}

#[test]
fn a_unix_socket_on_standard_input_is_refused_unless_the_agent_may_use_unix_sockets() {
    // A wrapper (`socat UNIX-CONNECT:... EXEC:'agentgate exec ...'`) hands the agent a Unix
    // connection it could never make itself: here to a root-only service.
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&two_agents(&echo, "", "local", "allow_unix_sockets: true"));
    let dir = std::env::temp_dir().join(agentgate_tests::unique("agentgate-stdio"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("root-only.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let _ = std::io::Write::write_all(&mut s, b"ROOT-ONLY-SERVICE\n");
        }
    });
    let connected = || {
        Stdio::from(std::os::fd::OwnedFd::from(
            UnixStream::connect(&path).unwrap(),
        ))
    };
    let script = "import sys; print(sys.stdin.readline().strip())";
    let exec = |agent: &str, extra: &[&str]| {
        let mut cmd = Command::new(agentgate_tests::agentgate_bin());
        cmd.args(["exec", "--config"])
            .arg(&gate.config)
            .args(["--agent", agent, "--user", "nobody"])
            .args(extra)
            .args(["--", "python3", "-c", script])
            .stdin(connected());
        run(&mut cmd)
    };
    let o = exec("bot", &[]);
    assert!(!o.status.success(), "{}", agentgate_tests::show(&o));
    assert_eq!(stdout(&o), "", "{}", agentgate_tests::show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("descriptor 0 (standard input) is a Unix socket")
            && err.contains("allow_unix_sockets: true")
            && err.contains("--keep-fds"),
        "{err}"
    );
    // An agent that may use Unix sockets gets it, and so does one the operator opts out for.
    for o in [exec("local", &[]), exec("bot", &["--keep-fds"])] {
        assert_eq!(
            stdout(&o).trim(),
            "ROOT-ONLY-SERVICE",
            "{}",
            agentgate_tests::show(&o)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exec_as_a_user_refuses_a_working_directory_the_user_cannot_reach() {
    // The command inherits the operator's working directory: one under root's 0700 home let an
    // agent read files by relative path that it could not reach by their own.
    use std::os::unix::fs::PermissionsExt;
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let home = std::env::temp_dir().join(agentgate_tests::unique("agentgate-home"));
    let inner = home.join("project");
    std::fs::create_dir_all(&inner).unwrap();
    let mode = |p: &std::path::Path, m| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(&home, 0o700);
    mode(&inner, 0o755);
    std::fs::write(inner.join("notes.txt"), "operator notes\n").unwrap();
    mode(&inner.join("notes.txt"), 0o644);
    std::fs::write(inner.join("bot.sh"), "#!/bin/sh\ncat notes.txt\n").unwrap();
    mode(&inner.join("bot.sh"), 0o755);

    let o = run(gate
        .exec_as("bot", "nobody", &["cat", "notes.txt"])
        .current_dir(&inner));
    assert!(!o.status.success(), "{}", agentgate_tests::show(&o));
    assert_eq!(stdout(&o), "", "{}", agentgate_tests::show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!(
            "working directory {} cannot be reached",
            inner.display()
        )) && err.contains("cd to a directory the user can reach"),
        "{err}"
    );
    // Root (no --user) is not held back, and once the user reaches the directory a relative
    // command path works from it.
    let o = run(gate.exec("bot", &["cat", "notes.txt"]).current_dir(&inner));
    assert_eq!(
        stdout(&o),
        "operator notes\n",
        "{}",
        agentgate_tests::show(&o)
    );
    mode(&home, 0o755);
    let o = run(gate
        .exec_as("bot", "nobody", &["./bot.sh"])
        .current_dir(&inner));
    assert_eq!(
        stdout(&o),
        "operator notes\n",
        "{}",
        agentgate_tests::show(&o)
    );
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn exec_as_a_user_starts_the_command_from_a_minimal_environment() {
    // The operator's (root's) environment holds tokens and passwords; with --user the agent gets
    // the terminal and locale variables, its user's, and what --env names.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let env = r#"echo "secret=$FOO_SECRET named=$FOO_NAMED lang=$LANG user=$USER home=$HOME path=${PATH:+set}""#;
    let run_with = |cmd: &mut Command| {
        let o = run(cmd
            .env("FOO_SECRET", "s3cret")
            .env("FOO_NAMED", "passed")
            .env("LANG", "C.UTF-8"));
        assert!(o.status.success(), "{}", agentgate_tests::show(&o));
        stdout(&o).trim().to_string()
    };
    let nobody_home = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .dir
        .display()
        .to_string();
    let seen = run_with(&mut gate.exec_as("bot", "nobody", &["sh", "-c", env]));
    assert_eq!(
        seen,
        format!("secret= named= lang=C.UTF-8 user=nobody home={nobody_home} path=set")
    );
    let mut named = Command::new(agentgate_tests::agentgate_bin());
    named
        .args(["exec", "--config"])
        .arg(&gate.config)
        .args(["--agent", "bot", "--user", "nobody", "--env", "FOO_NAMED"])
        .args(["--", "sh", "-c", env]);
    assert_eq!(
        run_with(&mut named),
        format!("secret= named=passed lang=C.UTF-8 user=nobody home={nobody_home} path=set")
    );
    // Root (no --user) could read it anyway: it keeps the whole environment.
    let seen = run_with(&mut gate.exec("bot", &["sh", "-c", env]));
    assert!(seen.starts_with("secret=s3cret named=passed "), "{seen}");
}

/// Stands in for the operator's interactive shell: a session leader with a pseudo-terminal as
/// its controlling terminal, running each `exec` as a foreground job (its own process group,
/// given the terminal). argv[1]: the `agentgate exec ... --` prefix, as JSON. Prints what the
/// terminal showed and what the shell saw, as JSON.
const OPERATOR_TERMINAL: &str = r#"
import json, os, pty, select, signal, subprocess, sys, time
prefix = json.loads(sys.argv[1])
PROBE = r"""
import errno, fcntl, json, os, sys, termios
def attempt(f):
    try:
        f()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
line = sys.stdin.readline()
res = {"read": line.strip(), "isatty": os.isatty(0), "sid": os.getsid(0)}
res["tiocsti"] = attempt(lambda: [fcntl.ioctl(0, termios.TIOCSTI, bytes([c])) for c in b"echo INJECTED\n"])
res["tcsetpgrp"] = attempt(lambda: os.tcsetpgrp(0, os.getpgrp()))
print("probe:" + json.dumps(res), flush=True)
"""
INTERRUPTED = r"""
import os, signal, sys, time
def on(sig, frame):
    os.write(1, ("agent got " + signal.Signals(sig).name + "\n").encode())
    sys.exit(42)
signal.signal(signal.SIGINT, on)
print("interrupt-me", flush=True)
time.sleep(30)
"""
reports_r, reports_w = os.pipe()
pid, master = pty.fork()
if pid == 0:
    os.close(reports_r)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    def report(**kv):
        os.write(reports_w, (json.dumps(kv) + "\n").encode())
    def foreground():
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpgrp())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)
    def job(argv):
        code = subprocess.Popen(argv, preexec_fn=foreground).wait()
        os.tcsetpgrp(0, os.getpgrp())
        return code
    report(shell_sid=os.getsid(0))
    code = job(prefix + ["python3", "-c", PROBE])
    left = b""
    if select.select([0], [], [], 1)[0]:
        left = os.read(0, 1024)
    report(probe_exit=code, left_in_input=left.decode(errors="replace"))
    report(interrupted_exit=job(prefix + ["python3", "-c", INTERRUPTED]))
    os._exit(0)
os.close(reports_w)
os.write(master, b"typed by the operator\n")
transcript, reports, interrupted = b"", b"", False
open_fds, deadline = {master, reports_r}, time.time() + 60
while reports_r in open_fds and time.time() < deadline:
    for fd in select.select(list(open_fds), [], [], 1)[0]:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            open_fds.discard(fd)
        elif fd == master:
            transcript += data
        else:
            reports += data
    if not interrupted and b"interrupt-me" in transcript:
        os.write(master, b"\x03")
        interrupted = True
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
out = {"transcript": transcript.decode(errors="replace")}
for line in reports.decode().splitlines():
    out.update(json.loads(line))
print(json.dumps(out))
"#;

#[test]
fn exec_gives_the_agent_no_controlling_terminal() {
    // Run from an operator's terminal, an agent sharing it could push a command into its input
    // (TIOCSTI), which the operator's root shell runs once the agent exits, outside every
    // cgroup; or take the foreground (tcsetpgrp) and read what the operator types next. `exec`
    // runs the agent in a session of its own, with the terminal's descriptors but not the
    // terminal as its controlling terminal.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let prefix = serde_json::json!([
        agentgate_tests::agentgate_bin(),
        "exec",
        "--config",
        gate.config,
        "--agent",
        "bot",
        "--user",
        "nobody",
        "--"
    ]);
    let out = run(Command::new("python3").args(["-c", OPERATOR_TERMINAL, &prefix.to_string()]));
    let seen: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", agentgate_tests::show(&out)));
    let transcript = seen["transcript"].as_str().unwrap_or_default();
    let probe: Value = transcript
        .lines()
        .find_map(|l| l.trim().strip_prefix("probe:"))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no probe result: {seen}"));
    // Where TIOCSTI is disabled for everyone, it fails earlier, with EIO.
    let legacy = std::fs::read_to_string("/proc/sys/dev/tty/legacy_tiocsti").unwrap_or_default();
    let refused = if legacy.trim() == "0" { "EIO" } else { "EPERM" };
    assert_eq!(probe["tiocsti"], refused, "{seen}");
    assert_eq!(
        seen["left_in_input"], "",
        "nothing reaches the shell's input: {seen}"
    );
    assert_eq!(probe["tcsetpgrp"], "ENOTTY", "{seen}");
    assert_ne!(probe["sid"], seen["shell_sid"], "{seen}");
    // Interactive use still works: the agent reads what is typed at the terminal.
    assert_eq!(probe["isatty"], true, "{seen}");
    assert_eq!(probe["read"], "typed by the operator", "{seen}");
    assert_eq!(seen["probe_exit"], 0, "{seen}");
    // Ctrl-C at the terminal reaches the agent through `exec`.
    assert!(transcript.contains("agent got SIGINT"), "{seen}");
    assert_eq!(seen["interrupted_exit"], 42, "{seen}");
}

/// Tries, from the calling process, to trace process `argv[1]` and to open its memory, and
/// prints the errnos (0: it worked).
const TRACE_ANOTHER: &str = r#"
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
out = {"uid": os.getuid()}
out["ptrace"] = 0 if libc.ptrace(16, pid, 0, 0) == 0 else ctypes.get_errno()
try:
    open(f"/proc/{pid}/mem", "r+b").close()
    out["mem"] = 0
except OSError as e:
    out["mem"] = e.errno
try:
    open("/etc/hostname").read()
    out["reads"] = True
except OSError:
    out["reads"] = False
print(json.dumps(out))
"#;

#[test]
fn an_agent_cannot_trace_processes_of_its_user_outside_its_namespace() {
    // Identity is the cgroup of the process that connects. A process may trace any process of
    // its own uid (no Yama here), so an agent could make an ungoverned process of its user, or
    // another agent's, connect for it. `exec --user` gives the command a user namespace of its
    // own, with every id mapped to itself: same user, same files, no tracing out of it.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    // An ungoverned process of the same user, dumpable like any program it starts.
    let mut victim = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "60",
        ])
        .spawn()
        .expect("an ungoverned process as nobody");
    let pid = victim.id().to_string();
    // The same check as nobody outside the gate: tracing works there, so the refusal below is
    // the namespace's doing. (The system's Python: a root-only toolchain shim may come first
    // on PATH.)
    let outside = run(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        TRACE_ANOTHER,
        &pid,
    ]));
    let outside: Value = serde_json::from_str(stdout(&outside).trim()).expect("json");
    assert_eq!(outside["ptrace"], 0, "{outside}");
    // (Attached: let it go on; the tracer has exited, which detaches it.)
    let inside = run(&mut gate.exec_as(
        "bot",
        "nobody",
        &["/usr/bin/python3", "-c", TRACE_ANOTHER, &pid],
    ));
    let inside: Value = serde_json::from_str(stdout(&inside).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", agentgate_tests::show(&inside)));
    assert_eq!(inside["uid"], 65534, "{inside}");
    assert_eq!(inside["ptrace"], EPERM, "{inside}");
    assert_eq!(inside["mem"], 13, "EACCES opening its memory: {inside}");
    assert_eq!(inside["reads"], true, "{inside}");
    let _ = victim.kill();
    let _ = victim.wait();
}

/// `add PROGRAM ARGS...`: joins a fresh session keyring, adds the operator's key to it and
/// executes PROGRAM (an operator's shell after `kinit` or `keyctl add`). `read`: looks for that
/// key in the session keyring and reads it, then adds a key of its own; prints JSON (a negative
/// number is an errno). x86-64 system call numbers.
const SESSION_KEYS: &str = r#"
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
SYS_add_key, SYS_keyctl = 248, 250
SESSION = ctypes.c_long(-3)  # KEY_SPEC_SESSION_KEYRING
def call(*args):
    r = libc.syscall(*args)
    return r if r >= 0 else -ctypes.get_errno()
if sys.argv[1] == "add":
    call(SYS_keyctl, 1, None)  # KEYCTL_JOIN_SESSION_KEYRING, anonymous
    assert call(SYS_add_key, b"user", b"operator-secret", b"db-password=hunter2", 19, SESSION) > 0
    os.execv(sys.argv[2], sys.argv[2:])
out = {"uid": os.getuid()}
out["search"] = call(SYS_keyctl, 10, SESSION, b"user", b"operator-secret", 0)  # KEYCTL_SEARCH
if out["search"] > 0:
    buf = ctypes.create_string_buffer(64)
    n = call(SYS_keyctl, 11, ctypes.c_long(out["search"]), buf, 64)  # KEYCTL_READ
    out["read"] = buf.raw[:n].decode() if n >= 0 else n
out["own_key"] = call(SYS_add_key, b"user", b"agent-own", b"mine", 4, SESSION) > 0
print(json.dumps(out))
"#;

#[test]
fn the_agent_gets_a_session_keyring_of_its_own() {
    // `setsid` and the user change keep the caller's session keyring, whose keys the process
    // possesses: an agent, even as nobody, read (and could overwrite) the operator's.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let bin = agentgate_tests::agentgate_bin();
    let config = gate.config.to_str().unwrap().to_string();
    let python = "/usr/bin/python3";
    let keys = |prefix: &[&str]| -> Value {
        let o = run(Command::new(python)
            .args(["-c", SESSION_KEYS, "add"])
            .args(prefix)
            .args([python, "-c", SESSION_KEYS, "read"]));
        serde_json::from_str(stdout(&o).trim())
            .unwrap_or_else(|e| panic!("{e}: {}", agentgate_tests::show(&o)))
    };
    // Outside the gate a process of another user in the same session reads the key.
    let outside = keys(&[
        "/usr/bin/setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    assert_eq!(
        outside["read"], "db-password=hunter2",
        "the route exists outside the gate: {outside}"
    );
    let exec = [
        bin.to_str().unwrap(),
        "exec",
        "--config",
        &config,
        "--agent",
        "bot",
    ];
    let as_nobody = [&exec[..], &["--user", "nobody", "--"]].concat();
    let as_root = [&exec[..], &["--"]].concat();
    for (who, uid, prefix) in [("nobody", 65534, as_nobody), ("root", 0, as_root)] {
        let seen = keys(&prefix);
        assert_eq!(seen["uid"], uid, "{seen}");
        assert_eq!(seen["search"], -126, "ENOKEY as {who}: {seen}");
        assert!(seen.get("read").is_none(), "{seen}");
        assert_eq!(
            seen["own_key"], true,
            "its own keyring works as {who}: {seen}"
        );
    }
}

#[test]
fn exec_relays_signals_and_exit_status_and_the_agent_dies_with_it() {
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let exec_as_nobody = |script: &str| {
        gate.exec_as("bot", "nobody", &["python3", "-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn exec")
    };
    let first_line = |child: &mut std::process::Child| {
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        line
    };

    // A signal that ends the agent is reported as a shell does.
    let out = run(&mut gate.exec("bot", &["sh", "-c", "kill -TERM $$"]));
    assert_eq!(
        out.status.code(),
        Some(143),
        "{}",
        agentgate_tests::show(&out)
    );

    // SIGTERM sent to `exec` reaches the agent, which starts with no signal blocked; `exec`
    // itself stays outside the agent's cgroup.
    let mut child = exec_as_nobody(
        r#"
import os, signal, sys, time
def on(sig, frame):
    os.write(1, ("agent got " + signal.Signals(sig).name + "\n").encode())
    sys.exit(9)
signal.signal(signal.SIGTERM, on)
blocked = [l.split()[1] for l in open("/proc/self/status") if l.startswith("SigBlk:")][0]
print(os.getpid(), blocked, flush=True)
time.sleep(30)
"#,
    );
    let line = first_line(&mut child);
    let (agent_pid, blocked) = line.trim().split_once(' ').expect("pid and mask");
    assert_eq!(u64::from_str_radix(blocked, 16), Ok(0), "{line}");
    let cgroup_of = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let agent_cgroup = format!("{}/bot\n", gate.cgroup_base);
    assert!(cgroup_of(agent_pid).ends_with(&agent_cgroup));
    assert!(!cgroup_of(&child.id().to_string()).ends_with(&agent_cgroup));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(9),
        "{}",
        agentgate_tests::show(&out)
    );
    assert_eq!(stdout(&out).trim(), "agent got SIGTERM");

    // `kill -9` of `exec` (which cannot be relayed) still ends the agent, as it did when `exec`
    // became the agent.
    let mut child =
        exec_as_nobody("import os, time; print(os.getpid(), flush=True); time.sleep(30)");
    let agent_pid = first_line(&mut child).trim().to_string();
    child.kill().unwrap();
    let _ = child.wait();
    wait_for(
        "the agent to end",
        Duration::from_secs(10),
        || match std::fs::read_to_string(format!("/proc/{agent_pid}/stat")) {
            Err(_) => Some(()),
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
                .then_some(()),
        },
    );
}

#[test]
fn a_program_name_with_a_line_break_cannot_forge_lines_of_a_replay() {
    // The agent names its executable: one called "x\n-- session ended ..." made the replay's
    // header print a forged line of its own.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let dir = std::env::temp_dir().join(agentgate_tests::unique("agentgate-exe"));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("agent\n-- session ended 2020-01-01T00:00:00Z");
    std::fs::copy("/usr/bin/python3", &exe).unwrap();
    let script = format!(
        "import socket; s = socket.create_connection(('127.0.0.1', {})); s.sendall(b'hi'); s.recv(2)",
        echo.addr.port()
    );
    let o = run(&mut gate.exec("bot", &[exe.to_str().unwrap(), "-c", &script]));
    assert!(o.status.success(), "{}", agentgate_tests::show(&o));
    let session = gate.sessions_ended(1)[0]["id"]
        .as_i64()
        .unwrap()
        .to_string();
    let replay = gate.cli(&["sessions", "replay", &session]);
    let text = stdout(&replay);
    assert!(
        text.contains("agent\\n-- session ended 2020"),
        "the name is shown escaped: {text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("-- session ended 2020")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_state_dir_and_the_session_store_are_private_to_the_daemon() {
    // Open to other users, a governed agent could read every agent's records, and hold a read
    // lock on `sessions.db-shm` (a read-only descriptor is enough) to stall the session writer.
    use std::os::unix::fs::PermissionsExt;
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    let governed = gate.probe("bot", &[&format!("tcp:{}", echo.addr)]);
    assert!(ok(&governed[0]), "{governed:?}");
    gate.sessions_ended(1);
    let state = gate.dir.join("state");
    let db_files =
        || ["sessions.db", "sessions.db-wal", "sessions.db-shm"].map(|name| state.join(name));
    let mode = |p: &std::path::Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    let open_as_nobody = |gate: &Gate, path: &std::path::Path| {
        let script = format!(
            "import os\ntry:\n    os.open({:?}, os.O_RDONLY)\n    print('opened')\nexcept OSError as e:\n    print(e.errno)",
            path.display().to_string()
        );
        stdout(&run(&mut gate.exec_as(
            "bot",
            "nobody",
            &["python3", "-c", &script],
        )))
    };
    let shm = state.join("sessions.db-shm");
    assert_eq!(open_as_nobody(&gate, &shm).trim(), "13", "EACCES expected");
    assert_eq!(mode(&state), 0o700);
    for f in db_files() {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }

    // A state_dir and store an earlier version left open to everyone are narrowed at start.
    gate.stop();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in db_files() {
        if f.exists() {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    assert_eq!(
        open_as_nobody(&gate, &state.join("sessions.db")).trim(),
        "opened"
    );
    gate.spawn();
    assert_eq!(mode(&state), 0o700);
    for f in db_files() {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    assert_eq!(open_as_nobody(&gate, &shm).trim(), "13", "EACCES expected");
    let log = gate.log();
    assert!(
        log.contains("state_dir was open to other users; narrowed to 0700"),
        "{log}"
    );
}

#[test]
fn governed_processes_can_create_only_tcp_and_udp_sockets() {
    // Raw, ICMP echo, UDP-Lite, MPTCP and other sockets send past the connect and sendmsg hooks:
    // their creation is refused in the kernel. ICMP echo is allowed to agents that opt in.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&two_agents(&echo, "", "pinger", "allow_ping: true"));
    // In a network namespace of its own the script may widen ping_group_range (a per-namespace
    // setting; the host's "1 0" makes ping sockets fail with EACCES before any hook runs). The
    // cgroup hooks follow the process into it.
    let script = r#"
import json, socket
with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
    f.write("0 2147483647")
kinds = {
    "tcp": (socket.AF_INET, socket.SOCK_STREAM, 0),
    "udp6": (socket.AF_INET6, socket.SOCK_DGRAM, 0),
    "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "raw6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP),
    "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
    "ping6": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6),
    "udplite": (socket.AF_INET, socket.SOCK_DGRAM, 136),
    "mptcp": (socket.AF_INET, socket.SOCK_STREAM, 262),
}
out = {}
for name, (family, kind, proto) in kinds.items():
    try:
        socket.socket(family, kind, proto).close()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"#;
    let outcome = |cmd: &mut Command| -> Value {
        serde_json::from_str(stdout(&run(cmd)).trim()).expect("probe output")
    };
    let ungoverned = outcome(Command::new("unshare").args(["-n", "python3", "-c", script]));
    let bot = outcome(&mut gate.exec("bot", &["unshare", "-n", "python3", "-c", script]));
    let pinger = outcome(&mut gate.exec("pinger", &["unshare", "-n", "python3", "-c", script]));
    for kind in ["raw", "raw6", "ping", "ping6", "udplite", "mptcp"] {
        assert_eq!(
            ungoverned[kind], 0,
            "{kind} works outside the gate: {ungoverned}"
        );
        assert_eq!(
            bot[kind], EPERM,
            "{kind} refused for a governed process: {bot}"
        );
    }
    for kind in ["tcp", "udp6"] {
        assert_eq!(bot[kind], 0, "{kind}: {bot}");
    }
    assert_eq!(pinger["ping"], 0, "{pinger}");
    assert_eq!(pinger["ping6"], 0, "{pinger}");
    assert_eq!(
        pinger["raw"], EPERM,
        "allow_ping allows ICMP echo only: {pinger}"
    );

    let e = gate.wait_event("a socket refused at creation", |e| {
        e["detail"]["reason"] == "socket_not_allowed"
            && e["detail"]["socket"] == "mptcp"
            && e["agent"] == "bot"
    });
    assert!(e["destination"].is_null(), "{e}");
}

#[test]
fn pins_of_another_build_with_fewer_programs_are_not_replaced_behind_the_operators_back() {
    // An upgrade that adds a program finds some of its links pinned, not all. Replacing them
    // would detach every program until the new ones are installed: refused, as for any pins
    // of another build, and governed connects stay refused meanwhile.
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    let spec = format!("tcp:{}", echo.addr);
    assert!(ok(&gate.probe("bot", &[&spec])[0]));
    gate.stop();
    // What the previous build left: no sock_create link, another object's hash.
    std::fs::remove_file(gate.pin_dir.join("links/ag_sock_create")).unwrap();
    std::fs::write(gate.dir.join("state/pinned-object.sha256"), "0".repeat(64)).unwrap();

    let mut daemon = Command::new(agentgate_tests::agentgate_bin())
        .args(["run", "--config"])
        .arg(&gate.config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = daemon.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = daemon.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        status.is_some_and(|s| !s.success()),
        "the daemon must refuse to start: {err}"
    );
    assert!(err.contains("different build"), "{err}");
    assert!(
        gate.pin_dir.join("links/ag_connect4").exists(),
        "the other build's links are left in place"
    );
    let governed = gate.probe("bot", &[&spec]);
    assert_eq!(errno(&governed[0]), EPERM, "{governed:?}");

    // After `uninstall` this build installs its own.
    assert!(gate.cli(&["uninstall"]).status.success());
    gate.spawn();
    assert!(ok(&gate.probe("bot", &[&spec])[0]));
}

#[test]
fn connects_whose_handshake_never_reaches_the_gate_cannot_fill_the_flow_map() {
    // A TCP MD5 key for 127.0.0.1 (no capability needed) makes the gate's listener drop the
    // redirected SYN: the flow record written at the SYN stays until the sweep. More of those
    // than the map holds must not close every other agent's connections.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let script = format!(
        r#"
import socket, struct
def md5(s):
    addr = struct.pack("=HH4s", socket.AF_INET, 0, socket.inet_aton("127.0.0.1")).ljust(128, b"\0")
    key = b"k" * 8
    s.setsockopt(socket.IPPROTO_TCP, 14, addr + struct.pack("=BBHI", 0, 0, len(key), 0) + key.ljust(80, b"\0"))
sent = 0
for i in range(30000):
    s = socket.socket()
    md5(s)
    # Several source addresses: more 4-tuples than ephemeral ports.
    s.bind(("127.0.0.%d" % (2 + i % 4), 0))
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", {port}))
    except BlockingIOError:
        sent += 1
    s.close()
print(sent)
"#,
        port = echo.addr.port()
    );
    let out = run(&mut gate.exec("bot", &["python3", "-c", &script]));
    assert_eq!(
        stdout(&out).trim(),
        "30000",
        "every SYN sent: {}",
        stdout(&out)
    );
    let spec = format!("tcp:{}", echo.addr);
    for agent in ["recorder", "bot"] {
        let p = gate.probe(agent, &[&spec]);
        assert!(ok(&p[0]), "{agent} after the flood: {p:?}");
    }
}

#[test]
fn an_agent_holding_its_maximum_of_connections_cannot_open_more() {
    // One agent must not run the daemon out of descriptors for everyone: beyond
    // `max_connections` its connections are closed at accept; other agents are unaffected.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&two_agents(&echo, "max_connections: 3", "other", ""));
    let script = format!(
        r#"
import socket
def echo(s):
    try:
        s.sendall(b"hi")
        return s.recv(2) == b"hi"
    except OSError:
        return False
held = [socket.create_connection(("127.0.0.1", {port})) for _ in range(5)]
print(",".join("ok" if echo(s) else "closed" for s in held))
for s in held:
    s.close()
# The gate gives a slot back when it has seen the close: retry for a while.
import time
for _ in range(100):
    again = socket.create_connection(("127.0.0.1", {port}))
    if echo(again):
        print("ok")
        break
    again.close()
    time.sleep(0.05)
else:
    print("closed")
"#,
        port = echo.addr.port()
    );
    let out = stdout(&run(&mut gate.exec("bot", &["python3", "-c", &script])));
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("ok,ok,ok,closed,closed"), "{out}");
    // Once they are closed, the agent may connect again (the slots are given back).
    assert_eq!(lines.next(), Some("ok"), "{out}");
    assert!(ok(&gate.probe("other", &[&format!("tcp:{}", echo.addr)])[0]));
    let e = gate.wait_event("a connection_limit event", |e| {
        e["kind"] == "connection_limit"
    });
    assert_eq!(e["agent"], "bot");
    assert_eq!(e["detail"]["max_connections"], 3);
}

#[test]
fn new_connections_are_refused_while_the_session_store_is_far_behind() {
    // A connection whose session could not be recorded must not be relayed: past twice
    // `sessions.max_queued` (here 2 records) new connections of the agent holding its share of
    // the queue are closed at accept. Another agent's are still relayed: one agent filling the
    // queue does not shut the others out.
    let echo = EchoServer::start("127.0.0.1:0");
    let body = format!(
        "{}sessions: {{max_queued: 1}}\n",
        two_agents(&echo, "", "other", "")
    );
    let gate = Gate::start(&body);
    let lock = rusqlite::Connection::open(gate.dir.join("state/sessions.db")).unwrap();
    lock.execute_batch("BEGIN IMMEDIATE").unwrap();
    let script = |n: usize, retry: bool| {
        format!(
            r#"
import socket, time
def echo():
    s = socket.create_connection(("127.0.0.1", {port}))
    try:
        s.sendall(b"hi")
        return s.recv(2) == b"hi"
    except OSError:
        return False
    finally:
        s.close()
out = []
for _ in range({n}):
    ok = echo()
    while {retry} and not ok:
        time.sleep(0.05)
        ok = echo()
    out.append("ok" if ok else "closed")
print(",".join(out))
"#,
            port = echo.addr.port(),
            retry = if retry { "True" } else { "False" },
        )
    };
    let run_as = |agent, n, retry| {
        let out = stdout(&run(
            &mut gate.exec(agent, &["python3", "-c", &script(n, retry)])
        ));
        out.trim().to_string()
    };
    let run_bot = |n, retry| run_as("bot", n, retry);
    // The first connection is relayed; its records wait for the locked file.
    assert_eq!(run_bot(1, false), "ok");
    wait_for("2 queued records", Duration::from_secs(10), || {
        let s = gate.cli_json(&["status", "--json"]);
        (s["daemon"]["session_queue"].as_u64()? >= 2).then_some(())
    });
    assert_eq!(run_bot(2, false), "closed,closed");
    assert_eq!(run_as("other", 1, false), "ok");
    let status = gate.cli_json(&["status", "--json"]);
    assert_eq!(
        status["daemon"]["session_queue_busiest"]["agent"], "bot",
        "{status:#}"
    );
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    // Once the writer has caught up, connections are relayed again.
    assert_eq!(run_bot(1, true), "ok");
    let e = gate.wait_event("a session_store_overloaded event", |e| {
        e["kind"] == "session_store_overloaded"
    });
    assert_eq!(e["agent"], "bot");
    assert_eq!(e["detail"]["max_queued"], 1);
}

#[test]
fn connections_from_other_hosts_to_a_governed_listener_are_dropped() {
    // A governed agent that listens could serve a remote peer anything, past every outbound
    // hook. Connections to its listening sockets from addresses that are not loopback ones are
    // dropped in the kernel (recorded as `inbound_connection`) unless the agent has
    // `allow_inbound: true`; connections from this host's loopback always go through.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&two_agents(&echo, "", "server", "allow_inbound: true"));
    // Addresses of this host that are not loopback ones, as another host's peer would use
    // (connecting to them picks them as source).
    let v4 = HostAddress::add("198.51.100.78");
    let v6 = HostAddress::add("2001:db8::78");
    for (agent, remote_allowed) in [("bot", false), ("server", true)] {
        let port = agentgate_tests::free_port();
        let script = format!(
            r#"
import socket
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", {port}))
s.listen(16)
print("listening", flush=True)
s.settimeout(30)
while True:
    c, _ = s.accept()
    c.sendall(b"hi")
    c.close()
"#
        );
        let mut child = gate
            .exec(agent, &["python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the governed listener");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "listening", "{agent}");
        let greet = |host: &str| -> std::io::Result<String> {
            let addr: SocketAddr = format!("{host}:{port}").parse().expect("addr");
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut got = String::new();
            s.read_to_string(&mut got)?;
            Ok(got)
        };
        for local in ["127.0.0.1", "[::1]"] {
            assert_eq!(greet(local).expect(local), "hi", "{agent} from {local}");
        }
        for remote in [v4.0.to_string(), format!("[{}]", v6.0)] {
            let got = greet(&remote);
            if remote_allowed {
                assert_eq!(got.expect("allowed"), "hi", "{agent} from {remote}");
            } else {
                let err = got.expect_err("a connection from another address must not be accepted");
                assert_eq!(
                    err.kind(),
                    std::io::ErrorKind::TimedOut,
                    "{agent} from {remote}: {err}"
                );
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        if !remote_allowed {
            for (family, destination) in [
                ("ipv4", format!("{}:{port}", v4.0)),
                ("ipv6", format!("[{}]:{port}", v6.0)),
            ] {
                let e = gate.wait_event("the dropped inbound connection", |e| {
                    e["kind"] == "kernel_deny"
                        && e["agent"] == agent
                        && e["detail"]["reason"] == "inbound_connection"
                        && e["destination"] == destination.as_str()
                });
                assert_eq!(e["detail"]["family"], family, "{e}");
                assert!(
                    e["pid"].is_null(),
                    "no process runs when a packet arrives: {e}"
                );
            }
        }
    }
    // Nothing of `server` was dropped.
    let v = gate.cli_json(&["events", "--json"]);
    assert!(
        !v.as_array()
            .unwrap()
            .iter()
            .any(|e| e["agent"] == "server" && e["detail"]["reason"] == "inbound_connection"),
        "{v:#}"
    );
}

#[test]
fn governed_processes_cannot_bind_the_ports_the_gate_dials_or_listens_on() {
    // A governed agent listening on a target's port while its server is down (or on the
    // enforcer's port while the daemon is stopped) would be dialed by the gate with brokered
    // credentials, or handed other agents' redirected connections. Such binds are refused.
    let echo = EchoServer::start("127.0.0.1:0");
    let spare = agentgate_tests::free_port();
    let remote = agentgate_tests::free_port();
    // A local target's port the kernel could hand out itself (the other test ports are kept
    // outside the ephemeral range).
    let ephemeral = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port")
        .port();
    let extra = format!(
        "  - name: spare\n    match: [\"127.0.0.3:{spare}\"]\n    protocol: tcp\n  - name: elsewhere\n    match: [\"10.9.9.9:{remote}\"]\n    protocol: tcp\n  - name: ephemeral\n    match: [\"127.0.0.4:{ephemeral}\"]\n    protocol: tcp\n"
    );
    let gate = Gate::start(&config(&echo, &extra));
    let free = agentgate_tests::free_port();
    let cases = [
        ("4", "127.0.0.1", spare, EPERM),
        ("4", "0.0.0.0", spare, EPERM),
        ("4", "127.0.0.2", spare, EPERM),
        ("6", "::", spare, EPERM),
        ("6", "::1", spare, EPERM),
        ("4", "127.0.0.1", echo.addr.port(), EPERM),
        ("4", "127.0.0.1", gate.port, EPERM),
        ("6", "::", gate.port, EPERM),
        ("4", "127.0.0.1", free, 0),
        // A remote target's port: nothing listening here stands in for it.
        ("4", "0.0.0.0", remote, 0),
        ("6", "::", 0, 0),
    ];
    let list: Vec<String> = cases
        .iter()
        .map(|(f, h, p, _)| format!("({f}, {h:?}, {p})"))
        .collect();
    let script = format!(
        r#"
import socket, json
out = []
for fam, host, port in [{}]:
    s = socket.socket(socket.AF_INET if fam == 4 else socket.AF_INET6, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        out.append(0)
    except OSError as e:
        out.append(e.errno)
    s.close()
print(json.dumps(out))
"#,
        list.join(", ")
    );
    let o = run(&mut gate.exec("bot", &["python3", "-c", &script]));
    let got: Vec<i64> =
        serde_json::from_str(stdout(&o).trim()).unwrap_or_else(|e| panic!("{e}: {o:?}"));
    for ((f, h, p, want), got) in cases.iter().zip(&got) {
        assert_eq!(*got, *want, "IPv{f} bind to {h}:{p}");
    }
    gate.wait_event("the refused bind", |e| {
        e["kind"] == "kernel_deny"
            && e["agent"] == "bot"
            && e["detail"]["reason"] == "bind_to_reserved_port"
            && e["destination"] == format!("127.0.0.1:{spare}").as_str()
    });
    // Ungoverned processes are not touched.
    std::net::TcpListener::bind(("127.0.0.1", spare)).expect("an ungoverned bind");
    // `listen()` without `bind()` takes a port from the ephemeral range, past the bind hooks:
    // the daemon names the reserved ports the kernel could hand out that way, and only those.
    let kept = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_reserved_ports")
        .expect("ip_local_reserved_ports");
    assert!(kept.trim().is_empty(), "this host reserves ports: {kept}");
    let log = gate.log();
    let line = log
        .lines()
        .find(|l| l.contains("ip_local_reserved_ports"))
        .unwrap_or_else(|| panic!("no warning of ports open to autobind in:\n{log}"));
    let named: Vec<u16> = line
        .split_once(" ports=")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .expect("the ports field")
        .split(',')
        .map(|p| p.parse().expect("a port"))
        .collect();
    // The echo server's port is ephemeral too; the others are outside the range.
    let mut want = vec![ephemeral, echo.addr.port()];
    want.sort_unstable();
    assert_eq!(named, want, "{line}");
}

/// Creates the sockets no kernel hook sees and tries io_uring; prints each call's errno (0:
/// it worked). argv[1]: a Unix socket that answers `hello`; argv[2]: a Unix datagram socket.
const OTHER_SOCKETS: &str = r#"
import ctypes, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
out = {}
def probe(name, f):
    try:
        f()
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
def unix():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    out["unix_reply"] = s.recv(16).decode()
    s.close()
probe("unix", unix)
probe("vsock", lambda: socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close())
probe("alg", lambda: socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET).close())
probe("pair", lambda: [s.close() for s in socket.socketpair()])
probe("seqpacket_pair", lambda: [s.close() for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)])
def dgram_pair():
    # connect(AF_UNSPEC) dissolves the pair: a plain datagram socket, which sends anywhere.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    if libc.connect(a.fileno(), ctypes.create_string_buffer(16), 16) != 0:
        raise OSError(ctypes.get_errno(), "connect AF_UNSPEC")
    a.sendto(b"from the agent", sys.argv[2])
    a.close()
probe("dgram_pair", dgram_pair)
# SOCK_PACKET: the kernel makes a packet socket of it, past the IPv4 code (needs CAP_NET_RAW).
probe("sock_packet", lambda: socket.socket(socket.AF_INET, 10, socket.htons(3)).close())
probe("tcp", lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
probe("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close())
params = ctypes.create_string_buffer(120)
fd = libc.syscall(425, 4, params)  # io_uring_setup(4, &params)
out["io_uring"] = 0 if fd >= 0 else ctypes.get_errno()
if fd >= 0:
    os.close(fd)
out["no_new_privs"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0]
print(json.dumps(out))
"#;

#[test]
fn exec_refuses_unix_vsock_and_other_sockets_no_hook_sees_and_io_uring() {
    // The connect hooks see IPv4 and IPv6 only: a Unix socket reaches whatever listens on its
    // path (a database trusting local connections, a container engine), a vsock the hypervisor's
    // host, io_uring creates and connects sockets where no system call filter looks. `exec`
    // refuses them all with a seccomp filter; `allow_unix_sockets: true` lets Unix ones through.
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&two_agents(&echo, "", "local", "allow_unix_sockets: true"));
    // A service on a Unix socket anyone may connect to.
    let dir = std::env::temp_dir().join(agentgate_tests::unique("agentgate-unix"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("service.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().map_while(Result::ok) {
            let _ = s.write_all(b"hello");
        }
    });
    let path = path.to_str().unwrap();
    // A datagram service anyone may send to (syslog's /dev/log, journald's socket).
    let dgram_path = dir.join("dgram.sock");
    let dgram = std::os::unix::net::UnixDatagram::bind(&dgram_path).unwrap();
    std::fs::set_permissions(&dgram_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    dgram.set_nonblocking(true).unwrap();
    let received = || {
        let mut n = 0;
        let mut buf = [0u8; 64];
        while dgram.recv(&mut buf).is_ok() {
            n += 1;
        }
        n
    };
    let dgram_path = dgram_path.to_str().unwrap();
    let outcome = |cmd: &mut Command| -> Value {
        let o = run(cmd);
        serde_json::from_str(stdout(&o).trim())
            .unwrap_or_else(|e| panic!("{e}: {}", agentgate_tests::show(&o)))
    };
    let script = ["/usr/bin/python3", "-c", OTHER_SOCKETS, path, dgram_path];
    let outside = outcome(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(script),
    );
    assert_eq!(
        outside["unix"], 0,
        "the route exists outside the gate: {outside}"
    );
    assert_eq!(outside["unix_reply"], "hello", "{outside}");
    assert_eq!(outside["dgram_pair"], 0, "{outside}");
    assert_eq!(received(), 1, "the dissolved pair reached the service");
    assert_ne!(outside["alg"], EPERM, "{outside}");
    assert_eq!(outside["io_uring"], 0, "{outside}");
    assert_ne!(outside["vsock"], EPERM, "{outside}");
    assert_eq!(outside["no_new_privs"], "0", "{outside}");
    let outside_root = outcome(Command::new(script[0]).args(&script[1..]));
    assert_eq!(outside_root["sock_packet"], 0, "as root: {outside_root}");
    received();

    for (who, bot) in [
        (
            "nobody",
            outcome(&mut gate.exec_as("bot", "nobody", &script)),
        ),
        ("root", outcome(&mut gate.exec("bot", &script))),
    ] {
        for refused in [
            "unix",
            "vsock",
            "alg",
            "io_uring",
            "dgram_pair",
            "sock_packet",
        ] {
            assert_eq!(bot[refused], EPERM, "{refused} as {who}: {bot}");
        }
        assert!(bot.get("unix_reply").is_none(), "{bot}");
        assert_eq!(
            received(),
            0,
            "as {who}: nothing reached the datagram service"
        );
        for allowed in ["pair", "seqpacket_pair", "tcp", "netlink"] {
            assert_eq!(bot[allowed], 0, "{allowed} as {who}: {bot}");
        }
        assert_eq!(bot["no_new_privs"], "1", "{bot}");
    }
    let local = outcome(&mut gate.exec_as("local", "nobody", &script));
    assert_eq!(local["unix"], 0, "allow_unix_sockets: {local}");
    assert_eq!(local["unix_reply"], "hello", "{local}");
    assert_eq!(local["dgram_pair"], 0, "allow_unix_sockets: {local}");
    assert_eq!(received(), 1);
    for refused in ["vsock", "alg", "io_uring", "sock_packet"] {
        assert_eq!(local[refused], EPERM, "{refused}: {local}");
    }

    // An x32 system call (bit 30 of the number set; x32's `socket` here) kills the agent,
    // whether or not the kernel has x32 (this one answers ENOSYS outside the gate).
    let x32 = "import ctypes; libc = ctypes.CDLL(None, use_errno=True); print(libc.syscall(0x40000000 | 41, 1, 1, 0), ctypes.get_errno())";
    let o = run(Command::new("python3").args(["-c", x32]));
    assert!(o.status.success(), "{}", agentgate_tests::show(&o));
    let o = run(&mut gate.exec("bot", &["python3", "-c", x32]));
    assert_eq!(
        o.status.code(),
        Some(128 + nix::sys::signal::Signal::SIGSYS as i32),
        "{}",
        agentgate_tests::show(&o)
    );
    assert_eq!(stdout(&o), "", "{}", agentgate_tests::show(&o));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_flow_record_of_a_connect_that_never_completed_cannot_be_claimed_by_another_process() {
    // A TCP MD5 key for 127.0.0.1 (no capability needed) makes the gate's listener drop the
    // agent's redirected SYN. Had its flow record been filed under the 4-tuple then, any local
    // process binding the same source port and connecting to the gate would be served as the
    // agent (with its brokered credentials). Records are filed once the handshake completes.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let stale = format!(
        r#"
import socket, struct
s = socket.socket()
s.bind(("127.0.0.1", 0))
addr = struct.pack("=HH4s", socket.AF_INET, 0, socket.inet_aton("127.0.0.1")).ljust(128, b"\0")
s.setsockopt(socket.IPPROTO_TCP, 14, addr + struct.pack("=BBHI", 0, 0, 4, 0) + b"key!".ljust(80, b"\0"))
s.settimeout(1)
try:
    s.connect(("127.0.0.1", {port}))
    print("connected")
except OSError:
    pass
print(s.getsockname()[1])
s.close()
"#,
        port = echo.addr.port()
    );
    let out = run(&mut gate.exec_as("bot", "nobody", &["/usr/bin/python3", "-c", &stale]));
    let text = stdout(&out);
    assert!(!text.contains("connected"), "{text}");
    let source_port = text.trim();
    let claim = format!(
        r#"
import socket
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
c.bind(("127.0.0.1", {source_port}))
c.settimeout(3)
c.connect(("127.0.0.1", {gate_port}))
try:
    c.sendall(b"claimed")
    print(repr(c.recv(64)))
except OSError as e:
    print("closed", e.errno)
"#,
        gate_port = gate.port
    );
    let claimed = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["/usr/bin/python3", "-c", &claim]));
    let said = stdout(&claimed);
    assert!(
        said.trim() == "b''" || said.starts_with("closed"),
        "the ungoverned process was served as the agent: {said} {}",
        agentgate_tests::show(&claimed)
    );
    gate.wait_event("the claim closed without a flow record", |e| {
        e["kind"] == "no_flow_record"
    });
}

/// Runs `exec` twice on one pseudo-terminal: a live `sleep`, and a command that leaves two
/// processes behind, one holding the terminal, one that let go of it. argv[1]: the exec prefix.
const LEFT_ON_THE_TERMINAL: &str = r#"
import json, os, pty, re, subprocess, sys, time
prefix = json.loads(sys.argv[1])
master, slave = pty.openpty()
tty = dict(stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
live = subprocess.Popen(prefix + ["sleep", "20"], **tty)
time.sleep(0.5)
LEFTOVER = r'''
import os, time
holder = os.fork()
if holder == 0:
    os.setsid()
    time.sleep(30)
    os._exit(0)
let_go_r, let_go_w = os.pipe()
detached = os.fork()
if detached == 0:
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.write(let_go_w, b"x")
    time.sleep(30)
    os._exit(0)
os.read(let_go_r, 1)
print("pids %d %d" % (holder, detached), flush=True)
'''
code = subprocess.run(prefix + ["/usr/bin/python3", "-c", LEFTOVER], **tty).returncode
os.set_blocking(master, False)
seen = b""
try:
    while True:
        seen += os.read(master, 4096)
except (BlockingIOError, OSError):
    pass
holder, detached = map(int, re.search(rb"pids (\d+) (\d+)", seen).groups())
def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
deadline = time.time() + 3
while alive(holder) and time.time() < deadline:
    time.sleep(0.05)
out = {"exit": code, "holder_alive": alive(holder), "detached_alive": alive(detached),
       "live_alive": live.poll() is None, "notice": b"left behind holding this terminal" in seen}
for pid in (holder, detached):
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
live.kill()
live.wait()
print(json.dumps(out))
"#;

#[test]
fn processes_a_command_leaves_holding_the_operators_terminal_are_killed_when_exec_ends() {
    // A process the agent leaves behind with the terminal's descriptors would read part of what
    // the operator types next (nothing stops a process outside the terminal's session from
    // reading it). `exec` kills those once the command ends; processes that let go of the
    // terminal, and another exec still running on it, are left alone.
    let echo = EchoServer::start("127.0.0.1:0");
    let gate = Gate::start(&config(&echo, ""));
    let prefix = json!([
        agentgate_tests::agentgate_bin(),
        "exec",
        "--config",
        gate.config,
        "--agent",
        "bot",
        "--user",
        "nobody",
        "--"
    ]);
    let o = run(Command::new("/usr/bin/python3").args([
        "-c",
        LEFT_ON_THE_TERMINAL,
        &prefix.to_string(),
    ]));
    let out: Value = serde_json::from_str(stdout(&o).trim())
        .unwrap_or_else(|e| panic!("{e}: {}", agentgate_tests::show(&o)));
    assert_eq!(out["exit"], 0, "{out}");
    assert_eq!(out["holder_alive"], false, "{out}");
    assert_eq!(out["notice"], true, "the operator is told: {out}");
    assert_eq!(out["detached_alive"], true, "{out}");
    assert_eq!(
        out["live_alive"], true,
        "another exec on the terminal: {out}"
    );
}

/// Connects through the gate `n` times as `bot` (echoing two bytes each), retrying a closed
/// connection for up to 20 s when `retry`: "ok" or "closed" per connection, comma-separated.
fn echo_script(port: u16, n: usize, retry: bool) -> String {
    format!(
        r#"
import socket, time
def echo():
    try:
        s = socket.create_connection(("127.0.0.1", {port}))
    except OSError:
        return False
    try:
        s.sendall(b"hi")
        return s.recv(2) == b"hi"
    except OSError:
        return False
    finally:
        s.close()
out = []
for _ in range({n}):
    ok = echo()
    deadline = time.time() + 20
    while {retry} and not ok and time.time() < deadline:
        time.sleep(0.05)
        ok = echo()
    out.append("ok" if ok else "closed")
print(",".join(out))
"#,
        retry = if retry { "True" } else { "False" },
    )
}

/// A tmpfs mounted over a directory, unmounted when dropped (after the gate using it: declare it
/// first).
struct Tmpfs(Option<std::path::PathBuf>);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
    }
}

#[test]
fn connections_are_refused_while_session_store_writes_fail_and_nothing_queued_is_lost() {
    // A session store whose commits fail (its disk is full) keeps the batch and retries it:
    // meanwhile no connection is relayed unrecorded, and once space returns what was queued is
    // committed and connections are relayed again. (The free-space reserve is off here: it
    // would refuse connections before the commits fail.)
    let mut mount = Tmpfs(None);
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&format!(
        "{}sessions: {{min_free_mib: 0}}\n",
        config(&echo, "")
    ));
    let port = echo.addr.port();
    let run_bot = |gate: &Gate, n, retry| {
        let out = stdout(&run(
            &mut gate.exec("bot", &["python3", "-c", &echo_script(port, n, retry)])
        ));
        out.trim().to_string()
    };
    assert_eq!(run_bot(&gate, 1, false), "ok");
    gate.sessions_ended(1);

    // The state directory moves onto a small tmpfs.
    gate.stop();
    let state = gate.dir.join("state");
    let saved = gate.dir.join("state-saved");
    std::fs::rename(&state, &saved).unwrap();
    std::fs::create_dir(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success());
    mount.0 = Some(state.clone());
    for entry in std::fs::read_dir(&saved).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), state.join(entry.file_name())).unwrap();
        }
    }
    gate.spawn();

    // Fill it.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&chunk[..512]).is_ok() {}
    }
    // This connection was taken before any commit failed; its records are kept.
    assert_eq!(run_bot(&gate, 1, false), "ok");
    wait_for(
        "a failed session store write",
        Duration::from_secs(10),
        || {
            gate.log()
                .contains("session store write failed")
                .then_some(())
        },
    );
    assert_eq!(
        run_bot(&gate, 2, false),
        "closed,closed",
        "connections must be refused while the store cannot commit"
    );
    assert!(gate.log().contains("session store writes are failing"));

    // Space returns: what was queued is committed and connections are relayed again.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(run_bot(&gate, 1, true), "ok");
    let sessions = gate.sessions_ended(3);
    assert_eq!(sessions.len(), 3, "{sessions:#?}");
    for s in &sessions {
        assert_eq!(s["bytes_up"], 2, "{s:#}");
        assert_eq!(s["bytes_down"], 2, "{s:#}");
        assert!(s["error"].is_null(), "{s:#}");
    }
    let e = gate.wait_event("a session_store_failed event", |e| {
        e["kind"] == "session_store_failed"
    });
    assert!(
        e["detail"]["error"]
            .as_str()
            .is_some_and(|m| m.contains("full")),
        "{e:#}"
    );
    assert!(e["detail"]["failing_ms"].as_u64().unwrap() > 0, "{e:#}");
    gate.stop();
}

#[test]
fn sessions_open_when_the_daemon_stops_or_is_killed_end_as_interrupted() {
    // A relayed session the daemon could not end (killed, or stopped with SIGTERM while it was
    // open) does not stay open forever with no end: it is ended as interrupted.
    let echo = EchoServer::start("127.0.0.1:0");
    let mut gate = Gate::start(&config(&echo, ""));
    let hold = format!(
        r#"
import socket, sys, time
s = socket.create_connection(("127.0.0.1", {}))
s.sendall(b"hi")
assert s.recv(2) == b"hi"
print("open", flush=True)
time.sleep(60)
"#,
        echo.addr.port()
    );
    let open_one = |gate: &Gate| {
        let mut child = gate
            .exec("bot", &["python3", "-c", &hold])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "open");
        child
    };
    let started = |gate: &Gate, n: usize| {
        wait_for(
            &format!("{n} recorded sessions"),
            Duration::from_secs(10),
            || {
                let v = gate.cli_json(&["sessions", "list", "--json"]);
                let rows = v.as_array()?.clone();
                (rows.len() >= n).then_some(rows)
            },
        )
    };

    let mut killed = open_one(&gate);
    let rows = started(&gate, 1);
    assert!(rows[0]["ended"].is_null(), "{rows:#?}");
    gate.kill9();
    gate.spawn();
    let rows = gate.sessions_ended(1);
    assert!(
        rows[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("interrupted: the daemon stopped before")),
        "{rows:#?}"
    );
    let _ = killed.kill();
    let _ = killed.wait();

    let mut stopped = open_one(&gate);
    let rows = started(&gate, 2);
    assert!(rows[0]["ended"].is_null(), "{rows:#?}");
    gate.stop();
    let rows = gate.sessions_ended(2);
    assert!(
        rows[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("interrupted: the daemon stopped while")),
        "{rows:#?}"
    );
    let _ = stopped.kill();
    let _ = stopped.wait();
}
