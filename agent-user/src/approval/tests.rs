#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use super::*;
use bytes::Bytes;

fn approvals() -> (Approvals, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "agentgate-approval-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(SessionStore::open(&dir.join("s.db")).unwrap());
    (Approvals::new(store, None, Vec::new(), 41), dir)
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn ticket(agent: &str, sql: &str) -> NewTicket {
    NewTicket {
        requester: Requester {
            agent: agent.into(),
            roles: vec!["operator".into()],
            pid: 4242,
            uid: 1000,
            exe: Some("/usr/bin/psql".into()),
            cmdline: None,
            target: "db".into(),
            database: "postgres".into(),
            session_id: 7,
        },
        protocol: "simple",
        statement: sql.into(),
        params: Vec::new(),
        param_formats: Vec::new(),
        facts: serde_json::Value::Null,
        policy: Some("operators".into()),
        rule: Some("bulk-writes".into()),
        timeout: Duration::from_secs(60),
    }
}

fn approve(by: &str) -> Approve {
    Approve {
        approver: by.into(),
        caller_agent: None,
        sha256: None,
        grant_for: None,
        reason: None,
    }
}

#[tokio::test]
async fn ids_continue_after_the_last_recorded_ticket() {
    let (a, _d) = approvals();
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    assert_eq!(h.ticket.id, 42);
    assert_eq!(
        a.hold(ticket("bot", "DELETE FROM t")).unwrap().ticket.id,
        43
    );
}

#[tokio::test]
async fn approval_reaches_the_holder_once() {
    let (a, _d) = approvals();
    let mut events = a.subscribe();
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    assert_eq!(events.recv().await.unwrap().event, "ticket_created");
    let t = a.approve(h.ticket.id, approve("unix:root")).unwrap();
    assert_eq!(t.state, TicketState::Approved);
    assert_eq!(
        h.outcome.await.unwrap(),
        Outcome::Approved {
            by: "unix:root".into(),
            reason: None
        }
    );
    assert_eq!(events.recv().await.unwrap().event, "ticket_approved");
    // A second decision, or an expiry racing it, changes nothing.
    assert!(matches!(
        a.deny(t.id, "unix:root", None, "late"),
        Err(ApprovalError::Decided {
            state: TicketState::Approved,
            ..
        })
    ));
    a.expire(t.id);
    assert_eq!(a.list(true)[0].state, TicketState::Approved);
    assert!(a.pending().is_empty());
}

#[tokio::test]
async fn approval_is_bound_to_the_statement_hash() {
    let (a, _d) = approvals();
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    let other = statement_hash("simple", "DELETE FROM u", &[], &[]);
    let err = a
        .approve(
            h.ticket.id,
            Approve {
                sha256: Some(other),
                ..approve("jwt:alice")
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApprovalError::HashMismatch { .. }));
    assert_eq!(err.kind(), ErrorKind::Conflict);
    assert_eq!(a.pending().len(), 1);
    let right = Approve {
        sha256: Some(h.ticket.sha256.to_ascii_uppercase()),
        ..approve("jwt:alice")
    };
    a.approve(h.ticket.id, right).unwrap();
}

#[test]
fn the_hash_covers_protocol_text_parameters_and_formats() {
    let p = |s: &str| Some(Bytes::copy_from_slice(s.as_bytes()));
    let base = statement_hash("extended", "UPDATE t SET v = $1", &[p("a")], &[0]);
    assert_eq!(
        base,
        statement_hash("extended", "UPDATE t SET v = $1", &[p("a")], &[0])
    );
    for other in [
        statement_hash("simple", "UPDATE t SET v = $1", &[p("a")], &[0]),
        statement_hash("extended", "UPDATE t SET v = $2", &[p("a")], &[0]),
        statement_hash("extended", "UPDATE t SET v = $1", &[p("b")], &[0]),
        statement_hash("extended", "UPDATE t SET v = $1", &[None], &[0]),
        statement_hash("extended", "UPDATE t SET v = $1", &[p("")], &[0]),
        statement_hash("extended", "UPDATE t SET v = $1", &[p("a")], &[1]),
        statement_hash("extended", "UPDATE t SET v = $1", &[p("a"), None], &[0]),
    ] {
        assert_ne!(base, other);
    }
}

#[tokio::test]
async fn an_agent_cannot_decide_its_own_ticket() {
    let (a, _d) = approvals();
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    let own = Approve {
        caller_agent: Some("bot".into()),
        ..approve("unix:root")
    };
    assert!(matches!(
        a.approve(h.ticket.id, own),
        Err(ApprovalError::OwnTicket(_))
    ));
    assert!(matches!(
        a.approve(h.ticket.id, approve("jwt:bot")),
        Err(ApprovalError::OwnTicket(_))
    ));
    assert!(matches!(
        a.deny(h.ticket.id, "jwt:bot", None, "mine"),
        Err(ApprovalError::OwnTicket(_))
    ));
    assert_eq!(a.pending().len(), 1);
    // Another agent's identity may decide it.
    a.deny(h.ticket.id, "jwt:bot2", Some("bot2"), "no").unwrap();
}

#[tokio::test]
async fn expiry_denial_and_cancel_are_delivered() {
    let (a, _d) = approvals();
    let h1 = a.hold(ticket("bot", "DELETE FROM a")).unwrap();
    let h2 = a.hold(ticket("bot", "DELETE FROM b")).unwrap();
    let mut other_session = ticket("bot", "DELETE FROM c");
    other_session.requester.session_id = 8;
    let h3 = a.hold(other_session).unwrap();
    a.expire(h1.ticket.id);
    assert!(
        matches!(h1.outcome.await.unwrap(), Outcome::Expired { after } if after == Duration::from_secs(60))
    );
    assert!(a.deny(h2.ticket.id, "unix:root", None, " ").is_err());
    a.deny(h2.ticket.id, "unix:root", None, "no").unwrap();
    assert_eq!(
        h2.outcome.await.unwrap(),
        Outcome::Denied {
            by: "unix:root".into(),
            reason: "no".into()
        }
    );
    assert!(!a.cancel_session(7, "x"));
    assert!(a.cancel_session(8, "cancelled by the agent"));
    assert!(matches!(
        h3.outcome.await.unwrap(),
        Outcome::Cancelled { .. }
    ));
    let states: Vec<TicketState> = a.list(true).iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            TicketState::Cancelled,
            TicketState::Denied,
            TicketState::Expired
        ]
    );
}

