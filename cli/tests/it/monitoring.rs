//! Monitoring: the alert rules and their tests pass promtool; the rules and
//! the dashboard use only the contract's metric names; a real API and worker
//! (started by `fsctl up`) export every one of them and a real Prometheus
//! scrapes both; docker-compose.yml has the structure the README promises.

use flashsale_testkit::env;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The metric names of the contract's "Metrics" table.
const CONTRACT_METRICS: &[&str] = &[
    "flashsale_order_requests_total",
    "flashsale_request_duration_seconds",
    "flashsale_orders_processed_total",
    "flashsale_order_latency_seconds",
    "flashsale_batch_size",
    "flashsale_lock_wait_seconds",
    "flashsale_stock_level",
    "flashsale_queue_depth",
    "flashsale_queue_consumers",
    "flashsale_inflight_orders",
    // Contract v3, admission by stock tokens.
    "flashsale_admission_tokens",
    // Contract v3, holds; the overdue gauge is ours (invariant 7's alert
    // needs to see holds past their expiry, which the contract's two cannot).
    "flashsale_holds",
    "flashsale_hold_outcomes_total",
    "flashsale_holds_overdue",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo().join("monitoring/prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is missing ({e}): scripts/test installs Debian's prometheus package")
        });
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_config_and_tests_every_alert() {
    promtool(&["check", "config", "prometheus.yml"]);
    promtool(&["check", "rules", "rules.yml"]);
    promtool(&["test", "rules", "rules.test.yml"]);
    // Every alert has a firing and a quiet test case.
    let rules = std::fs::read_to_string(repo().join("monitoring/prometheus/rules.yml")).unwrap();
    let tests =
        std::fs::read_to_string(repo().join("monitoring/prometheus/rules.test.yml")).unwrap();
    for line in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        let cases = tests.matches(&format!("alertname: {line}")).count();
        assert!(cases >= 2, "alert {line} has {cases} test cases");
        assert!(
            rules.contains("runbook: docs/operations.md#runbook-"),
            "runbook missing"
        );
    }
}

/// Metric names in a PromQL expression: every `flashsale_*` word outside
/// label matchers, and every word used as a selector (`name{` or `name[`).
fn selectors(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() || chars[i] == '_' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let inside_braces = chars[..start].iter().filter(|c| **c == '{').count()
                > chars[..start].iter().filter(|c| **c == '}').count();
            let selector = matches!(chars.get(i), Some('{') | Some('['));
            if !inside_braces && (selector || word.starts_with("flashsale_")) {
                out.insert(word);
            }
        } else {
            i += 1;
        }
    }
    out
}

fn allowed(name: &str) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name);
    CONTRACT_METRICS.contains(&base) || name == "up" || name.starts_with("process_")
}

#[test]
fn rules_and_dashboard_use_only_the_contracts_metrics() {
    let rules = std::fs::read_to_string(repo().join("monitoring/prometheus/rules.yml")).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&rules).unwrap();
    let mut exprs: Vec<String> = rules["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r["expr"].as_str().unwrap().to_owned())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("monitoring/grafana/dashboards/flashsale.json"))
            .unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in selectors(expr) {
            assert!(
                allowed(&name),
                "{name} (in {expr}) is not a contract metric"
            );
            used.insert(name);
        }
    }
    // The dashboard shows each of the contract's metrics.
    for m in CONTRACT_METRICS {
        assert!(
            used.iter().any(|u| u.starts_with(m)),
            "{m} appears in no rule or panel"
        );
    }
}

