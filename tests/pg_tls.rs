//! TLS to the database: `sslmode=require` connects over TLS, verifying the server's
//! certificate against the CA file given (besides the system's roots) and its name against
//! the URL's host, and refuses a certificate for another name; without `sslmode` the
//! connection is in clear text. Needs `HIGHWATER_PG_URL` on 127.0.0.1 and the local
//! server's TLS certificate (Debian's snakeoil one, issued to `localhost`); skips with a note
//! otherwise. (A certificate no root vouches for is not tried: Debian's system store, which
//! is trusted too, holds the snakeoil certificate.)

mod common;

use std::error::Error as _;
use std::path::Path;

use common::pg::{Schema, URL_VAR};
use highwater::store::{PgOptions, PgStore, Store};
use postgres::{Client, NoTls};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// The test URL with `host` for 127.0.0.1 and `query` appended, or `None` (with a note)
/// when the set-up this test needs is missing.
fn url_with(host: &str, query: &str) -> Option<String> {
    let url = std::env::var(URL_VAR).ok()?;
    if !url.contains("@127.0.0.1") || !Path::new(SERVER_CERT).exists() {
        eprintln!("note: pg_tls needs {URL_VAR} on 127.0.0.1 and {SERVER_CERT}: skipped");
        return None;
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    Some(format!(
        "{}{sep}{query}",
        url.replace("@127.0.0.1", &format!("@{host}"))
    ))
}

/// Whether the database sees a connection of `application` over TLS.
fn over_tls(application: &str) -> Result<Option<bool>, Box<dyn std::error::Error>> {
    let mut client = Client::connect(&std::env::var(URL_VAR)?, NoTls)?;
    let row = client.query_opt(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = $1",
        &[&application],
    )?;
    Ok(row.and_then(|r| r.get::<_, Option<bool>>(0)))
}

fn options(schema: &Schema, ca: Option<&str>) -> PgOptions {
    PgOptions {
        schema: Some(schema.name().to_owned()),
        pool_size: 2,
        connect_timeout: std::time::Duration::from_secs(3),
        ca_file: ca.map(Into::into),
    }
}

/// The whole chain of `e`'s messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

#[test]
fn sslmode_require_verifies_the_servers_certificate_and_name() -> TestResult {
    let Some(schema) = Schema::fresh("sslmode_require_verifies")? else {
        return Ok(());
    };
    let Some(url) = url_with("localhost", "sslmode=require&application_name=hw_tls_ok") else {
        return Ok(());
    };
    let store = PgStore::open_with(&url, &options(&schema, Some(SERVER_CERT)))?;
    store.read()?.clock()?;
    assert_eq!(
        over_tls("hw_tls_ok")?,
        Some(true),
        "the store's connections are not TLS"
    );
    drop(store);

    // The right CA, the wrong name (the certificate is for localhost).
    let Some(url) = url_with("127.0.0.1", "sslmode=require") else {
        return Ok(());
    };
    let Err(e) = PgStore::open_with(&url, &options(&schema, Some(SERVER_CERT))) else {
        panic!("a certificate for another name was accepted");
    };
    let text = chain(&e);
    assert!(text.contains("certificate"), "{text}");
    assert!(e.source().is_some());
    Ok(())
}

#[test]
fn without_sslmode_the_connection_is_clear_text() -> TestResult {
    let Some(schema) = Schema::fresh("without_sslmode_clear_text")? else {
        return Ok(());
    };
    let Some(url) = url_with("127.0.0.1", "application_name=hw_tls_plain") else {
        return Ok(());
    };
    let store = PgStore::open_with(&url, &options(&schema, None))?;
    store.read()?.clock()?;
    assert_eq!(over_tls("hw_tls_plain")?, Some(false));
    Ok(())
}
