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

#[test]
fn a_file_written_from_a_path_reads_back_and_a_missing_path_writes_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let node = SyncEngine::open(dir.path().join("node"))?;
    let (scope, key) = (Scope::shared(), Key::try_from("doc")?);
    let source = dir.path().join("report.pdf");
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&source, &content)?;
    node.put_file_path(&scope, &key, "report", &source)?;
    let (blob, mut reader) = node.open_file(&scope, &key)?.ok_or("no file")?;
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut back)?;
    assert_eq!((back, blob.hash), (content.clone(), Hash::of(&content)));

    let before = node.digest()?;
    let err = node
        .put_file_path(
            &scope,
            &Key::try_from("gone")?,
            "x",
            dir.path().join("missing.pdf"),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Blob(_)), "{err:?}");
    assert_eq!(node.digest()?, before);
    Ok(())
}
