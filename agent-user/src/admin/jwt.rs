//! Verification of the bearer tokens (JWT, RFC 7519) that authenticate callers of the HTTP admin
//! API.
//!
//! A [`Verifier`] is built once from the validated [`JwtConfig`]: the HS256 secret, the PEM public
//! key or the JWKS file is read at start-up and never fetched again. It accepts exactly the
//! configured algorithm (a token's `alg` header never chooses the key type, so an HS256 token
//! signed with a public key is refused, and so is `none`), requires `exp` and a non-empty `sub`,
//! checks `nbf` when present and `iss`/`aud` when configured. It knows nothing of HTTP: the
//! listener in `admin::http` finds the token and turns a refusal into a 401.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{JwtAlgorithm, JwtConfig};

/// RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
pub const MIN_HS256_SECRET_LEN: usize = 32;

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    // Loading the key material.
    #[error("JWT key file {path}: {source}")]
    ReadKeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("JWT key file {path}: {reason}")]
    BadKeyFile { path: PathBuf, reason: String },
    #[error(
        "JWT secret file {path}: the secret is {len} bytes; HS256 needs at least {MIN_HS256_SECRET_LEN}"
    )]
    WeakSecret { path: PathBuf, len: usize },
    #[error("JWKS file {path}: no key usable for {algorithm:?}")]
    NoUsableKey {
        path: PathBuf,
        algorithm: JwtAlgorithm,
    },
    #[error("JWKS file {path}: two keys share kid `{kid}`")]
    DuplicateKid { path: PathBuf, kid: String },
    #[error("JWT configuration: {0}")]
    Config(&'static str),

    // Verifying a token.
    #[error("missing bearer token")]
    MissingToken,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("token algorithm {got:?} refused: only {expected:?} is accepted")]
    WrongAlgorithm { expected: Algorithm, got: Algorithm },
    #[error("token header marks extensions critical ({0}); none are supported")]
    CriticalExtension(String),
    #[error("token has no kid and the JWKS holds several keys")]
    MissingKid,
    #[error("token kid `{0}` names no usable key")]
    UnknownKid(String),
    #[error("bad token signature")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf)")]
    NotYetValid,
    #[error("token lacks the required `{0}` claim")]
    MissingClaim(String),
    #[error("token claim `{0}` has the wrong type")]
    BadClaim(String),
    #[error("token issuer refused")]
    WrongIssuer,
    #[error("token audience refused")]
    WrongAudience,
    #[error("token has no subject (`sub` missing or empty)")]
    MissingSub,
    #[error("token issued in the future (iat)")]
    IssuedInFuture,
    #[error(
        "token lifetime (exp - iat) exceeds admin.http.max_token_lifetime ({}s)",
        .0.as_secs()
    )]
    LifetimeTooLong(Duration),
}

/// Where the verifying key comes from.
enum Keys {
    /// HS256 secret or PEM public key: one key, the token's `kid` is ignored.
    Single(DecodingKey),
    /// JWKS: keys picked by `kid`; `lone` is the key a token without `kid` may use, set when the
    /// set holds exactly one usable key.
    Set {
        by_kid: HashMap<String, DecodingKey>,
        lone: Option<DecodingKey>,
    },
}

pub struct Verifier {
    algorithm: Algorithm,
    keys: Keys,
    validation: Validation,
    /// The longest `exp - iat` (`exp - now` without `iat`) accepted.
    max_lifetime: Option<Duration>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Single(_) => "single key".to_string(),
            Keys::Set { by_kid, lone } => {
                format!("JWKS ({} by kid, lone: {})", by_kid.len(), lone.is_some())
            }
        };
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

/// The claims read after the signature and the registered claims have been checked.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    /// Required and checked by the library; read again for the lifetime.
    #[serde(default)]
    exp: Option<f64>,
    #[serde(default)]
    iat: Option<f64>,
}

