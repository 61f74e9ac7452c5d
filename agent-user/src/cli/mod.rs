//! The command-line verbs other than `run`: each is a short client of another module
//! (`identity` + `intercept` for `exec`, `admin` for `status`/`attach`, `session` for
//! `sessions`). Output formatting lives here; decisions do not.

pub mod approvals;
mod exec;
mod seccomp;
mod terminal;
pub(crate) mod text;

pub use exec::{ExecRequest, close_inherited_fds, exec, exec_supervised, inherited_fds};

use std::io::Write as _;
use std::path::Path;

use crate::admin::{self, Request};
use crate::config::{Config, normalize_cgroup};
use crate::identity::CgroupFs;
use crate::intercept;
use crate::session::{EventRow, SessionReader, SessionRow, StatementRow};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    #[error(transparent)]
    Admin(#[from] admin::AdminError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn msg(s: impl Into<String>) -> CliError {
    CliError::Msg(s.into())
}

pub async fn attach(cfg: &Config, agent: &str, cgroup: &str) -> Result<(), CliError> {
    admin::call(
        &cfg.admin_socket(),
        &Request::Attach {
            agent: agent.into(),
            cgroup: cgroup.into(),
        },
    )
    .await?;
    println!("cgroup {cgroup} is now governed as `{agent}`");
    Ok(())
}

pub async fn detach(cfg: &Config, cgroup: &str) -> Result<(), CliError> {
    admin::call(
        &cfg.admin_socket(),
        &Request::Detach {
            cgroup: cgroup.into(),
        },
    )
    .await?;
    println!("cgroup {cgroup} is no longer governed");
    Ok(())
}

/// Prints what is governed. Ok(true) when the daemon answers and every program is attached.
pub async fn status(cfg: &Config, json: bool) -> Result<bool, CliError> {
    let links = intercept::pinned_links(&cfg.pin_dir, &cfg.state_dir);
    let attached = links.iter().all(|l| l.attached);
    let daemon = admin::call(&cfg.admin_socket(), &Request::Status).await;
    if json {
        let value = serde_json::json!({
            "daemon": daemon.as_ref().ok().and_then(|r| r.status.clone()),
            "daemon_error": daemon.as_ref().err().map(ToString::to_string),
            "programs": links,
        });
        println!("{value:#}");
        return Ok(attached && daemon.is_ok());
    }
    let mut out = text::stdout();
    match &daemon {
        Ok(resp) => {
            if let Some(s) = &resp.status {
                writeln!(
                    out,
                    "daemon: running (pid {}, version {})",
                    s.pid, s.version
                )?;
                writeln!(out, "listening: {}", s.listeners.join(", "))?;
                writeln!(out, "cgroup2: {}   pins: {}", s.cgroup2, s.pin_dir)?;
                writeln!(
                    out,
                    "connections: {} served, {} refused",
                    s.connections_served, s.connections_refused
                )?;
                writeln!(
                    out,
                    "approvals: {} pending tickets, {} active grants",
                    s.pending_tickets, s.active_grants
                )?;
                writeln!(
                    out,
                    "session store: {} records queued (statements wait at {}, for agents holding {} of them){}{}",
                    s.session_queue,
                    s.session_queue_limit,
                    s.session_queue_agent_share,
                    match &s.session_queue_busiest {
                        Some(b) => format!(", most by {} ({})", b.agent, b.queued),
                        None => String::new(),
                    },
                    if s.session_backpressure {
                        ": BEHIND, statements of agents holding their share are waiting"
                    } else {
                        ""
                    }
                )?;
                writeln!(out, "governed:")?;
                for g in &s.governed {
                    writeln!(
                        out,
                        "  {:<20} cgroup {} (id {}) roles [{}] targets [{}]",
                        g.agent,
                        g.cgroup,
                        g.cgroup_id,
                        g.roles.join(", "),
                        g.targets.join(", ")
                    )?;
                }
            }
        }
        Err(e) => writeln!(out, "daemon: NOT RUNNING ({e})")?,
    }
    for l in &links {
        let cost = match (l.runs, l.run_ns) {
            (Some(runs), Some(ns)) if runs > 0 => {
                format!(", {runs} runs, {:.0} ns each", ns as f64 / runs as f64)
            }
            _ => String::new(),
        };
        writeln!(
            out,
            "program {:<16} {}{cost}",
            l.name,
            if l.attached {
                "attached (pinned)"
            } else {
                "NOT ATTACHED"
            }
        )?;
    }
    if daemon.is_err() && attached {
        writeln!(
            out,
            "note: programs are pinned, so governed agents are refused (fail closed) until the daemon serves again"
        )?;
    }
    Ok(attached && daemon.is_ok())
}

