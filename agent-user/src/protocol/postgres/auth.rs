//! Client side of authentication towards the upstream server, as a pure state
//! machine: feed it each decoded `Authentication` request and send what it
//! returns. It supports trust, cleartext password, md5 and SCRAM-SHA-256
//! without channel binding; GSSAPI, SSPI and Kerberos are refused. It does not
//! read or write sockets and does not handle the messages that follow
//! AuthenticationOk (ParameterStatus, BackendKeyData, ReadyForQuery).
//!
//! Flow: <https://www.postgresql.org/docs/15/protocol-flow.html#id-1.10.6.7.3>;
//! SASL: <https://www.postgresql.org/docs/15/sasl-authentication.html>.
//! The password never appears in Debug output or error text.

use std::fmt;

use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};

use super::backend::Authentication;
use super::frontend::FrontendMessage;

/// What the caller must do after feeding one authentication request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthStep {
    /// Send this message to the server, then wait for its next request.
    Send(FrontendMessage),
    /// Nothing to send; wait for the server's next request.
    Wait,
    /// AuthenticationOk received: authentication is complete.
    Done,
}

/// Why upstream authentication cannot proceed. Every error is final.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("server requested {method} authentication but no password is configured")]
    PasswordRequired { method: &'static str },
    #[error("the configured password contains a NUL byte and cannot be sent")]
    InvalidPassword,
    #[error("server offered no supported SASL mechanism (offered: {offered:?})")]
    UnsupportedMechanism { offered: Vec<String> },
    #[error("unsupported authentication method {name} (code {code})")]
    UnsupportedMethod { name: &'static str, code: i32 },
    #[error("expected {expected}, received {received}")]
    UnexpectedMessage {
        expected: &'static str,
        received: &'static str,
    },
    #[error("SCRAM exchange failed: {reason}")]
    Scram { reason: String },
    /// The server proved no knowledge of the password: it may be an impostor.
    #[error("server SCRAM signature does not match")]
    ServerSignatureMismatch,
}

/// postgres-protocol's wording for a failed server-signature check; its
/// errors are plain `io::Error`s, so the text is the only way to tell this
/// case apart. Anything else still fails, as a generic `Scram` error.
const SCRAM_VERIFICATION_ERROR: &str = "SCRAM verification error";

enum State {
    Start,
    AwaitingSaslContinue(Box<ScramSha256>),
    AwaitingSaslFinal(Box<ScramSha256>),
    AwaitingOk,
    Done,
    Failed,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            Self::Start => "Start",
            Self::AwaitingSaslContinue(_) => "AwaitingSaslContinue",
            Self::AwaitingSaslFinal(_) => "AwaitingSaslFinal",
            Self::AwaitingOk => "AwaitingOk",
            Self::Done => "Done",
            Self::Failed => "Failed",
        }
    }

    fn expected(&self) -> &'static str {
        match self {
            Self::Start => "an authentication request",
            Self::AwaitingSaslContinue(_) => "AuthenticationSASLContinue",
            Self::AwaitingSaslFinal(_) => "AuthenticationSASLFinal",
            Self::AwaitingOk => "AuthenticationOk",
            Self::Done | Self::Failed => "no further authentication request",
        }
    }
}

/// Authenticates the proxy to the upstream server as `user`.
pub struct UpstreamAuth {
    user: String,
    password: Option<String>,
    state: State,
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("state", &self.state.name())
            .finish()
    }
}

impl UpstreamAuth {
    /// `user` must be the one sent in the StartupMessage (md5 salts with it).
    /// An empty password counts as none: the server rejects empty passwords.
    pub fn new(user: &str, password: Option<&str>) -> Self {
        Self {
            user: user.to_owned(),
            password: password.filter(|p| !p.is_empty()).map(str::to_owned),
            state: State::Start,
        }
    }

