//! The data model: scopes, keys, versions, blob references and residency.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::InputError;
use crate::hash::Hash;
use crate::hlc::Hlc;

/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// The longest record value, in bytes. Larger content belongs in a file (blob).
pub const MAX_VALUE_LEN: usize = 1 << 20;
const MAX_SEGMENT_LEN: usize = 64;

/// The stream a record belongs to: `shared`, or `app/<app_id>/<table>` for rows owned by one
/// app. Sync can be limited to a set of scopes, and access is granted per scope.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope(String);

impl Scope {
    /// The `shared` scope.
    pub fn shared() -> Self {
        Scope("shared".to_owned())
    }

    /// The scope of `table` in app `app_id`.
    ///
    /// # Errors
    /// [`InputError::InvalidScope`] if a segment is empty, too long, starts with '.', or
    /// holds a character outside `[A-Za-z0-9_.-]`.
    pub fn app(app_id: &str, table: &str) -> Result<Self, InputError> {
        format!("app/{app_id}/{table}").parse()
    }

    /// The scope's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The app id, for an app scope.
    pub fn app_id(&self) -> Option<&str> {
        self.0
            .strip_prefix("app/")
            .and_then(|rest| rest.split('/').next())
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl FromStr for Scope {
    type Err = InputError;

    fn from_str(s: &str) -> Result<Self, InputError> {
        let ok = s == "shared"
            || matches!(s.strip_prefix("app/").map(|r| r.split('/').collect::<Vec<_>>()),
                Some(parts) if parts.len() == 2 && parts.iter().all(|p| valid_segment(p)));
        if ok {
            Ok(Scope(s.to_owned()))
        } else {
            Err(InputError::InvalidScope {
                scope: s.chars().take(80).collect(),
            })
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.0)
    }
}

impl Serialize for Scope {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Which scopes an exchange covers.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub enum ScopeFilter {
    /// Every scope either side knows (and the responder grants).
    #[default]
    All,
    /// Only these scopes.
    Only(BTreeSet<Scope>),
}

impl ScopeFilter {
    /// Whether `scope` is in play.
    pub fn contains(&self, scope: &Scope) -> bool {
        match self {
            ScopeFilter::All => true,
            ScopeFilter::Only(set) => set.contains(scope),
        }
    }
}

/// A record's key within its scope: 1 to [`MAX_KEY_LEN`] arbitrary bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(Vec<u8>);

impl Key {
    /// A key from bytes.
    ///
    /// # Errors
    /// [`InputError::KeyLength`] if empty or longer than [`MAX_KEY_LEN`].
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, InputError> {
        let bytes = bytes.into();
        if bytes.is_empty() || bytes.len() > MAX_KEY_LEN {
            return Err(InputError::KeyLength {
                len: bytes.len(),
                max: MAX_KEY_LEN,
            });
        }
        Ok(Key(bytes))
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl TryFrom<&str> for Key {
    type Error = InputError;
    fn try_from(s: &str) -> Result<Self, InputError> {
        Key::new(s.as_bytes())
    }
}

impl TryFrom<&[u8]> for Key {
    type Error = InputError;
    fn try_from(b: &[u8]) -> Result<Self, InputError> {
        Key::new(b)
    }
}

impl fmt::Display for Key {
    /// The key as text: UTF-8 as it is, with control characters escaped (`\n`, `\u{1b}`),
    /// so a printed key cannot drive a terminal; a key that is not UTF-8 as `0x` and hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => s.chars().try_for_each(|c| {
                if c.is_control() {
                    write!(f, "{}", c.escape_default())
                } else {
                    write!(f, "{c}")
                }
            }),
            Err(_) => {
                f.write_str("0x")?;
                self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(s) => write!(f, "Key({s:?})"),
            Err(_) => write!(f, "Key({:02x?})", self.0),
        }
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        Key::new(bytes.into_vec()).map_err(serde::de::Error::custom)
    }
}

/// A content-addressed reference to a blob: its blake3 hash and size in bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct BlobRef {
    /// The blake3 hash of the content.
    pub hash: Hash,
    /// The content's length in bytes.
    pub size: u64,
}

/// What a version does to its key.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Op {
    /// Sets the value (and optionally points at a blob).
    Put {
        /// The value's bytes.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// A file attached to the record.
        blob: Option<BlobRef>,
    },
    /// Deletes the key: a tombstone that syncs like any other version.
    Delete,
}

impl Op {
    /// Checks the op against the model's size limits.
    ///
    /// # Errors
    /// [`InputError::ValueTooLarge`] for a value over [`MAX_VALUE_LEN`].
    pub fn validate(&self) -> Result<(), InputError> {
        match self {
            Op::Put { value, .. } if value.len() > MAX_VALUE_LEN => {
                Err(InputError::ValueTooLarge {
                    len: value.len(),
                    max: MAX_VALUE_LEN,
                })
            }
            _ => Ok(()),
        }
    }

