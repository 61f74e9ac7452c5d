//! Operator configuration: the YAML file, its validation, and the validated types the rest of
//! the daemon receives.
//!
//! Parsing errors name the file, line and key (serde_norway reports both); semantic errors found
//! after parsing (an agent naming an unknown target, duplicate names) name the key path. Nothing
//! outside this module sees unvalidated configuration. Policies and masking profiles are parsed
//! here as part of the file and compiled by their own modules.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The configuration the demo and a bare `agentgate run` use when no file is given.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../../policies/default.yaml");

/// Default path looked up when `--config` is not given and the file exists.
pub const DEFAULT_PATH: &str = "/etc/agentgate/agentgate.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: `{key}`: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

/// What unknown destinations of a governed agent get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDestinations {
    /// Refused in the kernel with `EPERM` (the default).
    #[default]
    Deny,
    /// Redirected and relayed as recorded opaque TCP.
    Record,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: relayed and recorded at the connection level.
    Tcp,
    /// PostgreSQL wire protocol.
    Postgres,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A destination pattern: `ip:port` or `cidr:port` (IPv6 as `[addr]:port` / `[cidr]:port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination {
    pub net: IpNet,
    pub port: u16,
}

impl Destination {
    /// Does the kernel's allow list take `addr` for this destination? As there, an IPv4
    /// address and its mapped form (`::ffff:a.b.c.d`) are one address, so an IPv6 network that
    /// covers mapped space (`::/0`) matches IPv4 destinations too.
    pub fn matches(&self, addr: &SocketAddr) -> bool {
        self.port == addr.port() && self.contains(addr.ip())
    }

    /// Does this destination cover more than one address (`10.0.0.0/8:5432`)? Then the
    /// address dialed for a connect to it, when the target sets no `upstream`, is the one the
    /// agent chose.
    pub fn is_network(&self) -> bool {
        self.net.prefix_len() < self.net.max_prefix_len()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let mapped = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        match self.net {
            IpNet::V4(n) => mapped.to_ipv4_mapped().is_some_and(|v4| n.contains(&v4)),
            IpNet::V6(n) => n.contains(&mapped),
        }
    }

    /// The address of this host that this destination names, if it names one: 127.0.0.1 when
    /// it covers that address, else `::1`, else its network address when that is a loopback or
    /// unspecified one (`127.0.0.2`, `0.0.0.0`, `::`).
    ///
    /// Every loopback and unspecified spelling reaches the same local listeners, so the kernel
    /// takes one that no destination names for the target that 127.0.0.1 is (see
    /// `intercept`), and the gate then dials this address, the one the operator configured.
    pub fn local_address(&self) -> Option<IpAddr> {
        let (v4, v6) = (
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        );
        if self.contains(v4) {
            return Some(v4);
        }
        if self.contains(v6) {
            return Some(v6);
        }
        let network = match self.net.network() {
            IpAddr::V6(n) => n.to_ipv4_mapped().map_or(IpAddr::V6(n), IpAddr::V4),
            v4 => v4,
        };
        (network.is_loopback() || network.is_unspecified()).then_some(network)
    }
}

impl FromStr for Destination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` is not `ip:port` or `cidr:port`"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| format!("`{s}`: bad port `{port}`"))?;
        if port == 0 {
            return Err(format!("`{s}`: port 0 is not a destination"));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let net = if host.contains('/') {
            IpNet::from_str(host).map_err(|e| format!("`{s}`: bad CIDR: {e}"))?
        } else {
            let ip = IpAddr::from_str(host).map_err(|e| format!("`{s}`: bad address: {e}"))?;
            IpNet::from(ip)
        };
        Ok(Destination {
            net: net.trunc(),
            port,
        })
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Destination::from_str(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Destination {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V4(n) if n.prefix_len() == 32 => write!(f, "{}:{}", n.addr(), self.port),
            IpNet::V6(n) if n.prefix_len() == 128 => write!(f, "[{}]:{}", n.addr(), self.port),
            IpNet::V4(n) => write!(f, "{n}:{}", self.port),
            IpNet::V6(n) => write!(f, "[{n}]:{}", self.port),
        }
    }
}

fn deserialize_socket_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    SocketAddr::from_str(&s).map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}")))
}

fn deserialize_opt_socket_addr<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    deserialize_socket_addr(d).map(Some)
}

fn deserialize_socket_addrs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<SocketAddr>, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| {
            SocketAddr::from_str(s).map_err(|e| serde::de::Error::custom(format!("`{s}`: {e}")))
        })
        .collect()
}

/// The enforcer's loopback listeners.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    #[serde(default = "default_ipv4")]
    pub ipv4: Ipv4Addr,
    /// `null` disables the IPv6 listener; governed IPv6 connects are then refused.
    #[serde(default = "default_ipv6")]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default = "default_port")]
    pub port: u16,
    /// One accept loop per CPU the daemon may run on, each pinned to its CPU, and the kernel
    /// hands a connection to the loop on the CPU that processed its SYN (`SO_INCOMING_CPU`; on
    /// loopback, the agent's own CPU), so wake-ups between agent and gate stay on one core.
    /// Off: the loops float, and connections are spread over them by hash.
    #[serde(default = "default_pin_cpus")]
    pub pin_cpus: bool,
}

