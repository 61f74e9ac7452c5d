//! agentgate: the host enforcement point for autonomous agents.
//!
//! The kernel side (`agent-ebpf`) redirects governed sockets to this daemon; `intercept` loads
//! and pins it, `identity` says who is speaking, `config` says what they may reach, `proxy` joins
//! connections to their records, `session` stores what happened, `admin` exposes the daemon to
//! operators, `daemon` wires the parts together and `cli` holds the operator verbs.
#![forbid(unsafe_code)]

pub mod admin;
pub mod approval;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod intercept;
pub mod mask;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod session;
pub mod webhook;

#[cfg(test)]
mod test_support;
