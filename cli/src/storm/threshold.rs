//! `--threshold EXPR`, k6 style: `p99<250ms`, `rate(202)>0.1`, `errors<1%`,
//! `lost==0`. Parsed before anything is sent; checked against the report.

use super::printer::format_seconds;
use super::report::StormReport;
use serde::Serialize;

/// The metrics a threshold may name, for `--help` and errors.
pub const METRICS: &str = "min, p50, p90, p95, p99, p999, max, mean (latency: 250ms, 1.5s, 800us; \
a bare number is ms), rate(STATUS) and rate(4xx) (share of requests: 0.9 or 90%), errors (share \
of requests with no answer), unexpected (answers not as the contract says), lost, pending \
(accepted orders after the drain), rps (answers/s), accepts (202s/s)";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Metric {
    Quantile(f64),
    Min,
    Max,
    Mean,
    Rate,
    Errors,
    Unexpected,
    Lost,
    Pending,
    Rps,
    Accepts,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

/// A parsed `--threshold`.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    pub expr: String,
    metric: Metric,
    /// For `rate(...)`: the status or class.
    status: String,
    op: Op,
    value: f64,
}

/// A threshold checked against a report.
#[derive(Debug, Clone, Serialize)]
pub struct ThresholdResult {
    pub expr: String,
    pub ok: bool,
    pub actual: String,
}

impl std::str::FromStr for Threshold {
    type Err = String;
    fn from_str(expr: &str) -> Result<Self, String> {
        let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
        let ops = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        let (at, token, op) = ops
            .iter()
            .filter_map(|(t, op)| compact.find(t).map(|at| (at, *t, *op)))
            .min_by_key(|(at, t, _)| (*at, usize::MAX - t.len()))
            .ok_or_else(|| {
                format!("threshold {expr:?}: expected METRIC OP VALUE, e.g. p99<250ms (OP: < <= > >= == !=)")
            })?;
        let (name, value) = (&compact[..at], &compact[at + token.len()..]);
        let (metric, status) = metric(name).ok_or_else(|| {
            format!("threshold {expr:?}: unknown metric {name:?}; known: {METRICS}")
        })?;
        let value = parse_value(metric, value)
            .ok_or_else(|| format!("threshold {expr:?}: {value:?} is not a value for {name}"))?;
        Ok(Self {
            expr: expr.trim().to_owned(),
            metric,
            status,
            op,
            value,
        })
    }
}

fn metric(name: &str) -> Option<(Metric, String)> {
    let plain = |m| Some((m, String::new()));
    match name {
        "min" => plain(Metric::Min),
        "max" => plain(Metric::Max),
        "mean" | "avg" => plain(Metric::Mean),
        "p999" | "p99.9" => plain(Metric::Quantile(0.999)),
        "errors" => plain(Metric::Errors),
        "unexpected" => plain(Metric::Unexpected),
        "lost" => plain(Metric::Lost),
        "pending" => plain(Metric::Pending),
        "rps" => plain(Metric::Rps),
        "accepts" => plain(Metric::Accepts),
        _ => {
            if let Some(p) = name.strip_prefix('p')
                && let Ok(p) = p.parse::<u8>()
                && (1..100).contains(&p)
            {
                return plain(Metric::Quantile(f64::from(p) / 100.0));
            }
            let status = name.strip_prefix("rate(")?.strip_suffix(')')?;
            let valid = status.len() == 3
                && status.starts_with(|c: char| ('1'..='5').contains(&c))
                && (status[1..].chars().all(|c| c.is_ascii_digit()) || &status[1..] == "xx");
            valid.then(|| (Metric::Rate, status.to_owned()))
        }
    }
}