fn default_pin_cpus() -> bool {
    true
}

fn default_ipv4() -> Ipv4Addr {
    Ipv4Addr::LOCALHOST
}
fn default_ipv6() -> Option<Ipv6Addr> {
    Some(Ipv6Addr::LOCALHOST)
}
fn default_port() -> u16 {
    15001
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            ipv4: default_ipv4(),
            ipv6: default_ipv6(),
            port: default_port(),
            pin_cpus: default_pin_cpus(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub name: String,
    /// Path of the agent's cgroup relative to the cgroup2 mount, e.g. `agentgate/etl-bot`.
    pub cgroup: String,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Target names this agent may reach; `"*"` means every configured target.
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub unknown_destinations: UnknownDestinations,
    /// ICMP echo ("ping") sockets may be created. Off by default: no hook sees what they send,
    /// and ICMP payloads can carry anything. Raw sockets, SCTP and other non-TCP/UDP sockets
    /// are always refused at creation.
    #[serde(default)]
    pub allow_ping: bool,
    /// TCP connections from other hosts to this agent's listening sockets are accepted. Off by
    /// default: the kernel drops them (`inbound_connection` events), since a remote peer the
    /// agent serves could be sent anything, past every outbound hook. Connections from this
    /// host (loopback addresses) are always accepted.
    #[serde(default)]
    pub allow_inbound: bool,
    /// Processes `agentgate exec` starts may create Unix-domain sockets. Off by default: no
    /// hook sees where they connect, and a database's local socket (often trusted without a
    /// password) or a container engine's would be reached past the gate. Socket pairs are
    /// always allowed; vsock, packet and other non-IP families never (see `cli::seccomp`).
    #[serde(default)]
    pub allow_unix_sockets: bool,
    /// Connections of this agent the enforcer serves at once; more are closed at accept (with
    /// a `connection_limit` event). One agent cannot run the daemon out of descriptors for all.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    1024
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: String,
    /// Original destinations (`ip:port`, `cidr:port`) that this target answers for.
    #[serde(rename = "match")]
    pub destinations: Vec<Destination>,
    pub protocol: Protocol,
    /// Where the enforcer connects; default: the original destination.
    #[serde(default, deserialize_with = "deserialize_opt_socket_addr")]
    pub upstream: Option<SocketAddr>,
    /// Brokered upstream credentials (required for `postgres`): the agent never holds them.
    #[serde(default)]
    pub credentials: Option<CredentialsConfig>,
    /// Upstream TLS: `disable` (default), `require` (encrypt, no verification) or `verify-full`.
    #[serde(default)]
    pub tls: crate::proxy::pgtls::TlsMode,
    /// CA bundle for `verify-full` (default: the system bundle).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Name checked against the server certificate (default: the upstream's IP address).
    #[serde(default)]
    pub server_name: Option<String>,
    /// Largest protocol frame accepted from either side; larger ones close the connection.
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// How many result rows of each statement are kept in the session record (masked).
    #[serde(default = "default_record_rows")]
    pub record_rows: usize,
    /// Bytes one connection may make the gate keep for its named and unnamed prepared
    /// statements and portals (their text, names, kept parameters, result columns). A Parse
    /// or Bind beyond it is refused with SQLSTATE 54000; closing names gives the bytes back.
    #[serde(default = "default_max_kept_bytes")]
    pub max_kept_bytes: usize,
    /// Statements one query string (a simple Query) may hold: the gate parses, judges and
    /// records each before sending any, so a frame of tiny statements costs it far more than
    /// the frame. A query with more is refused with SQLSTATE 54000, nothing of it sent.
    #[serde(default = "default_max_statements_per_query")]
    pub max_statements_per_query: usize,
    /// Bytes of SQL text (a simple Query's, or a Parse's) the gate will parse. Parsing builds a
    /// syntax tree of up to about a thousand times the text's size while it runs (`SELECT
    /// 1,1,1,...`: about 1.1 KB per byte), so a frame-sized statement could take gigabytes. A
    /// longer text is refused with SQLSTATE 54000, nothing sent; large data goes as COPY or as
    /// parameters, which are not parsed.
    #[serde(default = "default_max_query_bytes")]
    pub max_query_bytes: usize,
}

impl TargetConfig {
    /// Where the enforcer connects for a connect to `original` that the kernel took for this
    /// target: `upstream` if set, else `original` when a destination names it. Otherwise the
    /// kernel took another spelling of this host (`127.0.0.2`, `0.0.0.0`, `::1`) for it, and
    /// the gate dials the local address the target names on that port instead: whatever
    /// listens at the spelling is not what the operator configured (a governed agent can
    /// listen on `127.0.0.2` itself and be handed the brokered credentials). `None` if the
    /// target names no such address (a flow from before a configuration change).
    pub fn upstream_for(&self, original: SocketAddr) -> Option<SocketAddr> {
        if let Some(u) = self.upstream {
            return Some(u);
        }
        if self.destinations.iter().any(|d| d.matches(&original)) {
            return Some(original);
        }
        self.destinations
            .iter()
            .filter(|d| d.port == original.port())
            .find_map(Destination::local_address)
            .map(|ip| SocketAddr::new(ip, original.port()))
    }
}

fn default_max_frame() -> usize {
    16 * 1024 * 1024
}
fn default_record_rows() -> usize {
    10
}
fn default_max_kept_bytes() -> usize {
    64 * 1024 * 1024
}
fn default_max_statements_per_query() -> usize {
    1000
}
fn default_max_query_bytes() -> usize {
    256 * 1024
}

/// Where the gate finds the upstream password: an environment variable of the daemon or a file
/// (read at each connection, so it can be rotated without a restart).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsConfig {
    pub user: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Database to connect to instead of the one the agent asks for.
    #[serde(default)]
    pub database: Option<String>,
}

