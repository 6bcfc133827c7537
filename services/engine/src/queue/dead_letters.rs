//! The dead-letter queue, looked at without losing or hiding anything.

use super::rabbitmq::{self as broker, BrokerError, REASON_HEADER};
use crate::config::Namespace;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use std::time::Duration;

/// How long a peek waits for another peek of the same DLQ to finish.
const PEEK_TURN_WAIT: Duration = Duration::from_secs(30);

/// A message in the dead-letter queue.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    pub message_id: Option<String>,
    pub reason: Option<String>,
    pub body: String,
}

/// The first `limit` dead letters, read without losing or hiding any.
///
/// A requeue cannot serve: RabbitMQ 4.x counts a requeue of a quorum queue
/// message toward its delivery limit (20 by default, and the DLQ has no
/// dead-letter target of its own), so repeated peeks would end up dropping
/// dead letters. Instead each one is taken unacked, a copy (same body and
/// properties, the reason kept in `x-flashsale-reason`) is published back
/// to the DLQ and confirmed, and only then is the original acked: at any
/// instant the message is in the queue, so a peek that dies midway loses
/// nothing (at worst the dead letter is there twice). The copy starts
/// with no delivery count. Peeks take turns: each holds the exclusive
/// queue `<ns>.orders.dlq.peek` while it reads, so two at once cannot
/// hide messages from each other.
pub async fn peek_dead_letters(
    amqp_url: &str,
    ns: &Namespace,
    limit: usize,
) -> Result<Vec<DeadLetter>, BrokerError> {
    let conn = broker::connect(amqp_url, "fsctl").await?;
    let result = async {
        let channel = take_peek_turn(&conn, ns).await?;
        broker::declare_queues(&channel, ns).await?;
        let dlq = ns.dead_letter_queue();
        let (ready, _) = broker::queue_stats(&channel, &dlq).await?;
        let mut out = Vec::new();
        while out.len() < limit.min(ready as usize) {
            let got = channel
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false })
                .await?;
            let Some(got) = got else { break };
            let d = got.delivery;
            // Our own reason, or RabbitMQ's (`delivery_limit`) for the queue's own.
            let reason = d.properties.headers().as_ref().and_then(|h| {
                let h = h.inner();
                h.get(REASON_HEADER)
                    .or_else(|| h.get("x-first-death-reason"))
                    .and_then(text)
            });
            let mut headers = d.properties.headers().clone().unwrap_or_default();
            if let Some(r) = &reason {
                headers.insert(
                    REASON_HEADER.into(),
                    AMQPValue::LongString(r.as_str().into()),
                );
            }
            let copy = d.properties.clone().with_headers(headers);
            if let Err(e) = broker::publish_with(&channel, &dlq, &d.data, copy).await {
                // The original stays: hand it back and report the failure.
                let back = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                let _ = d.acker.nack(back).await;
                return Err(lapin::Error::from(std::io::Error::other(format!(
                    "cannot put a copy of a dead letter back: {e}"
                ))));
            }
            d.acker.ack(BasicAckOptions::default()).await?;
            out.push(DeadLetter {
                message_id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned()),
                reason,
                body: String::from_utf8_lossy(&d.data).into_owned(),
            });
        }
        // Close the channel first and wait for RabbitMQ's answer: its acks
        // are handled before it closes. A connection closed at once can
        // end the channel with an ack still unhandled, and the original,
        // requeued, then sits in the DLQ beside its copy.
        channel.close(200, "peeked".into()).await?;
        Ok::<_, lapin::Error>(out)
    }
    .await;
    let _ = conn.close(200, "peeked".into()).await;
    Ok(result?)
}

/// A confirm-mode channel holding the DLQ's peek turn (an exclusive queue);
/// waits while another peek holds it.
async fn take_peek_turn(
    conn: &lapin::Connection,
    ns: &Namespace,
) -> Result<lapin::Channel, lapin::Error> {
    let turn = format!("{}.peek", ns.dead_letter_queue());
    let deadline = tokio::time::Instant::now() + PEEK_TURN_WAIT;
    loop {
        let channel = conn.create_channel().await?;
        let exclusive = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        match channel
            .queue_declare(turn.as_str().into(), exclusive, FieldTable::default())
            .await
        {
            Ok(_) => {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                return Ok(channel);
            }
            // RESOURCE_LOCKED: another peek holds the turn (the channel is closed).
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "another peek of the DLQ is running; waiting");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}
