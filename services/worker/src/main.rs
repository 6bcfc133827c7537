use clap::Parser;
use flashsale_engine::{shutdown, telemetry};
use flashsale_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    telemetry::init();
    let config = WorkerConfig::parse();
    let result = async {
        let worker = Worker::connect(config).await?;
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        tokio::spawn(async move {
            shutdown::signal().await;
            trigger.cancel();
        });
        worker.run(stop).await
    }
    .await;
    if let Err(e) = result {
        eprintln!(
            "flashsale-worker: {}",
            flashsale_engine::telemetry::with_causes(e.as_ref())
        );
        std::process::exit(1);
    }
}
