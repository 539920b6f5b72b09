use clap::Parser as _;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // One TLS provider for the whole process: the webhook server and the Kubernetes client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Started as `kubectl_complete-agentsecrets`: kubectl asks for plugin completions.
    if agent_secrets::tools::completion::answer_kubectl_if_asked() {
        return std::process::ExitCode::SUCCESS;
    }
    let cli = agent_secrets::cli::Cli::parse();
    // Exit codes are mapped in one place: tools::error.
    agent_secrets::tools::error::report(agent_secrets::cli::dispatch(cli).await)
}
