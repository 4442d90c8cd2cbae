//! One agent: configuration in, running tasks out. `main`, the demo and the tests all start
//! agents through here, so they exercise the same code paths.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::otel::OtlpHistogram;
use crate::config::{Config, ConfigError};
use crate::discovery::{Discovery, Source};
use crate::incoming::IncomingChecks;
use crate::liveness::Heartbeat;
use crate::metrics::{Metrics, Push};
use crate::probe::{Prober, ProberSettings, Resolver};
use crate::scheduler::{discovery_wait, RoundReport, Scheduler};
use crate::server::{router, AppState};
use crate::targets::Targets;
use crate::telemetry::ProbeSpans;
use crate::{kube_client, listener, telemetry, tls};
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The longest the final telemetry flush may take at shutdown.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Resolver(#[from] crate::probe::ResolverError),
}

impl StartError {
    /// Operator input is at fault (exit 64) rather than the environment.
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Config(_) | StartError::Telemetry(telemetry::TelemetryError::Config(_)))
    }
}

/// An agent whose listeners are bound but which does not probe or serve yet.
pub struct Bound {
    config: Config,
    source: Source,
    targets: Targets,
    prober: Arc<Prober>,
    metrics: Arc<Metrics>,
    spans: Option<Arc<ProbeSpans>>,
    tracer: Option<SdkTracerProvider>,
    incoming: Arc<IncomingChecks>,
    pod_name: String,
    plain: tokio::net::TcpListener,
    pub local_addr: SocketAddr,
    secure: Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    pub tls_local_addr: Option<SocketAddr>,
    reloader: tls::Reloader,
}

/// A started agent.
pub struct Agent {
    config: Config,
    pub local_addr: SocketAddr,
    pub tls_local_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    tracer: Option<SdkTracerProvider>,
    reports: watch::Receiver<Option<Arc<RoundReport>>>,
    draining: Arc<AtomicBool>,
    stop_probing: watch::Sender<bool>,
    stop_serving: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Agent {
    /// Validates `config`, binds the listeners and starts discovery, rounds and serving.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        Ok(Self::bind(config).await?.run())
    }

    /// Validates `config` and binds the listeners; nothing runs until [`Bound::run`].
    pub async fn bind(config: Config) -> Result<Bound, StartError> {
        config.validate()?;
        let pod_name = config.pod_name.clone().unwrap_or_else(hostname);
        let mut reloader = tls::Reloader::new();
        let probe_tls = tls::probe_tls(
            &config.service_account_dir.join("ca.crt"),
            config.extra_ca.as_deref(),
            config.insecure,
            &mut reloader,
        )
        .map_err(|e| match e.path() {
            // The service-account `ca.crt` is at fault, not the extra CA.
            Some(path) if Some(path) != config.extra_ca.as_deref() => {
                ConfigError::new("KUBENURSE_SERVICE_ACCOUNT_DIR", path.display().to_string(), e.to_string())
            }
            _ => ConfigError::new("KUBENURSE_EXTRA_CA", display_path(&config.extra_ca), e.to_string()),
        })?;
        let server_tls = match (&config.cert_file, &config.cert_key) {
            (Some(cert), Some(key)) if config.use_tls => {
                Some(tls::server_config(cert, key, &mut reloader).map_err(|e| {
                    let (variable, path) = match e.path() {
                        Some(path) if path == key.as_path() => ("KUBENURSE_CERT_KEY", key),
                        _ => ("KUBENURSE_CERT_FILE", cert),
                    };
                    ConfigError::new(variable, path.display().to_string(), e.to_string())
                })?)
            }
            _ => None,
        };

        let kube = kube_client::build(&config).await?;
        let namespace = config.namespace.clone().or_else(|| kube.as_ref().map(|k| k.namespace.clone()));
        let source = Source::from_config(&config, kube, &pod_name, namespace.clone());

        let incoming = Arc::new(IncomingChecks::default());
        let resource = telemetry::resource(&config, &pod_name, namespace.as_deref());
        let push = telemetry::metric_push(&config.otel, &mut reloader)?.map(|push| Push {
            readers: Box::new(move || push.reader()),
            exponential_histograms: config.otel.otlp_histogram == OtlpHistogram::Exponential,
        });
        // `cloud.availability_zone` in OTEL_RESOURCE_ATTRIBUTES is the operator's word: the
        // zone discovery reads does not replace it on the resource.
        let operator_zone = config
            .otel
            .resource_attributes
            .as_ref()
            .is_some_and(|attributes| attributes.0.contains_key(crate::metrics::ZONE_ATTRIBUTE));
        let metrics = Arc::new(
            Metrics::new(config.buckets(), resource.clone(), incoming.clone(), push)?
                .with_detail(config.metrics_detail)
                .with_series_reset(config.series_reset_interval)
                .with_zone_from_discovery(!operator_zone),
        );
        let tracer = telemetry::tracer_provider(&config.otel, resource, &mut reloader)?;
        let spans = tracer.as_ref().map(|t| Arc::new(ProbeSpans::new(t, config.slow_threshold)));
        let targets = Targets::from_config(&config);
        for s in targets.skipped() {
            tracing::info!(probe = %s.kind, reason = %s.reason, "probe skipped");
        }
        let prober = Arc::new(Prober::new(ProberSettings {
            tls: probe_tls,
            resolver: Resolver::from_system(config.dns_servers.as_ref())?,
            timeout: config.check_timeout,
            token_file: config.service_account_dir.join("token"),
            own_pod: pod_name.clone(),
            reuse_connections: config.reuse_connections,
        }));

        let plain = listener::bind(config.listen_addr)
            .await
            .map_err(|source| StartError::Listen { addr: config.listen_addr, source })?;
        let local_addr =
            plain.local_addr().map_err(|source| StartError::Listen { addr: config.listen_addr, source })?;
        let secure = match server_tls {
            Some(tls) => {
                let l = listener::bind(config.tls_listen_addr)
                    .await
                    .map_err(|source| StartError::Listen { addr: config.tls_listen_addr, source })?;
                Some((l, tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
            }
            None => None,
        };
        let tls_local_addr = secure.as_ref().and_then(|(l, _)| l.local_addr().ok());

        Ok(Bound {
            config,
            source,
            targets,
            prober,
            metrics,
            spans,
            tracer,
            incoming,
            pod_name,
            plain,
            local_addr,
            secure,
            tls_local_addr,
            reloader,
        })
    }
}

impl Bound {
    /// Starts discovery, rounds and serving.
    pub fn run(self) -> Agent {
        let discovery = Discovery::start(self.source);
        let (reports_tx, reports) = watch::channel(None);
        let (stop_probing, probing_rx) = watch::channel(false);
        let (stop_serving, serving_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));
        let heartbeat = Arc::new(Heartbeat::new(
            self.config.check_interval,
            self.config.check_timeout,
            discovery_wait(self.config.check_interval),
        ));

        let scheduler = Scheduler {
            interval: self.config.check_interval,
            targets: self.targets,
            check_neighbourhood: self.config.check_neighbourhood,
            neighbour_limit: self.config.neighbour_limit,
            own_node: self.config.node_name.clone(),
            discovery: discovery.clone(),
            prober: self.prober,
            metrics: self.metrics.clone(),
            spans: self.spans,
            reports: reports_tx,
            heartbeat: heartbeat.clone(),
        };
        let app = router(Arc::new(AppState {
            hostname: self.pod_name,
            reports: reports.clone(),
            draining: draining.clone(),
            heartbeat,
            discovery,
            incoming: self.incoming,
            metrics: self.metrics.clone(),
        }));
        // One slot table for both listeners, so a client cannot take twice its share.
        let connections = listener::Connections::new(listener::MAX_CONNECTIONS, listener::MAX_CONNECTIONS_PER_ADDRESS);
        let mut tasks = vec![
            tokio::spawn(scheduler.run(probing_rx)),
            tokio::spawn(listener::serve(self.plain, None, app.clone(), connections.clone(), serving_rx.clone())),
        ];
        if let Some((l, acceptor)) = self.secure {
            tasks.push(tokio::spawn(listener::serve(l, Some(acceptor), app, connections, serving_rx.clone())));
        }
        if !self.reloader.is_empty() && !self.config.reload_interval.is_zero() {
            tasks.push(tokio::spawn(self.reloader.run(self.config.reload_interval, serving_rx)));
        }
        tracing::info!(local_addr = %self.local_addr, tls = ?self.tls_local_addr, "kubenurse started");
        Agent {
            config: self.config,
            local_addr: self.local_addr,
            tls_local_addr: self.tls_local_addr,
            metrics: self.metrics,
            tracer: self.tracer,
            reports,
            draining,
            stop_probing,
            stop_serving,
            tasks,
        }
    }
}

impl Agent {
    /// The latest round report, and a way to wait for the next.
    pub fn reports(&self) -> watch::Receiver<Option<Arc<RoundReport>>> {
        self.reports.clone()
    }

