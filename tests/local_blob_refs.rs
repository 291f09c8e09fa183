//! A local write may only point at a blob the node holds: otherwise its own stream would
//! carry a version it can never ship, blocking every later write of that origin.

use highwater::error::InputError;
use highwater::{BlobRef, Error, Hash, Key, Op, Residency, Scope, SyncEngine};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[test]
fn a_write_pointing_at_a_missing_blob_is_refused_and_changes_nothing() -> TestResult {
    let node = SyncEngine::in_memory()?;
    let (scope, key) = (Scope::shared(), Key::try_from("photo")?);
    let before = (node.digest()?, node.watermarks()?);
    let missing = BlobRef {
        hash: Hash::of(b"never stored"),
        size: 12,
    };
    let err = node
        .write(
            &scope,
            &key,
            Op::Put {
                value: b"v".to_vec(),
                blob: Some(missing),
            },
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::Input(InputError::BlobNotLocal { hash }) if hash == missing.hash),
        "{err:?}"
    );
    assert_eq!((node.digest()?, node.watermarks()?), before);
    Ok(())
}

#[test]
fn a_write_pointing_at_a_stored_blob_is_resident() -> TestResult {
    let node = SyncEngine::in_memory()?;
    let (scope, key) = (Scope::shared(), Key::try_from("photo")?);
    node.put_file_bytes(&scope, &Key::try_from("first")?, "v1", b"shared bytes")?;
    let blob = node
        .get(&scope, &Key::try_from("first")?)?
        .and_then(|r| r.blob)
        .ok_or("no blob")?;
    // A second record may point at the same stored content without re-sending it.
    node.write(
        &scope,
        &key,
        Op::Put {
            value: b"v2".to_vec(),
            blob: Some(blob),
        },
    )?;
    assert_eq!(node.residency(&scope, &key)?, Residency::Resident);
    Ok(())
}
