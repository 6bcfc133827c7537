//! How `fsctl` prints: one JSON document with `--json`, otherwise tables
//! (comfy-table), coloured only on a terminal and never under `NO_COLOR`.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, Color, ContentArrangement, Table};
use serde::Serialize;
use std::io::IsTerminal;

pub fn color() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.iter().copied());
    t
}

/// A cell green when `good`, red otherwise (plain without colour).
pub fn verdict(good: bool, yes: &str, no: &str) -> Cell {
    let cell = Cell::new(if good { yes } else { no });
    if !color() {
        return cell;
    }
    cell.fg(if good { Color::Green } else { Color::Red })
}

pub fn json(value: &impl Serialize) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    );
}

/// `4900.0` -> `4,900`.
pub fn thousands(n: f64) -> String {
    let digits = (n.round() as u64).to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A spinner with a message on stderr, or a hidden one when `show` is false.
pub fn spinner(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}