#[test]
fn compose_file_has_every_service_with_healthchecks_in_order() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for name in [
        "postgres",
        "redis",
        "rabbitmq",
        "api",
        "worker-1",
        "worker-2",
        "worker-3",
        "prometheus",
        "grafana",
    ] {
        let mut service = services
            .get(name)
            .unwrap_or_else(|| panic!("service {name} missing"))
            .clone();
        service.apply_merge().unwrap();
        assert!(
            service.get("healthcheck").is_some(),
            "{name} has no healthcheck"
        );
        if let Some(deps) = service.get("depends_on") {
            for (dep, how) in deps.as_mapping().unwrap() {
                assert_eq!(how["condition"], "service_healthy", "{name} -> {dep:?}");
            }
        }
    }
    for app in ["api", "worker-1", "prometheus", "grafana"] {
        assert!(
            services[app].get("depends_on").is_some(),
            "{app} waits for nothing"
        );
    }
    let volumes = compose["volumes"].as_mapping().unwrap();
    assert!(volumes.contains_key("pgdata") && volumes.contains_key("grafana-data"));
    assert!(
        text.contains("DATABASE_URL") && text.contains("AMQP_URL") && text.contains("REDIS_URL")
    );
}

#[test]
fn compose_file_is_safe_by_default() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap();
    // Only the API (and the cluster profile's load balancer in front of its
    // APIs) is published on every interface; the operators' pages on loopback.
    for (name, service) in services {
        let Some(ports) = service.get("ports") else {
            continue;
        };
        for port in ports.as_sequence().unwrap() {
            let port = port.as_str().unwrap();
            if matches!(name.as_str(), Some("api" | "lb")) {
                continue;
            }
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port} beyond loopback"
            );
        }
    }
    // RabbitMQ keeps its node name and its data (the accepted orders) across re-creation.
    let rabbit = &services["rabbitmq"];
    assert!(
        rabbit.get("hostname").is_some(),
        "rabbitmq has no fixed hostname"
    );
    let mounts: Vec<&str> = rabbit["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        mounts.contains(&"rabbitmq-data:/var/lib/rabbitmq"),
        "rabbitmq keeps its data in no named volume: {mounts:?}"
    );
    assert!(
        compose["volumes"]
            .as_mapping()
            .unwrap()
            .contains_key("rabbitmq-data")
    );
    // No lifecycle API, no working default password anywhere.
    assert!(
        !text.contains("web.enable-lifecycle"),
        "Prometheus' lifecycle API is on"
    );
    for weak in [
        "guest:guest",
        "postgres:postgres@",
        "PASSWORD: admin",
        "PASS: guest",
    ] {
        assert!(!text.contains(weak), "a default password is set: {weak}");
    }
    for secret in [
        "POSTGRES_PASSWORD:?",
        "RABBITMQ_PASSWORD:?",
        "GRAFANA_ADMIN_PASSWORD:?",
    ] {
        assert!(text.contains(secret), "{secret} is not required from .env");
    }
    let example = std::fs::read_to_string(repo().join(".env.example")).unwrap();
    for line in example.lines().filter(|l| l.contains("PASSWORD=")) {
        assert!(line.ends_with('='), "the example sets a password: {line}");
    }
    let ignored = std::fs::read_to_string(repo().join(".gitignore")).unwrap();
    assert!(
        ignored.lines().any(|l| l.trim() == ".env"),
        ".env is not ignored by git"
    );
}