impl fmt::Debug for CredentialsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsConfig")
            .field("user", &self.user)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("database", &self.database)
            .finish()
    }
}

impl CredentialsConfig {
    /// The password, read now. `None` when neither source is configured (trust auth).
    pub fn password(&self) -> Result<Option<String>, String> {
        if let Some(var) = &self.password_env {
            return std::env::var(var).map(Some).map_err(|_| {
                format!("environment variable {var} (credentials.password_env) is not set")
            });
        }
        if let Some(file) = &self.password_file {
            return std::fs::read_to_string(file)
                .map(|p| Some(p.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| format!("credentials.password_file {}: {e}", file.display()));
        }
        Ok(None)
    }
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    /// Sessions database and the admin socket live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where links and maps are pinned (on bpffs).
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// `SO_MARK` set on the enforcer's upstream sockets (backstop against self-redirection).
    #[serde(default = "default_mark")]
    pub mark: u32,
    /// UDP destinations governed agents may use (DNS resolvers), as `ip:port`.
    #[serde(default, deserialize_with = "deserialize_socket_addrs")]
    pub dns_resolvers: Vec<SocketAddr>,
    #[serde(default)]
    pub log_format: LogFormat,
    #[serde(default)]
    pub agents: Vec<AgentConfig>,
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Per-statement policies for protocol-aware targets (see `policy`).
    #[serde(default)]
    pub policies: Vec<crate::policy::PolicyConfig>,
    /// Masking profiles that policies name (see `mask`).
    #[serde(default)]
    pub masking: Option<crate::mask::MaskingConfig>,
    /// The admin API: the unix socket is always served; `http` adds a loopback listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// URLs told about approval tickets (created, approved, denied, expired, cancelled).
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
    /// How many events one source (a governed agent refused in the kernel, connections without a
    /// flow record) may have recorded; the rest are counted (see `session::limit`).
    #[serde(default)]
    pub events: crate::session::limit::EventLimits,
    /// Limits on approval tickets (see `approval::ApprovalLimits`).
    #[serde(default)]
    pub approvals: crate::approval::ApprovalLimits,
    /// The bound on records waiting for the session writer (see `session::StoreLimits`).
    #[serde(default)]
    pub sessions: crate::session::StoreLimits,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default)]
    pub http: Option<AdminHttpConfig>,
}

/// The loopback HTTP admin listener. Callers authenticate with a JWT whose `sub` names them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminHttpConfig {
    /// A loopback `ip:port`. Governed agents' connects to it are refused in the kernel.
    pub listen: SocketAddr,
    pub jwt: JwtConfig,
    /// The longest token lifetime accepted (`exp - iat`, or `exp - now` without `iat`), such as
    /// `24h`; `off` accepts any.
    #[serde(default = "default_max_token_lifetime")]
    pub max_token_lifetime: String,
}

fn default_max_token_lifetime() -> String {
    "24h".into()
}

impl AdminHttpConfig {
    /// `max_token_lifetime`, validated at load (`None`: `off`).
    pub fn max_token_lifetime(&self) -> Result<Option<std::time::Duration>, String> {
        let text = self.max_token_lifetime.trim();
        if text == "off" {
            return Ok(None);
        }
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Err("must be positive (or `off`)".into()),
            Ok(d) => Ok(Some(d)),
            Err(e) => Err(format!("bad duration {text:?}: {e}")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

/// How admin JWTs are verified: HS256 with a shared secret file, or RS256/ES256 with a PEM
/// public key file or a JWKS file (keys picked by `kid`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub algorithm: JwtAlgorithm,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, when set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`/`nbf`, in seconds.
    #[serde(default = "default_jwt_leeway")]
    pub leeway_secs: u64,
}

fn default_jwt_leeway() -> u64 {
    30
}

/// One webhook: events are POSTed as JSON, signed with HMAC-SHA256 of `TIMESTAMP.BODY` under the
/// secret (see `webhook`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Event kinds to send (`ticket_created`, `ticket_approved`, `ticket_denied`,
    /// `ticket_expired`, `ticket_cancelled`, `grant_created`, `grant_revoked`, `grant_expired`);
    /// empty = all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Delivery attempts before giving up (with exponential backoff between them).
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// Per-attempt timeout, in milliseconds.
    #[serde(default = "default_webhook_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_webhook_attempts() -> u32 {
    5
}
fn default_webhook_timeout_ms() -> u64 {
    5000
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/agentgate")
}
fn default_pin_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/agentgate")
}
fn default_mark() -> u32 {
    0x4147_4154
}

