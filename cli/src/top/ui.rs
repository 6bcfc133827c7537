//! Rendering: a pure function of the state and the time. Readable at 80×24;
//! a taller terminal adds the workers and locks to the overview, a wider one
//! adds product names.

use super::app::{App, Panel, Percentiles, ProductRow, Source, left};
use crate::storm::printer::format_seconds;
use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Clear, Paragraph, Row, Sparkline, Table, Wrap};
use std::time::{Duration, Instant};

pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;

/// Colours when allowed; without them, emphasis through modifiers only.
struct Paint {
    color: bool,
}

impl Paint {
    fn fg(&self, c: Color) -> Style {
        if self.color {
            Style::new().fg(c)
        } else {
            Style::new()
        }
    }
    fn good(&self) -> Style {
        self.fg(Color::Green)
    }
    fn bad(&self) -> Style {
        self.fg(Color::Red).add_modifier(Modifier::BOLD)
    }
    fn dim(&self) -> Style {
        if self.color {
            Style::new().fg(Color::DarkGray)
        } else {
            Style::new().add_modifier(Modifier::DIM)
        }
    }
    fn badge(&self, ok: bool) -> Style {
        let base = Style::new().add_modifier(Modifier::BOLD);
        match (self.color, ok) {
            (true, true) => base.fg(Color::Black).bg(Color::Green),
            (true, false) => base.fg(Color::White).bg(Color::Red),
            (false, _) => base.add_modifier(Modifier::REVERSED),
        }
    }
}

pub fn draw(frame: &mut Frame, app: &App, now: Instant) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let text = format!(
            "terminal too small (need {MIN_WIDTH}×{MIN_HEIGHT}, have {}×{})",
            area.width, area.height
        );
        frame.render_widget(
            Paragraph::new(text)
                .alignment(Alignment::Center)
                .wrap(Wrap { trim: true }),
            area,
        );
        return;
    }
    let paint = Paint { color: app.color };
    let [header, body, footer] = Layout::vertical([
        Constraint::Length(3),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(area);
    draw_header(frame, app, now, &paint, header);
    match app.panel {
        Panel::Overview => draw_overview(frame, app, now, &paint, body),
        Panel::Products => draw_products(frame, app, now, &paint, body),
        Panel::Workers => draw_workers(frame, app, now, &paint, body),
        Panel::Locks => draw_locks(frame, app, now, &paint, body),
    }
    draw_footer(frame, app, &paint, footer);
    if app.help {
        draw_help(frame, area);
    }
}

fn every(d: Duration) -> String {
    match d.as_millis() {
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn draw_header(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let [top, health, tabs] = Layout::vertical([Constraint::Length(1); 3]).areas(area);
    let mut line = vec![
        Span::styled("fsctl top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            " · namespace {} · up {} · every {}",
            app.namespace,
            hms(now.saturating_duration_since(app.started)),
            every(app.refresh)
        )),
    ];
    if app.frozen {
        line.push(Span::styled("  FROZEN (f resumes)", paint.bad()));
    }
    let (badge, ok) = match (&app.shown.violations, app.stale(Source::Postgres, now)) {
        (_, Some(_)) | (None, _) => (" LEDGER ? ".to_owned(), false),
        (Some(v), None) if v.is_empty() => (" LEDGER OK ".to_owned(), true),
        (Some(v), None) => {
            let first = &v[0];
            let on = first
                .product_id
                .map(|p| format!(" on product {p}"))
                .unwrap_or_default();
            let more = match v.len() {
                1 => String::new(),
                n => format!(" (+{} more)", n - 1),
            };
            (
                format!(
                    " VIOLATED: invariant {}{on}: {}{more} ",
                    first.invariant, first.detail
                ),
                false,
            )
        }
    };
    if ok || badge.len() < 12 {
        let [title, badge_area] = Layout::horizontal([
            Constraint::Min(0),
            Constraint::Length(badge.chars().count() as u16),
        ])
        .areas(top);
        frame.render_widget(Paragraph::new(Line::from(line)), title);
        frame.render_widget(
            Paragraph::new(Span::styled(badge, paint.badge(ok))),
            badge_area,
        );
    } else {
        // A broken ledger takes the whole line: nothing else matters more.
        frame.render_widget(
            Paragraph::new(Span::styled(
                format!("{badge:<w$}", w = top.width as usize),
                paint.badge(false),
            )),
            top,
        );
    }

    let mut spans = Vec::new();
    for source in Source::ALL {
        let h = &app.health[&source];
        let up = h.is_up() && app.stale(source, now).is_none();
        spans.push(Span::styled(
            format!("{} {}", if up { "●" } else { "✗" }, source.name()),
            if up { paint.good() } else { paint.bad() },
        ));
        if source == Source::Api
            && up
            && let Some(why) = &app.shown.not_ready
        {
            spans.push(Span::styled(format!(" (not ready: {why})"), paint.bad()));
        }
        if let Some(e) = &h.error {
            spans.push(Span::styled(format!(" ({e})"), paint.bad()));
        }
        spans.push(Span::raw("   "));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), health);

    let mut tab_spans = Vec::new();
    for (i, panel) in Panel::ALL.iter().enumerate() {
        let label = format!(" {} {} ", i + 1, panel.title());
        let style = if *panel == app.panel {
            Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD)
        } else {
            Style::new()
        };
        tab_spans.push(Span::styled(label, style));
        tab_spans.push(Span::raw(" "));
    }
    frame.render_widget(Paragraph::new(Line::from(tab_spans)), tabs);
}

