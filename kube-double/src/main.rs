//! `meshiam-kube-double`: the Kubernetes API double as a process, for the demo stack.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use meshiam_kube_double::{KubeDouble, Options, PodsFile};
use tracing_subscriber::EnvFilter;

/// An in-memory Kubernetes API (pods, namespaces; list/watch) over plain HTTP.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// meshiam pods YAML file to preload.
    #[arg(long)]
    pods_file: Option<PathBuf>,
    /// How often watches that allow bookmarks get one.
    #[arg(long, default_value_t = 60_000)]
    bookmark_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let args = Args::parse();
    let options = Options {
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms),
    };
    let double = KubeDouble::start_with(args.listen, options)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    if let Some(path) = &args.pods_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let file = PodsFile::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        double.apply_pods_file(&file)?;
        for pod in &file.pods {
            tracing::info!(
                pod = %format!("{}/{}", pod.namespace, pod.name),
                ips = ?pod.ips,
                node = pod.node.as_deref().unwrap_or(""),
                role = pod.annotations.get("iam.amazonaws.com/role").map(String::as_str).unwrap_or(""),
                "preloaded pod"
            );
        }
        tracing::info!(
            pods = file.pods.len(),
            namespaces = file.namespaces.len(),
            file = %path.display(),
            "preloaded pods file"
        );
    }
    tracing::info!(
        url = %double.url(),
        resource_version = double.resource_version(),
        "serving the Kubernetes API double (core v1 pods and namespaces; admin under /_double)"
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    double.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
