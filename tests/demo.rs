//! The one-command demo (`highwater demo`) runs end to end over loopback HTTP, converges and
//! exits 0: the binary is run as a newcomer runs it, at small sizes.

use std::process::Command;

#[test]
fn the_demo_converges() -> Result<(), Box<dyn std::error::Error>> {
    let out = Command::new(env!("CARGO_BIN_EXE_highwater"))
        .args(["demo", "--records", "300", "--file-kib", "256"])
        .env("RUST_LOG", "warn")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    println!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "demo exited with {}:\n{text}",
        out.status
    );
    assert!(
        text.contains("CONVERGED") && !text.contains("NOT CONVERGED"),
        "{text}"
    );
    assert!(text.contains("blob_staged"), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
    Ok(())
}
