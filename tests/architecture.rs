//! The dependency arrows that the compiler does not check: the HTTP server and client
//! (src/http) and the transports (src/transport) see a node only through its traits
//! (`Responder`, `NodeApi`), so no code under them names the engine's type. Comments (doc
//! examples are written for the library's users) and unit tests (`#[cfg(test)]` to the end
//! of the file) may.

use std::error::Error;
use std::path::{Path, PathBuf};

type TestResult<T = ()> = Result<T, Box<dyn Error>>;

/// The layers that must not name the engine.
const ENGINE_FREE: [&str; 2] = ["src/http", "src/transport"];

/// The identifier they must not name.
const ENGINE: &str = "SyncEngine";

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> TestResult<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// The 1-based numbers of the code lines where `ident` appears as a whole identifier: not in
/// comments, and not from the first `#[cfg(test)]` on.
fn lines_naming(text: &str, ident: &str) -> Vec<usize> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    text.lines()
        .enumerate()
        .take_while(|(_, line)| line.trim() != "#[cfg(test)]")
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .filter(|(_, line)| {
            line.match_indices(ident).any(|(at, _)| {
                let before = line[..at].chars().next_back();
                let after = line[at + ident.len()..].chars().next();
                !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
            })
        })
        .map(|(n, _)| n + 1)
        .collect()
}

#[test]
fn http_and_transport_do_not_name_the_engine() -> TestResult {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    let mut checked = 0;
    for dir in ENGINE_FREE {
        for file in rust_files(&root.join(dir))? {
            checked += 1;
            let text = std::fs::read_to_string(&file)?;
            for line in lines_naming(&text, ENGINE) {
                let shown = file.strip_prefix(root).unwrap_or(&file).display();
                found.push(format!("{shown}:{line}"));
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} files found under {ENGINE_FREE:?}"
    );
    assert!(
        found.is_empty(),
        "{ENGINE} is named where only the Responder and NodeApi traits may be seen: {}",
        found.join(", ")
    );
    Ok(())
}

#[test]
fn the_check_finds_whole_identifiers_only() {
    let text = "use crate::engine::SyncEngine;\n// MySyncEngine, SyncEngines\nx: SyncEngine\n\
                /// a SyncEngine in a doc\n#[cfg(test)]\nuse SyncEngine;\n";
    assert_eq!(lines_naming(text, ENGINE), vec![1, 3]);
}
