//! The loopback HTTP admin API end to end: a real daemon with real eBPF hooks, JWTs made here,
//! raw HTTP/1.1 requests from an ungoverned process, and governed agents whose connects to the
//! admin listener are refused in the kernel (`EPERM`, event reason `protected_endpoint`).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentgate_tests::{EPERM, EchoServer, Gate, free_port, python_argv, run, stdout, unique};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const SECRET: &str = "test-only-admin-http-secret-0123456789abcdef";

/// A gate with the admin HTTP listener on, and the secret file it verifies tokens with.
struct AdminGate {
    gate: Gate,
    admin: SocketAddr,
    secret_dir: PathBuf,
}

impl Drop for AdminGate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.secret_dir);
    }
}

fn start() -> AdminGate {
    let echo = EchoServer::start("127.0.0.1:0");
    let secret_dir = std::env::temp_dir().join(unique("agentgate-jwt"));
    std::fs::create_dir_all(&secret_dir).expect("create secret dir");
    let secret_file = secret_dir.join("admin-jwt.secret");
    std::fs::write(&secret_file, SECRET).expect("write secret file");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the secret file");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let gate = Gate::start(&format!(
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
    match: [\"{echo}\"]
    protocol: tcp
admin:
  http:
    listen: {admin}
    jwt:
      algorithm: HS256
      secret_file: {secret}
      leeway_secs: 5
",
        echo = echo.addr,
        secret = secret_file.display(),
    ));
    AdminGate {
        gate,
        admin,
        secret_dir,
    }
}

fn now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

fn token_with(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn token() -> String {
    token_with(SECRET, &json!({"sub": "ops@example", "exp": now() + 300}))
}

struct HttpResponse {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: Value,
}

impl HttpResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> HttpResponse {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the admin listener {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON body ({e}): {body:?}"));
    HttpResponse {
        status,
        headers,
        body,
    }
}

#[test]
fn requests_without_a_valid_token_are_refused_with_401() {
    let g = start();

    let r = request(g.admin, "GET", "/v1/status", None, None);
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "{:?}",
        r.headers
    );
    assert_eq!(r.body["ok"], false);
    assert!(
        r.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{}",
        r.body
    );

    let wrong_secret = token_with(
        "another-test-secret-of-sufficient-length!",
        &json!({"sub": "ops@example", "exp": now() + 300}),
    );
    let expired = token_with(SECRET, &json!({"sub": "ops@example", "exp": now() - 600}));
    let no_sub = token_with(SECRET, &json!({"exp": now() + 300}));
    let no_exp = token_with(SECRET, &json!({"sub": "ops@example"}));
    for (token, why) in [
        (&wrong_secret, "signature"),
        (&expired, "expired"),
        (&no_sub, "sub"),
        (&no_exp, "exp"),
    ] {
        for path in ["/v1/status", "/v1/approvals", "/v1/does-not-exist"] {
            let r = request(g.admin, "GET", path, Some(token), None);
            assert_eq!(r.status, 401, "{why} on {path}: {}", r.body);
            assert!(
                r.header("www-authenticate").is_some_and(
                    |v| v.starts_with("Bearer") && v.contains("error=\"invalid_token\"")
                ),
                "{why}: {:?}",
                r.headers
            );
            assert_eq!(r.body["ok"], false);
            assert!(
                r.body["error"].as_str().unwrap_or_default().contains(why),
                "{why}: {}",
                r.body
            );
        }
    }
    // A refused grant changes nothing.
    let r = request(
        g.admin,
        "POST",
        "/v1/grants",
        Some(&expired),
        Some(&json!({"agent": "bot", "role": "dba", "for": "5m"})),
    );
    assert_eq!(r.status, 401);
    let grants = g.gate.cli_json(&["grants", "list", "--all", "--json"]);
    assert_eq!(grants.as_array().map(Vec::len), Some(0), "{grants}");

    // Refusals are logged, the tokens never are.
    let log = g.gate.log();
    assert!(log.contains("unauthenticated request refused"), "{log}");
    for t in [&wrong_secret, &expired, &no_sub, &no_exp] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(
            !log.contains(signature),
            "a token leaked into the log:\n{log}"
        );
    }
}

