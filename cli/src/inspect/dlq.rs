//! `fsctl inspect dlq`.

use super::*;
use flashsale_engine::queue;

/// Dead letters, read without consuming them.
pub async fn show(
    b: &BackendUrls,
    ns: &Namespace,
    as_json: bool,
    limit: usize,
) -> Result<(), Failure> {
    let q = queue::queues(&b.amqp_url, ns).await?;
    let messages = queue::peek_dead_letters(&b.amqp_url, ns, limit).await?;
    if as_json {
        output::json(&json!({"dlq": {"count": q.dlq_ready, "messages": messages}}));
    } else {
        let mut t = output::table(&["message id", "reason", "body"]);
        for m in &messages {
            let body: String = m.body.chars().take(80).collect();
            t.add_row(vec![
                Cell::new(m.message_id.as_deref().unwrap_or("-")),
                Cell::new(m.reason.as_deref().unwrap_or("-")),
                Cell::new(body),
            ]);
        }
        println!("{t}");
        println!(
            "{} messages in {} (showing {})",
            q.dlq_ready,
            ns.dead_letter_queue(),
            messages.len()
        );
    }
    Ok(())
}