impl Verifier {
    /// Reads the key material named by `cfg` (validated at config load: exactly one source fits
    /// the algorithm).
    pub fn from_config(cfg: &JwtConfig) -> Result<Verifier, JwtError> {
        let algorithm = match cfg.algorithm {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
        };
        let keys = match (
            cfg.algorithm,
            &cfg.secret_file,
            &cfg.public_key_file,
            &cfg.jwks_file,
        ) {
            (JwtAlgorithm::HS256, Some(path), None, None) => Keys::Single(load_secret(path)?),
            (JwtAlgorithm::RS256 | JwtAlgorithm::ES256, None, Some(path), None) => {
                Keys::Single(load_pem(path, cfg.algorithm)?)
            }
            (JwtAlgorithm::RS256 | JwtAlgorithm::ES256, None, None, Some(path)) => {
                load_jwks(path, cfg.algorithm)?
            }
            _ => {
                return Err(JwtError::Config(
                    "HS256 takes a secret_file; RS256 and ES256 take one of public_key_file or jwks_file",
                ));
            }
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = cfg.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // RFC 7519 4.1.3: a token carrying an `aud` is refused unless it names us, so with no
        // audience configured any token with an `aud` is refused (the library's default).
        validation.validate_aud = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if let Some(aud) = &cfg.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            algorithm,
            keys,
            validation,
            max_lifetime: None,
        })
    }

    /// Refuses tokens that live longer than `max` (`admin.http.max_token_lifetime`): a leaked
    /// token is good only for so long, whatever its issuer wrote.
    pub fn with_max_lifetime(mut self, max: Option<Duration>) -> Verifier {
        self.max_lifetime = max;
        self
    }

    /// Verifies `token` (the compact JWS, without `Bearer `) and returns its `sub`.
    pub fn verify(&self, token: &str) -> Result<String, JwtError> {
        if token.is_empty() {
            return Err(JwtError::MissingToken);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.into_kind() {
            JwtErrorKind::Json(e) => JwtError::Malformed(format!("header: {e}")),
            other => JwtError::Malformed(format!("header: {other:?}")),
        })?;
        if header.alg != self.algorithm {
            return Err(JwtError::WrongAlgorithm {
                expected: self.algorithm,
                got: header.alg,
            });
        }
        if let Some(crit) = header.crit.as_ref().filter(|c| !c.is_empty()) {
            return Err(JwtError::CriticalExtension(crit.join(", ")));
        }
        let key = match &self.keys {
            Keys::Single(key) => key,
            Keys::Set { by_kid, lone } => match header.kid.as_deref() {
                Some(kid) => by_kid
                    .get(kid)
                    .ok_or_else(|| JwtError::UnknownKid(kid.to_string()))?,
                None => lone.as_ref().ok_or(JwtError::MissingKid)?,
            },
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| token_error(e.into_kind()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        if let Some(iat) = data.claims.iat
            && iat > now + self.validation.leeway as f64
        {
            return Err(JwtError::IssuedInFuture);
        }
        if let (Some(max), Some(exp)) = (self.max_lifetime, data.claims.exp) {
            let from = data.claims.iat.unwrap_or(now);
            if exp - from > max.as_secs_f64() {
                return Err(JwtError::LifetimeTooLong(max));
            }
        }
        match data.claims.sub {
            Some(sub) if !sub.trim().is_empty() => Ok(sub),
            _ => Err(JwtError::MissingSub),
        }
    }
}

fn token_error(kind: JwtErrorKind) -> JwtError {
    match kind {
        JwtErrorKind::InvalidSignature => JwtError::BadSignature,
        JwtErrorKind::ExpiredSignature => JwtError::Expired,
        JwtErrorKind::ImmatureSignature => JwtError::NotYetValid,
        JwtErrorKind::InvalidIssuer => JwtError::WrongIssuer,
        JwtErrorKind::InvalidAudience => JwtError::WrongAudience,
        JwtErrorKind::MissingRequiredClaim(c) if c == "sub" => JwtError::MissingSub,
        JwtErrorKind::MissingRequiredClaim(c) => JwtError::MissingClaim(c),
        JwtErrorKind::InvalidClaimFormat(c) => JwtError::BadClaim(c),
        JwtErrorKind::Json(e) => JwtError::Malformed(format!("claims: {e}")),
        JwtErrorKind::Base64(e) => JwtError::Malformed(format!("base64: {e}")),
        JwtErrorKind::Utf8(e) => JwtError::Malformed(format!("utf-8: {e}")),
        // The verifier refuses a signature that does not even parse (wrong length for ES256).
        JwtErrorKind::InvalidEcdsaKey | JwtErrorKind::InvalidRsaKey(_) => JwtError::BadSignature,
        other => JwtError::Malformed(format!("{other:?}")),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, JwtError> {
    std::fs::read(path).map_err(|source| JwtError::ReadKeyFile {
        path: path.into(),
        source,
    })
}

fn bad(path: &Path, reason: impl Into<String>) -> JwtError {
    JwtError::BadKeyFile {
        path: path.into(),
        reason: reason.into(),
    }
}

/// The whole file is the secret, minus one trailing newline (`echo ... > file`).
fn load_secret(path: &Path) -> Result<DecodingKey, JwtError> {
    warn_if_readable_by_others(path);
    let mut secret = read(path)?;
    if secret.last() == Some(&b'\n') {
        secret.pop();
        if secret.last() == Some(&b'\r') {
            secret.pop();
        }
    }
    if secret.len() < MIN_HS256_SECRET_LEN {
        return Err(JwtError::WeakSecret {
            path: path.into(),
            len: secret.len(),
        });
    }
    Ok(DecodingKey::from_secret(&secret))
}

fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the admin JWT secret file is readable by group or others; chmod 600 it"
        );
    }
}

