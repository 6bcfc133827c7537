//! `fsctl inspect redis`.

use super::*;

/// The Redis masters.
pub async fn show(b: &BackendUrls, as_json: bool) -> Result<(), Failure> {
    let redis = backends::redis(b).await?;
    let masters = redis_conn::masters(&redis).await?;
    if as_json {
        output::json(&json!({"cluster": redis.is_cluster(), "masters": masters}));
    } else {
        let mut t = output::table(&["master", "hash slots", "replicas", "keys"]);
        for m in &masters {
            t.add_row(vec![
                Cell::new(&m.address),
                Cell::new(m.slots),
                Cell::new(m.replicas),
                m.keys
                    .map_or_else(|| output::verdict(false, "", "no answer"), Cell::new),
            ]);
        }
        println!("{t}");
        let slots: u32 = masters.iter().map(|m| m.slots).sum();
        if redis.is_cluster() {
            println!(
                "Redis Cluster: {} masters serving {slots} of 16384 slots",
                masters.len()
            );
        } else {
            println!("standalone Redis");
        }
    }
    Ok(())
}
