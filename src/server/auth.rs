//! Who is calling: bearer tokens, one per agency (and one for the admin),
//! kept as SHA-256 hashes, never in the code.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A department system acting for its agency.
    Agency(String),
    /// An auditor agency: reads every case, moves none.
    Auditor(String),
    /// The operator: deploys workflows, reads everything, moves no case.
    Admin,
}

impl Principal {
    pub fn agency(&self) -> Option<&str> {
        match self {
            Principal::Agency(a) => Some(a),
            _ => None,
        }
    }

    /// Reads every case.
    pub fn reads_all(&self) -> bool {
        matches!(self, Principal::Auditor(_) | Principal::Admin)
    }

    pub fn name(&self) -> &str {
        match self {
            Principal::Agency(a) | Principal::Auditor(a) => a,
            Principal::Admin => ADMIN,
        }
    }
}

/// The name the admin's token is listed under.
pub const ADMIN: &str = "admin";

/// Token hashes → principals, and client-certificate fingerprints →
/// principals (mutual TLS).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    by_hash: HashMap<[u8; 32], Principal>,
    by_certificate: HashMap<[u8; 32], Principal>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("credential for `{0}`: expected `sha256:<64 hex digits>`")]
    BadHash(String),
    #[error("credential for `{0}`: no such agency in the directory")]
    UnknownAgency(String),
    #[error("no random numbers from the operating system: {0}")]
    Random(String),
    #[error(
        "the token of `{0}` is {1}: a token must be at least {MIN_TOKEN_CHARS} characters with no spaces around it (remove the line and restart to have one generated)"
    )]
    WeakToken(String, &'static str),
    #[error(
        "`{0}` and `{1}` have the same token: each must have its own, or one of them could act as the other"
    )]
    SharedToken(String, String),
}

/// The shortest token accepted. Generated ones are 67 characters; a short
/// one (or an empty one left to "revoke" an agency) is easily guessed.
pub const MIN_TOKEN_CHARS: usize = 16;