impl Config {
    /// The kernel's per-agent share of its refusal ring for this configuration: one value for
    /// the settings it is loaded with, the daemon's warning and its suppressed-event reports.
    pub fn kernel_event_budget(&self) -> crate::session::limit::KernelEventBudget {
        crate::session::limit::KernelEventBudget::of(self.events, self.agents.len())
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Config::parse(&text, &file)
    }

    /// The file named on the command line, else `/etc/agentgate/agentgate.yaml` if present,
    /// else the embedded default.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None if Path::new(DEFAULT_PATH).exists() => Config::load(Path::new(DEFAULT_PATH)),
            None => Config::parse(EMBEDDED_DEFAULT, "<embedded default>"),
        }
    }

    /// Parses and validates YAML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_norway::from_str(text).map_err(|e| match e.location() {
            Some(loc) => ConfigError::Syntax {
                file: file.to_string(),
                line: loc.line(),
                column: loc.column(),
                message: e.to_string(),
            },
            None => ConfigError::Parse {
                file: file.to_string(),
                message: e.to_string(),
            },
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key,
            message,
        };
        if self.listen.port == 0 {
            return Err(invalid(
                "listen.port".into(),
                "must be a fixed port, not 0".into(),
            ));
        }
        if self.agents.len() > agent_common::MAX_AGENTS as usize {
            return Err(invalid("agents".into(), "too many agents".into()));
        }
        let mut target_names = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            if t.name.is_empty() || t.name == "*" {
                return Err(invalid(
                    format!("targets[{i}].name"),
                    "must be a non-empty name".into(),
                ));
            }
            if !target_names.insert(t.name.as_str()) {
                return Err(invalid(
                    format!("targets[{i}].name"),
                    format!("duplicate target `{}`", t.name),
                ));
            }
            if t.protocol == Protocol::Postgres {
                let Some(c) = &t.credentials else {
                    return Err(invalid(
                        format!("targets[{i}].credentials"),
                        "a postgres target needs brokered credentials (user, password_env or password_file)".into(),
                    ));
                };
                if c.password_env.is_some() && c.password_file.is_some() {
                    return Err(invalid(
                        format!("targets[{i}].credentials"),
                        "give password_env or password_file, not both".into(),
                    ));
                }
                if t.max_frame_bytes < 1024 {
                    return Err(invalid(
                        format!("targets[{i}].max_frame_bytes"),
                        "must be at least 1024".into(),
                    ));
                }
                if t.max_kept_bytes < 65536 {
                    return Err(invalid(
                        format!("targets[{i}].max_kept_bytes"),
                        "must be at least 65536".into(),
                    ));
                }
                if t.max_query_bytes < 1024 {
                    return Err(invalid(
                        format!("targets[{i}].max_query_bytes"),
                        "must be at least 1024".into(),
                    ));
                }
                if t.max_statements_per_query == 0 {
                    return Err(invalid(
                        format!("targets[{i}].max_statements_per_query"),
                        "must be at least 1".into(),
                    ));
                }
                // A network destination without an upstream dials the address the agent asked
                // for within it: a server the agent runs there (or one relaying the login to
                // the real server) would be handed the brokered login. Only a certificate for a
                // fixed name tells the server the operator meant from that one.
                if t.upstream.is_none() && t.destinations.iter().any(Destination::is_network) {
                    let verified = t.tls == crate::proxy::pgtls::TlsMode::VerifyFull;
                    if !verified || t.server_name.is_none() {
                        return Err(invalid(
                            format!("targets[{i}].upstream"),
                            "this target matches a network and brokers credentials: without an \
                             upstream the gate would log in wherever the agent connects within \
                             it, even to a server the agent runs. Set `upstream`, match single \
                             addresses, or use `tls: verify-full` with a `server_name` every \
                             server there presents"
                                .into(),
                        ));
                    }
                }
                // A statement replacing the unnamed one is let in while the old one is still
                // held (up to twice a frame each): both must fit.
                if t.max_kept_bytes / 4 < t.max_frame_bytes {
                    return Err(invalid(
                        format!("targets[{i}].max_kept_bytes"),
                        format!(
                            "must be at least 4 times max_frame_bytes ({})",
                            t.max_frame_bytes
                        ),
                    ));
                }
            }
            if t.destinations.is_empty() {
                return Err(invalid(
                    format!("targets[{i}].match"),
                    "needs at least one destination".into(),
                ));
            }
            for (j, d) in t.destinations.iter().enumerate() {
                if d.port == self.listen.port && is_local(&d.net) {
                    return Err(invalid(
                        format!("targets[{i}].match[{j}]"),
                        "a target cannot be the enforcer's own listener".into(),
                    ));
                }
            }
        }
        if let Some(h) = &self.admin.http {
            if !h.listen.ip().is_loopback() {
                return Err(invalid(
                    "admin.http.listen".into(),
                    "the admin HTTP listener must be on a loopback address".into(),
                ));
            }
            if h.listen.port() == self.listen.port || h.listen.port() == 0 {
                return Err(invalid(
                    "admin.http.listen".into(),
                    "needs a fixed port other than the enforcer's".into(),
                ));
            }
            if let Err(e) = h.max_token_lifetime() {
                return Err(invalid("admin.http.max_token_lifetime".into(), e));
            }
            let j = &h.jwt;
            let keys = [j.public_key_file.is_some(), j.jwks_file.is_some()];
            match j.algorithm {
                JwtAlgorithm::HS256 if j.secret_file.is_none() => {
                    return Err(invalid(
                        "admin.http.jwt.secret_file".into(),
                        "HS256 needs a secret_file".into(),
                    ));
                }
                JwtAlgorithm::HS256 if keys.contains(&true) => {
                    return Err(invalid(
                        "admin.http.jwt".into(),
                        "HS256 takes a secret_file, not public keys".into(),
                    ));
                }
                JwtAlgorithm::RS256 | JwtAlgorithm::ES256
                    if keys.iter().filter(|k| **k).count() != 1 || j.secret_file.is_some() =>
                {
                    return Err(invalid(
                        "admin.http.jwt".into(),
                        "RS256 and ES256 need exactly one of public_key_file or jwks_file".into(),
                    ));
                }
                _ => {}
            }
        }
        if self.sessions.max_queued == 0 {
            return Err(invalid(
                "sessions.max_queued".into(),
                "must be at least 1 (statements wait for the session writer above it)".into(),
            ));
        }
        match self.sessions.max_queued_per_agent {
            Some(0) => {
                return Err(invalid(
                    "sessions.max_queued_per_agent".into(),
                    "must be at least 1 (an agent holding fewer records is not held back)".into(),
                ));
            }
            Some(n) if n > self.sessions.max_queued => {
                return Err(invalid(
                    "sessions.max_queued_per_agent".into(),
                    format!(
                        "must be at most sessions.max_queued ({}): it is an agent's share of that bound",
                        self.sessions.max_queued
                    ),
                ));
            }
            _ => {}
        }
        if self.events.burst == 0 {
            return Err(invalid(
                "events.burst".into(),
                "must be at least 1 (every source's first event is recorded)".into(),
            ));
        }
        if self.events.per_second > crate::session::limit::MAX_PER_SECOND {
            return Err(invalid(
                "events.per_second".into(),
                format!(
                    "must be at most {} (the kernel's budget refills in whole nanoseconds)",
                    crate::session::limit::MAX_PER_SECOND
                ),
            ));
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(invalid(
                    format!("webhooks[{i}].url"),
                    "must be an http:// or https:// URL".into(),
                ));
            }
            if w.secret_env.is_some() == w.secret_file.is_some() {
                return Err(invalid(
                    format!("webhooks[{i}]"),
                    "needs exactly one of secret_env or secret_file (deliveries are always signed)"
                        .into(),
                ));
            }
            const KINDS: [&str; 8] = [
                "ticket_created",
                "ticket_approved",
                "ticket_denied",
                "ticket_expired",
                "ticket_cancelled",
                "grant_created",
                "grant_revoked",
                "grant_expired",
            ];
            if let Some(bad) = w.events.iter().find(|e| !KINDS.contains(&e.as_str())) {
                return Err(invalid(
                    format!("webhooks[{i}].events"),
                    format!("unknown event `{bad}` (known: {})", KINDS.join(", ")),
                ));
            }
            if w.timeout_ms == 0 {
                return Err(invalid(
                    format!("webhooks[{i}].timeout_ms"),
                    "must be at least 1".into(),
                ));
            }
            if w.max_attempts == 0 {
                return Err(invalid(
                    format!("webhooks[{i}].max_attempts"),
                    "must be at least 1".into(),
                ));
            }
        }
        let policies = crate::policy::compile(self.policies.clone())
            .map_err(|e| invalid(policy_key(&e), e.to_string()))?;
        let profiles: Vec<String> = match &self.masking {
            Some(m) => {
                m.validate()
                    .map_err(|e| invalid("masking".into(), e.to_string()))?;
                m.profiles.keys().cloned().collect()
            }
            None => Vec::new(),
        };
        for (i, p) in self.policies.iter().enumerate() {
            let mut names: Vec<&String> = p.mask.iter().collect();
            for r in &p.rules {
                names.extend(r.mask.iter().flatten());
            }
            if let Some(missing) = names.into_iter().find(|n| !profiles.contains(n)) {
                return Err(invalid(
                    format!("policies[{i}].mask"),
                    format!("masking profile `{missing}` is not defined under `masking.profiles`"),
                ));
            }
        }
        drop(policies);
        let mut agent_names = HashSet::new();
        let mut cgroups = HashSet::new();
        for (i, a) in self.agents.iter().enumerate() {
            if a.name.is_empty() {
                return Err(invalid(
                    format!("agents[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if !agent_names.insert(a.name.as_str()) {
                return Err(invalid(
                    format!("agents[{i}].name"),
                    format!("duplicate agent `{}`", a.name),
                ));
            }
            let cg = normalize_cgroup(&a.cgroup)
                .map_err(|m| invalid(format!("agents[{i}].cgroup"), m))?;
            if !cgroups.insert(cg) {
                return Err(invalid(
                    format!("agents[{i}].cgroup"),
                    "two agents share a cgroup".into(),
                ));
            }
            for (j, t) in a.targets.iter().enumerate() {
                if t != "*" && !target_names.contains(t.as_str()) {
                    return Err(invalid(
                        format!("agents[{i}].targets[{j}]"),
                        format!("unknown target `{t}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The agent's kernel-side id: its 1-based position in `agents`.
    pub fn agent_id(&self, name: &str) -> Option<u32> {
        self.agents
            .iter()
            .position(|a| a.name == name)
            .and_then(|i| u32::try_from(i + 1).ok())
    }

    pub fn agent_by_id(&self, id: u32) -> Option<&AgentConfig> {
        self.agents.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    pub fn agent(&self, name: &str) -> Option<&AgentConfig> {
        self.agents.iter().find(|a| a.name == name)
    }

    /// The target's kernel-side id: its 1-based position in `targets`.
    pub fn target_by_id(&self, id: u32) -> Option<&TargetConfig> {
        self.targets.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    /// Targets the agent may reach, with their ids.
    pub fn targets_of<'a>(
        &'a self,
        agent: &'a AgentConfig,
    ) -> impl Iterator<Item = (u32, &'a TargetConfig)> {
        self.targets.iter().enumerate().filter_map(move |(i, t)| {
            let allowed = agent.targets.iter().any(|n| n == "*" || *n == t.name);
            let id = u32::try_from(i + 1).ok()?;
            allowed.then_some((id, t))
        })
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.state_dir.join("admin.sock")
    }

    pub fn sessions_db(&self) -> PathBuf {
        self.state_dir.join("sessions.db")
    }
}

fn policy_key(e: &crate::policy::PolicyError) -> String {
    match e.rule() {
        Some(rule) => format!("policies[{}].rules[{rule}]", e.policy()),
        None => format!("policies[{}]", e.policy()),
    }
}

fn is_local(net: &IpNet) -> bool {
    let ip = net.addr();
    ip.is_loopback() || ip.is_unspecified()
}

/// Validates a cgroup path relative to the cgroup2 mount: no `..`, not the root.
pub fn normalize_cgroup(path: &str) -> Result<String, String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err("the cgroup root cannot be governed; name a child cgroup".into());
    }
    if parts.iter().any(|p| *p == "." || *p == "..") {
        return Err(format!("`{path}` must not contain `.` or `..`"));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert!(!cfg.agents.is_empty());
        assert!(!cfg.targets.is_empty());
    }

    #[test]
    fn destinations_parse_and_match() {
        let d: Destination = "10.0.0.0/8:5432".parse().unwrap();
        assert!(d.matches(&"10.1.2.3:5432".parse().unwrap()));
        assert!(!d.matches(&"10.1.2.3:5433".parse().unwrap()));
        assert!(!d.matches(&"11.1.2.3:5432".parse().unwrap()));
        assert!(d.matches(&"[::ffff:10.0.0.5]:5432".parse().unwrap()));
        let v6: Destination = "[fd00::/64]:443".parse().unwrap();
        assert!(v6.matches(&"[fd00::1]:443".parse().unwrap()));
        // As in the kernel's allow list, mapped and plain IPv4 are one address.
        let any: Destination = "[::/0]:443".parse().unwrap();
        assert!(any.matches(&"10.1.2.3:443".parse().unwrap()));
        let mapped: Destination = "[::ffff:127.0.0.1]:443".parse().unwrap();
        assert!(mapped.matches(&"127.0.0.1:443".parse().unwrap()));
        assert!(!mapped.matches(&"[::1]:443".parse().unwrap()));
        assert!("127.0.0.1".parse::<Destination>().is_err());
        assert!("127.0.0.1:0".parse::<Destination>().is_err());
        assert!("300.0.0.1:1".parse::<Destination>().is_err());
    }

    #[test]
    fn local_addresses_of_destinations() {
        let local = |d: &str| {
            d.parse::<Destination>()
                .unwrap()
                .local_address()
                .map(|ip| ip.to_string())
        };
        assert_eq!(local("127.0.0.1:5432").as_deref(), Some("127.0.0.1"));
        assert_eq!(local("0.0.0.0/0:5432").as_deref(), Some("127.0.0.1"));
        assert_eq!(local("[::/0]:5432").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            local("[::ffff:127.0.0.1]:5432").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(local("[::1]:5432").as_deref(), Some("::1"));
        assert_eq!(local("127.0.0.2:5432").as_deref(), Some("127.0.0.2"));
        assert_eq!(local("127.0.0.128/25:5432").as_deref(), Some("127.0.0.128"));
        assert_eq!(
            local("[::ffff:127.0.0.2]:5432").as_deref(),
            Some("127.0.0.2")
        );
        assert_eq!(local("0.0.0.0:5432").as_deref(), Some("0.0.0.0"));
        assert_eq!(local("[::]:5432").as_deref(), Some("::"));
        assert_eq!(local("10.0.0.0/8:5432"), None);
        assert_eq!(local("[fd00::/64]:5432"), None);
    }

    #[test]
    fn a_target_found_under_another_local_spelling_is_dialed_at_its_own_address() {
        let cfg = Config::parse(
            "targets:
  - name: db
    match: [\"10.0.0.0/8:5432\", \"[::1]:5432\", \"127.0.0.2:6432\"]
    protocol: tcp
  - name: pinned
    match: [\"127.0.0.1:7000\"]
    protocol: tcp
    upstream: 10.9.9.9:7000
",
            "f.yaml",
        )
        .unwrap();
        let up = |t: usize, a: &str| {
            cfg.targets[t]
                .upstream_for(a.parse().unwrap())
                .map(|s| s.to_string())
        };
        assert_eq!(up(0, "10.1.2.3:5432").as_deref(), Some("10.1.2.3:5432"));
        assert_eq!(up(0, "[::1]:5432").as_deref(), Some("[::1]:5432"));
        assert_eq!(up(0, "127.0.0.3:5432").as_deref(), Some("[::1]:5432"));
        assert_eq!(up(0, "0.0.0.0:5432").as_deref(), Some("[::1]:5432"));
        assert_eq!(up(0, "[::]:6432").as_deref(), Some("127.0.0.2:6432"));
        assert_eq!(up(0, "127.0.0.1:9999"), None);
        assert_eq!(up(1, "127.0.0.9:7000").as_deref(), Some("10.9.9.9:7000"));
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad = "agents:\n  - name: a\n    cgroup: x\n    rolez: [r]\n";
        let err = Config::parse(bad, "f.yaml").unwrap_err().to_string();
        assert!(err.starts_with("f.yaml:4:"), "{err}");
        assert!(err.contains("rolez"), "{err}");

        let bad = "targets:\n  - name: db\n    match: [\"127.0.0.1:99999\"]\n    protocol: tcp\n";
        let err = Config::parse(bad, "f.yaml").unwrap_err().to_string();
        assert!(err.contains("f.yaml:3"), "{err}");
        assert!(err.contains("bad port"), "{err}");

        let bad = "agents:\n  - name: a\n    cgroup: x\n    targets: [nope]\n";
        let err = Config::parse(bad, "f.yaml").unwrap_err().to_string();
        assert_eq!(err, "f.yaml: `agents[0].targets[0]`: unknown target `nope`");
    }

    #[test]
    fn a_credentialed_network_target_must_say_where_it_logs_in() {
        let with = |m: &str, extra: &str| {
            format!(
                "targets:
  - name: db
    match: [\"{m}\"]
    protocol: postgres
    credentials: {{ user: app, password_env: PW }}
{extra}"
            )
        };
        for m in [
            "10.0.0.0/8:5432",
            "127.0.0.0/8:5432",
            "[::/0]:5432",
            "[fd00::/64]:5432",
        ] {
            for refused in [
                "",
                "    tls: verify-full\n",
                "    tls: require\n    server_name: db.internal\n",
            ] {
                let err = Config::parse(&with(m, refused), "f")
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains("targets[0].upstream") && err.contains("server_name"),
                    "{m} {refused}: {err}"
                );
            }
            for ok in [
                "    upstream: 10.1.2.3:5432\n",
                "    tls: verify-full\n    server_name: db.internal\n",
            ] {
                Config::parse(&with(m, ok), "f").unwrap_or_else(|e| panic!("{m} {ok}: {e}"));
            }
        }
        // Single addresses name the server the operator meant.
        for m in [
            "10.1.2.3:5432",
            "127.0.0.1:5432",
            "[::1]:5432",
            "10.1.2.3/32:5432",
            "0.0.0.0:5432",
        ] {
            Config::parse(&with(m, ""), "f").unwrap_or_else(|e| panic!("{m}: {e}"));
        }
    }

    #[test]
    fn max_kept_bytes_defaults_to_64_mib_and_a_tiny_one_is_refused() {
        let target = |extra: &str| {
            format!(
                "targets:\n  - name: db\n    match: [\"127.0.0.1:5432\"]\n    protocol: postgres\n    credentials: {{ user: u }}\n{extra}"
            )
        };
        let cfg = Config::parse(&target(""), "f").unwrap();
        assert_eq!(cfg.targets[0].max_kept_bytes, 64 * 1024 * 1024);
        let err = Config::parse(&target("    max_kept_bytes: 100\n"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("targets[0].max_kept_bytes"), "{err}");
        // Less than 4 frames (the default frame cap is 16 MiB).
        let err = Config::parse(&target("    max_kept_bytes: 67108863\n"), "f")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("targets[0].max_kept_bytes") && err.contains("max_frame_bytes"),
            "{err}"
        );
        let cfg = Config::parse(
            &target("    max_frame_bytes: 65536\n    max_kept_bytes: 262144\n"),
            "f",
        )
        .unwrap();
        assert_eq!(cfg.targets[0].max_kept_bytes, 262144);
    }

    #[test]
    fn max_statements_per_query_defaults_to_1000_and_zero_is_refused() {
        let target = |extra: &str| {
            format!(
                "targets:\n  - name: db\n    match: [\"127.0.0.1:5432\"]\n    protocol: postgres\n    credentials: {{ user: u }}\n{extra}"
            )
        };
        let cfg = Config::parse(&target(""), "f").unwrap();
        assert_eq!(cfg.targets[0].max_statements_per_query, 1000);
        let err = Config::parse(&target("    max_statements_per_query: 0\n"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("targets[0].max_statements_per_query"), "{err}");
        let cfg = Config::parse(&target("    max_statements_per_query: 1\n"), "f").unwrap();
        assert_eq!(cfg.targets[0].max_statements_per_query, 1);
        assert_eq!(cfg.targets[0].max_query_bytes, 256 * 1024);
        let err = Config::parse(&target("    max_query_bytes: 100\n"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("targets[0].max_query_bytes"), "{err}");
    }

    #[test]
    fn event_limits_default_and_a_zero_burst_is_refused() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert_eq!(cfg.events, crate::session::limit::EventLimits::default());
        let err = Config::parse("events: {burst: 0}\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("events.burst"), "{err}");
        let cfg = Config::parse("events: {per_second: 0}\n", "f").unwrap();
        assert_eq!(cfg.events.burst, 100);
        assert_eq!(cfg.events.per_second, 0);
    }

    #[test]
    fn an_event_rate_past_the_cap_is_refused_by_its_key() {
        let cap = crate::session::limit::MAX_PER_SECOND;
        let cfg = Config::parse(&format!("events: {{per_second: {cap}}}\n"), "f").unwrap();
        assert_eq!(cfg.events.per_second, cap);
        let err = Config::parse(&format!("events: {{per_second: {}}}\n", cap + 1), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("events.per_second"), "{err}");
        let err = Config::parse("events: {per_second: 4000000000}\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("events.per_second"), "{err}");
    }

    #[test]
    fn the_session_queue_bound_defaults_and_zero_is_refused_by_its_key() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert_eq!(cfg.sessions.max_queued, 100_000);
        let err = Config::parse("sessions: {max_queued: 0}\n", "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sessions.max_queued"), "{err}");
        let cfg = Config::parse("sessions: {max_queued: 7}\n", "f").unwrap();
        assert_eq!(cfg.sessions.max_queued, 7);
        assert!(Config::parse("sessions: {max_queue: 7}\n", "f").is_err());
    }

    #[test]
    fn an_agents_share_of_the_session_queue_is_checked_by_its_key() {
        let cfg = Config::parse(EMBEDDED_DEFAULT, "default").unwrap();
        assert_eq!(cfg.sessions.max_queued_per_agent, None);
        let cfg =
            Config::parse("sessions: {max_queued: 10, max_queued_per_agent: 4}\n", "f").unwrap();
        assert_eq!(cfg.sessions.max_queued_per_agent, Some(4));
        for bad in [
            "sessions: {max_queued_per_agent: 0}\n",
            "sessions: {max_queued: 10, max_queued_per_agent: 11}\n",
        ] {
            let err = Config::parse(bad, "f").unwrap_err().to_string();
            assert!(
                err.contains("sessions.max_queued_per_agent"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn refuses_root_cgroup_and_self_target() {
        let bad = "agents:\n  - name: a\n    cgroup: /\n";
        assert!(
            Config::parse(bad, "f")
                .unwrap_err()
                .to_string()
                .contains("agents[0].cgroup")
        );
        let bad = "targets:\n  - name: me\n    match: [\"127.0.0.1:15001\"]\n    protocol: tcp\n";
        assert!(
            Config::parse(bad, "f")
                .unwrap_err()
                .to_string()
                .contains("enforcer's own listener")
        );
        assert!(normalize_cgroup("a/../b").is_err());
        assert_eq!(normalize_cgroup("/a//b/").unwrap(), "a/b");
    }

    #[test]
    fn ids_are_one_based_and_targets_filtered() {
        let text = "targets:\n  - {name: a, match: [\"127.0.0.1:1\"], protocol: tcp}\n  - {name: b, match: [\"127.0.0.1:2\"], protocol: tcp}\nagents:\n  - {name: x, cgroup: g/x, targets: [b]}\n  - {name: y, cgroup: g/y, targets: [\"*\"]}\n";
        let cfg = Config::parse(text, "f").unwrap();
        assert_eq!(cfg.agent_id("y"), Some(2));
        assert_eq!(cfg.agent_by_id(1).unwrap().name, "x");
        assert!(cfg.agent_by_id(0).is_none());
        let x = cfg.agent("x").unwrap();
        let ids: Vec<u32> = cfg.targets_of(x).map(|(id, _)| id).collect();
        assert_eq!(ids, vec![2]);
        let y = cfg.agent("y").unwrap();
        assert_eq!(cfg.targets_of(y).count(), 2);
    }
}
