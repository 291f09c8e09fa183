//! One records API, two sides: the same operations through `NodeApi` on an engine held in
//! this process and on a node reached over HTTP (`NodeClient`) give the same answers, and
//! the client's status document is the served engine's own.

use std::error::Error;
use std::io::Read;
use std::sync::Arc;

use highwater::api::{all_scopes, FileRead, ListQuery, Lookup, NodeApi};
use highwater::http::{serve, NodeClient, ServerConfig};
use highwater::{Key, Residency, Scope, SyncEngine};
use tokio::sync::oneshot;

type TestResult<T = ()> = Result<T, Box<dyn Error + Send + Sync>>;

fn key(text: &str) -> Key {
    Key::try_from(text).expect("a valid key")
}

fn notes() -> Scope {
    Scope::app("notes", "items").expect("a valid scope")
}

/// Reads a file answer to its end, off the runtime's threads.
async fn read_file(file: FileRead) -> TestResult<Vec<u8>> {
    let FileRead::Ready { mut reader, .. } = file else {
        return Err(format!("expected the file, got {file:?}").into());
    };
    let read = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).map(|_| out)
    });
    Ok(read.await??)
}

/// The scenario, on any side of the API; returns the keys listed a page of two at a time.
async fn exercise(api: &dyn NodeApi) -> TestResult<Vec<Key>> {
    let written = api.put(notes(), key("a"), b"first".to_vec()).await?;
    assert_eq!(written.file, None);
    match api.get(notes(), key("a")).await? {
        Lookup::Found(read) => {
            assert_eq!(read.value, b"first");
            assert_eq!(read.hlc, written.hlc);
            assert_eq!(read.residency, Residency::Resident);
        }
        other => return Err(format!("expected the record, got {other:?}").into()),
    }
    assert_eq!(api.get(notes(), key("nope")).await?, Lookup::Missing);
    api.put(notes(), key("b"), b"second".to_vec()).await?;
    api.put(notes(), key("c"), vec![0xff, 0xfe]).await?;
    api.delete(notes(), key("b")).await?;
    assert_eq!(api.get(notes(), key("b")).await?, Lookup::Deleted);

    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let stored = api
        .put_file(
            notes(),
            key("f"),
            Vec::new(),
            Box::new(std::io::Cursor::new(content.clone())),
        )
        .await?;
    let blob = stored.file.ok_or("a file write names its file")?;
    assert_eq!(blob.size, content.len() as u64);
    assert_eq!(
        read_file(api.get_file(notes(), key("f")).await?).await?,
        content
    );
    assert!(matches!(
        api.get_file(notes(), key("a")).await?,
        FileRead::NoFile
    ));
    assert!(matches!(
        api.get_file(notes(), key("b")).await?,
        FileRead::Missing
    ));

    let first = api
        .list(
            notes(),
            ListQuery {
                limit: 2,
                ..ListQuery::default()
            },
        )
        .await?;
    assert_eq!(first.records[0].value.as_deref(), Some("first"));
    assert_eq!(first.records[1].value, None, "not UTF-8");
    assert_eq!(first.next_after, Some(key("c")));
    let rest = api
        .list(
            notes(),
            ListQuery {
                after: first.next_after.clone(),
                limit: 2,
                ..ListQuery::default()
            },
        )
        .await?;
    assert_eq!(rest.records[0].file, Some(blob));
    assert_eq!(
        rest.next_after, None,
        "a page that is not full ends the listing"
    );
    Ok(first
        .records
        .iter()
        .chain(&rest.records)
        .map(|r| r.key.clone())
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_and_a_node_over_http_answer_the_same() -> TestResult {
    let local = SyncEngine::in_memory()?;
    let local_keys = exercise(&local).await?;

    let served = Arc::new(SyncEngine::in_memory()?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        served.clone(),
        listener,
        ServerConfig::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    let remote: Box<dyn NodeApi> = Box::new(NodeClient::new(&url, None)?);
    let remote_keys = exercise(&*remote).await?;
    assert_eq!(local_keys, remote_keys);
    assert_eq!(local_keys, [key("a"), key("c"), key("f")]);

    let over_http = remote.status(all_scopes()).await?;
    let at_home = served.status(all_scopes()).await?;
    assert_eq!(over_http, at_home);
    assert_eq!(over_http.node, served.node_id());
    let scope = &over_http.scopes[&notes()];
    assert_eq!(
        (
            scope.residency.resident,
            scope.residency.staged,
            scope.residency.tombstoned
        ),
        (3, 0, 1)
    );

    let _ = stop.send(());
    server.await??;
    Ok(())
}
