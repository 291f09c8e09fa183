//! Bearer tokens and what they grant.
//!
//! A node runs either **open** (no tokens: everything allowed, only on a loopback address) or
//! with a set of tokens, each granting read and/or write on scope patterns and, separately,
//! the right to sync. Token secrets are kept only as blake3 hashes and compared in constant
//! time (`blake3::Hash`'s equality is constant-time).
//!
//! The token file is JSON:
//!
//! ```json
//! {"tokens": [
//!   {"name": "hub", "token": "…at least 16 characters…", "read": ["*"], "write": ["*"], "sync": true},
//!   {"name": "notes-app", "token": "…", "read": ["app/notes/*"], "write": ["app/notes/*"]},
//!   {"name": "prometheus", "token": "…", "metrics": true}
//! ]}
//! ```
//!
//! Patterns are `*` (every scope), `shared`, `app/<app_id>/*` (every table of one app) or an
//! exact scope `app/<app_id>/<table>`.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::record::Scope;

/// The shortest token secret accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// A scope pattern in a grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopePattern {
    /// Every scope.
    All,
    /// Every table of one app.
    App(String),
    /// One scope.
    Exact(Scope),
}

impl ScopePattern {
    /// Whether `scope` matches.
    pub fn matches(&self, scope: &Scope) -> bool {
        match self {
            ScopePattern::All => true,
            ScopePattern::App(app) => scope.app_id() == Some(app.as_str()),
            ScopePattern::Exact(s) => s == scope,
        }
    }
}

impl std::str::FromStr for ScopePattern {
    type Err = AccessError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || AccessError::BadPattern {
            pattern: s.to_owned(),
        };
        if s == "*" {
            return Ok(ScopePattern::All);
        }
        if let Some(app) = s.strip_prefix("app/").and_then(|r| r.strip_suffix("/*")) {
            // Validate the app id as a scope segment.
            Scope::app(app, "t").map_err(|_| bad())?;
            return Ok(ScopePattern::App(app.to_owned()));
        }
        s.parse::<Scope>()
            .map(ScopePattern::Exact)
            .map_err(|_| bad())
    }
}

impl fmt::Display for ScopePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopePattern::All => f.write_str("*"),
            ScopePattern::App(a) => write!(f, "app/{a}/*"),
            ScopePattern::Exact(s) => f.write_str(s.as_str()),
        }
    }
}

/// What a token (or an open node) allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The token's name, for logs (never the secret).
    pub name: String,
    /// Scopes it may read.
    pub read: Vec<ScopePattern>,
    /// Scopes it may write.
    pub write: Vec<ScopePattern>,
    /// Whether it may sync (exchange, blobs, watch).
    pub sync: bool,
    /// Whether it may read the node's metrics (`GET /metrics`).
    pub metrics: bool,
}

impl Grant {
    /// Everything: what an open node grants.
    pub fn everything(name: &str) -> Grant {
        Grant {
            name: name.to_owned(),
            read: vec![ScopePattern::All],
            write: vec![ScopePattern::All],
            sync: true,
            metrics: true,
        }
    }

    /// Whether it may read `scope`.
    pub fn can_read(&self, scope: &Scope) -> bool {
        self.read.iter().any(|p| p.matches(scope))
    }

    /// Whether it may write `scope`.
    pub fn can_write(&self, scope: &Scope) -> bool {
        self.write.iter().any(|p| p.matches(scope))
    }

    /// Whether it may read every scope.
    pub fn reads_all(&self) -> bool {
        self.read.contains(&ScopePattern::All)
    }
}

struct Token {
    hash: blake3::Hash,
    grant: Grant,
}

/// Who may do what on a node.
pub struct Access {
    /// `None`: open node.
    tokens: Option<Vec<Token>>,
}

impl fmt::Debug for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tokens {
            None => f.write_str("Access::Open"),
            Some(t) => f
                .debug_list()
                .entries(t.iter().map(|t| &t.grant.name))
                .finish(),
        }
    }
}

/// A token file or pattern that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AccessError {
    /// The token file could not be read.
    #[error("cannot read token file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The token file is not valid JSON of the expected shape.
    #[error("token file is malformed: {reason}")]
    Malformed {
        /// What is wrong.
        reason: String,
    },
    /// A scope pattern is not `*`, `shared`, `app/<id>/*` or a scope.
    #[error(
        "bad scope pattern {pattern:?} (use *, shared, app/<app_id>/* or app/<app_id>/<table>)"
    )]
    BadPattern {
        /// The pattern.
        pattern: String,
    },
    /// A token secret is too short or not printable ASCII.
    #[error("token {name:?} must be at least {MIN_TOKEN_LEN} printable ASCII characters")]
    WeakToken {
        /// The token's name.
        name: String,
    },
    /// Two tokens share a secret or a name.
    #[error("token {name:?} is defined twice (same name or same secret)")]
    Duplicate {
        /// The token's name.
        name: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    token: String,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    sync: bool,
    #[serde(default)]
    metrics: bool,
}

impl Access {
    /// An open node: every request is allowed. [`crate::http::serve`] refuses to run open
    /// on anything but a loopback address.
    pub fn open() -> Access {
        Access { tokens: None }
    }

