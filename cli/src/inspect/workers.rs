//! `fsctl inspect workers`.

use super::*;

/// Workers from their heartbeats.
pub async fn show(b: &BackendUrls, ns: &Namespace, as_json: bool) -> Result<(), Failure> {
    let redis = backends::redis(b).await?;
    let workers = heartbeat::workers(&redis, ns).await?;
    if as_json {
        output::json(&json!({"workers": workers}));
    } else {
        let mut t = output::table(&[
            "worker",
            "state",
            "up since",
            "processed",
            "in flight",
            "product",
            "last beat",
            "metrics",
        ]);
        for w in &workers {
            t.add_row(vec![
                Cell::new(&w.id),
                output::verdict(w.alive, "alive", "gone"),
                Cell::new(&w.started_at),
                Cell::new(w.processed),
                Cell::new(w.inflight),
                Cell::new(
                    w.product
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "-".into()),
                ),
                Cell::new(format!("{:.1} s ago", w.last_beat_seconds)),
                Cell::new(&w.metrics_addr),
            ]);
        }
        println!("{t}");
        println!(
            "{} workers alive",
            workers.iter().filter(|w| w.alive).count()
        );
    }
    Ok(())
}