    /// An estimate of the op's encoded size, for byte budgets.
    pub fn encoded_len_hint(&self) -> usize {
        match self {
            Op::Put { value, blob } => 4 + value.len() + if blob.is_some() { 42 } else { 1 },
            Op::Delete => 1,
        }
    }
}

/// One version of a key: the timestamp that orders it and what it does.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Version {
    /// When and by whom it was written; orders versions (last write wins).
    pub hlc: Hlc,
    /// The operation.
    pub op: Op,
}

impl Version {
    /// Whether this version is a tombstone.
    pub fn is_tombstone(&self) -> bool {
        matches!(self.op, Op::Delete)
    }

    /// The blob this version points at, if any.
    pub fn blob(&self) -> Option<&BlobRef> {
        match &self.op {
            Op::Put { blob, .. } => blob.as_ref(),
            Op::Delete => None,
        }
    }
}

/// How far a node has pulled a scope from its peers (see `docs/scheduling.md`, "Hydration").
#[derive(
    Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Hydration {
    /// No pull of the scope has begun since the node was created.
    #[default]
    NotStarted,
    /// A pull of the scope is under way: a round with it in play reported more to come or
    /// left a stream halted.
    Hydrating,
    /// A round with a peer pulled the scope completely: nothing more to come, no halts.
    /// Durable: a node stays ready after a restart.
    Ready,
}

impl Hydration {
    /// The state's name (`not_started`, `hydrating`, `ready`).
    pub fn as_str(self) -> &'static str {
        match self {
            Hydration::NotStarted => "not_started",
            Hydration::Hydrating => "hydrating",
            Hydration::Ready => "ready",
        }
    }

    /// The state named `name` ([`Hydration::as_str`]), if any.
    pub fn parse(name: &str) -> Option<Hydration> {
        [
            Hydration::NotStarted,
            Hydration::Hydrating,
            Hydration::Ready,
        ]
        .into_iter()
        .find(|h| h.as_str() == name)
    }
}

/// Where a record stands on a node. Derived from the row and the blob store, never stored.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub enum Residency {
    /// No row for the key.
    Absent,
    /// The row is present but its blob is not local yet.
    Staged,
    /// The row is present, with its blob if it has one.
    Resident,
    /// The latest version is a delete.
    Tombstoned,
}

impl Residency {
    /// The residency of `version`, given whether its blob (if any) is local.
    pub fn of(version: Option<&Version>, blob_is_local: impl FnOnce(&BlobRef) -> bool) -> Self {
        match version {
            None => Residency::Absent,
            Some(v) if v.is_tombstone() => Residency::Tombstoned,
            Some(v) => match v.blob() {
                Some(b) if !blob_is_local(b) => Residency::Staged,
                _ => Residency::Resident,
            },
        }
    }

    /// The lower-case name used in headers and status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Residency::Absent => "absent",
            Residency::Staged => "staged",
            Residency::Resident => "resident",
            Residency::Tombstoned => "tombstoned",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_prints_as_text_with_controls_escaped_or_as_hex() {
        assert_eq!(Key::new("notes/1").unwrap().to_string(), "notes/1");
        assert_eq!(
            Key::new("a\x1b[2Jb\n").unwrap().to_string(),
            "a\\u{1b}[2Jb\\n"
        );
        assert_eq!(Key::new(vec![0xff, 0x00]).unwrap().to_string(), "0xff00");
    }

    #[test]
    fn scopes_parse_strictly() {
        for ok in [
            "shared",
            "app/notes/items",
            "app/com.example.x/t_1",
            "app/a-b/c",
        ] {
            assert_eq!(ok.parse::<Scope>().unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "Shared",
            "app",
            "app/x",
            "app//t",
            "app/x/t/u",
            "app/../t",
            "app/x/.h",
            "app/x y/t",
            "app/x/t\0",
            "/shared",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            Scope::app("notes", "items").unwrap().app_id(),
            Some("notes")
        );
    }

    #[test]
    fn keys_and_values_are_bounded() {
        assert!(Key::new(Vec::new()).is_err());
        assert!(Key::new(vec![0; MAX_KEY_LEN]).is_ok());
        assert!(Key::new(vec![0; MAX_KEY_LEN + 1]).is_err());
        let big = Op::Put {
            value: vec![0; MAX_VALUE_LEN + 1],
            blob: None,
        };
        assert!(matches!(
            big.validate(),
            Err(InputError::ValueTooLarge { .. })
        ));
    }

    #[test]
    fn scope_deserialization_validates() {
        let bytes = postcard::to_allocvec("app/../x").unwrap();
        assert!(postcard::from_bytes::<Scope>(&bytes).is_err());
    }
}