#[test]
fn a_valid_token_reads_and_changes_state() {
    let g = start();
    let t = token();

    let r = request(g.admin, "GET", "/v1/status", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["ok"], true);
    assert_eq!(r.body["status"]["pid"], g.gate.pid().unwrap());
    assert_eq!(r.header("content-type"), Some("application/json"));

    let r = request(g.admin, "GET", "/v1/approvals", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["data"], json!([]));
    let r = request(g.admin, "GET", "/v1/approvals?all=true", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.body);

    // A grant made over HTTP is recorded as made by the token's subject, and can be revoked.
    let r = request(
        g.admin,
        "POST",
        "/v1/grants",
        Some(&t),
        Some(&json!({"agent": "bot", "role": "dba", "for": "10m", "reason": "incident 42"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["data"]["granted_by"], "jwt:ops@example",
        "{}",
        r.body
    );
    let id = r.body["data"]["id"].as_u64().expect("a grant id");
    let r = request(g.admin, "GET", "/v1/grants", Some(&t), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body["data"]
            .as_array()
            .is_some_and(|gs| gs.iter().any(|g| g["id"] == id)),
        "{}",
        r.body
    );
    let cli = g.gate.cli_json(&["grants", "list", "--json"]);
    assert!(
        cli.as_array()
            .is_some_and(|gs| gs.iter().any(|g| g["id"] == id)),
        "the CLI sees the HTTP grant: {cli}"
    );
    let r = request(
        g.admin,
        "DELETE",
        &format!("/v1/grants/{id}"),
        Some(&t),
        Some(&json!({"reason": "done"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(g.admin, "GET", "/v1/grants", Some(&t), None);
    assert_eq!(r.body["data"], json!([]), "{}", r.body);

    // The daemon's refusals come back with their status codes.
    let r = request(
        g.admin,
        "POST",
        "/v1/grants",
        Some(&t),
        Some(&json!({"agent": "nobody-here", "role": "dba", "for": "10m"})),
    );
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.body["error_kind"], "not_found");
    let r = request(
        g.admin,
        "POST",
        "/v1/approvals/999999/deny",
        Some(&t),
        Some(&json!({"reason": "no"})),
    );
    assert_eq!(r.status, 404, "{}", r.body);

    // And the listener's own refusals.
    let r = request(
        g.admin,
        "POST",
        "/v1/approvals/1/deny",
        Some(&t),
        Some(&json!({})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    let r = request(g.admin, "POST", "/v1/status", Some(&t), None);
    assert_eq!(r.status, 405, "{}", r.body);
    assert_eq!(r.header("allow"), Some("GET"));
    let r = request(g.admin, "GET", "/v1/nothing", Some(&t), None);
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn an_identity_naming_an_agent_cannot_grant_revoke_or_decide() {
    let g = start();
    let ops = token();
    // A grant an approver made, for the revoke attempts below.
    let r = request(
        g.admin,
        "POST",
        "/v1/grants",
        Some(&ops),
        Some(&json!({"agent": "recorder", "role": "dba", "for": "10m"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let granted = r.body["data"]["id"].as_u64().expect("a grant id");

    // The agent's own subject, the recorded form of it, and another agent's subject.
    for sub in ["bot", "jwt:bot", "recorder"] {
        let t = token_with(SECRET, &json!({"sub": sub, "exp": now() + 300}));
        for agent in ["bot", "recorder"] {
            let r = request(
                g.admin,
                "POST",
                "/v1/grants",
                Some(&t),
                Some(&json!({"agent": agent, "role": "dba", "for": "10m", "reason": "self"})),
            );
            assert_eq!(r.status, 403, "{sub} granting {agent}: {}", r.body);
            assert_eq!(r.body["error_kind"], "forbidden", "{}", r.body);
            assert!(
                r.body["error"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("an agent's identity may not"),
                "{}",
                r.body
            );
        }
        let r = request(
            g.admin,
            "DELETE",
            &format!("/v1/grants/{granted}"),
            Some(&t),
            Some(&json!({"reason": "mine now"})),
        );
        assert_eq!(r.status, 403, "{sub} revoking: {}", r.body);
        // Refused before the ticket is even looked up.
        let r = request(
            g.admin,
            "POST",
            "/v1/approvals/1/approve",
            Some(&t),
            Some(&json!({})),
        );
        assert_eq!(r.status, 403, "{sub} approving: {}", r.body);
        let r = request(
            g.admin,
            "POST",
            "/v1/approvals/1/deny",
            Some(&t),
            Some(&json!({"reason": "no"})),
        );
        assert_eq!(r.status, 403, "{sub} denying: {}", r.body);
        // Reading stays allowed.
        let r = request(g.admin, "GET", "/v1/grants", Some(&t), None);
        assert_eq!(r.status, 200, "{sub} reading: {}", r.body);
    }
    let grants = g.gate.cli_json(&["grants", "list", "--all", "--json"]);
    let grants = grants.as_array().expect("a list of grants");
    assert_eq!(grants.len(), 1, "{grants:?}");
    assert_eq!(grants[0]["id"], granted);
    assert!(grants[0]["revoked_by"].is_null(), "{grants:?}");
    let log = g.gate.log();
    assert!(
        log.contains("an agent's identity tried to decide or grant"),
        "{log}"
    );
}

#[test]
fn governed_agents_cannot_reach_the_admin_listener() {
    let g = start();
    let admin = g.admin;

    // Neither a strict agent nor one whose unknown destinations are let through (and recorded)
    // may connect, by IPv4 or by a v4-mapped IPv6 address.
    for agent in ["bot", "recorder"] {
        let probes = g.gate.probe(
            agent,
            &[
                &format!("tcp:{admin}"),
                &format!("tcp6:[::ffff:127.0.0.1]:{}", admin.port()),
            ],
        );
        for p in &probes {
            assert_eq!(p["ok"], false, "{agent}: {p}");
            assert_eq!(p["errno"], EPERM, "{agent}: {p}");
        }
    }
    let e = g.gate.wait_event("a protected_endpoint refusal", |e| {
        e["detail"]["reason"] == "protected_endpoint" && e["agent"] == "recorder"
    });
    assert!(e.to_string().contains(&admin.port().to_string()), "{e}");
    g.gate
        .wait_event("a protected_endpoint refusal of bot", |e| {
            e["detail"]["reason"] == "protected_endpoint" && e["agent"] == "bot"
        });

    // A real HTTP client holding a valid token does no better from inside the cgroup.
    let script = format!(
        "import urllib.request
req = urllib.request.Request('http://{admin}/v1/status', headers={{'Authorization': 'Bearer {t}'}})
try:
    urllib.request.urlopen(req, timeout=5)
    print('reached the admin API')
except Exception as e:
    print('refused:', e)
",
        t = token()
    );
    let argv = python_argv(&script);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run(&mut g.gate.exec("recorder", &argv));
    let text = stdout(&out);
    assert!(
        text.contains("refused:") && text.contains("Operation not permitted"),
        "governed HTTP client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same request from outside every governed cgroup is served.
    let r = request(admin, "GET", "/v1/status", Some(&token()), None);
    assert_eq!(r.status, 200, "{}", r.body);
}