/// A panel's frame; greyed with "stale 12s: why" when its source is stale.
fn panel<'a>(
    title: &str,
    app: &App,
    now: Instant,
    sources: &[Source],
    paint: &Paint,
) -> (Block<'a>, Style) {
    let stale = sources
        .iter()
        .find_map(|s| app.stale(*s, now).map(|st| (*s, st)));
    match stale {
        None => (Block::bordered().title(format!(" {title} ")), Style::new()),
        Some((source, (age, error))) => {
            let mut note = match age.as_secs() {
                0 => format!(" {title} · {} down", source.name()),
                s => format!(" {title} · {} stale {s}s", source.name()),
            };
            if let Some(e) = error {
                note.push_str(&format!(": {e}"));
            }
            note.push(' ');
            (
                Block::bordered()
                    .title(Span::styled(note, paint.bad()))
                    .style(paint.dim()),
                paint.dim(),
            )
        }
    }
}

fn rate(r: Option<f64>) -> String {
    r.map_or("—".to_owned(), |r| format!("{r:.0}/s"))
}

fn draw_overview(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let (main, bottom) = if area.height >= 30 {
        let [m, b] = Layout::vertical([Constraint::Min(20), Constraint::Length(10)]).areas(area);
        (m, Some(b))
    } else {
        (area, None)
    };
    let left_width = if main.width >= 120 { 50 } else { 40 };
    let [left_col, right_col] =
        Layout::horizontal([Constraint::Length(left_width), Constraint::Min(0)]).areas(main);
    let [throughput, queue, latency] = Layout::vertical([
        Constraint::Min(8),
        Constraint::Length(7),
        Constraint::Length(5),
    ])
    .areas(left_col);
    draw_throughput(frame, app, now, paint, throughput);
    draw_queue(frame, app, now, paint, queue);
    draw_latency(frame, app, now, paint, latency);
    draw_products(frame, app, now, paint, right_col);
    if let Some(bottom) = bottom {
        let [w, l] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
            .areas(bottom);
        draw_workers(frame, app, now, paint, w);
        draw_locks(frame, app, now, paint, l);
    }
}

fn draw_throughput(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let (block, style) = panel(
        "Throughput",
        app,
        now,
        &[Source::Api, Source::Postgres],
        paint,
    );
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let v = &app.shown;
    let series = [
        ("accepted", v.accepted_now, &v.accepted, Color::Cyan),
        ("confirmed", v.confirmed_now, &v.confirmed, Color::Green),
        ("rejected", v.rejected_now, &v.rejected, Color::Yellow),
    ];
    let rows = Layout::vertical([Constraint::Ratio(1, 3); 3]).split(inner);
    for ((name, now_rate, history, color), row) in series.into_iter().zip(rows.iter()) {
        let [label, spark] =
            Layout::horizontal([Constraint::Length(20), Constraint::Min(0)]).areas(*row);
        frame.render_widget(
            Paragraph::new(format!("{name:<10}{:>9}", rate(now_rate))).style(style),
            label,
        );
        let width = spark.width as usize;
        let recent: Vec<u64> = history
            .iter()
            .skip(history.len().saturating_sub(width))
            .copied()
            .collect();
        frame.render_widget(
            Sparkline::default()
                .data(&recent)
                .style(paint.fg(color).patch(style)),
            spark,
        );
    }
}

