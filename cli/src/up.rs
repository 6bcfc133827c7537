//! `fsctl up`: the API and N workers as child processes against the
//! configured services, for those who have PostgreSQL, Redis and RabbitMQ
//! but no Docker. Each line of their logs is prefixed with its name.

use crate::exit::{Failure, OK, Outcome, VIOLATION};
use clap::Args;
use flashsale_engine::queue::rabbitmq as broker;
use flashsale_engine::{BackendUrls, postgres, redis_conn, shutdown};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Debug, Args)]
#[command(after_help = "Example:
  fsctl up --workers 3          # API on 127.0.0.1:3000, workers' metrics on 3001..3003

Stops everything gracefully (SIGTERM, then a wait) on Ctrl-C or SIGTERM.
Exit codes: 0 stopped cleanly; 1 a child failed; 2 a component unreachable
or a binary missing.")]
pub struct UpArgs {
    /// Worker processes to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Where the API listens; with --apis N, API i listens on this port + i - 1.
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:3000")]
    pub api_addr: String,
    /// API processes to run (ports in sequence from --api-addr's).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub apis: u16,
    /// Worker i serves its metrics on this port + i - 1.
    #[arg(long, default_value_t = 3001)]
    pub first_metrics_port: u16,
    /// Where flashsale-api and flashsale-worker are (default: next to fsctl, else PATH).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

fn binary(dir: Option<&Path>, name: &str) -> Result<PathBuf, Failure> {
    let beside = dir.map(Path::to_path_buf).or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(Path::to_path_buf))
    });
    if let Some(candidate) = beside.map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(candidate);
    }
    if dir.is_some() {
        return Err(Failure::usage(format!(
            "{name} not found in {}",
            dir.map(|d| d.display().to_string()).unwrap_or_default()
        )));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    on_path.ok_or_else(|| {
        Failure::usage(format!(
            "{name} not found next to fsctl or on PATH (cargo build --release builds it)"
        ))
    })
}

/// `n` listen addresses: `first`, then the ports after it.
fn api_addrs(first: &str, n: u16) -> Result<Vec<String>, Failure> {
    let (host, port) = first
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        .ok_or_else(|| Failure::usage(format!("--api-addr {first:?}: expected HOST:PORT")))?;
    (0..n)
        .map(|i| {
            port.checked_add(i)
                .map(|p| format!("{host}:{p}"))
                .ok_or_else(|| Failure::usage(format!("--apis {n} from port {port}: past 65535")))
        })
        .collect()
}

/// A named child whose output is prefixed with its name.
struct Service {
    name: String,
    child: Child,
}

fn spawn(
    name: &str,
    program: &Path,
    b: &BackendUrls,
    env: &[(&str, String)],
) -> Result<Service, Failure> {
    let mut cmd = Command::new(program);
    cmd.env("DATABASE_URL", &b.database_url)
        .env("REDIS_URL", &b.redis_url)
        .env("AMQP_URL", &b.amqp_url)
        .env("FLASHSALE_NAMESPACE", &b.namespace)
        .env(
            "FLASHSALE_PARTITIONS",
            b.partitions.unwrap_or(1).to_string(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Failure::usage(format!("cannot start {}: {e}", program.display())))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let prefix = format!("[{name}]");
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("{prefix} {line}");
            }
        });
    }
    Ok(Service {
        name: name.to_owned(),
        child,
    })
}

/// Asks a child to stop (SIGTERM), waits, then kills it.
async fn stop(service: &mut Service) -> bool {
    if let Some(pid) = service.child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(15), service.child.wait()).await {
        Ok(Ok(status)) => status.success(),
        _ => {
            let _ = service.child.kill().await;
            false
        }
    }
}

pub async fn run(b: &BackendUrls, args: &UpArgs) -> Outcome {
    // Each component first, so an unreachable one is one clear line.
    postgres::connect_and_migrate(&b.database_url, 1).await?;
    redis_conn::connect(&b.redis_url).await?;
    broker::connect(&b.amqp_url, "fsctl up")
        .await?
        .close(200, "probe".into())
        .await?;

    let api_bin = binary(args.bin_dir.as_deref(), "flashsale-api")?;
    let worker_bin = binary(args.bin_dir.as_deref(), "flashsale-worker")?;
    let api_addrs = api_addrs(&args.api_addr, args.apis)?;
    let mut services = Vec::new();
    for (i, addr) in api_addrs.iter().enumerate() {
        let name = if args.apis == 1 {
            "api".to_owned()
        } else {
            format!("api-{}", i + 1)
        };
        services.push(spawn(&name, &api_bin, b, &[("API_ADDR", addr.clone())])?);
    }
    let mut metrics = Vec::new();
    for i in 1..=args.workers {
        let addr = format!("127.0.0.1:{}", args.first_metrics_port + i - 1);
        services.push(spawn(
            &format!("worker-{i}"),
            &worker_bin,
            b,
            &[
                ("METRICS_ADDR", addr.clone()),
                ("WORKER_ID", format!("up-worker-{i}")),
            ],
        )?);
        metrics.push(addr);
    }

    let api_urls: Vec<String> = api_addrs
        .iter()
        .map(|a| format!("http://{}", a.replace("0.0.0.0", "127.0.0.1")))
        .collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let started = Instant::now();
    for api_url in &api_urls {
        loop {
            let ready = client.get(format!("{api_url}/health/ready")).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            for s in &mut services {
                if let Ok(Some(status)) = s.child.try_wait() {
                    return Err(Failure {
                        code: VIOLATION,
                        message: format!("{} exited during start-up ({status})", s.name),
                    });
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                for s in &mut services {
                    stop(s).await;
                }
                return Err(Failure::usage(format!(
                    "the API at {api_url} did not become ready within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    println!(
        "fsctl up: ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for api_url in &api_urls {
        println!("  API      {api_url}  (/buy, /orders/ID, /products/ID, /health/ready, /metrics)");
    }
    for (i, m) in metrics.iter().enumerate() {
        println!("  worker-{} http://{m}/metrics", i + 1);
    }
    println!("  namespace {}; Ctrl-C stops everything", b.namespace);

    // Run until a signal, or until a child dies on its own.
    let died = tokio::select! {
        () = shutdown::signal() => None,
        name = first_exit(&mut services) => Some(name),
    };
    let mut clean = died.is_none();
    for s in &mut services {
        if !stop(s).await {
            clean = false;
        }
    }
    match died {
        Some(name) => Err(Failure {
            code: VIOLATION,
            message: format!("{name} exited on its own; stopped the others"),
        }),
        None if clean => {
            println!("fsctl up: all stopped");
            Ok(OK)
        }
        None => Err(Failure {
            code: VIOLATION,
            message: "a child did not stop cleanly".into(),
        }),
    }
}

async fn first_exit(services: &mut [Service]) -> String {
    loop {
        for s in services.iter_mut() {
            if let Ok(Some(_)) = s.child.try_wait() {
                return s.name.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
