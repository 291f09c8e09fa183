//! The one-command demo runs end to end over loopback HTTP and converges.

use highwater::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_converges() {
    let options = DemoOptions {
        records_per_node: 300,
        file_size: 256 << 10,
        ..DemoOptions::default()
    };
    let mut out = Vec::new();
    let report = run(&options, &mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    println!("{text}");
    assert!(report.converged, "demo did not converge:\n{text}");
    assert_eq!(report.digests.len(), 3);
    assert!(
        report.digests.windows(2).all(|w| w[0].1 == w[1].1),
        "{text}"
    );
    assert!(text.contains("blob_staged"), "{text}");
    assert!(!text.contains("FAILED"), "{text}");
}