fn draw_queue(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let (block, style) = panel("Queue", app, now, &[Source::Broker], paint);
    let lines = match &app.shown.queue {
        None => vec![Line::from("waiting for RabbitMQ…")],
        Some(q) => {
            let eta = match app.drain_eta() {
                Some(d) if d.is_zero() => "drained".to_owned(),
                Some(d) => format!("{:.1}s", d.as_secs_f64()),
                None => "— (nothing processed lately)".to_owned(),
            };
            let mut lines = vec![
                Line::from(format!(
                    "ready      {:>8}   consumers {:>3}",
                    q.orders_ready, q.orders_consumers
                )),
                Line::from(format!("in flight  {:>8}", app.inflight())),
                Line::from(vec![
                    Span::raw("dead letters "),
                    Span::styled(
                        format!("{:>6}", q.dlq_ready),
                        if q.dlq_ready > 0 {
                            paint.bad()
                        } else {
                            Style::new()
                        },
                    ),
                ]),
                Line::from(format!("drain ETA  {eta}")),
            ];
            if q.partitions.len() > 1 {
                // Each partition's ready messages and consumers: p:ready/consumers.
                let each: Vec<String> = q
                    .partitions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("{i}:{}/{}", p.ready, p.consumers))
                    .collect();
                lines.push(Line::from(format!("partitions {}", each.join(" "))));
            }
            lines
        }
    };
    frame.render_widget(Paragraph::new(lines).style(style).block(block), area);
}

fn draw_latency(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let (block, style) = panel("Latency, last 10s", app, now, &[Source::Api], paint);
    let row = |name: &str, p: Option<Percentiles>| match p {
        Some(p) => format!(
            "{name:<13}{:>8}{:>8}{:>8}",
            format_seconds(p.p50),
            format_seconds(p.p90),
            format_seconds(p.p99)
        ),
        None => format!("{name:<13}{:>8}", "idle"),
    };
    let lines = vec![
        Line::from(format!("{:<13}{:>8}{:>8}{:>8}", "", "p50", "p90", "p99")),
        Line::from(row("accept", app.shown.accept_latency)),
        Line::from(row("accept→commit", app.shown.commit_latency)),
    ];
    frame.render_widget(Paragraph::new(lines).style(style).block(block), area);
}