fn load_pem(path: &Path, algorithm: JwtAlgorithm) -> Result<DecodingKey, JwtError> {
    let pem = read(path)?;
    let key = match algorithm {
        JwtAlgorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
        JwtAlgorithm::ES256 => DecodingKey::from_ec_pem(&pem),
        JwtAlgorithm::HS256 => return Err(bad(path, "HS256 takes no public key")),
    };
    let key = key.map_err(|e| bad(path, format!("not a {algorithm:?} public key in PEM: {e}")))?;
    check_key(&key, algorithm).map_err(|reason| bad(path, reason))?;
    Ok(key)
}

/// Builds the verifier for `key` once, so a key the crypto backend cannot use (an EC point off
/// the curve) is refused at start-up rather than turning every token into a bad signature.
fn check_key(key: &DecodingKey, algorithm: JwtAlgorithm) -> Result<(), String> {
    let alg = match algorithm {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
    };
    jsonwebtoken::crypto::verify("AA", b"probe", key, alg)
        .map(drop)
        .map_err(|e| format!("unusable {algorithm:?} key: {e}"))
}

/// A JWKS document. Keys are parsed one by one so that keys this verifier cannot use (other key
/// types, encryption keys) do not make the whole set unreadable.
#[derive(Deserialize)]
struct RawJwkSet {
    keys: Vec<serde_json::Value>,
}

fn load_jwks(path: &Path, algorithm: JwtAlgorithm) -> Result<Keys, JwtError> {
    let raw: RawJwkSet = serde_json::from_slice(&read(path)?)
        .map_err(|e| bad(path, format!("not a JWKS document: {e}")))?;
    let mut by_kid = HashMap::new();
    let mut usable = Vec::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            tracing::debug!(path = %path.display(), index = i, "JWKS key skipped: unsupported");
            continue;
        };
        if !fits(&jwk, algorithm) {
            continue;
        }
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|e| bad(path, format!("key {i}: unreadable: {e}")))?;
        check_key(&key, algorithm).map_err(|reason| bad(path, format!("key {i}: {reason}")))?;
        match jwk.common.key_id {
            Some(kid) => {
                if by_kid.insert(kid.clone(), key.clone()).is_some() {
                    return Err(JwtError::DuplicateKid {
                        path: path.into(),
                        kid,
                    });
                }
                usable.push(key);
            }
            None => usable.push(key),
        }
    }
    if usable.is_empty() {
        return Err(JwtError::NoUsableKey {
            path: path.into(),
            algorithm,
        });
    }
    let lone = (usable.len() == 1).then(|| usable.pop()).flatten();
    Ok(Keys::Set { by_kid, lone })
}