fn parse_value(metric: Metric, raw: &str) -> Option<f64> {
    let number = |s: &str| s.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    match metric {
        Metric::Quantile(_) | Metric::Min | Metric::Max | Metric::Mean => {
            if let Some(us) = raw.strip_suffix("us").or_else(|| raw.strip_suffix("µs")) {
                return number(us).map(|v| v / 1e6);
            }
            if let Some(ms) = raw.strip_suffix("ms") {
                return number(ms).map(|v| v / 1e3);
            }
            if let Some(s) = raw.strip_suffix('s') {
                return number(s);
            }
            number(raw).map(|v| v / 1e3)
        }
        Metric::Rate | Metric::Errors => match raw.strip_suffix('%') {
            Some(p) => number(p).map(|v| v / 100.0).filter(|v| *v <= 1.0),
            None => number(raw).filter(|v| *v <= 1.0),
        },
        _ => number(raw),
    }
}

impl Threshold {
    /// Needs the drain's figures (`lost`, `pending`).
    pub fn needs_drain(&self) -> bool {
        matches!(self.metric, Metric::Lost | Metric::Pending)
    }

    pub fn check(&self, report: &StormReport) -> ThresholdResult {
        let total = report.requests.max(1) as f64;
        let drain = report.drain.clone().unwrap_or_default();
        let l = &report.latency_seconds;
        let actual = match self.metric {
            Metric::Quantile(q) => report.latency_quantile(q),
            Metric::Min => l.min,
            Metric::Max => l.max,
            Metric::Mean => l.mean,
            Metric::Rate => report.status_count(&self.status) as f64 / total,
            Metric::Errors => report.error_count() as f64 / total,
            Metric::Unexpected => report.mix.unexpected as f64,
            Metric::Lost => drain.lost as f64,
            Metric::Pending => drain.pending as f64,
            Metric::Rps => report.answer_rate,
            Metric::Accepts => report.accept_rate,
        };
        let v = self.value;
        let ok = match self.op {
            Op::Lt => actual < v,
            Op::Le => actual <= v,
            Op::Gt => actual > v,
            Op::Ge => actual >= v,
            Op::Eq => (actual - v).abs() < 1e-9,
            Op::Ne => (actual - v).abs() >= 1e-9,
        };
        let shown = match self.metric {
            Metric::Quantile(_) | Metric::Min | Metric::Max | Metric::Mean => {
                format_seconds(actual)
            }
            Metric::Rate | Metric::Errors => format!("{:.2}%", actual * 100.0),
            Metric::Rps | Metric::Accepts => format!("{actual:.0}/s"),
            _ => format!("{actual:.0}"),
        };
        ThresholdResult {
            expr: self.expr.clone(),
            ok,
            actual: shown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_k6_style_expressions() {
        let t: Threshold = "p99<250ms".parse().expect("valid");
        assert_eq!(
            (t.metric, t.op, t.value),
            (Metric::Quantile(0.99), Op::Lt, 0.25)
        );
        let t: Threshold = "rate(202) > 0.1".parse().expect("valid");
        assert_eq!(
            (t.metric, t.status.as_str(), t.op),
            (Metric::Rate, "202", Op::Gt)
        );
        let t: Threshold = "errors<1%".parse().expect("valid");
        assert_eq!((t.metric, t.value), (Metric::Errors, 0.01));
        let t: Threshold = "lost==0".parse().expect("valid");
        assert!(t.needs_drain());
        let t: Threshold = "p50<=1.5s".parse().expect("valid");
        assert_eq!((t.op, t.value), (Op::Le, 1.5));
        let t: Threshold = "rate(4xx)<=5%".parse().expect("valid");
        assert_eq!(t.status, "4xx");
        assert_eq!("max<800".parse::<Threshold>().expect("valid").value, 0.8);
    }

    #[test]
    fn refuses_unknown_metrics_and_malformed_expressions() {
        for bad in [
            "p99",
            "p99<",
            "latency<1s",
            "p99<fast",
            "rate(abc)>0.1",
            "rate(202)>2",
            "errors<150%",
            "p100<1s",
            "<5",
            "lost==-1",
        ] {
            assert!(bad.parse::<Threshold>().is_err(), "{bad}");
        }
    }
}
