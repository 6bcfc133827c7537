use clap::Parser;
use flashsale_api::{ApiConfig, Application};
use flashsale_engine::{shutdown, telemetry};

#[tokio::main]
async fn main() {
    telemetry::init();
    let config = ApiConfig::parse();
    let result = async {
        let app = Application::build(config).await?;
        app.run_until(shutdown::signal()).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = result {
        eprintln!(
            "flashsale-api: {}",
            flashsale_engine::telemetry::with_causes(e.as_ref())
        );
        std::process::exit(1);
    }
}
