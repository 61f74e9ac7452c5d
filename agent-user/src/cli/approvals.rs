//! `agentgate approvals ...`, `agentgate grant` and `agentgate grants ...`: clients of the
//! admin socket. The daemon decides who may do what; this module only asks and prints.

use std::io::Write as _;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::text::visible;
use super::{CliError, msg};
use crate::admin::{self, Request, Response};
use crate::approval::{ApprovalEvent, Grant, Ticket};
use crate::config::Config;
use crate::session::format_ms;

fn parse_duration(text: &str) -> Result<Duration, CliError> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| msg(format!("bad duration {text:?}: {e}")))?;
    if d.is_zero() {
        return Err(msg("a duration must be positive"));
    }
    Ok(d)
}

async fn ask(cfg: &Config, req: Request) -> Result<serde_json::Value, CliError> {
    let resp = admin::call(&cfg.admin_socket(), &req).await?;
    Ok(resp.data.unwrap_or_default())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn describe_ticket(out: &mut impl std::io::Write, t: &Ticket) -> std::io::Result<()> {
    writeln!(
        out,
        "ticket {} [{}] agent {} (pid {}, {}) -> {}/{} session {}",
        t.id,
        serde_json::to_value(t.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        t.requester.agent,
        t.requester.pid,
        visible(t.requester.exe.as_deref().unwrap_or("-"), "    "),
        t.requester.target,
        t.requester.database,
        t.requester.session_id
    )?;
    writeln!(
        out,
        "  rule {} of policy {}, held {}, expires {}",
        t.rule.as_deref().unwrap_or("default"),
        t.policy.as_deref().unwrap_or("-"),
        t.created,
        format_ms(t.expires_ms)
    )?;
    writeln!(
        out,
        "  {} statement: {}",
        t.protocol,
        visible(&t.statement, "    ")
    )?;
    if !t.params.is_empty() {
        let params: Vec<String> = t
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let value = p
                    .as_deref()
                    .map_or("NULL".to_string(), |v| visible(v, "    "));
                format!("${}={value}", i + 1)
            })
            .collect();
        writeln!(out, "  parameters: {}", params.join(", "))?;
    }
    writeln!(out, "  sha256 {}", t.sha256)?;
    if let Some(by) = &t.decided_by {
        writeln!(
            out,
            "  decided by {by}{}",
            t.reason
                .as_ref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        )?;
    } else if let Some(r) = &t.reason {
        writeln!(out, "  {r}")?;
    }
    if let Some(g) = t.grant_id {
        writeln!(out, "  granted the rule as grant {g}")?;
    }
    Ok(())
}

fn describe_grant(out: &mut impl std::io::Write, g: &Grant) -> std::io::Result<()> {
    let state = if g.revoked_ms.is_some() {
        format!("revoked by {}", g.revoked_by.as_deref().unwrap_or("?"))
    } else if g.active_at(crate::session::now_ms()) {
        format!("active until {}", g.expires)
    } else {
        format!("expired {}", g.expires)
    };
    writeln!(
        out,
        "grant {} agent {}: {} ({state}), granted by {} at {}{}{}",
        g.id,
        g.agent,
        g.scope,
        g.granted_by,
        format_ms(g.created_ms),
        g.ticket
            .map(|t| format!(" approving ticket {t}"))
            .unwrap_or_default(),
        g.reason
            .as_ref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    )
}

/// Asks for a list and prints it as JSON, or each item with `describe` (or that there are none).
async fn print_list<T: serde::de::DeserializeOwned>(
    cfg: &Config,
    req: Request,
    json: bool,
    none: &str,
    describe: fn(
        &mut super::text::Visible<std::io::StdoutLock<'static>>,
        &T,
    ) -> std::io::Result<()>,
) -> Result<(), CliError> {
    let data = ask(cfg, req).await?;
    if json {
        print_json(&data);
        return Ok(());
    }
    let items: Vec<T> =
        serde_json::from_value(data).map_err(|e| msg(format!("bad answer: {e}")))?;
    let mut out = super::text::stdout();
    if items.is_empty() {
        writeln!(out, "{none}")?;
    }
    for item in &items {
        describe(&mut out, item)?;
    }
    Ok(())
}

pub async fn list(cfg: &Config, all: bool, json: bool) -> Result<(), CliError> {
    let none = if all {
        "no tickets"
    } else {
        "no pending tickets"
    };
    print_list(cfg, Request::ApprovalsList { all }, json, none, |o, t| {
        describe_ticket(o, t)
    })
    .await
}