#[test]
fn compose_cluster_profile_is_a_three_node_cluster_and_a_redis_cluster_behind_a_balancer() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    let services = compose["services"].as_mapping().unwrap();
    let in_cluster = |name: &str| {
        let profiles = &services[name]["profiles"];
        profiles
            .as_sequence()
            .is_some_and(|p| p.iter().any(|v| v == "cluster"))
    };
    for n in 1..=3 {
        let name = format!("rabbit-{n}");
        let node = &services[name.as_str()];
        assert!(in_cluster(&name), "{name} is not in the cluster profile");
        assert_eq!(
            node["hostname"],
            name.as_str(),
            "{name} keeps its node name"
        );
        assert_eq!(
            node["volumes"][0],
            format!("{name}-data:/var/lib/rabbitmq").as_str()
        );
        assert!(
            node["environment"].get("RABBITMQ_ERLANG_COOKIE").is_some(),
            "{name}: no shared cookie"
        );
        assert!(
            compose["volumes"]
                .as_mapping()
                .unwrap()
                .contains_key(format!("{name}-data").as_str())
        );
    }
    let formation = compose["configs"]["rabbit-cluster-conf"]["content"]
        .as_str()
        .unwrap();
    for n in 1..=3 {
        assert!(
            formation.contains(&format!("rabbit@rabbit-{n}")),
            "{formation}"
        );
    }
    // Two APIs and three workers on every node, the queue in partitions.
    let mut apis = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        if !(name.starts_with("api-") || name.starts_with("worker-c")) {
            continue;
        }
        apis += usize::from(name.starts_with("api-"));
        let env = &service["environment"];
        let amqp = env["AMQP_URL"].as_str().unwrap();
        for n in 1..=3 {
            assert!(
                amqp.contains(&format!("@rabbit-{n}:5672")),
                "{name}: {amqp}"
            );
        }
        let redis = env["REDIS_URL"].as_str().unwrap();
        for n in 1..=6 {
            assert!(
                redis.contains(&format!("redis://redis-c{n}:6379")),
                "{name}: {redis}"
            );
        }
        assert!(
            service["depends_on"]["redis-cluster-init"]["condition"]
                == "service_completed_successfully",
            "{name} does not wait for the Redis Cluster to form"
        );
        assert_eq!(env["FLASHSALE_PARTITIONS"], 3, "{name}");
        assert_eq!(env["FLASHSALE_NAMESPACE"], "flashsale-cluster", "{name}");
        for n in 1..=3 {
            assert!(
                service["depends_on"]
                    .get(format!("rabbit-{n}").as_str())
                    .is_some(),
                "{name} does not wait for rabbit-{n}"
            );
        }
    }
    assert_eq!(apis, 2);
    // Six Redis nodes with cluster mode and a volume each, formed into 3
    // masters and 3 replicas once.
    for n in 1..=6 {
        let name = format!("redis-c{n}");
        assert!(in_cluster(&name), "{name} is not in the cluster profile");
        let command: Vec<&str> = services[name.as_str()]["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            command
                .windows(2)
                .any(|w| w == ["--cluster-enabled", "yes"]),
            "{name}"
        );
        assert_eq!(
            services[name.as_str()]["volumes"][0],
            format!("{name}-data:/data").as_str()
        );
    }
    let init = services["redis-cluster-init"]["command"][0]
        .as_str()
        .unwrap();
    assert!(init.contains("--cluster-replicas 1"), "{init}");
    let lb = compose["configs"]["lb-conf"]["content"].as_str().unwrap();
    assert!(
        lb.contains("server api-a:3000") && lb.contains("server api-b:3000"),
        "{lb}"
    );
    assert!(in_cluster("lb"));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn get_text(url: &str) -> Option<String> {
    let r = reqwest::get(url).await.ok()?;
    r.status().is_success().then_some(())?;
    r.text().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsctl_up_runs_the_stack_that_prometheus_scrapes() {
    let env = env().await;
    let b = env.backends();
    let fsctl = PathBuf::from(env!("CARGO_BIN_EXE_fsctl"));
    let bins = fsctl.parent().unwrap().to_path_buf();
    // Two APIs on ports in sequence (fsctl up --apis 2).
    let api_port = loop {
        let p = free_port();
        if std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let (metrics_port, prom_port) = (free_port(), free_port());
    let with_env = |c: &mut Command| {
        c.env("DATABASE_URL", &b.database_url)
            .env("REDIS_URL", &b.redis_url)
            .env("AMQP_URL", &b.amqp_url)
            .env("FLASHSALE_NAMESPACE", &b.namespace);
    };
    let mut seed = Command::new(&fsctl);
    with_env(&mut seed);
    assert!(
        seed.args(["seed", "--products", "1", "--stock", "10"])
            .status()
            .unwrap()
            .success()
    );
    // Product 2 holds its orders 3 s for payment (its metrics: holds).
    let mut seed = Command::new(&fsctl);
    with_env(&mut seed);
    assert!(
        seed.args([
            "seed",
            "--products",
            "2",
            "--stock",
            "10",
            "--hold-seconds",
            "3"
        ])
        .status()
        .unwrap()
        .success()
    );

    let mut up = Command::new(&fsctl);
    with_env(&mut up);
    let up = up
        .args([
            "up",
            "--workers",
            "1",
            "--apis",
            "2",
            "--api-addr",
            &format!("127.0.0.1:{api_port}"),
        ])
        .args([
            "--first-metrics-port",
            &metrics_port.to_string(),
            "--bin-dir",
            bins.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Stopped (with its APIs and workers) even if the test fails midway.
    let mut up = flashsale_testkit::Stopped(up);
    let api = format!("http://127.0.0.1:{api_port}");
    let mut ready = false;
    for _ in 0..150 {
        if get_text(&format!("{api}/health/ready")).await.is_some() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ready, "fsctl up never brought the API up");
    let second = format!("http://127.0.0.1:{}", api_port + 1);
    let mut second_ready = false;
    for _ in 0..150 {
        if get_text(&format!("{second}/health/ready")).await.is_some() {
            second_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        second_ready,
        "the second API (--apis 2) is not up on the next port"
    );
    for i in 0..5 {
        let r = env
            .http
            .post(format!("{api}/buy"))
            .json(&serde_json::json!({"userId": format!("u{i}"), "productId": 1, "quantity": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
    }
    // Two held orders: one paid, one left to expire.
    let mut held = Vec::new();
    for user in ["payer", "walker"] {
        let r = env
            .http
            .post(format!("{api}/buy"))
            .json(&serde_json::json!({"userId": user, "productId": 2, "quantity": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let body: serde_json::Value = r.json().await.unwrap();
        held.push(body["orderId"].as_str().unwrap().to_owned());
    }
    let mut paid = false;
    for _ in 0..50 {
        let r = env
            .http
            .post(format!("{api}/orders/{}/pay", held[0]))
            .json(&serde_json::json!({"userId": "payer"}))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            paid = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(paid, "the held order was never paid");
    // The worker's metrics appear once it has booked the orders.
    let mut exported = String::new();
    for _ in 0..75 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        exported = get_text(&format!("{api}/metrics")).await.unwrap();
        exported.push_str(
            &get_text(&format!("http://127.0.0.1:{metrics_port}/metrics"))
                .await
                .unwrap(),
        );
        if CONTRACT_METRICS.iter().all(|m| exported.contains(m)) {
            break;
        }
    }
    for m in CONTRACT_METRICS {
        assert!(
            exported.contains(m),
            "{m} is not exported by the API or the worker"
        );
    }

    // A real Prometheus scrapes both for a few seconds.
    let dir = std::env::temp_dir().join(format!("fsx-prom-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: flashsale-api\n    static_configs:\n      - targets: ['127.0.0.1:{api_port}']\n  - job_name: flashsale-worker\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("prometheus is missing ({e}): scripts/test installs it"));
    let query = |q: &str| format!("http://127.0.0.1:{prom_port}/api/v1/query?query={q}");
    let mut both_up = false;
    let mut sampled = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Some(text) = get_text(&query("sum(up)")).await {
            let v: Value = serde_json::from_str(&text).unwrap();
            both_up = v["data"]["result"][0]["value"][1] == "2";
        }
        if let Some(text) = get_text(&query("flashsale_order_requests_total")).await {
            let v: Value = serde_json::from_str(&text).unwrap();
            sampled = !v["data"]["result"].as_array().unwrap().is_empty();
        }
        if both_up && sampled {
            break;
        }
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let _ = Command::new("kill")
        .args(["-TERM", &up.0.id().to_string()])
        .status();
    let mut stopped = None;
    for _ in 0..100 {
        if let Some(s) = up.0.try_wait().unwrap() {
            stopped = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(both_up, "Prometheus did not see both targets up");
    assert!(
        sampled,
        "Prometheus has no sample of flashsale_order_requests_total"
    );
    assert_eq!(
        stopped.expect("fsctl up did not stop on SIGTERM").code(),
        Some(0)
    );
    env.finish().await;
}
