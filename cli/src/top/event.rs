//! The one event channel the dashboard reads: keys and resizes from the
//! terminal, ticks that age what is shown, and samples from the collectors.

use super::app::Sample;
use crossterm::event::{Event as TermEvent, EventStream, KeyEvent, KeyEventKind};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinSet;

#[derive(Debug)]
pub enum Event {
    Key(KeyEvent),
    /// Redraw: the terminal was resized, or ages moved on.
    Redraw,
    Sample(Instant, Sample),
}

/// Forwards key presses and resizes, and a tick every `refresh`.
pub fn start(refresh: Duration, events: &UnboundedSender<Event>, tasks: &mut JoinSet<()>) {
    let keys = events.clone();
    tasks.spawn(async move {
        let mut terminal = EventStream::new();
        while let Some(Ok(event)) = terminal.next().await {
            let forwarded = match event {
                TermEvent::Key(k) if k.kind != KeyEventKind::Release => Event::Key(k),
                TermEvent::Resize(..) => Event::Redraw,
                _ => continue,
            };
            if keys.send(forwarded).is_err() {
                return;
            }
        }
    });
    let ticks = events.clone();
    tasks.spawn(async move {
        let mut every = tokio::time::interval(refresh);
        loop {
            every.tick().await;
            if ticks.send(Event::Redraw).is_err() {
                return;
            }
        }
    });
}