pub fn check_config(path: &Path) -> Result<(), CliError> {
    let cfg = Config::load(path)?;
    println!(
        "{}: ok ({} agents, {} targets, listener port {})",
        path.display(),
        cfg.agents.len(),
        cfg.targets.len(),
        cfg.listen.port
    );
    Ok(())
}

pub fn sessions_list(cfg: &Config, limit: usize, json: bool) -> Result<(), CliError> {
    let reader = SessionReader::open(&cfg.sessions_db())?;
    let rows = reader.list(limit)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(());
    }
    let mut out = text::stdout();
    writeln!(
        out,
        "{:>6}  {:<24}  {:<16}  {:>7}  {:<21}  {:<12}  {:<7}  {:>10}  {:>10}",
        "ID",
        "STARTED",
        "AGENT",
        "PID",
        "DESTINATION",
        "TARGET",
        "DECISION",
        "BYTES_UP",
        "BYTES_DOWN"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:>6}  {:<24}  {:<16}  {:>7}  {:<21}  {:<12}  {:<7}  {:>10}  {:>10}",
            r.id,
            r.started,
            r.agent.as_deref().unwrap_or("-"),
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            r.original_destination.as_deref().unwrap_or("-"),
            r.target.as_deref().unwrap_or("-"),
            r.decision,
            r.bytes_up,
            r.bytes_down
        )?;
    }
    Ok(())
}