    /// Turns `/ready` to 503 at once (the first step of shutting down).
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The full shutdown sequence of SPEC §7: not ready at once, keep probing and serving
    /// for the shutdown duration, then stop rounds, drain listeners and flush telemetry.
    pub async fn shutdown(self) {
        self.start_draining();
        tracing::info!(keep_serving = ?self.config.shutdown_duration, "shutting down: /ready now answers 503");
        tokio::time::sleep(self.config.shutdown_duration).await;
        self.stop().await;
    }

    /// Stops the rounds and leaves the listeners serving: what a crashed or stuck prober looks
    /// like from outside (`/livez` turns 503 once the limit passes). [`Self::stop`] ends the rest.
    pub fn stop_probing(&self) {
        let _ = self.stop_probing.send(true);
    }

    /// Stops rounds and listeners at once (after draining open requests) and flushes.
    pub async fn stop(self) {
        self.draining.store(true, Ordering::SeqCst);
        let _ = self.stop_probing.send(true);
        let _ = self.stop_serving.send(true);
        for task in self.tasks {
            // A round in flight ends within the probe deadline; listeners drain within theirs.
            if tokio::time::timeout(self.config.check_timeout + Duration::from_secs(6), task).await.is_err() {
                tracing::warn!("a task did not stop in time");
            }
        }
        // Push what the last interval recorded. Exporters have their own deadlines; this
        // bounds the whole flush in case a collector hangs.
        let metrics = self.metrics.clone();
        let tracer = self.tracer.clone();
        let flush = tokio::task::spawn_blocking(move || {
            if let Some(tracer) = tracer {
                if let Err(e) = tracer.shutdown() {
                    tracing::warn!(error = %e, "final span export failed");
                }
            }
            metrics.shutdown();
        });
        if tokio::time::timeout(FLUSH_TIMEOUT, flush).await.is_err() {
            tracing::warn!(limit = ?FLUSH_TIMEOUT, "telemetry flush did not finish in time");
        }
        tracing::info!("kubenurse stopped");
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kubenurse".to_owned())
}

fn display_path(path: &Option<std::path::PathBuf>) -> String {
    path.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}