/// Whether a JWK may verify tokens of `algorithm`: its key type and curve fit, its `alg` (when
/// set) is that algorithm, and its `use`/`key_ops` (when set) allow verifying signatures.
fn fits(jwk: &Jwk, algorithm: JwtAlgorithm) -> bool {
    use jsonwebtoken::jwk::KeyAlgorithm;
    let (kty_fits, alg) = match (algorithm, &jwk.algorithm) {
        (JwtAlgorithm::RS256, AlgorithmParameters::RSA(_)) => (true, KeyAlgorithm::RS256),
        (JwtAlgorithm::ES256, AlgorithmParameters::EllipticCurve(p)) => {
            (p.curve == EllipticCurve::P256, KeyAlgorithm::ES256)
        }
        _ => return false,
    };
    let alg_fits = jwk.common.key_algorithm.is_none_or(|a| a == alg);
    let use_fits = jwk
        .common
        .public_key_use
        .as_ref()
        .is_none_or(|u| *u == PublicKeyUse::Signature);
    let ops_fit = jwk
        .common
        .key_operations
        .as_ref()
        .is_none_or(|ops| ops.contains(&KeyOperations::Verify));
    kty_fits && alg_fits && use_fits && ops_fit
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use std::time::{SystemTime, UNIX_EPOCH};

    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"test-only-hs256-secret-0123456789abcdef";
    const RSA_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/jwt/test-only-rsa-private.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../../tests/fixtures/jwt/test-only-ec-private.pem");

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/jwt")
            .join(name)
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn config(algorithm: JwtAlgorithm) -> JwtConfig {
        JwtConfig {
            algorithm,
            secret_file: None,
            public_key_file: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 0,
        }
    }

    /// A secret file in a fresh temp dir (removed when the guard drops).
    struct TempSecret(PathBuf);

    impl TempSecret {
        fn new(contents: &[u8]) -> TempSecret {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "agentgate-jwt-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("secret");
            std::fs::write(&path, contents).unwrap();
            TempSecret(path)
        }
    }

    impl Drop for TempSecret {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn hs256(contents: &[u8]) -> (Verifier, TempSecret) {
        let file = TempSecret::new(contents);
        let mut cfg = config(JwtAlgorithm::HS256);
        cfg.secret_file = Some(file.0.clone());
        (Verifier::from_config(&cfg).unwrap(), file)
    }

    fn sign(
        alg: Algorithm,
        kid: Option<&str>,
        key: &EncodingKey,
        claims: serde_json::Value,
    ) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, &claims, key).unwrap()
    }

    fn hs(claims: serde_json::Value) -> String {
        sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(SECRET),
            claims,
        )
    }

    fn rs(kid: Option<&str>, claims: serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        sign(Algorithm::RS256, kid, &key, claims)
    }

    fn es(kid: Option<&str>, claims: serde_json::Value) -> String {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE).unwrap();
        sign(Algorithm::ES256, kid, &key, claims)
    }

    fn good() -> serde_json::Value {
        json!({"sub": "alice", "exp": now() + 300})
    }

    /// base64url without padding, for hand-built tokens.
    fn b64(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn hs256_good_token_gives_its_subject() {
        let (v, _f) = hs256(SECRET);
        assert_eq!(v.verify(&hs(good())).unwrap(), "alice");
    }

    #[test]
    fn hs256_secret_file_trailing_newline_is_not_part_of_the_secret() {
        let mut contents = SECRET.to_vec();
        contents.push(b'\n');
        let (v, _f) = hs256(&contents);
        assert_eq!(v.verify(&hs(good())).unwrap(), "alice");
    }

    #[test]
    fn hs256_short_secret_is_refused_at_load() {
        let file = TempSecret::new(b"too-short");
        let mut cfg = config(JwtAlgorithm::HS256);
        cfg.secret_file = Some(file.0.clone());
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::WeakSecret { len: 9, .. }), "{err}");
    }

    #[test]
    fn missing_key_file_is_named() {
        let mut cfg = config(JwtAlgorithm::HS256);
        cfg.secret_file = Some("/nonexistent/agentgate-secret".into());
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::ReadKeyFile { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/agentgate-secret"));
    }

    #[test]
    fn a_token_issued_in_the_future_is_refused() {
        let (v, _f) = hs256(SECRET);
        let ahead = hs(json!({"sub": "alice", "iat": now() + 3600, "exp": now() + 7200}));
        assert!(matches!(v.verify(&ahead), Err(JwtError::IssuedInFuture)));
        // Within the leeway (clock skew), and in the past, it is fine.
        let mut cfg = config(JwtAlgorithm::HS256);
        let file = TempSecret::new(SECRET);
        cfg.secret_file = Some(file.0.clone());
        cfg.leeway_secs = 60;
        let lenient = Verifier::from_config(&cfg).unwrap();
        let skewed = hs(json!({"sub": "alice", "iat": now() + 30, "exp": now() + 300}));
        assert_eq!(lenient.verify(&skewed).unwrap(), "alice");
        let past = hs(json!({"sub": "alice", "iat": now() - 30, "exp": now() + 300}));
        assert_eq!(v.verify(&past).unwrap(), "alice");
    }

    #[test]
    fn a_token_living_longer_than_the_maximum_is_refused() {
        let (v, _f) = hs256(SECRET);
        let v = v.with_max_lifetime(Some(Duration::from_secs(24 * 3600)));
        let year = now() + 365 * 24 * 3600;
        // exp - iat too long, though exp is in the future.
        let long = hs(json!({"sub": "alice", "iat": now() - 10, "exp": year}));
        assert!(matches!(v.verify(&long), Err(JwtError::LifetimeTooLong(_))));
        // Without iat, exp - now counts.
        let no_iat = hs(json!({"sub": "alice", "exp": year}));
        assert!(matches!(
            v.verify(&no_iat),
            Err(JwtError::LifetimeTooLong(_))
        ));
        let day = hs(json!({"sub": "alice", "iat": now(), "exp": now() + 3600}));
        assert_eq!(v.verify(&day).unwrap(), "alice");
        // Off: any lifetime.
        let (any, _g) = hs256(SECRET);
        assert_eq!(any.verify(&no_iat).unwrap(), "alice");
    }

    #[test]
    fn hs256_wrong_secret_is_a_bad_signature() {
        let (v, _f) = hs256(SECRET);
        let other = EncodingKey::from_secret(b"another-secret-of-sufficient-length-xx");
        let token = sign(Algorithm::HS256, None, &other, good());
        assert!(matches!(v.verify(&token), Err(JwtError::BadSignature)));
    }

    #[test]
    fn tampered_claims_are_a_bad_signature() {
        let (v, _f) = hs256(SECRET);
        let token = hs(good());
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = b64(json!({"sub": "mallory", "exp": now() + 300})
            .to_string()
            .as_bytes());
        parts[1] = &forged;
        assert!(matches!(
            v.verify(&parts.join(".")),
            Err(JwtError::BadSignature)
        ));
    }

    #[test]
    fn expired_token_is_refused_beyond_the_leeway() {
        let (v, _f) = hs256(SECRET);
        let token = hs(json!({"sub": "alice", "exp": now() - 120}));
        assert!(matches!(v.verify(&token), Err(JwtError::Expired)));

        let file = TempSecret::new(SECRET);
        let mut cfg = config(JwtAlgorithm::HS256);
        cfg.secret_file = Some(file.0.clone());
        cfg.leeway_secs = 600;
        let lenient = Verifier::from_config(&cfg).unwrap();
        assert_eq!(lenient.verify(&token).unwrap(), "alice");
    }

    #[test]
    fn not_before_in_the_future_is_refused() {
        let (v, _f) = hs256(SECRET);
        let token = hs(json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300}));
        assert!(matches!(v.verify(&token), Err(JwtError::NotYetValid)));
        let token = hs(json!({"sub": "alice", "exp": now() + 600, "nbf": now() - 10}));
        assert_eq!(v.verify(&token).unwrap(), "alice");
    }

    #[test]
    fn missing_exp_is_refused() {
        let (v, _f) = hs256(SECRET);
        let token = hs(json!({"sub": "alice"}));
        match v.verify(&token) {
            Err(JwtError::MissingClaim(c)) => assert_eq!(c, "exp"),
            other => panic!("expected a missing exp, got {other:?}"),
        }
    }

    #[test]
    fn non_numeric_exp_is_refused() {
        let (v, _f) = hs256(SECRET);
        let token = hs(json!({"sub": "alice", "exp": "tomorrow"}));
        assert!(v.verify(&token).is_err());
    }

    #[test]
    fn missing_or_empty_sub_is_refused() {
        let (v, _f) = hs256(SECRET);
        for claims in [
            json!({"exp": now() + 300}),
            json!({"sub": "", "exp": now() + 300}),
            json!({"sub": "  ", "exp": now() + 300}),
        ] {
            assert!(
                matches!(v.verify(&hs(claims.clone())), Err(JwtError::MissingSub)),
                "{claims}"
            );
        }
    }

    #[test]
    fn issuer_and_audience_are_enforced_when_configured() {
        let file = TempSecret::new(SECRET);
        let mut cfg = config(JwtAlgorithm::HS256);
        cfg.secret_file = Some(file.0.clone());
        cfg.issuer = Some("https://idp.example".into());
        cfg.audience = Some("agentgate".into());
        let v = Verifier::from_config(&cfg).unwrap();
        let exp = now() + 300;
        let ok =
            json!({"sub": "alice", "exp": exp, "iss": "https://idp.example", "aud": "agentgate"});
        assert_eq!(v.verify(&hs(ok)).unwrap(), "alice");
        let aud_list = json!({"sub": "alice", "exp": exp, "iss": "https://idp.example", "aud": ["x", "agentgate"]});
        assert_eq!(v.verify(&hs(aud_list)).unwrap(), "alice");

        let wrong_iss =
            json!({"sub": "alice", "exp": exp, "iss": "https://evil.example", "aud": "agentgate"});
        assert!(matches!(
            v.verify(&hs(wrong_iss)),
            Err(JwtError::WrongIssuer)
        ));
        let wrong_aud =
            json!({"sub": "alice", "exp": exp, "iss": "https://idp.example", "aud": "other"});
        assert!(matches!(
            v.verify(&hs(wrong_aud)),
            Err(JwtError::WrongAudience)
        ));
        let no_iss = json!({"sub": "alice", "exp": exp, "aud": "agentgate"});
        assert!(matches!(v.verify(&hs(no_iss)), Err(JwtError::MissingClaim(c)) if c == "iss"));
        let no_aud = json!({"sub": "alice", "exp": exp, "iss": "https://idp.example"});
        assert!(matches!(v.verify(&hs(no_aud)), Err(JwtError::MissingClaim(c)) if c == "aud"));
    }

    #[test]
    fn hs256_config_refuses_other_algorithms() {
        let (v, _f) = hs256(SECRET);
        let token = rs(None, good());
        assert!(matches!(
            v.verify(&token),
            Err(JwtError::WrongAlgorithm {
                expected: Algorithm::HS256,
                got: Algorithm::RS256
            })
        ));
        let hs384 = sign(
            Algorithm::HS384,
            None,
            &EncodingKey::from_secret(SECRET),
            good(),
        );
        assert!(matches!(
            v.verify(&hs384),
            Err(JwtError::WrongAlgorithm { .. })
        ));
    }

    /// The classic confusion: an HS256 token whose HMAC key is the server's RSA public key.
    #[test]
    fn rs256_config_refuses_hs256_signed_with_the_public_key() {
        let mut cfg = config(JwtAlgorithm::RS256);
        cfg.public_key_file = Some(fixture("test-only-rsa-public.pem"));
        let v = Verifier::from_config(&cfg).unwrap();
        let public_pem = std::fs::read(fixture("test-only-rsa-public.pem")).unwrap();
        let token = sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(&public_pem),
            good(),
        );
        assert!(matches!(
            v.verify(&token),
            Err(JwtError::WrongAlgorithm {
                expected: Algorithm::RS256,
                got: Algorithm::HS256
            })
        ));
    }

    #[test]
    fn alg_none_is_refused() {
        let (v, _f) = hs256(SECRET);
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let claims = b64(good().to_string().as_bytes());
        for token in [format!("{header}.{claims}."), format!("{header}.{claims}")] {
            assert!(
                matches!(v.verify(&token), Err(JwtError::Malformed(_))),
                "{token}"
            );
        }
    }

    #[test]
    fn critical_header_extensions_are_refused() {
        let (v, _f) = hs256(SECRET);
        let mut header = Header::new(Algorithm::HS256);
        header.crit = Some(vec!["exp-ext".into()]);
        let token = encode(&header, &good(), &EncodingKey::from_secret(SECRET)).unwrap();
        assert!(matches!(
            v.verify(&token),
            Err(JwtError::CriticalExtension(_))
        ));
    }

    #[test]
    fn garbage_and_oversized_tokens_are_malformed() {
        let (v, _f) = hs256(SECRET);
        assert!(matches!(v.verify(""), Err(JwtError::MissingToken)));
        for token in ["abc", "a.b", "a.b.c", "....", "eyJ.eyJ.sig"] {
            assert!(
                matches!(v.verify(token), Err(JwtError::Malformed(_))),
                "{token}"
            );
        }
        let huge = "a".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(v.verify(&huge), Err(JwtError::Malformed(_))));
    }

    #[test]
    fn rs256_with_pem_public_key() {
        let mut cfg = config(JwtAlgorithm::RS256);
        cfg.public_key_file = Some(fixture("test-only-rsa-public.pem"));
        let v = Verifier::from_config(&cfg).unwrap();
        // A PEM key is the only key: a kid, if any, is irrelevant.
        assert_eq!(v.verify(&rs(None, good())).unwrap(), "alice");
        assert_eq!(v.verify(&rs(Some("whatever"), good())).unwrap(), "alice");
        let expired = rs(None, json!({"sub": "alice", "exp": now() - 60}));
        assert!(matches!(v.verify(&expired), Err(JwtError::Expired)));
        // ES256 token against an RS256 config.
        assert!(matches!(
            v.verify(&es(None, good())),
            Err(JwtError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn rs256_wrong_key_is_a_bad_signature() {
        let mut cfg = config(JwtAlgorithm::RS256);
        cfg.public_key_file = Some(fixture("test-only-rsa-public.pem"));
        let v = Verifier::from_config(&cfg).unwrap();
        let token = rs(None, good());
        let (head, _) = token.rsplit_once('.').unwrap();
        // Same length, different bytes.
        let forged = format!("{head}.{}", b64(&[7u8; 256]));
        assert!(matches!(v.verify(&forged), Err(JwtError::BadSignature)));
    }

    #[test]
    fn es256_with_pem_public_key() {
        let mut cfg = config(JwtAlgorithm::ES256);
        cfg.public_key_file = Some(fixture("test-only-ec-public.pem"));
        let v = Verifier::from_config(&cfg).unwrap();
        assert_eq!(v.verify(&es(None, good())).unwrap(), "alice");
        assert!(matches!(
            v.verify(&rs(None, good())),
            Err(JwtError::WrongAlgorithm { .. })
        ));
        let token = es(None, good());
        let (head, _) = token.rsplit_once('.').unwrap();
        let forged = format!("{head}.{}", b64(&[7u8; 64]));
        assert!(matches!(v.verify(&forged), Err(JwtError::BadSignature)));
    }

    #[test]
    fn pem_of_the_wrong_kind_is_refused_at_load() {
        let mut cfg = config(JwtAlgorithm::ES256);
        cfg.public_key_file = Some(fixture("test-only-rsa-public.pem"));
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::BadKeyFile { .. }), "{err}");
    }

    #[test]
    fn jwks_rs256_picks_the_key_by_kid() {
        let mut cfg = config(JwtAlgorithm::RS256);
        cfg.jwks_file = Some(fixture("test-only-jwks.json"));
        let v = Verifier::from_config(&cfg).unwrap();
        assert_eq!(v.verify(&rs(Some("test-rsa-1"), good())).unwrap(), "alice");
        match v.verify(&rs(Some("nope"), good())) {
            Err(JwtError::UnknownKid(kid)) => assert_eq!(kid, "nope"),
            other => panic!("expected an unknown kid, got {other:?}"),
        }
        // The set holds one usable RS256 key, so a token without kid may use it.
        assert_eq!(v.verify(&rs(None, good())).unwrap(), "alice");
    }

    #[test]
    fn jwks_keys_that_do_not_fit_the_algorithm_are_never_used() {
        let mut cfg = config(JwtAlgorithm::RS256);
        cfg.jwks_file = Some(fixture("test-only-jwks.json"));
        let v = Verifier::from_config(&cfg).unwrap();
        // The EC key is in the file but cannot verify RS256 tokens.
        assert!(matches!(
            v.verify(&rs(Some("test-ec-1"), good())),
            Err(JwtError::UnknownKid(_))
        ));
        // The `oct` key is in the file: an HS256 token signed with it is refused by algorithm.
        let oct = EncodingKey::from_secret(b"not-a-key-for-asymmetric-configs");
        let token = sign(Algorithm::HS256, Some("test-oct-1"), &oct, good());
        assert!(matches!(
            v.verify(&token),
            Err(JwtError::WrongAlgorithm { .. })
        ));
    }

    #[test]
    fn jwks_es256_by_kid() {
        let mut cfg = config(JwtAlgorithm::ES256);
        cfg.jwks_file = Some(fixture("test-only-jwks.json"));
        let v = Verifier::from_config(&cfg).unwrap();
        assert_eq!(v.verify(&es(Some("test-ec-1"), good())).unwrap(), "alice");
        assert!(matches!(
            v.verify(&es(Some("test-rsa-1"), good())),
            Err(JwtError::UnknownKid(_))
        ));
    }

    #[test]
    fn jwks_single_key_without_kid() {
        let mut cfg = config(JwtAlgorithm::ES256);
        cfg.jwks_file = Some(fixture("test-only-jwks-single-ec.json"));
        let v = Verifier::from_config(&cfg).unwrap();
        assert_eq!(v.verify(&es(None, good())).unwrap(), "alice");
        assert!(matches!(
            v.verify(&es(Some("test-ec-1"), good())),
            Err(JwtError::UnknownKid(_))
        ));
    }

    #[test]
    fn jwks_ec_point_off_the_curve_is_refused_at_load() {
        let dir = TempSecret::new(b"");
        let path = dir.0.with_file_name("jwks.json");
        let jwks: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("test-only-jwks.json")).unwrap())
                .unwrap();
        let mut ec = jwks["keys"][3].clone();
        ec["y"] = json!(b64(&[1u8; 32]));
        std::fs::write(&path, json!({"keys": [ec]}).to_string()).unwrap();
        let mut cfg = config(JwtAlgorithm::ES256);
        cfg.jwks_file = Some(path);
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::BadKeyFile { .. }), "{err}");
    }

    #[test]
    fn jwks_without_kid_and_several_keys_is_refused() {
        let dir = TempSecret::new(b"");
        let path = dir.0.with_file_name("jwks.json");
        let jwks: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("test-only-jwks.json")).unwrap())
                .unwrap();
        let ec = jwks["keys"][3].clone();
        let mut ec2 = ec.clone();
        ec2["kid"] = json!("test-ec-2");
        std::fs::write(&path, json!({"keys": [ec, ec2]}).to_string()).unwrap();
        let mut cfg = config(JwtAlgorithm::ES256);
        cfg.jwks_file = Some(path);
        let v = Verifier::from_config(&cfg).unwrap();
        assert!(matches!(
            v.verify(&es(None, good())),
            Err(JwtError::MissingKid)
        ));
        assert_eq!(v.verify(&es(Some("test-ec-2"), good())).unwrap(), "alice");
    }

    #[test]
    fn jwks_with_no_usable_key_or_duplicate_kids_is_refused_at_load() {
        let dir = TempSecret::new(b"");
        let path = dir.0.with_file_name("jwks.json");
        let jwks: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture("test-only-jwks.json")).unwrap())
                .unwrap();
        let mut cfg = config(JwtAlgorithm::RS256);
        cfg.jwks_file = Some(path.clone());

        std::fs::write(&path, json!({"keys": [jwks["keys"][3]]}).to_string()).unwrap();
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::NoUsableKey { .. }), "{err}");

        let rsa = jwks["keys"][2].clone();
        std::fs::write(&path, json!({"keys": [rsa, rsa]}).to_string()).unwrap();
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::DuplicateKid { .. }), "{err}");

        let mut enc = rsa.clone();
        enc["use"] = json!("enc");
        std::fs::write(&path, json!({"keys": [enc]}).to_string()).unwrap();
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::NoUsableKey { .. }), "{err}");

        std::fs::write(&path, "not json").unwrap();
        let err = Verifier::from_config(&cfg).unwrap_err();
        assert!(matches!(err, JwtError::BadKeyFile { .. }), "{err}");
    }

    #[test]
    fn errors_never_echo_the_token() {
        let (v, _f) = hs256(SECRET);
        let other = EncodingKey::from_secret(b"another-secret-of-sufficient-length-xx");
        let token = sign(Algorithm::HS256, None, &other, good());
        let msg = v.verify(&token).unwrap_err().to_string();
        let signature = token.rsplit('.').next().unwrap();
        assert!(!msg.contains(signature), "{msg}");
    }
}