/// A session's statements and events (its tickets, and the grants of its agent while it was
/// open), in the order they happened.
enum Item<'a> {
    Statement(&'a StatementRow),
    Event(&'a EventRow),
}

fn timeline<'a>(statements: &'a [StatementRow], events: &'a [EventRow]) -> Vec<Item<'a>> {
    let mut items: Vec<(i64, u8, i64, Item<'a>)> = Vec::new();
    for e in events {
        items.push((e.ts_ms, 0, e.id, Item::Event(e)));
    }
    for st in statements {
        items.push((st.ts_ms, 1, st.id, Item::Statement(st)));
    }
    items.sort_by_key(|(ts, order, id, _)| (*ts, *order, *id));
    items.into_iter().map(|(_, _, _, i)| i).collect()
}

/// The session's own events plus its agent's grant events while it was open.
fn session_events(reader: &SessionReader, row: &SessionRow) -> Result<Vec<EventRow>, CliError> {
    let mut events = reader.events_of(row.id)?;
    if let Some(agent) = &row.agent {
        let until = row.ended_ms.unwrap_or_else(crate::session::now_ms);
        events.extend(reader.grant_events(agent, row.started_ms, until)?);
    }
    events.sort_by_key(|e| (e.ts_ms, e.id));
    Ok(events)
}

/// One line for a ticket or grant event.
fn describe_event(e: &EventRow) -> String {
    let d = &e.detail;
    let text = |p: &str| d.pointer(p).and_then(serde_json::Value::as_str);
    let s = |k: &str| text(&format!("/{k}")).unwrap_or("-").to_string();
    let num = |p: &str| d.pointer(p).and_then(serde_json::Value::as_u64);
    let id = num("/id").unwrap_or(0);
    match e.kind.as_str() {
        "ticket_created" => format!(
            "ticket {id} held for approval by rule \"{}\" (sha256 {}): {}",
            s("rule"),
            s("sha256"),
            text::visible(text("/statement").unwrap_or("").trim(), "    ")
        ),
        "ticket_approved" => format!(
            "ticket {id} approved by {}{}{}",
            s("decided_by"),
            text("/reason")
                .map(|r| format!(": {r}"))
                .unwrap_or_default(),
            num("/grant_id")
                .map(|g| format!(" (and granted the rule as grant {g})"))
                .unwrap_or_default()
        ),
        "ticket_denied" => format!("ticket {id} denied by {}: {}", s("decided_by"), s("reason")),
        "ticket_expired" => format!("ticket {id} expired: {}", s("reason")),
        "ticket_cancelled" => format!("ticket {id} cancelled: {}", s("reason")),
        "grant_created" | "grant_revoked" | "grant_expired" => {
            let scope = match text("/scope/kind") {
                Some("role") => format!("role {}", text("/scope/role").unwrap_or("?")),
                _ => format!(
                    "rule {} of policy {} on target {}, database {}",
                    text("/scope/rule").unwrap_or("?"),
                    text("/scope/policy").unwrap_or("?"),
                    text("/scope/target").unwrap_or("?"),
                    text("/scope/database").unwrap_or("?")
                ),
            };
            let what = match e.kind.as_str() {
                "grant_created" => format!("granted by {} until {}", s("granted_by"), s("expires")),
                "grant_revoked" => format!("revoked by {}", s("revoked_by")),
                _ => "expired".to_string(),
            };
            format!("grant {id} to agent {}: {scope} {what}", s("agent"))
        }
        _ => format!("{} {}", e.kind, e.detail),
    }
}

pub fn sessions_show(cfg: &Config, id: i64, json: bool) -> Result<(), CliError> {
    let reader = SessionReader::open(&cfg.sessions_db())?;
    let row = reader.get(id)?;
    let events = session_events(&reader, &row)?;
    let statements = reader.statements_of(id)?;
    if json {
        let value =
            serde_json::json!({ "session": row, "events": events, "statements": statements });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        return Ok(());
    }
    print_session(&row)?;
    let mut out = text::stdout();
    for item in timeline(&statements, &events) {
        let st = match item {
            Item::Event(e) => {
                writeln!(out, "  [{}] {}", e.ts, describe_event(e))?;
                continue;
            }
            Item::Statement(st) => st,
        };
        writeln!(
            out,
            "  [{}] #{} {} {}{} ({}{}) {}",
            st.ts,
            st.id,
            st.protocol,
            st.decision,
            if st.enforced {
                ""
            } else {
                " (shadow: not enforced)"
            },
            st.kind.as_deref().unwrap_or("?"),
            st.rule
                .as_ref()
                .map(|r| format!(", rule {r}"))
                .unwrap_or_default(),
            // Line breaks kept: `SELECT 1 -- x` then `DROP TABLE t` is two lines, as it ran.
            text::visible(st.text.trim(), "      ")
        )?;
        let mut outcome = Vec::new();
        if let Some(m) = st.message.as_ref().filter(|_| st.decision == "allow") {
            outcome.push(m.clone());
        }
        if let Some(t) = &st.command_tag {
            outcome.push(t.clone());
        }
        if let Some(r) = st.rows {
            outcome.push(format!("{r} rows"));
        }
        if let Some(d) = st.duration_us {
            outcome.push(format!("{d} us"));
        }
        if st.masked {
            outcome.push("masked".into());
        }
        if let Some(e) = &st.error {
            outcome.push(format!("error: {e}"));
        }
        if !outcome.is_empty() {
            writeln!(out, "      -> {}", outcome.join(", "))?;
        }
    }
    Ok(())
}

/// The session as a readable psql-like transcript, statements in the order they ran.
pub fn sessions_replay(cfg: &Config, id: i64) -> Result<(), CliError> {
    let reader = SessionReader::open(&cfg.sessions_db())?;
    let row = reader.get(id)?;
    let statements = reader.statements_of(id)?;
    let mut out = text::stdout();
    let agent = row.agent.clone().unwrap_or_else(|| "agent".into());
    writeln!(
        out,
        "-- session {} agent {} (pid {}, {}) -> {} at {}",
        row.id,
        agent,
        row.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        // The agent names its program: a line break in the name would start a line of its own.
        text::escaped(row.exe.as_deref().unwrap_or("-")),
        row.target.as_deref().unwrap_or("-"),
        row.started
    )?;
    let events = session_events(&reader, &row)?;
    for item in timeline(&statements, &events) {
        match item {
            Item::Statement(st) => write_statement(&mut out, &agent, st)?,
            Item::Event(e) => writeln!(out, "\n-- {} {}", e.ts, describe_event(e))?,
        }
    }
    writeln!(
        out,
        "\n-- session ended {}",
        row.ended.as_deref().unwrap_or("(still open)")
    )?;
    Ok(())
}

fn json_strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|c| {
            c.iter()
                .map(|v| {
                    // A cell stays on one line, whatever the value holds.
                    v.as_str()
                        .map(text::escaped)
                        .unwrap_or_else(|| "NULL".into())
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_statement(
    out: &mut impl std::io::Write,
    agent: &str,
    st: &StatementRow,
) -> std::io::Result<()> {
    writeln!(
        out,
        "\n-- {}{}",
        st.ts,
        if st.enforced { "" } else { " (shadow mode)" }
    )?;
    writeln!(out, "{agent}=> {};", st.text.trim().trim_end_matches(';'))?;
    if st.decision != "allow" {
        let rule = st.rule.as_deref().unwrap_or("default");
        let verb = if st.enforced {
            "DENIED"
        } else {
            "WOULD BE DENIED"
        };
        writeln!(
            out,
            "{verb} by rule \"{rule}\": {}",
            st.message.as_deref().unwrap_or("")
        )?;
        if st.enforced {
            return Ok(());
        }
    }
    if let Some(e) = &st.error {
        writeln!(out, "ERROR:  {e}")?;
        return Ok(());
    }
    let columns = json_strings(&st.columns);
    let rows: Vec<Vec<String>> = st
        .result_rows
        .as_array()
        .map(|rows| rows.iter().map(json_strings).collect())
        .unwrap_or_default();
    if columns.is_empty() {
        if let Some(tag) = &st.command_tag {
            writeln!(out, "{tag}")?;
        }
        return Ok(());
    }
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|v| v.chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!(" {c:<w$} "))
            .collect::<Vec<_>>()
            .join("|")
    };
    writeln!(out, "{}", line(&columns))?;
    writeln!(
        out,
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(w + 2))
            .collect::<Vec<_>>()
            .join("+")
    )?;
    for r in &rows {
        writeln!(out, "{}", line(r))?;
    }
    let total = st.rows.unwrap_or(0);
    let shown = i64::try_from(rows.len()).unwrap_or(0);
    if total > shown {
        writeln!(out, "... ({} more rows not recorded)", total - shown)?;
    }
    writeln!(
        out,
        "({total} row{}){}",
        if total == 1 { "" } else { "s" },
        if st.masked { " [masked]" } else { "" }
    )
}

/// `agentgate explain`: the facts and the rule that decides, without running anything.
pub fn explain(
    cfg: &Config,
    agent: &str,
    target: &str,
    sql: &str,
    json: bool,
) -> Result<(), CliError> {
    let a = cfg
        .agent(agent)
        .ok_or_else(|| msg(format!("unknown agent `{agent}`")))?;
    if !cfg.targets.iter().any(|t| t.name == target) {
        return Err(msg(format!("unknown target `{target}`")));
    }
    let set = crate::policy::compile(cfg.policies.clone()).map_err(|e| msg(e.to_string()))?;
    let subject = crate::policy::Subject {
        agent,
        roles: &a.roles,
    };
    let explanation = crate::policy::explain(&set, &subject, target, sql);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&explanation).unwrap_or_default()
        );
    } else {
        println!("{explanation}");
    }
    Ok(())
}

