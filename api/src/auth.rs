//! Authentication: every call carries `authorization: Bearer <token>`, either an HS256 JWT signed
//! with the configured secret or an API key from the API keys file. Both resolve to the same
//! [`Identity`] (user, account, role, teams), which the interceptor attaches to the request for
//! the handlers' access checks (I2-I4).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, bail};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::error::ApiError;

/// I3: what a caller may do beyond inbox membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Admin,
    SuperAdmin,
}

impl Role {
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "agent" => Some(Role::Agent),
            "admin" => Some(Role::Admin),
            "super_admin" => Some(Role::SuperAdmin),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Admin => "admin",
            Role::SuperAdmin => "super_admin",
        }
    }

    /// Admins and super admins can see every inbox of their account (I3) and configure it.
    pub fn is_admin(self) -> bool {
        matches!(self, Role::Admin | Role::SuperAdmin)
    }
}

/// Who is calling, as established by their token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: String,
    pub account_id: String,
    pub role: Role,
    pub team_ids: Vec<String>,
}

impl Identity {
    /// The identity the interceptor attached; its absence is a wiring bug, reported as
    /// UNAUTHENTICATED rather than a panic.
    pub fn of<T>(request: &Request<T>) -> Result<Identity, ApiError> {
        request
            .extensions()
            .get::<Identity>()
            .cloned()
            .ok_or_else(|| ApiError::Unauthenticated("missing credentials".into()))
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    account: String,
    role: String,
    #[serde(default)]
    teams: Vec<String>,
}

/// The API keys file (`API_KEYS_FILE`): one `[[keys]]` table per key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeysFile {
    #[serde(default)]
    keys: Vec<ApiKeyDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyDecl {
    /// The key itself, or (preferred, so the file holds no usable secret) its SHA-256 in hex.
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    key_sha256: Option<String>,
    user_id: String,
    account: String,
    role: String,
    #[serde(default)]
    teams: Vec<String>,
}

struct AuthenticatorInner {
    jwt_key_opt: Option<DecodingKey>,
    validation: Validation,
    /// By SHA-256 of the key, so lookups never compare raw secrets byte by byte.
    api_keys: HashMap<[u8; 32], Identity>,
}

/// Verifies bearer tokens; also the tonic interceptor that attaches the caller's [`Identity`].
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<AuthenticatorInner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Authenticator")
            .field("jwt", &self.inner.jwt_key_opt.is_some())
            .field("api_keys", &self.inner.api_keys.len())
            .finish()
    }
}

