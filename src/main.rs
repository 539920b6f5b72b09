use clap::Parser as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One TLS provider for the whole process: the webhook server and the Kubernetes client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = agent_secrets::cli::Cli::parse();
    agent_secrets::cli::dispatch(cli).await
}