fn print_session(r: &SessionRow) -> std::io::Result<()> {
    let mut out = text::stdout();
    // One line per field: a command line holding a line break cannot fake the next field.
    let opt = |v: &Option<String>| v.as_deref().map_or_else(|| "-".into(), text::escaped);
    writeln!(out, "session {}", r.id)?;
    writeln!(
        out,
        "  agent:       {} (roles: {})",
        opt(&r.agent),
        r.roles.join(", ")
    )?;
    writeln!(
        out,
        "  process:     pid {} uid {} exe {}",
        r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        r.uid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        opt(&r.exe)
    )?;
    writeln!(out, "  cmdline:     {}", opt(&r.cmdline))?;
    writeln!(
        out,
        "  cgroup:      {} (id {})",
        opt(&r.cgroup),
        r.cgroup_id
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into())
    )?;
    writeln!(out, "  client:      {}", r.client)?;
    writeln!(
        out,
        "  destination: {} -> target {} ({}) via {}",
        opt(&r.original_destination),
        opt(&r.target),
        opt(&r.protocol),
        opt(&r.upstream)
    )?;
    writeln!(
        out,
        "  decision:    {}{}",
        r.decision,
        r.reason
            .as_ref()
            .map(|s| format!(" ({s})"))
            .unwrap_or_default()
    )?;
    writeln!(out, "  started:     {}", r.started)?;
    writeln!(out, "  ended:       {}", opt(&r.ended))?;
    writeln!(
        out,
        "  bytes:       {} up, {} down",
        r.bytes_up, r.bytes_down
    )?;
    if let Some(e) = &r.error {
        writeln!(out, "  error:       {}", text::escaped(e))?;
    }
    Ok(())
}