impl Authenticator {
    /// `jwt_secret_opt`: the HS256 secret; `api_keys_toml_opt`: the API keys file's text.
    /// At least one must be given: an API without any way to authenticate is a misconfiguration.
    pub fn new(jwt_secret_opt: Option<&[u8]>, api_keys_toml_opt: Option<&str>) -> anyhow::Result<Authenticator> {
        if let Some(secret) = jwt_secret_opt
            && secret.len() < 32
        {
            bail!("the JWT secret must be at least 32 bytes");
        }
        let mut api_keys = HashMap::new();
        if let Some(text) = api_keys_toml_opt {
            let file: ApiKeysFile = toml::from_str(text).context("API keys file is not valid")?;
            for (index, decl) in file.keys.into_iter().enumerate() {
                let digest: [u8; 32] = match (&decl.key, &decl.key_sha256) {
                    (Some(key), None) if key.len() >= 16 => Sha256::digest(key.as_bytes()).into(),
                    (Some(_), None) => bail!("API key #{index}: keys must be at least 16 characters"),
                    (None, Some(key_sha256)) => {
                        decode_hex_digest(key_sha256).with_context(|| format!("API key #{index}"))?
                    }
                    _ => bail!("API key #{index}: give exactly one of `key` and `key_sha256`"),
                };
                let role = Role::parse(&decl.role)
                    .with_context(|| format!("API key #{index}: unknown role `{}`", decl.role))?;
                if decl.user_id.is_empty() || decl.account.is_empty() {
                    bail!("API key #{index}: user_id and account are required");
                }
                let identity = Identity { user_id: decl.user_id, account_id: decl.account, role, team_ids: decl.teams };
                if api_keys.insert(digest, identity).is_some() {
                    bail!("API key #{index} is listed twice");
                }
            }
        }
        if jwt_secret_opt.is_none() && api_keys.is_empty() {
            bail!("no authentication configured: set API_JWT_SECRET and/or API_KEYS_FILE");
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 30;
        // A token that is not yet valid (`nbf` in the future, beyond the leeway) is refused.
        validation.validate_nbf = true;
        Ok(Authenticator {
            inner: Arc::new(AuthenticatorInner {
                jwt_key_opt: jwt_secret_opt.map(DecodingKey::from_secret),
                validation,
                api_keys,
            }),
        })
    }

    /// The identity behind an `authorization` header value.
    pub fn authenticate(&self, authorization_opt: Option<&str>) -> Result<Identity, ApiError> {
        let Some(authorization) = authorization_opt else {
            return Err(ApiError::Unauthenticated("missing `authorization: Bearer <token>` metadata".into()));
        };
        let token = authorization
            .strip_prefix("Bearer ")
            .or_else(|| authorization.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or_else(|| ApiError::Unauthenticated("authorization must be `Bearer <token>`".into()))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(identity) = self.inner.api_keys.get(&digest) {
            return Ok(identity.clone());
        }
        // A JWT has three dot-separated parts; anything else was meant as an API key.
        let Some(key) = self.inner.jwt_key_opt.as_ref().filter(|_| token.matches('.').count() == 2) else {
            return Err(ApiError::Unauthenticated("unknown API key".into()));
        };
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.inner.validation)
            .map_err(|error| {
                use jsonwebtoken::errors::ErrorKind;
                let reason = match error.kind() {
                    ErrorKind::ExpiredSignature => "token expired",
                    ErrorKind::ImmatureSignature => "token not yet valid (nbf is in the future)",
                    ErrorKind::InvalidSignature => "token signature is invalid",
                    ErrorKind::MissingRequiredClaim(_) => "token lacks a required claim (exp, sub)",
                    ErrorKind::InvalidAlgorithm => "token must be signed with HS256",
                    _ => "token is not a valid JWT",
                };
                ApiError::Unauthenticated(reason.into())
            })?
            .claims;
        let role = Role::parse(&claims.role)
            .ok_or_else(|| ApiError::Unauthenticated(format!("token role `{}` is not a known role", claims.role)))?;
        if claims.sub.is_empty() || claims.account.is_empty() {
            return Err(ApiError::Unauthenticated("token `sub` and `account` must not be empty".into()));
        }
        Ok(Identity { user_id: claims.sub, account_id: claims.account, role, team_ids: claims.teams })
    }
}

fn decode_hex_digest(hex_digest: &str) -> anyhow::Result<[u8; 32]> {
    if hex_digest.len() != 64 {
        bail!("key_sha256 must be 64 hex digits");
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut digest).context("key_sha256 must be hex")?;
    Ok(digest)
}

impl Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let authorization_opt = request.metadata().get("authorization").and_then(|value| value.to_str().ok());
        let identity = self.authenticate(authorization_opt)?;
        tracing::Span::current().record("user", identity.user_id.as_str());
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// Signs a token for `identity` valid for `ttl` (tests, the demo and the benchmark mint tokens
/// this way; production tokens come from the identity provider sharing the secret).
pub fn mint_token(secret: &[u8], identity: &Identity, ttl: std::time::Duration) -> anyhow::Result<String> {
    let expires = chrono::Utc::now().timestamp() + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
    let claims = serde_json::json!({
        "sub": identity.user_id,
        "account": identity.account_id,
        "role": identity.role.name(),
        "teams": identity.team_ids,
        "exp": expires,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .context("failed to sign token")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn ana() -> Identity {
        Identity { user_id: "ana".into(), account_id: "demo".into(), role: Role::Agent, team_ids: vec!["t1".into()] }
    }

    #[test]
    fn a_valid_jwt_yields_its_identity() {
        let auth = Authenticator::new(Some(SECRET), None).unwrap();
        let token = mint_token(SECRET, &ana(), Duration::from_secs(60)).unwrap();
        assert_eq!(auth.authenticate(Some(&format!("Bearer {token}"))).unwrap(), ana());
    }

    #[test]
    fn missing_malformed_forged_and_expired_tokens_are_unauthenticated() {
        let auth = Authenticator::new(Some(SECRET), None).unwrap();
        let forged = mint_token(b"another-secret-another-secret-xx", &ana(), Duration::from_secs(60)).unwrap();
        let expired = {
            let claims = serde_json::json!({"sub": "ana", "account": "demo", "role": "agent", "exp": 1_000});
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let bad_role = {
            let claims = serde_json::json!({"sub": "ana", "account": "demo", "role": "root", "exp": 9_999_999_999_i64});
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let not_yet_valid = {
            let claims = serde_json::json!({
                "sub": "ana", "account": "demo", "role": "agent",
                "exp": 9_999_999_999_i64, "nbf": 9_999_999_000_i64,
            });
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        let error = auth.authenticate(Some(&format!("Bearer {not_yet_valid}"))).unwrap_err();
        assert!(error.to_string().contains("not yet valid"), "{error}");
        for header in [
            None,
            Some(format!("Bearer {not_yet_valid}")),
            Some("Basic abc".to_owned()),
            Some("Bearer ".to_owned()),
            Some(format!("Bearer {forged}")),
            Some(format!("Bearer {expired}")),
            Some(format!("Bearer {bad_role}")),
            Some("Bearer not-a-known-api-key".to_owned()),
        ] {
            let error = auth.authenticate(header.as_deref()).unwrap_err();
            assert!(matches!(error, ApiError::Unauthenticated(_)), "{header:?}: {error}");
        }
    }

    #[test]
    fn api_keys_from_the_file_map_to_identities_by_plain_key_or_digest() {
        let digest: String =
            Sha256::digest(b"sk_test_second_key_1234").iter().map(|byte| format!("{byte:02x}")).collect();
        let file = format!(
            r#"
            [[keys]]
            key = "sk_test_first_key_12345"
            user_id = "bot"
            account = "demo"
            role = "admin"

            [[keys]]
            key_sha256 = "{digest}"
            user_id = "reporter"
            account = "demo"
            role = "agent"
            teams = ["support"]
            "#
        );
        let auth = Authenticator::new(None, Some(&file)).unwrap();
        let bot = auth.authenticate(Some("Bearer sk_test_first_key_12345")).unwrap();
        assert_eq!((bot.user_id.as_str(), bot.role), ("bot", Role::Admin));
        let reporter = auth.authenticate(Some("Bearer sk_test_second_key_1234")).unwrap();
        assert_eq!(reporter.team_ids, ["support"]);
        assert!(auth.authenticate(Some("Bearer sk_test_unknown_key_000")).is_err());
    }

    #[test]
    fn misconfiguration_is_refused_at_start() {
        assert!(Authenticator::new(None, None).is_err());
        assert!(Authenticator::new(Some(b"short"), None).is_err());
        let bad_role =
            "[[keys]]\nkey = \"sk_test_first_key_12345\"\nuser_id = \"u\"\naccount = \"a\"\nrole = \"root\"\n";
        assert!(Authenticator::new(None, Some(bad_role)).is_err());
    }
}