    /// Whether the node is open.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none()
    }

    /// A node with these `(secret, grant)` tokens.
    ///
    /// # Errors
    /// A secret shorter than [`MIN_TOKEN_LEN`] or not printable ASCII, or a duplicate.
    pub fn with_tokens(
        tokens: impl IntoIterator<Item = (String, Grant)>,
    ) -> Result<Access, AccessError> {
        let mut out: Vec<Token> = Vec::new();
        for (secret, grant) in tokens {
            if secret.len() < MIN_TOKEN_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(AccessError::WeakToken { name: grant.name });
            }
            let hash = blake3::hash(secret.as_bytes());
            if out
                .iter()
                .any(|t| t.hash == hash || t.grant.name == grant.name)
            {
                return Err(AccessError::Duplicate { name: grant.name });
            }
            out.push(Token { hash, grant });
        }
        Ok(Access { tokens: Some(out) })
    }

    /// Parses a token file's JSON text.
    ///
    /// # Errors
    /// [`AccessError::Malformed`], a bad pattern, a weak or duplicate token.
    pub fn from_json(text: &str) -> Result<Access, AccessError> {
        let file: TokenFile = serde_json::from_str(text).map_err(|e| AccessError::Malformed {
            reason: e.to_string(),
        })?;
        let parse = |v: Vec<String>| -> Result<Vec<ScopePattern>, AccessError> {
            v.iter().map(|p| p.parse()).collect()
        };
        let mut tokens = Vec::new();
        for e in file.tokens {
            let grant = Grant {
                name: e.name,
                read: parse(e.read)?,
                write: parse(e.write)?,
                sync: e.sync,
                metrics: e.metrics,
            };
            tokens.push((e.token, grant));
        }
        Access::with_tokens(tokens)
    }

    /// Reads a token file.
    ///
    /// # Errors
    /// As for [`Access::from_json`], or the file cannot be read.
    pub fn from_file(path: &Path) -> Result<Access, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Access::from_json(&text)
    }

    /// What the bearer of `secret` may do (`None` for an unknown token). On an open node,
    /// everything, whatever the secret.
    pub fn authorize(&self, secret: Option<&str>) -> Option<Grant> {
        let Some(tokens) = &self.tokens else {
            return Some(Grant::everything("open"));
        };
        let presented = blake3::hash(secret?.as_bytes());
        // Every token is compared (constant time each), so timing does not tell which
        // matched.
        let mut found = None;
        for t in tokens {
            if t.hash == presented {
                found = Some(&t.grant);
            }
        }
        found.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_and_parse() {
        let notes = Scope::app("notes", "items").unwrap();
        let todo = Scope::app("todo", "items").unwrap();
        let p: ScopePattern = "app/notes/*".parse().unwrap();
        assert!(p.matches(&notes) && !p.matches(&todo) && !p.matches(&Scope::shared()));
        assert!("*".parse::<ScopePattern>().unwrap().matches(&todo));
        assert!("shared"
            .parse::<ScopePattern>()
            .unwrap()
            .matches(&Scope::shared()));
        for bad in [
            "",
            "app/*",
            "app/../*",
            "app/notes",
            "app/notes/*/x",
            "nope",
        ] {
            assert!(bad.parse::<ScopePattern>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn token_file_grants_and_refuses() {
        let access = Access::from_json(
            r#"{"tokens":[{"name":"a","token":"aaaaaaaaaaaaaaaa","read":["app/a/*"],"write":["app/a/*"]},
                          {"name":"hub","token":"hhhhhhhhhhhhhhhh","read":["*"],"sync":true}]}"#,
        )
        .unwrap();
        let a = access.authorize(Some("aaaaaaaaaaaaaaaa")).unwrap();
        assert_eq!(a.name, "a");
        assert!(!a.sync);
        assert!(a.can_write(&Scope::app("a", "t").unwrap()));
        assert!(!a.can_read(&Scope::app("b", "t").unwrap()));
        let hub = access.authorize(Some("hhhhhhhhhhhhhhhh")).unwrap();
        assert!(hub.sync && hub.reads_all() && !hub.can_write(&Scope::shared()));
        assert!(access.authorize(Some("aaaaaaaaaaaaaaab")).is_none());
        assert!(access.authorize(None).is_none());
        assert!(!access.is_open());
    }

    #[test]
    fn weak_duplicate_and_malformed_token_files_are_refused() {
        let weak = r#"{"tokens":[{"name":"a","token":"short"}]}"#;
        assert!(matches!(
            Access::from_json(weak),
            Err(AccessError::WeakToken { .. })
        ));
        let dup = r#"{"tokens":[{"name":"a","token":"aaaaaaaaaaaaaaaa"},{"name":"b","token":"aaaaaaaaaaaaaaaa"}]}"#;
        assert!(matches!(
            Access::from_json(dup),
            Err(AccessError::Duplicate { .. })
        ));
        let unknown = r#"{"tokens":[{"name":"a","token":"aaaaaaaaaaaaaaaa","admin":true}]}"#;
        assert!(matches!(
            Access::from_json(unknown),
            Err(AccessError::Malformed { .. })
        ));
        let pattern = r#"{"tokens":[{"name":"a","token":"aaaaaaaaaaaaaaaa","read":["app/x"]}]}"#;
        assert!(matches!(
            Access::from_json(pattern),
            Err(AccessError::BadPattern { .. })
        ));
    }
}
