//! A PostgreSQL target behind upstream TLS: the gate speaks TLS to the server (rustls,
//! `verify-full` against the operator's CA) while the agent's side stays local plain text, and
//! a server whose certificate does not chain to the configured CA is refused.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::Command;

use agentgate_tests::{Gate, Postgres, run, stdout, unique};

fn openssl(args: &[&str], what: &str) {
    let out = run(Command::new("openssl").args(args));
    assert!(
        out.status.success(),
        "openssl {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, an unrelated CA and a server certificate for localhost / 127.0.0.1 signed by the first.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let p = |n: &str| dir.join(n).display().to_string();
    for (key, crt, cn) in [
        ("ca.key", "ca.crt", "agentgate e2e CA"),
        ("other.key", "other.crt", "unrelated CA"),
    ] {
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &p(key),
                "-out",
                &p(crt),
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
            "CA",
        );
    }
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &p("server.key"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=localhost",
        ],
        "CSR",
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-CAcreateserial",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.crt"),
            "-CAkey",
            &p("ca.key"),
            "-extfile",
            &p("server.ext"),
            "-out",
            &p("server.crt"),
        ],
        "sign",
    );
    let chown = run(Command::new("chown")
        .arg("postgres:postgres")
        .arg(dir.join("server.key")));
    assert!(chown.status.success());
    run(Command::new("chmod")
        .arg("0600")
        .arg(dir.join("server.key")));
    run(Command::new("chmod").arg("0755").arg(dir));
    (
        dir.join("ca.crt"),
        dir.join("other.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

fn gate_for(pg: &Postgres, pw_file: &Path, ca: &Path) -> Gate {
    Gate::start(&format!(
        "agents:
  - name: bot
    cgroup: {{base}}/bot
    roles: [analyst]
    targets: [db]
targets:
  - name: db
    match: [\"127.0.0.1:{port}\"]
    protocol: postgres
    credentials: {{ user: postgres, password_file: {pw} }}
    tls: verify-full
    ca_file: {ca}
    server_name: localhost
policies:
  - name: reads
    roles: [analyst]
    targets: [db]
    rules:
      - {{ name: reads, match: {{ kinds: [select] }}, action: allow }}
",
        port = pg.port,
        pw = pw_file.display(),
        ca = ca.display()
    ))
}

#[test]
fn upstream_tls_verify_full_is_used_and_a_wrong_ca_is_refused() {
    agentgate_tests::require_root();
    let dir = std::env::temp_dir().join(unique("agentgate-pki"));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, other_ca, crt, key) = pki(&dir);
    let pg = Postgres::start_with(
        "scram-sha-256",
        &[
            "ssl=on",
            &format!("ssl_cert_file={}", crt.display()),
            &format!("ssl_key_file={}", key.display()),
        ],
    );
    let pw = dir.join("pw");
    std::fs::write(&pw, &pg.superuser_password).unwrap();

    let gate = gate_for(&pg, &pw, &ca);
    let sql = "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    let out = run(&mut gate.exec(
        "bot",
        &[
            "psql",
            "-X",
            "-A",
            "-t",
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            sql,
        ],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout(&out);
    assert!(
        line.starts_with("t|TLSv1."),
        "the gate's upstream connection must be TLS: {line}"
    );
    drop(gate);

    let wrong = gate_for(&pg, &pw, &other_ca);
    let out = run(&mut wrong.exec(
        "bot",
        &[
            "psql",
            "-X",
            "-w",
            "-h",
            "127.0.0.1",
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-c",
            "select 1",
        ],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TLS") && err.contains("certificate"),
        "a server with an untrusted certificate must be refused: {err}"
    );
    let sessions = wrong.sessions_ended(1);
    assert!(
        sessions[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("certificate"),
        "{:?}",
        sessions[0]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
