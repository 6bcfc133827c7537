//! The storm report as a person reads it: comfy-table tables for statuses,
//! errors and latency, then the drain, the books and the thresholds.

use super::report::{Latency, StormReport};
use crate::output;
use comfy_table::Cell;

impl StormReport {
    pub fn print(&self) {
        println!(
            "{} requests in {:.2}s: {:.0} answers/s, {:.0} accepted (202)/s{}",
            self.requests,
            self.duration_seconds,
            self.answer_rate,
            self.accept_rate,
            match self.target_rate {
                Some(t) => format!(", sent {:.0}/s of {t:.0}/s asked", self.send_rate),
                None => String::new(),
            },
        );
        let total = (self.requests + self.interrupted).max(1) as f64;
        let mut t = output::table(&["answer", "count", "share"]);
        for (status, n) in &self.status_counts {
            t.add_row(vec![
                Cell::new(status_label(status)),
                Cell::new(n),
                Cell::new(format!("{:.1}%", *n as f64 * 100.0 / total)),
            ]);
        }
        for (kind, n) in &self.errors {
            t.add_row(vec![
                Cell::new(format!("error: {kind}")),
                Cell::new(n),
                Cell::new(format!("{:.1}%", *n as f64 * 100.0 / total)),
            ]);
        }
        if self.interrupted > 0 {
            t.add_row(vec![
                Cell::new("interrupted"),
                Cell::new(self.interrupted),
                Cell::new(format!("{:.1}%", self.interrupted as f64 * 100.0 / total)),
            ]);
        }
        println!("{t}");
        let mut t = output::table(&["latency", "min", "p50", "p90", "p99", "p99.9", "max"]);
        let row = |name: &str, l: &Latency| {
            let mut cells = vec![Cell::new(name)];
            cells.extend(
                [l.min, l.p50, l.p90, l.p99, l.p999, l.max]
                    .into_iter()
                    .map(|s| Cell::new(format_seconds(s))),
            );
            cells
        };
        let first = if self.target_rate.is_some() {
            "from intended send"
        } else {
            "per request"
        };
        t.add_row(row(first, &self.latency_seconds));
        if let Some(u) = &self.uncorrected_latency_seconds {
            t.add_row(row("from actual send", u));
        }
        println!("{t}");
        let m = &self.mix;
        if m.duplicates + m.invalid > 0 || m.unexpected > 0 {
            println!(
                "mix: {} fresh; {} repeated keys ({} replayed as 200); {} bad inputs ({} got their 4xx); {} answers not as the contract says",
                m.fresh,
                m.duplicates,
                m.duplicates_replayed,
                m.invalid,
                m.invalid_rejected,
                m.unexpected
            );
            for e in &m.unexpected_examples {
                println!("  unexpected: {e}");
            }
        }
        if let Some(warning) = self.rate_missed() {
            eprintln!("{warning}");
        }
        if self.stopped_early {
            println!("stopped early: the report covers what was sent until then");
        }
    }

    pub fn print_drain(&self) {
        if let Some(d) = &self.drain {
            println!(
                "drain: {:.2}s; {} of {} accepted resolved ({} confirmed, {} rejected), {} pending, {} lost (read from {})",
                d.seconds,
                d.resolved,
                self.accepted.len(),
                d.confirmed,
                d.rejected,
                d.pending,
                d.lost,
                d.source
            );
        }
        if let Some(c) = &self.checkout {
            println!(
                "checkout (pay ratio {}, pay after {:.1}s): {} paid, {} cancelled, {} expired, {} still held; \
                 {} pays too late; {} units back on sale, {} sold again; {} units booked in all, the last {}",
                c.pay_ratio,
                c.pay_delay_seconds,
                c.paid,
                c.cancelled,
                c.expired,
                c.held,
                c.pays_too_late,
                c.units_returned,
                c.units_sold_again,
                c.units_booked,
                c.last_sale_seconds
                    .map_or("never".to_owned(), |s| format!("{s:.1}s into the storm"))
            );
        }
    }

    pub fn print_thresholds(&self) {
        if self.thresholds.is_empty() {
            return;
        }
        let mut t = output::table(&["threshold", "actual", ""]);
        for r in &self.thresholds {
            t.add_row(vec![
                Cell::new(&r.expr),
                Cell::new(&r.actual),
                output::verdict(r.ok, "✓", "✗"),
            ]);
        }
        println!("{t}");
    }
}

pub(super) fn status_label(status: &str) -> String {
    let meaning = match status {
        "200" => "repeat of an accepted key",
        "202" => "accepted",
        "400" => "invalid request",
        "404" => "unknown product",
        "409" => "sold out",
        "413" => "payload too large",
        "422" => "key reused with another body",
        "503" => "unavailable",
        _ => "",
    };
    if meaning.is_empty() {
        status.to_owned()
    } else {
        format!("{status} {meaning}")
    }
}

/// `0.0123` -> `12.3ms`.
pub fn format_seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2}s")
    } else if s >= 0.001 {
        format!("{:.1}ms", s * 1e3)
    } else {
        format!("{:.0}µs", s * 1e6)
    }
}