fn gauge(p: &ProductRow, width: usize) -> String {
    if p.stock <= 0 {
        return format!("{:<width$}", "SOLD OUT");
    }
    let filled = ((left(p) * width as f64).round() as usize).clamp(1, width);
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

fn draw_products(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let rows_shown = app.products();
    let title = format!(
        "Products ({}{}, sort: {})",
        rows_shown.len(),
        if app.filter.is_empty() {
            String::new()
        } else {
            format!(" matching \"{}\"", app.filter)
        },
        app.sort.name()
    );
    // A held-units column, and the expiries per second, when holds are used.
    let holds = rows_shown.iter().any(|p| p.held > 0);
    let title = match app.shown.expired_now {
        Some(rate) if holds || rate > 0.0 => format!("{title} · holds expiring {rate:.1}/s"),
        _ => title,
    };
    let (block, style) = panel(&title, app, now, &[Source::Postgres], paint);
    let wide = area.width >= 70;
    let bar = if wide { 16 } else { 8 };
    let violated: Vec<i64> = app
        .shown
        .violations
        .iter()
        .flatten()
        .filter_map(|v| v.product_id)
        .collect();
    let rows: Vec<Row> = rows_shown
        .iter()
        .map(|p| {
            let bar_style = match left(p) {
                l if p.stock <= 0 || l <= 0.1 => paint.fg(Color::Red),
                l if l <= 0.5 => paint.fg(Color::Yellow),
                _ => paint.fg(Color::Green),
            };
            let id = if violated.contains(&p.id) {
                Cell::from(Span::styled(format!("{}✗", p.id), paint.bad()))
            } else {
                Cell::from(p.id.to_string())
            };
            let mut cells = vec![id];
            if wide {
                cells.push(Cell::from(p.name.clone()));
            }
            cells.push(Cell::from(Span::styled(gauge(p, bar), bar_style)));
            cells.push(Cell::from(format!("{}/{}", p.stock, p.seeded)));
            if wide {
                cells.push(Cell::from(p.tokens.map_or("-".into(), |t| t.to_string())));
            }
            cells.push(Cell::from(p.confirmed.to_string()));
            if holds {
                cells.push(Cell::from(p.held.to_string()));
            }
            cells.push(Cell::from(p.rejected.to_string()));
            Row::new(cells)
        })
        .collect();
    let mut header = vec!["id"];
    let mut widths = vec![Constraint::Length(if wide { 6 } else { 4 })];
    if wide {
        header.push("name");
        widths.push(Constraint::Min(8));
    }
    header.extend(["left", "stock"]);
    widths.extend([
        Constraint::Length(bar as u16),
        Constraint::Length(if wide { 15 } else { 9 }),
    ]);
    if wide {
        // Units buys may still take: the admission counter.
        header.push("adm");
        widths.push(Constraint::Length(8));
    }
    header.push("conf");
    widths.push(Constraint::Length(if wide { 8 } else { 5 }));
    if holds {
        // Units held for buyers who have not paid yet.
        header.push("held");
        widths.push(Constraint::Length(if wide { 8 } else { 5 }));
    }
    header.push("rej");
    widths.push(Constraint::Length(if wide { 8 } else { 5 }));
    let table = Table::new(rows, widths)
        .header(Row::new(header).style(Style::new().add_modifier(Modifier::BOLD)))
        .style(style)
        .block(block);
    frame.render_widget(table, area);
}

fn draw_workers(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    let (block, style) = panel("Workers", app, now, &[Source::Redis], paint);
    let rows: Vec<Row> = app
        .shown
        .workers
        .iter()
        .map(|w| {
            let state = if w.gone {
                Span::styled("gone", paint.bad())
            } else {
                Span::styled("alive", paint.good())
            };
            Row::new(vec![
                Cell::from(w.view.id.clone()),
                Cell::from(state),
                Cell::from(format!("{:.1}s", w.view.last_beat_seconds)),
                Cell::from(w.view.processed.to_string()),
                Cell::from(w.view.inflight.to_string()),
                Cell::from(w.view.product.map_or("—".to_owned(), |p| p.to_string())),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let table = Table::new(
        rows,
        [
            Constraint::Min(12),
            Constraint::Length(5),
            Constraint::Length(5),
            Constraint::Length(8),
            Constraint::Length(5),
            Constraint::Length(7),
        ],
    )
    .header(
        Row::new(["worker", "state", "beat", "orders", "held", "product"])
            .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .style(style)
    .block(block);
    frame.render_widget(table, area);
    if empty {
        hint(
            frame,
            area,
            "no worker heartbeats (start one: fsctl up)",
            paint,
        );
    }
}

fn draw_locks(frame: &mut Frame, app: &App, now: Instant, paint: &Paint, area: Rect) {
    // On a Redis Cluster, each master and the keys it holds.
    // On a Redis Cluster, each master and its keys (`?`: no answer); the
    // host is left out when they all share one.
    let title = match app.shown.masters.as_slice() {
        masters if masters.len() > 1 => {
            let host = |a: &str| a.rsplit_once(':').map_or(a, |(h, _)| h).to_owned();
            let one_host = masters
                .iter()
                .all(|m| host(&m.address) == host(&masters[0].address));
            let each: Vec<String> = masters
                .iter()
                .map(|m| {
                    let at = match m.address.rsplit_once(':') {
                        Some((_, port)) if one_host => format!(":{port}"),
                        _ => m.address.clone(),
                    };
                    let keys = m.keys.map_or("?".to_owned(), |k| k.to_string());
                    format!("{at}={keys}")
                })
                .collect();
            format!("Locks · Redis masters (keys) {}", each.join(" "))
        }
        _ => "Locks".to_owned(),
    };
    let (block, style) = panel(&title, app, now, &[Source::Redis], paint);
    let rows: Vec<Row> = app
        .shown
        .locks
        .iter()
        .map(|l| {
            Row::new(vec![
                l.product_id.to_string(),
                l.holder.clone(),
                l.token.to_string(),
                format!("{:.1}s", l.ttl_ms as f64 / 1000.0),
            ])
        })
        .collect();
    let empty = rows.is_empty();
    let table = Table::new(
        rows,
        [
            Constraint::Length(8),
            Constraint::Min(12),
            Constraint::Length(8),
            Constraint::Length(7),
        ],
    )
    .header(
        Row::new(["product", "holder", "token", "ttl"])
            .style(Style::new().add_modifier(Modifier::BOLD)),
    )
    .style(style)
    .block(block);
    frame.render_widget(table, area);
    if empty {
        hint(frame, area, "no product lock held", paint);
    }
}

/// A dim line inside an empty table, below its header.
fn hint(frame: &mut Frame, area: Rect, text: &'static str, paint: &Paint) {
    let line = Rect {
        y: area.y + 2,
        height: 1,
        x: area.x + 2,
        width: area.width.saturating_sub(4),
    };
    frame.render_widget(Paragraph::new(text).style(paint.dim()), line);
}

fn draw_footer(frame: &mut Frame, app: &App, paint: &Paint, area: Rect) {
    let line = if app.filtering {
        Line::from(vec![
            Span::styled(
                "filter products: ",
                Style::new().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!("{}▏", app.filter)),
            Span::styled("  Enter keeps it, Esc clears it", paint.dim()),
        ])
    } else {
        Line::from(Span::styled(
            "q quit  ? help  f freeze  / filter  s sort  Tab/1-4 panels  Esc back",
            paint.dim(),
        ))
    };
    frame.render_widget(Paragraph::new(line), area);
}

pub const HELP: &[(&str, &str)] = &[
    ("q, Ctrl-C", "quit"),
    ("?", "this help (Esc or ? closes it)"),
    ("f", "freeze the display; data collection goes on"),
    (
        "/",
        "filter products by id or name; Enter keeps, Esc clears",
    ),
    ("s", "sort products: id, stock left, confirmed, rejected"),
    ("Tab, Shift-Tab", "next, previous panel"),
    ("1-4", "Overview, Products, Workers, Locks"),
    ("Esc", "close the help, or clear the filter"),
];

fn draw_help(frame: &mut Frame, area: Rect) {
    let width = 76.min(area.width);
    let height = (HELP.len() as u16 + 4).min(area.height);
    let popup = Rect {
        x: area.x + (area.width - width) / 2,
        y: area.y + (area.height - height) / 2,
        width,
        height,
    };
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{k:<16}"),
                    Style::new().add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(
        "The badge re-runs fsctl verify's checks every second.",
    ));
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Keys ")),
        popup,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::app::{ApiSample, LedgerSample, RedisSample, Sample};
    use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
    use flashsale_engine::audit::{ProductBooks, Violation};
    use flashsale_engine::heartbeat::WorkerView;
    use flashsale_engine::locks::LockView;
    use flashsale_engine::queue::QueueView;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;

    struct Sale {
        app: App,
        t0: Instant,
        tick: u32,
        redis_down: Option<String>,
    }

    fn books(id: i64, seeded: i64, stock: i64, rejected: i64) -> ProductBooks {
        ProductBooks {
            id,
            seeded_stock: seeded,
            stock,
            confirmed_units: seeded - stock,
            held_units: 0,
            rejected_orders: rejected,
            ok: true,
        }
    }

    fn worker(id: &str, processed: u64, inflight: u64, product: Option<i64>) -> WorkerView {
        WorkerView {
            id: id.into(),
            started_at: "2026-11-25T17:00:00Z".into(),
            processed,
            inflight,
            product,
            metrics_addr: String::new(),
            last_beat_seconds: 0.4,
            alive: true,
        }
    }

    impl Sale {
        /// A sale a few seconds in: orders flowing, product 1 nearly gone.
        fn healthy() -> Self {
            let t0 = Instant::now();
            let mut sale = Self {
                app: App::new(
                    "flashsale",
                    "http://127.0.0.1:3000",
                    Duration::from_millis(500),
                    false,
                    t0,
                ),
                t0,
                tick: 0,
                redis_down: None,
            };
            for (accepted, confirmed, stock) in [
                (0.0, 0, 100),
                (900.0, 30, 70),
                (2100.0, 60, 40),
                (3000.0, 88, 12),
            ] {
                sale.step(
                    accepted,
                    confirmed,
                    &[
                        books(1, 100, stock, 0),
                        books(2, 500, 450, 0),
                        books(3, 50, 50, 0),
                    ],
                );
            }
            sale
        }

        fn at(&self) -> Instant {
            self.t0 + Duration::from_millis(500) * self.tick
        }

        fn step(&mut self, accepted: f64, confirmed: u64, products: &[ProductBooks]) {
            self.tick += 1;
            let at = self.at();
            let latency = vec![
                (0.001, accepted * 0.6),
                (0.005, accepted * 0.95),
                (0.025, accepted),
                (f64::INFINITY, accepted),
            ];
            self.app.on_sample(
                at,
                Sample::Api(Ok(ApiSample {
                    not_ready: None,
                    accepted_total: accepted,
                    buy_latency: latency.clone(),
                })),
            );
            self.app.on_sample(
                at,
                Sample::Postgres(Ok(LedgerSample {
                    books: products.to_vec(),
                    names: [(1, "Hot item"), (2, "Sneaker"), (3, "Console")]
                        .into_iter()
                        .map(|(i, n)| (i, n.to_owned()))
                        .collect(),
                    violations: Vec::new(),
                    confirmed_orders: confirmed,
                    rejected_orders: confirmed / 10,
                    expired_orders: 0,
                    tokens: products.iter().map(|b| (b.id, b.stock)).collect(),
                })),
            );
            let redis = match &self.redis_down {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            };
            self.app.on_sample(
                at,
                Sample::Redis(redis.map(|()| RedisSample {
                    workers: vec![
                        worker("worker-a", confirmed, 120, Some(1)),
                        worker("worker-b", confirmed / 2, 40, None),
                    ],
                    locks: vec![LockView {
                        product_id: 1,
                        holder: "worker-a".into(),
                        token: 42,
                        ttl_ms: 9_400,
                    }],
                    masters: Vec::new(),
                    commit_latency: latency.iter().map(|(le, n)| (*le * 4.0, *n)).collect(),
                })),
            );
            self.app.on_sample(
                at,
                Sample::Broker(Ok(QueueView {
                    orders_ready: 340,
                    orders_consumers: 2,
                    dlq_ready: 0,
                    dlq_consumers: 0,
                    partitions: Vec::new(),
                })),
            );
        }

        fn render(&self, width: u16, height: u16) -> String {
            let mut terminal =
                Terminal::new(TestBackend::new(width, height)).expect("test backend");
            terminal
                .draw(|f| draw(f, &self.app, self.at()))
                .expect("draws");
            terminal.backend().to_string()
        }
    }

    #[test]
    fn healthy_sale() {
        let sale = Sale::healthy();
        insta::assert_snapshot!("healthy_80x24", sale.render(80, 24));
        insta::assert_snapshot!("healthy_140x40", sale.render(140, 40));
    }

    #[test]
    fn sold_out_product() {
        let mut sale = Sale::healthy();
        sale.step(
            3100.0,
            100,
            &[
                books(1, 100, 0, 37),
                books(2, 500, 450, 0),
                books(3, 50, 50, 0),
            ],
        );
        let screen = sale.render(80, 24);
        assert!(screen.contains("SOLD OUT"));
        insta::assert_snapshot!("sold_out_80x24", screen);
    }

    #[test]
    fn partitions_show_in_the_queue_panel() {
        use flashsale_engine::queue::rabbitmq::PartitionView;
        let mut sale = Sale::healthy();
        let at = sale.at();
        let part = |p: u16, ready| PartitionView {
            queue: format!("ns.orders.{p}"),
            ready,
            consumers: 2,
        };
        sale.app.on_sample(
            at,
            Sample::Broker(Ok(QueueView {
                orders_ready: 30,
                orders_consumers: 2,
                partitions: vec![part(0, 10), part(1, 0), part(2, 20)],
                ..QueueView::default()
            })),
        );
        let screen = sale.render(140, 40);
        assert!(
            screen.contains("partitions 0:10/2 1:0/2 2:20/2"),
            "{screen}"
        );
    }

    #[test]
    fn held_units_get_a_column_when_a_product_has_holds() {
        let mut sale = Sale::healthy();
        let header = |screen: &str| {
            screen
                .lines()
                .find(|l| l.contains("conf") && l.contains("rej"))
                .map(str::to_owned)
                .unwrap_or_default()
        };
        assert!(!header(&sale.render(140, 40)).contains("held"));
        let at = sale.at();
        let mut held = books(4, 100, 60, 0);
        held.confirmed_units = 25;
        held.held_units = 15;
        sale.app.on_sample(
            at,
            Sample::Postgres(Ok(LedgerSample {
                books: vec![held],
                ..LedgerSample::default()
            })),
        );
        let screen = sale.render(140, 40);
        let line = header(&screen);
        assert!(
            line.find("held") > line.find("conf"),
            "no held column: {screen}"
        );
        assert!(
            screen
                .lines()
                .any(|l| l.contains("60/100") && l.contains(" 15 ")),
            "{screen}"
        );
    }

    #[test]
    fn redis_cluster_masters_show_in_the_locks_panel() {
        use flashsale_engine::redis_conn::Master;
        let mut sale = Sale::healthy();
        let at = sale.at();
        let master = |port: u16, keys| Master {
            address: format!("127.0.0.1:{port}"),
            slots: 5461,
            replicas: 1,
            keys,
        };
        sale.app.on_sample(
            at,
            Sample::Redis(Ok(RedisSample {
                masters: vec![
                    master(7001, Some(12)),
                    master(7002, None),
                    master(7006, Some(3)),
                ],
                ..RedisSample::default()
            })),
        );
        let screen = sale.render(140, 40);
        assert!(
            screen.contains("Redis masters (keys) :7001=12 :7002=? :7006=3"),
            "{screen}"
        );
    }

    #[test]
    fn violated_invariant() {
        let mut sale = Sale::healthy();
        let at = sale.at();
        sale.app.on_sample(
            at,
            Sample::Postgres(Ok(LedgerSample {
                books: vec![
                    ProductBooks {
                        ok: false,
                        ..books(1, 100, 5, 0)
                    },
                    books(2, 500, 450, 0),
                ],
                violations: vec![Violation {
                    invariant: 1,
                    product_id: Some(1),
                    detail: "seeded 100 != stock 5 + confirmed 96 (off by -1)".into(),
                }],
                ..LedgerSample::default()
            })),
        );
        let screen = sale.render(80, 24);
        assert!(screen.contains("VIOLATED: invariant 1 on product 1"));
        insta::assert_snapshot!("violated_80x24", screen);
    }

    #[test]
    fn dead_redis() {
        let mut sale = Sale::healthy();
        sale.redis_down = Some("Connection refused (os error 111)".into());
        for _ in 0..24 {
            sale.step(3000.0, 88, &[books(1, 100, 12, 0)]);
        }
        sale.app.panel = Panel::Workers;
        let screen = sale.render(80, 24);
        assert!(screen.contains("Redis stale 12s"), "{screen}");
        assert!(
            screen.contains("● PostgreSQL"),
            "the others stay up: {screen}"
        );
        insta::assert_snapshot!("dead_redis_80x24", screen);
    }

    #[test]
    fn help_overlay() {
        let mut sale = Sale::healthy();
        sale.app
            .on_key(KeyEvent::new(KeyCode::Char('?'), KeyModifiers::NONE));
        let screen = sale.render(80, 24);
        for (key, _) in HELP {
            assert!(screen.contains(key), "help lists {key}");
        }
        insta::assert_snapshot!("help_80x24", screen);
    }

    #[test]
    fn too_small() {
        let screen = Sale::healthy().render(60, 20);
        assert!(screen.contains("terminal too small (need 80×24"));
    }
}