/// Maps token hashes to principals, refusing a hash two principals share.
fn by_hash(
    hashes: impl IntoIterator<Item = ([u8; 32], Principal)>,
) -> Result<HashMap<[u8; 32], Principal>, CredentialError> {
    let mut by_hash = HashMap::new();
    for (hash, principal) in hashes {
        if let Some(other) = by_hash.insert(hash, principal.clone()) {
            return Err(CredentialError::SharedToken(
                other.name().to_owned(),
                principal.name().to_owned(),
            ));
        }
    }
    Ok(by_hash)
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl Credentials {
    /// From `name → "sha256:<hex>"` (the config file's form).
    pub fn from_hashes(
        hashes: &BTreeMap<String, String>,
        agencies: &BTreeSet<String>,
        auditors: &BTreeSet<String>,
    ) -> Result<Self, CredentialError> {
        let mut hashed = Vec::new();
        for (name, hash) in hashes {
            let hex = hash
                .strip_prefix("sha256:")
                .ok_or_else(|| CredentialError::BadHash(name.clone()))?;
            let bytes: [u8; 32] = hex::decode(hex)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| CredentialError::BadHash(name.clone()))?;
            if bytes == hash_token("") {
                return Err(CredentialError::WeakToken(name.clone(), "empty"));
            }
            hashed.push((bytes, principal(name, agencies, auditors)?));
        }
        Ok(Credentials {
            by_hash: by_hash(hashed)?,
            by_certificate: HashMap::new(),
        })
    }

    /// Adds client certificates: `sha256:<hex of the certificate's DER>` → principal name.
    pub fn with_certificates(
        mut self,
        fingerprints: &BTreeMap<String, String>,
        agencies: &BTreeSet<String>,
        auditors: &BTreeSet<String>,
    ) -> Result<Self, CredentialError> {
        for (fingerprint, name) in fingerprints {
            let bytes: [u8; 32] = fingerprint
                .strip_prefix("sha256:")
                .and_then(|hex| hex::decode(hex).ok())
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| CredentialError::BadHash(fingerprint.clone()))?;
            self.by_certificate
                .insert(bytes, principal(name, agencies, auditors)?);
        }
        Ok(self)
    }
    pub fn from_tokens(
        tokens: &BTreeMap<String, String>,
        agencies: &BTreeSet<String>,
        auditors: &BTreeSet<String>,
    ) -> Result<Self, CredentialError> {
        let mut hashed = Vec::new();
        for (name, token) in tokens {
            let weakness = if token.is_empty() {
                Some("empty")
            } else if token.trim() != token {
                Some("surrounded by spaces")
            } else if token.chars().count() < MIN_TOKEN_CHARS {
                Some("too short")
            } else {
                None
            };
            if let Some(weakness) = weakness {
                return Err(CredentialError::WeakToken(name.clone(), weakness));
            }
            hashed.push((hash_token(token), principal(name, agencies, auditors)?));
        }
        Ok(Credentials {
            by_hash: by_hash(hashed)?,
            by_certificate: HashMap::new(),
        })
    }

    pub fn principal(&self, token: &str) -> Option<&Principal> {
        self.by_hash.get(&hash_token(token))
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The interceptor that authenticates every call: a client certificate
    /// mapped to a principal (mutual TLS), else `authorization: Bearer
    /// <token>` → the caller, put in the request's extensions.
    pub fn interceptor(
        &self,
    ) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + use<> {
        let credentials = self.clone();
        move |mut request: Request<()>| {
            let presented: Option<[u8; 32]> = request
                .peer_certs()
                .and_then(|certs| Some(Sha256::digest(certs.first()?.as_ref()).into()));
            let by_certificate = presented
                .and_then(|fingerprint| credentials.by_certificate.get(&fingerprint).cloned());
            let caller = request
                .extensions()
                .get::<super::request_log::Caller>()
                .cloned();
            let mut headers = request.metadata().get_all("authorization").iter();
            let by_token = match headers.next() {
                None => None,
                // Two credentials are ambiguous: a proxy that reads the last
                // and this server the first would each see another caller.
                Some(_) if headers.next().is_some() => {
                    return Err(unauthenticated(
                        "malformed-credential",
                        "more than one authorization header: send exactly one `authorization: Bearer <token>`",
                    ));
                }
                Some(header) => Some(credentials.bearer(header)?),
            };
            let principal = match (by_certificate, by_token) {
                // A certificate and a token of two callers: neither wins
                // silently, since the caller meant one of them.
                (Some(certified), Some(token)) if certified != token => {
                    return Err(unauthenticated(
                        "ambiguous-credential",
                        &format!(
                            "the client certificate is `{}`'s and the bearer token `{}`'s: send the credential of one caller",
                            certified.name(),
                            token.name()
                        ),
                    ));
                }
                (Some(certified), _) => {
                    tracing::debug!(
                        principal = certified.name(),
                        "authenticated by client certificate"
                    );
                    certified
                }
                (None, Some(token)) => {
                    tracing::debug!(principal = token.name(), "authenticated by token");
                    token
                }
                (None, None) => {
                    return Err(match presented {
                        // What the operator must add to map this certificate.
                        Some(fingerprint) => unauthenticated(
                            "no-credential",
                            &format!(
                                "the client certificate presented (\"sha256:{}\") is mapped to no agency (`client_certificates` in the server's configuration), and no `authorization: Bearer <token>` was sent",
                                hex::encode(fingerprint)
                            ),
                        ),
                        None => unauthenticated(
                            "no-credential",
                            "no credential: send `authorization: Bearer <token>`",
                        ),
                    });
                }
            };
            if let Some(caller) = caller {
                caller.set(principal.name());
            }
            request.extensions_mut().insert(principal);
            Ok(request)
        }
    }

    /// The principal of an `authorization: Bearer <token>` header.
    fn bearer(
        &self,
        header: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ) -> Result<Principal, Status> {
        // The scheme's name is case-insensitive (RFC 9110 §11.1).
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token)
            .ok_or_else(|| {
                unauthenticated(
                    "malformed-credential",
                    "the authorization header must be `Bearer <token>`",
                )
            })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(unauthenticated(
                "malformed-credential",
                "the bearer token is empty: send `authorization: Bearer <token>`",
            ));
        }
        self.principal(token)
            .cloned()
            .ok_or_else(|| unauthenticated("unknown-credential", "unknown or revoked token"))
    }
}