#[tokio::test]
async fn role_grants_add_roles_until_they_end() {
    let (a, _d) = approvals();
    let base = vec!["operator".to_string()];
    assert_eq!(a.roles_for("bot", &base), None);
    let g = a
        .grant_role("bot", "dba", Duration::from_millis(300), "unix:root", None)
        .unwrap();
    assert_eq!(
        a.roles_for("bot", &base),
        Some(GrantedRoles {
            roles: vec!["operator".to_string(), "dba".to_string()],
            grants: vec![g.id],
        })
    );
    assert!(a.all_active(&[g.id]));
    assert_eq!(a.roles_for("bot2", &base), None);
    assert!(
        a.grant_role("bot", "dba", Duration::ZERO, "x", None)
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Enforcement stops at expiry even before the expiry is recorded.
    assert_eq!(a.roles_for("bot", &base), None);
    assert!(!a.all_active(&[g.id]));
    let mut events = a.subscribe();
    a.record_expiries();
    let ev = events.recv().await.unwrap();
    assert_eq!(ev.event, "grant_expired");
    assert_eq!(ev.grant.unwrap().id, g.id);
    assert!(a.grants(false).is_empty());
    assert_eq!(a.grants(true).len(), 1);
    assert!(matches!(
        a.revoke(g.id, "unix:root", None),
        Err(ApprovalError::GrantInactive(_))
    ));
}

fn at<'a>(agent: &'a str, target: &'a str, database: &'a str, rule: &'a str) -> RuleUse<'a> {
    RuleUse {
        agent,
        target,
        database,
        policy: "operators",
        rule,
    }
}

#[test]
fn a_rule_grant_stored_without_target_matches_nothing() {
    let stored: GrantScope = serde_json::from_value(
        serde_json::json!({"kind": "rule", "policy": "operators", "rule": "bulk-writes"}),
    )
    .unwrap();
    let GrantScope::Rule {
        target, database, ..
    } = stored
    else {
        panic!("not a rule grant");
    };
    assert!(target.is_empty() && database.is_empty());
}

#[tokio::test]
async fn approving_with_a_duration_grants_the_rule() {
    let (a, _d) = approvals();
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    let t = a
        .approve(
            h.ticket.id,
            Approve {
                grant_for: Some(Duration::from_secs(600)),
                reason: Some("batch job".into()),
                ..approve("jwt:alice")
            },
        )
        .unwrap();
    let gid = t.grant_id.unwrap();
    let g = a
        .rule_grant(&at("bot", "db", "postgres", "bulk-writes"))
        .unwrap();
    assert_eq!(g.id, gid);
    assert_eq!(g.ticket, Some(h.ticket.id));
    assert_eq!(g.granted_by, "jwt:alice");
    assert!(
        g.scope
            .to_string()
            .contains("on target db, database postgres"),
        "{}",
        g.scope
    );
    assert!(
        a.rule_grant(&at("bot", "db", "postgres", "other"))
            .is_none()
    );
    assert!(
        a.rule_grant(&at("bot2", "db", "postgres", "bulk-writes"))
            .is_none()
    );
    // Only where the approved statement was going: not another target, nor another database.
    assert!(
        a.rule_grant(&at("bot", "prod", "postgres", "bulk-writes"))
            .is_none()
    );
    assert!(
        a.rule_grant(&at("bot", "db", "other", "bulk-writes"))
            .is_none()
    );
    a.revoke(gid, "unix:root", Some("done".into())).unwrap();
    assert!(
        a.rule_grant(&at("bot", "db", "postgres", "bulk-writes"))
            .is_none()
    );
    assert!(matches!(
        a.revoke(999, "unix:root", None),
        Err(ApprovalError::NoGrant(999))
    ));
}

#[tokio::test]
async fn grants_survive_a_restart() {
    let (a, dir) = approvals();
    let g = a
        .grant_role("bot", "dba", Duration::from_secs(600), "unix:root", None)
        .unwrap();
    a.store.flush().await.unwrap();
    let reader = crate::session::SessionReader::open(&dir.join("s.db")).unwrap();
    let stored: Vec<Grant> = reader
        .grants()
        .unwrap()
        .into_iter()
        .map(|v| serde_json::from_value(v).unwrap())
        .collect();
    let store = Arc::new(SessionStore::open(&dir.join("s.db")).unwrap());
    let again = Approvals::new(store, None, stored, 0);
    assert_eq!(
        again.roles_for("bot", &[]).map(|g| g.roles),
        Some(vec!["dba".to_string()])
    );
    let next = again
        .grant_role("bot", "x", Duration::from_secs(1), "unix:root", None)
        .unwrap();
    assert!(next.id > g.id);
}

#[tokio::test]
async fn grants_longer_than_the_maximum_are_refused_before_anything_changes() {
    let (a, _d) = approvals();
    let too_long = MAX_GRANT + Duration::from_secs(1);
    let eight_days = Duration::from_secs(8 * 24 * 3600);
    // A duration past year 9999 used to panic while formatting the expiry.
    for d in [too_long, eight_days, Duration::from_secs(u64::MAX)] {
        assert!(matches!(
            a.grant_role("bot", "dba", d, "unix:root", None),
            Err(ApprovalError::Invalid(_))
        ));
    }
    assert!(a.grants(true).is_empty());
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    let mut ap = approve("unix:root");
    ap.grant_for = Some(Duration::from_secs(u64::MAX));
    assert!(matches!(
        a.approve(h.ticket.id, ap),
        Err(ApprovalError::Invalid(_))
    ));
    // The ticket is still pending: the refusal came before the decision.
    let pending = a.pending();
    assert_eq!(pending.len(), 1);
    assert!(
        a.grant_role("bot", "dba", MAX_GRANT, "unix:root", None)
            .is_ok()
    );
}

#[tokio::test]
async fn an_agent_may_have_only_so_many_tickets_pending() {
    let (a, _d) = approvals();
    let a = a.with_limits(ApprovalLimits {
        max_pending_per_agent: 2,
        new_tickets_per_second: 1000,
        ..ApprovalLimits::default()
    });
    let h1 = a.hold(ticket("bot", "DELETE FROM a")).unwrap();
    let _h2 = a.hold(ticket("bot", "DELETE FROM b")).unwrap();
    let Err(Outcome::Refused { why }) = a.hold(ticket("bot", "DELETE FROM c")) else {
        panic!("a third ticket was opened");
    };
    assert!(
        why.contains("already has 2 statements awaiting approval"),
        "{why}"
    );
    assert_eq!(a.list(true).len(), 2, "no ticket for the refused statement");
    // Another agent has its own allowance.
    a.hold(ticket("bot2", "DELETE FROM c")).unwrap();
    // A decided ticket frees a place.
    a.deny(h1.ticket.id, "unix:root", None, "no").unwrap();
    a.hold(ticket("bot", "DELETE FROM c")).unwrap();
    assert!(a.hold(ticket("bot", "DELETE FROM d")).is_err());
}

#[tokio::test]
async fn an_agent_cannot_open_tickets_in_a_loop_by_hanging_up() {
    // Each cancelled ticket stops counting as pending; the rate of new ones is still bounded.
    let (a, _d) = approvals();
    let a = a.with_limits(ApprovalLimits {
        max_pending_per_agent: 2,
        new_tickets_per_second: 1,
        ..ApprovalLimits::default()
    });
    let mut opened = 0;
    let mut refused = None;
    for i in 0..20 {
        match a.hold(ticket("bot", &format!("DELETE FROM t{i}"))) {
            Ok(h) => {
                opened += 1;
                a.cancel(h.ticket.id, "the agent disconnected");
            }
            Err(Outcome::Refused { why }) => {
                refused = Some(why);
                break;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(opened, 4, "a burst of twice the pending limit");
    assert!(refused.unwrap().contains("faster than it may"));
    // Another agent is not affected.
    a.hold(ticket("bot2", "DELETE FROM t")).unwrap();
}

#[tokio::test]
async fn a_statement_too_large_to_hold_opens_no_ticket() {
    let (a, _d) = approvals();
    let a = a.with_limits(ApprovalLimits {
        max_statement_bytes: 100,
        ..ApprovalLimits::default()
    });
    let big = format!("DELETE FROM t WHERE v = '{}'", "x".repeat(100));
    let Err(Outcome::TooLarge { why }) = a.hold(ticket("bot", &big)) else {
        panic!("a ticket was opened for a statement over the limit");
    };
    assert!(why.contains("approvals.max_statement_bytes (100)"), "{why}");
    assert!(a.list(true).is_empty());
    // Parameters count with the text.
    let mut with_params = ticket("bot", "DELETE FROM t WHERE v = $1");
    with_params.params = vec![Some(Bytes::from(vec![b'x'; 90]))];
    with_params.param_formats = vec![0];
    assert!(matches!(a.hold(with_params), Err(Outcome::TooLarge { .. })));
    // At the limit it is held as before.
    let fits = "x".repeat(100);
    a.hold(ticket("bot", &fits)).unwrap();
    assert_eq!(a.list(false).len(), 1);
}

#[tokio::test]
async fn decided_tickets_kept_are_bounded_by_bytes() {
    let (a, _d) = approvals();
    let a = a.with_limits(ApprovalLimits {
        max_statement_bytes: 1024 * 1024,
        new_tickets_per_second: 1000,
        max_pending_per_agent: 1000,
    });
    let text = "x".repeat(1024 * 1024);
    for _ in 0..40 {
        let h = a.hold(ticket("bot", &text)).unwrap();
        a.cancel(h.ticket.id, "the agent disconnected");
    }
    let kept = a.list(true);
    assert_eq!(kept.len(), KEEP_DECIDED_BYTES / (1024 * 1024));
    // The newest are kept.
    assert_eq!(kept[0].id, 41 + 40);
}

#[test]
fn a_ticket_and_its_clones_share_one_copy_of_the_statement() {
    let (a, _d) = approvals();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _g = rt.enter();
    let mut rx = a.subscribe();
    let h = a.hold(ticket("bot", "DELETE FROM t")).unwrap();
    let listed = a.list(false);
    let event = rx.try_recv().unwrap();
    let sent = event.ticket.unwrap();
    assert!(Arc::ptr_eq(&h.ticket.statement, &listed[0].statement));
    assert!(Arc::ptr_eq(&h.ticket.statement, &sent.statement));
}