pub fn events_list(cfg: &Config, limit: usize, json: bool) -> Result<(), CliError> {
    let reader = SessionReader::open(&cfg.sessions_db())?;
    let rows = reader.events(limit)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_default()
        );
        return Ok(());
    }
    let mut out = text::stdout();
    for e in rows {
        // Tickets and grants read better as a sentence than as their JSON.
        let detail = if e.kind.starts_with("ticket_") || e.kind.starts_with("grant_") {
            describe_event(&e)
        } else {
            e.detail.to_string()
        };
        writeln!(
            out,
            "{:>6}  {}  {:<16}  agent={} pid={} dst={} {}",
            e.id,
            e.ts,
            e.kind,
            e.agent.as_deref().unwrap_or("-"),
            e.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            e.destination.as_deref().unwrap_or("-"),
            detail
        )?;
    }
    Ok(())
}

pub fn uninstall(cfg: &Config) -> Result<(), CliError> {
    intercept::uninstall(&cfg.pin_dir, &cfg.state_dir)?;
    let cgroups = CgroupFs::discover()?;
    for a in &cfg.agents {
        if let Ok(rel) = normalize_cgroup(&a.cgroup) {
            // Fails while processes remain inside; those stay where they are, now ungoverned.
            if let Err(e) = std::fs::remove_dir(cgroups.dir(&rel))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("note: cgroup {rel} kept: {e}");
            }
        }
    }
    println!(
        "removed pinned programs and maps under {}",
        cfg.pin_dir.display()
    );
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_statement_cannot_drive_the_operators_terminal() {
        // The agent chose the text; the database returned a value the agent stored earlier.
        let st = StatementRow {
            id: 1,
            ts: "t".into(),
            ts_ms: 0,
            protocol: "simple".into(),
            text: "SELECT note FROM notes -- \u{1b}[2K\nWHERE id = 1".into(),
            kind: Some("select".into()),
            tables: serde_json::json!([]),
            functions: serde_json::json!([]),
            decision: "allow".into(),
            enforced: true,
            policy: None,
            rule: None,
            message: None,
            duration_us: Some(1),
            rows: Some(1),
            command_tag: Some("SELECT 1".into()),
            error: None,
            columns: serde_json::json!(["note"]),
            result_rows: serde_json::json!([["\u{1b}]52;c;cm0gLXJmIC8=\u{7}line\nbreak\u{202e}"]]),
            masked: false,
        };
        let mut out = text::Visible(Vec::new());
        write_statement(&mut out, "bot", &st).unwrap();
        let shown = String::from_utf8(out.0).unwrap();
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\u{7}') && !shown.contains('\u{202e}'),
            "{shown:?}"
        );
        assert!(
            shown.contains("\\u{1b}]52;c;cm0gLXJmIC8=\\u{7}line\\nbreak\\u{202e}"),
            "{shown}"
        );
        // The statement keeps its line break: the WHERE is not hidden behind the comment.
        assert!(shown.contains("-- \\u{1b}[2K\nWHERE id = 1;"), "{shown}");
    }
}