/// `UNAUTHENTICATED` with its machine-readable reason, as every error is.
fn unauthenticated(reason: &str, message: &str) -> Status {
    super::api::status(tonic::Code::Unauthenticated, reason, message, &[])
}

fn principal(
    name: &str,
    agencies: &BTreeSet<String>,
    auditors: &BTreeSet<String>,
) -> Result<Principal, CredentialError> {
    if name == ADMIN {
        Ok(Principal::Admin)
    } else if auditors.contains(name) {
        Ok(Principal::Auditor(name.to_owned()))
    } else if agencies.contains(name) {
        Ok(Principal::Agency(name.to_owned()))
    } else {
        Err(CredentialError::UnknownAgency(name.to_owned()))
    }
}

/// A new random token: 32 bytes from the operating system, hex.
pub fn new_token() -> Result<String, CredentialError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| CredentialError::Random(e.to_string()))?;
    Ok(format!("gf_{}", hex::encode(bytes)))
}

/// Reads the generated token file, adding a token for every principal that
/// has none (new agencies, or the first start), and writes it back readable
/// by its owner only. Returns the tokens and the names given new ones.
pub fn ensure_token_file(
    path: &Path,
    names: &BTreeSet<String>,
) -> Result<(BTreeMap<String, String>, Vec<String>), CredentialError> {
    let file_error = |message: String| CredentialError::File {
        path: path.display().to_string(),
        message,
    };
    let mut tokens: BTreeMap<String, String> = if path.exists() {
        keep_private(path).map_err(|e| file_error(e.to_string()))?;
        let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
        let parsed: TokenFile = toml::from_str(&text).map_err(|e| file_error(e.to_string()))?;
        parsed.tokens
    } else {
        BTreeMap::new()
    };
    let mut added = Vec::new();
    for name in names {
        if !tokens.contains_key(name) {
            tokens.insert(name.clone(), new_token()?);
            added.push(name.clone());
        }
    }
    if !added.is_empty() {
        let body = toml::to_string(&TokenFile {
            tokens: tokens.clone(),
        })
        .map_err(|e| file_error(e.to_string()))?;
        let text = format!(
            "# govflow bearer tokens, one per agency and one for the admin. Generated by `govflow serve`.\n\
             # Give each department system its own agency's token; keep this file secret.\n{body}"
        );
        write_private(path, &text).map_err(|e| file_error(e.to_string()))?;
    }
    Ok((tokens, added))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenFile {
    tokens: BTreeMap<String, String>,
}

/// Makes the token file owner-only again if it was opened to others (a
/// `chmod 644`, a copy or a restore from a backup): every agency's token is
/// in it, so one local user could act as any agency.
fn keep_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            tracing::warn!(
                "the token file {} could be read by other users (mode {mode:o}); it holds every agency's bearer token, so it is owner-only (600) again",
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes a file that only its owner may read (mode 0600 on Unix), whole or
/// not at all: rewritten in place, a crash during the write left it empty or
/// cut short, and the next start then replaced every agency's token.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    #[cfg(unix)]
    let permissions = {
        use std::os::unix::fs::PermissionsExt;
        Some(std::fs::Permissions::from_mode(0o600))
    };
    #[cfg(not(unix))]
    let permissions = None;
    crate::files::replace(path, text.as_bytes(), permissions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hashed_and_mapped_to_principals() {
        let (a, b) = (new_token().expect("token"), new_token().expect("token"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 64);
        let agencies: BTreeSet<String> = ["x".to_owned(), "audit".to_owned()].into();
        let auditors: BTreeSet<String> = ["audit".to_owned()].into();
        let tokens: BTreeMap<String, String> = [
            ("x".to_owned(), a.clone()),
            ("audit".to_owned(), b.clone()),
            (ADMIN.to_owned(), "an-admin-token-of-some-length".to_owned()),
        ]
        .into();
        let creds = Credentials::from_tokens(&tokens, &agencies, &auditors).expect("valid");
        assert_eq!(creds.principal(&a), Some(&Principal::Agency("x".into())));
        assert_eq!(
            creds.principal(&b),
            Some(&Principal::Auditor("audit".into()))
        );
        assert_eq!(
            creds.principal("an-admin-token-of-some-length"),
            Some(&Principal::Admin)
        );
        assert_eq!(creds.principal("nope"), None);
        let hashes: BTreeMap<String, String> = [(
            "x".to_owned(),
            format!("sha256:{}", hex::encode(hash_token(&a))),
        )]
        .into();
        let from_config = Credentials::from_hashes(&hashes, &agencies, &auditors).expect("valid");
        assert_eq!(
            from_config.principal(&a),
            Some(&Principal::Agency("x".into()))
        );
        let bad: BTreeMap<String, String> = [("y".to_owned(), a.clone())].into();
        assert!(Credentials::from_tokens(&bad, &agencies, &auditors).is_err());
    }

    /// A token left empty (to "revoke" an agency), short, padded or shared
    /// would let a caller in as someone: the server refuses to start on it.
    #[test]
    fn empty_short_padded_and_shared_tokens_are_refused() {
        let agencies: BTreeSet<String> = ["x".to_owned(), "y".to_owned()].into();
        let none = BTreeSet::new();
        let good = new_token().expect("token");
        for (token, weakness) in [
            ("", "empty"),
            ("1234", "too short"),
            (" gf_0123456789abcdef", "surrounded by spaces"),
        ] {
            let tokens: BTreeMap<String, String> = [
                ("x".to_owned(), token.to_owned()),
                ("y".to_owned(), good.clone()),
            ]
            .into();
            let e = Credentials::from_tokens(&tokens, &agencies, &none).expect_err(token);
            assert!(e.to_string().contains(weakness), "{e}");
        }
        let shared: BTreeMap<String, String> = [
            ("x".to_owned(), good.clone()),
            ("y".to_owned(), good.clone()),
        ]
        .into();
        let e = Credentials::from_tokens(&shared, &agencies, &none).expect_err("shared");
        assert!(e.to_string().contains("same token"), "{e}");
        let hashed = |t: &str| format!("sha256:{}", hex::encode(hash_token(t)));
        let shared: BTreeMap<String, String> = [
            ("x".to_owned(), hashed(&good)),
            ("y".to_owned(), hashed(&good)),
        ]
        .into();
        assert!(Credentials::from_hashes(&shared, &agencies, &none).is_err());
        let empty: BTreeMap<String, String> = [("x".to_owned(), hashed(""))].into();
        assert!(Credentials::from_hashes(&empty, &agencies, &none).is_err());
    }

    #[test]
    fn the_token_file_is_owner_only_and_keeps_existing_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("credentials.toml");
        let names: BTreeSet<String> = ["a".to_owned(), ADMIN.to_owned()].into();
        let (first, added) = ensure_token_file(&path, &names).expect("written");
        assert_eq!(added, ["a", ADMIN]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let more: BTreeSet<String> = ["a".to_owned(), "b".to_owned(), ADMIN.to_owned()].into();
        let (second, added) = ensure_token_file(&path, &more).expect("updated");
        assert_eq!(added, ["b"]);
        assert_eq!(second["a"], first["a"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "still owner-only once rewritten");
            // Regression: opened to others by hand, it stayed so, while the
            // server said its tokens were in an owner-only file.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
            let (third, added) = ensure_token_file(&path, &more).expect("read");
            assert!(added.is_empty());
            assert_eq!(third, second);
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "owner-only again");
        }
    }
}