pub async fn approve(
    cfg: &Config,
    id: u64,
    sha256: Option<String>,
    grant_for: Option<&str>,
    reason: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let for_secs = grant_for
        .map(parse_duration)
        .transpose()?
        .map(|d| d.as_secs().max(1));
    let data = ask(
        cfg,
        Request::Approve {
            id,
            sha256,
            for_secs,
            reason,
        },
    )
    .await?;
    if json {
        print_json(&data);
        return Ok(());
    }
    let t: Ticket = serde_json::from_value(data).map_err(|e| msg(format!("bad answer: {e}")))?;
    println!("approved ticket {}: the held statement runs now", t.id);
    if let Some(g) = t.grant_id {
        println!(
            "agent {} may run statements of rule {} without review on target {}, database {} (grant {g})",
            t.requester.agent,
            t.rule.as_deref().unwrap_or("-"),
            t.requester.target,
            t.requester.database
        );
    }
    Ok(())
}

pub async fn deny(cfg: &Config, id: u64, reason: String, json: bool) -> Result<(), CliError> {
    let data = ask(cfg, Request::Deny { id, reason }).await?;
    if json {
        print_json(&data);
    } else {
        println!("denied ticket {id}");
    }
    Ok(())
}

/// Prints tickets and grant changes as they happen, until interrupted.
pub async fn watch(cfg: &Config, json: bool) -> Result<(), CliError> {
    let path = cfg.admin_socket();
    let stream = UnixStream::connect(&path)
        .await
        .map_err(|source| admin::AdminError::Connect {
            path: path.clone(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(&Request::Watch).map_err(|e| msg(e.to_string()))?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    while let Some(l) = lines.next_line().await? {
        let resp: Response =
            serde_json::from_str(&l).map_err(|e| msg(format!("bad answer: {e}")))?;
        if !resp.ok {
            return Err(msg(resp.error.unwrap_or_else(|| "refused".into())));
        }
        let Some(data) = resp.data else { continue };
        let mut out = super::text::stdout();
        if json {
            writeln!(out, "{data}")?;
            out.flush()?;
            continue;
        }
        let ev: ApprovalEvent =
            serde_json::from_value(data).map_err(|e| msg(format!("bad event: {e}")))?;
        writeln!(out, "== {} at {}", ev.event, format_ms(ev.ts_ms))?;
        if let Some(t) = &ev.ticket {
            describe_ticket(&mut out, t)?;
        }
        if let Some(g) = &ev.grant {
            describe_grant(&mut out, g)?;
        }
        out.flush()?;
    }
    Ok(())
}

pub async fn grant(
    cfg: &Config,
    agent: String,
    role: String,
    duration: &str,
    reason: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let for_secs = parse_duration(duration)?.as_secs().max(1);
    let data = ask(
        cfg,
        Request::Grant {
            agent,
            role,
            for_secs,
            reason,
        },
    )
    .await?;
    if json {
        print_json(&data);
        return Ok(());
    }
    let g: Grant = serde_json::from_value(data).map_err(|e| msg(format!("bad answer: {e}")))?;
    describe_grant(&mut super::text::stdout(), &g)?;
    Ok(())
}

pub async fn grants_list(cfg: &Config, all: bool, json: bool) -> Result<(), CliError> {
    let none = if all { "no grants" } else { "no active grants" };
    print_list(cfg, Request::GrantsList { all }, json, none, |o, g| {
        describe_grant(o, g)
    })
    .await
}

pub async fn revoke(
    cfg: &Config,
    id: u64,
    reason: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let data = ask(cfg, Request::Revoke { id, reason }).await?;
    if json {
        print_json(&data);
    } else {
        println!("revoked grant {id}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::visible;

    #[test]
    fn what_the_approver_reads_is_what_the_server_runs() {
        // The DROP after a comment is on its own line, as the server reads it.
        assert_eq!(
            visible("SELECT 1 -- harmless\nDROP TABLE users", "    "),
            "SELECT 1 -- harmless\n    DROP TABLE users"
        );
        // Terminal escapes, carriage returns and bidi overrides cannot redraw the line.
        assert_eq!(
            visible("a\u{1b}[2Kb\rc\u{202e}d\te", ""),
            "a\\u{1b}[2Kb\\u{d}c\\u{202e}d\te"
        );
    }
}
