//! meshiam-broker: parse the configuration, build the state, bind, serve until SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use meshiam_broker::config::{Config, LogFormat, PodSource};
use meshiam_broker::kube_source::{self, KubeSourceConfig};
use meshiam_broker::sts::{AwsSts, StsApi};
use meshiam_broker::{
    Broker, admin, background, cache, clock, container, file_source, metrics, node_imds, pods,
    policy,
};
use tracing_subscriber::EnvFilter;

// The static (musl) build's allocator: musl's malloc is slow under load (Cargo.toml).
#[cfg(target_env = "musl")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(cfg: &Config) -> Result<(), String> {
    let filter = EnvFilter::try_new(&cfg.log).map_err(|e| format!("--log {:?}: {e}", cfg.log))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match cfg.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("meshiam-broker: {msg}");
    std::process::exit(2);
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}

#[tokio::main]
async fn main() {
    // kube (ring) and the AWS SDK (aws-lc-rs) both bring a rustls crypto provider, so
    // rustls cannot pick one by itself: choose before any TLS client is built.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        fail(e);
    }
    if let Err(e) = init_logging(&cfg) {
        fail(e);
    }
    tracing::info!(version = meshiam_broker::VERSION, "meshiam-broker starting");

    let sts = match AwsSts::from_env(cfg.region.clone(), cfg.sts_endpoint, cfg.sts_timeout).await {
        Ok(s) => s,
        Err(e) => fail(e),
    };
    tracing::info!(
        region = sts.region().unwrap_or_default(),
        endpoint = ?cfg.sts_endpoint,
        "STS client ready"
    );
    let sts: Arc<dyn StsApi> = Arc::new(sts);

    // One Kubernetes client for the pod source and the container door's TokenReviews.
    let kube_client = match cfg.pod_source {
        PodSource::File => None,
        PodSource::Kube => match kube_source::client(cfg.watch_idle_timeout).await {
            Ok(c) => Some(c),
            Err(e) => fail(format!("Kubernetes client: {e}")),
        },
    };
    let reviewer = match &kube_client {
        Some(c) => container::Reviewer::Kube(c.clone()),
        None => container::Reviewer::None,
    };

    let store = pods::PodStore::new();
    let metrics = metrics::Metrics::new();
    let clock = clock::Clock::System;
    let broker = Arc::new(Broker {
        store: store.clone(),
        policy: policy::RolePolicy::new(cfg.policy_config()),
        cache: cache::CredentialCache::new(
            sts.clone(),
            cfg.cache_config(),
            clock.clone(),
            metrics.clone(),
        ),
        issuer: meshiam_imds::TokenIssuer::new(Broker::random_token_secret()),
        node_imds: node_imds::NodeImds::new(
            &cfg.node_imds_url,
            cfg.node_imds_timeout,
            cfg.metadata_cache_ttl,
        ),
        metrics,
        clock,
        serve: cfg.serve_config(),
        container: container::ContainerAuth::new(cfg.container_token_audience.clone(), reviewer),
    });

    // The pod source. The file must be valid at start; later bad versions are skipped.
    match (cfg.pod_source, kube_client) {
        (PodSource::File, _) => {
            if let Err(e) = file_source::load_into(&cfg.pods_file, cfg.node_name.as_deref(), &store)
            {
                fail(e);
            }
            tokio::spawn(file_source::watch(
                cfg.pods_file.clone(),
                cfg.node_name.clone(),
                cfg.pods_file_poll,
                store.clone(),
            ));
        }
        (PodSource::Kube, None) => fail("Kubernetes client missing"),
        (PodSource::Kube, Some(client)) => {
            let kcfg = KubeSourceConfig {
                node_name: cfg.node_name.clone().unwrap_or_default(),
                // Restrictions, and --mtls required's per-namespace exception for plain callers.
                watch_namespaces: cfg.namespace_restriction != policy::Restriction::Off
                    || cfg.mtls == meshiam_broker::mtls::MtlsMode::Required,
                idle_timeout: cfg.watch_idle_timeout,
            };
            let store = store.clone();
            tokio::spawn(async move {
                if let Err(e) = kube_source::run(client, kcfg, store).await {
                    // Without a pod source nobody can be identified: stop, let the
                    // DaemonSet restart us.
                    tracing::error!(error = %e, "Kubernetes pod source failed");
                    std::process::exit(1);
                }
            });
        }
    }

    if broker.policy.base_arn().is_none() {
        tokio::spawn(background::discover_base_arn(
            broker.clone(),
            sts.clone(),
            cfg.prefetch,
        ));
    }
    tokio::spawn(background::run(
        broker.clone(),
        cfg.maintenance_interval,
        cfg.prefetch,
    ));

    // TLS on the IMDS port (--mtls): the roots and the broker's certificate must load now.
    let tls = match cfg.mtls_files() {
        Some(files) if cfg.mtls != meshiam_broker::mtls::MtlsMode::Off => {
            match meshiam_broker::mtls::TlsTerminator::load(files, &cfg.mtls_trust_domain) {
                Ok(t) => {
                    tokio::spawn(t.clone().watch(broker.metrics.clone()));
                    Some(t)
                }
                Err(e) => fail(e),
            }
        }
        _ => None,
    };

    let imds_listener = match tokio::net::TcpListener::bind(cfg.listen).await {
        Ok(l) => l,
        Err(e) => fail(format!("--listen {}: {e}", cfg.listen)),
    };
    let admin_listener = match tokio::net::TcpListener::bind(cfg.admin_listen).await {
        Ok(l) => l,
        Err(e) => fail(format!("--admin-listen {}: {e}", cfg.admin_listen)),
    };
    tracing::info!(
        listen = %cfg.listen,
        admin = %cfg.admin_listen,
        direct_mode = cfg.direct_mode.as_str(),
        debug_endpoints = cfg.debug_endpoints,
        max_staleness = ?cfg.max_staleness,
        header_read_timeout = ?cfg.header_read_timeout,
        max_connections = cfg.max_connections,
        max_connections_per_peer = cfg.max_connections_per_peer,
        mtls = cfg.mtls.as_str(),
        mtls_trust_domain = %cfg.mtls_trust_domain,
        "serving"
    );

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let service = meshiam_broker::imds::Imds::new(broker.clone());
    let imds = meshiam_broker::server::serve_fn(
        imds_listener,
        move |peer, req| {
            let service = service.clone();
            async move { service.call(peer, req).await }
        },
        cfg.conn_limits(),
        broker.metrics.clone(),
        tls,
        stopped(stop_rx.clone()),
    );
    let admin = axum::serve(
        admin_listener,
        admin::router_with(
            broker.clone(),
            admin::AdminConfig {
                debug_endpoints: cfg.debug_endpoints,
            },
        )
        .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(stopped(stop_rx));
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let ((), admin) = tokio::join!(imds, admin);
    if let Err(e) = admin {
        tracing::error!(error = %e, "server error");
        std::process::exit(1);
    }
}