    /// True once AuthenticationOk has been accepted.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn password(&self, method: &'static str) -> Result<&str, AuthError> {
        self.password
            .as_deref()
            .ok_or(AuthError::PasswordRequired { method })
    }

    /// Advances the exchange with the server's next authentication request.
    ///
    /// AuthenticationOk is accepted only where the exchange allows it: in
    /// particular not before a SCRAM exchange has verified the server's
    /// signature, so a server cannot skip proving that it knows the password.
    pub fn on_message(&mut self, request: &Authentication) -> Result<AuthStep, AuthError> {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let (next, step) = match (state, request) {
            (State::Start | State::AwaitingOk, Authentication::Ok) => (State::Done, AuthStep::Done),
            (State::Start, Authentication::CleartextPassword) => {
                let password = self.password("cleartext password")?;
                let msg = FrontendMessage::password(password.as_bytes())
                    .map_err(|_| AuthError::InvalidPassword)?;
                (State::AwaitingOk, AuthStep::Send(msg))
            }
            (State::Start, Authentication::Md5Password { salt }) => {
                let password = self.password("md5")?;
                let hash = md5_hash(self.user.as_bytes(), password.as_bytes(), *salt);
                let msg = FrontendMessage::password(hash.as_bytes())
                    .map_err(|_| AuthError::InvalidPassword)?;
                (State::AwaitingOk, AuthStep::Send(msg))
            }
            (State::Start, Authentication::Sasl { mechanisms }) => {
                if !mechanisms.iter().any(|m| m == SCRAM_SHA_256) {
                    return Err(AuthError::UnsupportedMechanism {
                        offered: mechanisms.clone(),
                    });
                }
                let password = self.password("SCRAM-SHA-256")?;
                // No channel binding: the gs2 header says "n" (client does not
                // support it), which the server accepts for SCRAM-SHA-256.
                let scram = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                let msg =
                    FrontendMessage::sasl_initial_response(SCRAM_SHA_256, Some(scram.message()))
                        .map_err(|e| AuthError::Scram {
                            reason: e.to_string(),
                        })?;
                (
                    State::AwaitingSaslContinue(Box::new(scram)),
                    AuthStep::Send(msg),
                )
            }
            (State::Start, Authentication::Other { code, .. }) => {
                return Err(AuthError::UnsupportedMethod {
                    name: request.name(),
                    code: *code,
                });
            }
            (State::AwaitingSaslContinue(mut scram), Authentication::SaslContinue(data)) => {
                scram.update(data).map_err(|e| AuthError::Scram {
                    reason: e.to_string(),
                })?;
                let msg = FrontendMessage::sasl_response(scram.message());
                (State::AwaitingSaslFinal(scram), AuthStep::Send(msg))
            }
            (State::AwaitingSaslFinal(mut scram), Authentication::SaslFinal(data)) => {
                scram.finish(data).map_err(|e| {
                    let reason = e.to_string();
                    if reason == SCRAM_VERIFICATION_ERROR {
                        AuthError::ServerSignatureMismatch
                    } else {
                        AuthError::Scram { reason }
                    }
                })?;
                (State::AwaitingOk, AuthStep::Wait)
            }
            (state, _) => {
                return Err(AuthError::UnexpectedMessage {
                    expected: state.expected(),
                    received: request.name(),
                });
            }
        };
        self.state = next;
        Ok(step)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    use super::super::frontend::{parse_password, parse_sasl_initial_response};
    use super::*;

    const PASSWORD: &str = "s3cr3t-Pa55";

    fn sent(step: AuthStep) -> Bytes {
        match step {
            AuthStep::Send(FrontendMessage::PasswordMessage(body)) => body.into_bytes(),
            other => panic!("expected a PasswordMessage, got {other:?}"),
        }
    }

    #[test]
    fn trust_is_done_at_once() {
        let mut auth = UpstreamAuth::new("agent", None);
        assert_eq!(auth.on_message(&Authentication::Ok), Ok(AuthStep::Done));
        assert!(auth.is_done());
        assert!(matches!(
            auth.on_message(&Authentication::Ok),
            Err(AuthError::UnexpectedMessage { .. })
        ));
    }

    #[test]
    fn cleartext_sends_the_password() {
        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        let body = sent(auth.on_message(&Authentication::CleartextPassword).unwrap());
        assert_eq!(parse_password(&body).unwrap(), PASSWORD.as_bytes());
        assert_eq!(auth.on_message(&Authentication::Ok), Ok(AuthStep::Done));
    }

    #[test]
    fn missing_or_empty_password_is_reported() {
        for password in [None, Some("")] {
            let mut auth = UpstreamAuth::new("agent", password);
            assert_eq!(
                auth.on_message(&Authentication::CleartextPassword),
                Err(AuthError::PasswordRequired {
                    method: "cleartext password"
                })
            );
        }
        let mut auth = UpstreamAuth::new("agent", None);
        assert!(matches!(
            auth.on_message(&Authentication::Md5Password { salt: [1, 2, 3, 4] }),
            Err(AuthError::PasswordRequired { .. })
        ));
    }

    #[test]
    fn password_with_nul_is_refused() {
        let mut auth = UpstreamAuth::new("agent", Some("a\0b"));
        assert_eq!(
            auth.on_message(&Authentication::CleartextPassword),
            Err(AuthError::InvalidPassword)
        );
    }

    #[test]
    fn md5_matches_known_values() {
        // md5("password" || "user") = 4d45974e...; then md5(hex || salt),
        // computed independently with Python's hashlib.
        let mut auth = UpstreamAuth::new("user", Some("password"));
        let body = sent(
            auth.on_message(&Authentication::Md5Password {
                salt: [0x01, 0x02, 0x03, 0x04],
            })
            .unwrap(),
        );
        assert_eq!(
            parse_password(&body).unwrap(),
            b"md5a3576f1ae039b8996bc4fc2720f9c71a"
        );
        assert_eq!(auth.on_message(&Authentication::Ok), Ok(AuthStep::Done));

        let mut auth = UpstreamAuth::new("postgres", Some("secret"));
        let body = sent(
            auth.on_message(&Authentication::Md5Password {
                salt: [0xde, 0xad, 0xbe, 0xef],
            })
            .unwrap(),
        );
        assert_eq!(
            parse_password(&body).unwrap(),
            b"md5c546d0bbed2af888b328536b45c76348"
        );
    }

    type HmacSha256 = Hmac<Sha256>;

    fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// PBKDF2-HMAC-SHA-256 with one output block: SCRAM's Hi().
    fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut block = salt.to_vec();
        block.extend_from_slice(&1u32.to_be_bytes());
        let mut u = hmac(password, &block);
        let mut out = u;
        for _ in 1..iterations {
            u = hmac(password, &u);
            for (o, x) in out.iter_mut().zip(u) {
                *o ^= x;
            }
        }
        out
    }

    /// The server half of SCRAM-SHA-256 (RFC 5802 / RFC 7677), written from
    /// the RFC independently of postgres-protocol.
    struct ScramServer {
        salted: [u8; 32],
        client_first_bare: String,
        server_first: String,
        nonce: String,
    }

    impl ScramServer {
        fn first(password: &str, initial: &[u8]) -> Self {
            let (mechanism, data) = parse_sasl_initial_response(initial).unwrap();
            assert_eq!(mechanism, "SCRAM-SHA-256");
            let client_first = String::from_utf8(data.unwrap().to_vec()).unwrap();
            let client_first_bare = client_first
                .strip_prefix("n,,")
                .expect("gs2 header without channel binding")
                .to_owned();
            let client_nonce = client_first_bare.strip_prefix("n=,r=").unwrap();
            let nonce = format!("{client_nonce}SeRvErNoNcE");
            let salt = b"agentgate-salt!!";
            let server_first = format!("r={nonce},s={},i=4096", STANDARD.encode(salt));
            Self {
                salted: hi(password.as_bytes(), salt, 4096),
                client_first_bare,
                server_first,
                nonce,
            }
        }

        /// Checks the client's proof and returns the server-final message.
        fn finish(&self, client_final: &[u8]) -> Result<String, &'static str> {
            let client_final = std::str::from_utf8(client_final).unwrap();
            let (without_proof, proof) = client_final.rsplit_once(",p=").unwrap();
            assert_eq!(without_proof, format!("c=biws,r={}", self.nonce));
            let auth_message = format!(
                "{},{},{}",
                self.client_first_bare, self.server_first, without_proof
            );
            let client_key = hmac(&self.salted, b"Client Key");
            let stored_key: [u8; 32] = Sha256::digest(client_key).into();
            let signature = hmac(&stored_key, auth_message.as_bytes());
            let expected: Vec<u8> = client_key
                .iter()
                .zip(signature)
                .map(|(k, s)| k ^ s)
                .collect();
            if STANDARD.decode(proof).unwrap() != expected {
                return Err("invalid-proof");
            }
            let server_key = hmac(&self.salted, b"Server Key");
            let server_signature = hmac(&server_key, auth_message.as_bytes());
            Ok(format!("v={}", STANDARD.encode(server_signature)))
        }
    }

    fn scram_until_final(
        password: &str,
        server_password: &str,
    ) -> (UpstreamAuth, Result<String, &'static str>) {
        let mut auth = UpstreamAuth::new("agent", Some(password));
        let initial = sent(
            auth.on_message(&Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            })
            .unwrap(),
        );
        let server = ScramServer::first(server_password, &initial);
        let client_final = sent(
            auth.on_message(&Authentication::SaslContinue(Bytes::from(
                server.server_first.clone(),
            )))
            .unwrap(),
        );
        let result = server.finish(&client_final);
        (auth, result)
    }

    #[test]
    fn scram_sha_256_against_an_independent_server() {
        let (mut auth, server_final) = scram_until_final(PASSWORD, PASSWORD);
        let server_final = server_final.expect("server accepts the client proof");
        assert_eq!(
            auth.on_message(&Authentication::SaslFinal(Bytes::from(server_final))),
            Ok(AuthStep::Wait)
        );
        assert!(!auth.is_done());
        assert_eq!(auth.on_message(&Authentication::Ok), Ok(AuthStep::Done));
        assert!(auth.is_done());
    }

    #[test]
    fn scram_wrong_password_fails_server_side() {
        let (_, server_final) = scram_until_final("wrong", PASSWORD);
        assert_eq!(server_final, Err("invalid-proof"));
    }

    #[test]
    fn scram_forged_server_signature_is_rejected() {
        let (mut auth, server_final) = scram_until_final(PASSWORD, PASSWORD);
        let mut forged = STANDARD
            .decode(server_final.unwrap().strip_prefix("v=").unwrap())
            .unwrap();
        forged[0] ^= 1;
        let forged = format!("v={}", STANDARD.encode(forged));
        assert_eq!(
            auth.on_message(&Authentication::SaslFinal(Bytes::from(forged))),
            Err(AuthError::ServerSignatureMismatch)
        );
        assert!(matches!(
            auth.on_message(&Authentication::Ok),
            Err(AuthError::UnexpectedMessage { .. })
        ));
    }

    #[test]
    fn scram_server_error_and_bad_nonce_are_reported() {
        let (mut auth, _) = scram_until_final(PASSWORD, PASSWORD);
        assert!(matches!(
            auth.on_message(&Authentication::SaslFinal(Bytes::from_static(
                b"e=invalid-proof"
            ))),
            Err(AuthError::Scram { .. })
        ));

        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        auth.on_message(&Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into()],
        })
        .unwrap();
        let err = auth
            .on_message(&Authentication::SaslContinue(Bytes::from_static(
                b"r=notmynonce,s=c2FsdA==,i=4096",
            )))
            .unwrap_err();
        assert!(matches!(err, AuthError::Scram { .. }), "{err:?}");
    }

    #[test]
    fn ok_before_scram_completes_is_rejected() {
        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        auth.on_message(&Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256".into()],
        })
        .unwrap();
        assert_eq!(
            auth.on_message(&Authentication::Ok),
            Err(AuthError::UnexpectedMessage {
                expected: "AuthenticationSASLContinue",
                received: "AuthenticationOk",
            })
        );
    }

    #[test]
    fn unsupported_mechanisms_and_methods() {
        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        assert_eq!(
            auth.on_message(&Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into()],
            }),
            Err(AuthError::UnsupportedMechanism {
                offered: vec!["SCRAM-SHA-256-PLUS".into()],
            })
        );
        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        assert_eq!(
            auth.on_message(&Authentication::Other {
                code: 7,
                data: Bytes::new(),
            }),
            Err(AuthError::UnsupportedMethod {
                name: "AuthenticationGSS",
                code: 7,
            })
        );
    }

    #[test]
    fn password_never_shows_in_debug_or_errors() {
        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        assert!(!format!("{auth:?}").contains(PASSWORD));
        let step = auth.on_message(&Authentication::CleartextPassword).unwrap();
        assert!(!format!("{step:?}").contains(PASSWORD));
        assert!(!format!("{auth:?}").contains(PASSWORD));
        let err = auth
            .on_message(&Authentication::CleartextPassword)
            .unwrap_err();
        assert!(!format!("{err:?} {err}").contains(PASSWORD));

        let mut auth = UpstreamAuth::new("agent", Some(PASSWORD));
        let step = auth
            .on_message(&Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256".into()],
            })
            .unwrap();
        assert!(!format!("{step:?} {auth:?}").contains(PASSWORD));
    }
}
