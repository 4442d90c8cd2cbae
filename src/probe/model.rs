//! The probe's data model: what to probe ([`Target`]) and what one probe observed
//! ([`ProbeResult`]: the instant of each request phase, and how it ended).
//!
//! These types are plain data. The probe client fills them, the metrics, spans, logs and the
//! `/alive` handler read them; the label strings here are the closed sets of SPEC §5.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Status codes that keep their own label value; any other code a peer answers is `other`.
const STANDARD_CODES: std::ops::RangeInclusive<u16> = 100..=599;

/// A point in a request's life, as Go's `httptrace` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    DnsStart,
    DnsDone,
    ConnectStart,
    ConnectDone,
    TlsHandshakeStart,
    TlsHandshakeDone,
    GotConn,
    WroteRequest,
    GotFirstRespByte,
}

impl Event {
    pub const ALL: [Event; 9] = [
        Event::DnsStart,
        Event::DnsDone,
        Event::ConnectStart,
        Event::ConnectDone,
        Event::TlsHandshakeStart,
        Event::TlsHandshakeDone,
        Event::GotConn,
        Event::WroteRequest,
        Event::GotFirstRespByte,
    ];

    /// The `event` label value.
    pub fn label(self) -> &'static str {
        match self {
            Event::DnsStart => "dns_start",
            Event::DnsDone => "dns_done",
            Event::ConnectStart => "connect_start",
            Event::ConnectDone => "connect_done",
            Event::TlsHandshakeStart => "tls_handshake_start",
            Event::TlsHandshakeDone => "tls_handshake_done",
            Event::GotConn => "got_conn",
            Event::WroteRequest => "wrote_request",
            Event::GotFirstRespByte => "got_first_resp_byte",
        }
    }
}

/// The phase in which a request failed before it got a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailedPhase {
    /// Name resolution failed or did not finish in time.
    Dns,
    /// No TCP connection could be made in time (refused, unreachable, SYN dropped).
    Connect,
    /// The TLS handshake failed (untrusted certificate, protocol error) or did not finish
    /// in time.
    Tls,
    /// Writing the request failed or did not finish in time.
    WriteRequest,
    /// The request was written and no response head came (in time), and everything else:
    /// a reset while waiting, a malformed response, unreadable credentials.
    RoundTrip,
}

impl FailedPhase {
    /// The `event` label value of `kubenurse_errors_total`.
    pub fn label(self) -> &'static str {
        match self {
            FailedPhase::Dns => "dns_done",
            FailedPhase::Connect => "connect_done",
            FailedPhase::Tls => "tls_handshake_done",
            FailedPhase::WriteRequest => "wrote_request",
            FailedPhase::RoundTrip => "round_trip_error",
        }
    }
}

/// The zone label value when a zone is not known.
pub const UNKNOWN_ZONE: &str = "unknown";

/// A neighbour's identity, carried on its probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    pub pod: String,
    /// This agent's zone and the neighbour's, [`UNKNOWN_ZONE`] where not known.
    pub source_zone: String,
    pub target_zone: String,
}

/// What a probe does with its target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// `GET` the URL; success is status 200.
    Http,
    /// Resolve the URL's host and connect to its port (`tcp://host:port`), then close; success
    /// is a connection.
    Tcp,
    /// One A and one AAAA query for a name (`dns://name[@server:port]`); success is an
    /// address in either answer.
    Dns(DnsQuery),
}

/// The name a DNS check asks for, and whom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsQuery {
    /// The name as configured.
    pub name: String,
    /// Ask this server, the name taken as absolute. `None`: the system configuration, the
    /// servers, search list and `ndots` of `/etc/resolv.conf` (servers replaced by
    /// `KUBENURSE_DNS_SERVERS`).
    pub server: Option<SocketAddr>,
}

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The `type` label: `api_server_direct`, `path_<node>`, an extra check's name, …
    pub kind: String,
    pub url: http::Uri,
    pub check: Check,
    /// Send the service-account bearer token (apiserver probes only).
    pub bearer_token: bool,
    /// Set for neighbour probes: who is on the other side.
    pub peer: Option<Peer>,
}

impl Target {
    /// The target as an operator wrote it: the URL, without the `/` that `http::Uri` shows
    /// after the authority of a `tcp://` or `dns://` target.
    pub fn location(&self) -> String {
        match self.check {
            Check::Http => self.url.to_string(),
            Check::Tcp | Check::Dns(_) => format!(
                "{}://{}",
                self.url.scheme_str().unwrap_or_default(),
                self.url.authority().map_or("", |a| a.as_str())
            ),
        }
    }

    /// What a probe does to the target, for texts: `GET <url>`, or the `tcp://` or `dns://`
    /// target.
    pub fn operation(&self) -> String {
        match self.check {
            Check::Http => format!("GET {}", self.url),
            Check::Tcp | Check::Dns(_) => self.location(),
        }
    }
}

/// How a probe ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response arrived; only 200 counts as success.
    Response { status: u16 },
    /// A TCP check connected, or a DNS check found an address.
    Reached,
    /// No response (HTTP), no connection (TCP), no address (DNS).
    Failed {
        phase: FailedPhase,
        error: String,
        /// The class of the error, when known: `timeout`, `refused`, `nxdomain`, … (the
        /// span's `error.type`).
        cause: Option<&'static str>,
    },
}

/// Everything one probe observed.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub target: Arc<Target>,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Events that completed, as offsets from `started`, in the order they happened.
    pub events: Vec<(Event, Duration)>,
    /// From start to the response headers, when a response arrived.
    pub response_after: Option<Duration>,
    /// From start to the end of the probe (response headers, or the failure).
    pub elapsed: Duration,
    pub outcome: Outcome,
}

impl ProbeResult {
    /// A failed probe that observed nothing: its credentials could not be read, or its task
    /// crashed.
    pub fn unobserved(target: Arc<Target>, phase: FailedPhase, error: String) -> Self {
        ProbeResult {
            target,
            started: Instant::now(),
            started_at: SystemTime::now(),
            events: Vec::new(),
            response_after: None,
            elapsed: Duration::ZERO,
            outcome: Outcome::Failed { phase, error, cause: None },
        }
    }

    /// HTTP 200 and nothing else; for a TCP or DNS check, a connection or an address.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Response { status: 200 } | Outcome::Reached)
    }

    /// The `code` label of `kubenurse_httpclient_requests_total`: the HTTP status, `ok` for a
    /// TCP or DNS check that succeeded, `round_trip_error` for any failure. The peer chooses
    /// the status, so codes outside the HTTP range 100–599 are one value, `other`: a hostile
    /// peer cannot create hundreds of series.
    pub fn code_label(&self) -> Cow<'static, str> {
        match &self.outcome {
            Outcome::Response { status } if STANDARD_CODES.contains(status) => Cow::Owned(status.to_string()),
            Outcome::Response { .. } => Cow::Borrowed("other"),
            Outcome::Reached => Cow::Borrowed("ok"),
            Outcome::Failed { .. } => Cow::Borrowed("round_trip_error"),
        }
    }

    /// The span's `error.type` of a probe that got no response: the class of the error when
    /// known (`timeout`, `refused`, `nxdomain`, …), else the failed phase.
    pub fn error_type(&self) -> Option<&'static str> {
        match &self.outcome {
            Outcome::Failed { phase, cause, .. } => Some(cause.unwrap_or(phase.label())),
            Outcome::Response { .. } | Outcome::Reached => None,
        }
    }

    /// The `event` label of `kubenurse_errors_total`, when the probe failed: the failed phase,
    /// or `status_code_<N>` (`status_code_other` outside 100–599, as for [`Self::code_label`]).
    pub fn error_event(&self) -> Option<Cow<'static, str>> {
        match &self.outcome {
            Outcome::Response { status: 200 } | Outcome::Reached => None,
            Outcome::Response { status } if STANDARD_CODES.contains(status) => {
                Some(Cow::Owned(format!("status_code_{status}")))
            }
            Outcome::Response { .. } => Some(Cow::Borrowed("status_code_other")),
            Outcome::Failed { phase, .. } => Some(Cow::Borrowed(phase.label())),
        }
    }

    /// The `/alive` text: `ok`, the status line, or the error.
    pub fn summary(&self) -> String {
        match &self.outcome {
            Outcome::Response { status: 200 } | Outcome::Reached => "ok".to_owned(),
            Outcome::Response { status } => {
                let reason = http::StatusCode::from_u16(*status).ok().and_then(|s| s.canonical_reason());
                format!("{status} {}", reason.unwrap_or_default()).trim_end().to_owned()
            }
            Outcome::Failed { error, .. } => error.clone(),
        }
    }

    /// The offset at which `event` happened, if it did.
    pub fn event(&self, event: Event) -> Option<Duration> {
        self.events.iter().find(|(e, _)| *e == event).map(|(_, d)| *d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(outcome: Outcome) -> ProbeResult {
        ProbeResult {
            target: Arc::new(Target {
                kind: "me_service".into(),
                url: "http://127.0.0.1/alwayshappy".parse().expect("uri"),
                check: Check::Http,
                bearer_token: false,
                peer: None,
            }),
            started: Instant::now(),
            started_at: SystemTime::now(),
            events: vec![(Event::GotConn, Duration::from_millis(1))],
            response_after: None,
            elapsed: Duration::from_millis(2),
            outcome,
        }
    }

    #[test]
    fn only_200_is_success() {
        assert!(result(Outcome::Response { status: 200 }).is_ok());
        for status in [201, 204, 301, 404, 500] {
            assert!(!result(Outcome::Response { status }).is_ok(), "{status}");
        }
    }

    #[test]
    fn failures_are_classified_into_closed_label_sets() {
        let r = result(Outcome::Response { status: 503 });
        assert_eq!(r.code_label(), "503");
        assert_eq!(r.error_event().as_deref(), Some("status_code_503"));
        assert_eq!(r.summary(), "503 Service Unavailable");

        let cases = [
            (FailedPhase::Dns, "dns_done"),
            (FailedPhase::Connect, "connect_done"),
            (FailedPhase::Tls, "tls_handshake_done"),
            (FailedPhase::WriteRequest, "wrote_request"),
            (FailedPhase::RoundTrip, "round_trip_error"),
        ];
        for (phase, label) in cases {
            let r = result(Outcome::Failed { phase, error: "boom at 10.1.2.3".into(), cause: None });
            assert_eq!(r.code_label(), "round_trip_error");
            assert_eq!(r.error_event().as_deref(), Some(label));
            assert_eq!(r.error_type(), Some(label), "without a known cause, the phase");
            assert_eq!(r.summary(), "boom at 10.1.2.3");
        }
        assert_eq!(result(Outcome::Response { status: 200 }).error_event(), None);
        assert_eq!(result(Outcome::Response { status: 200 }).summary(), "ok");
        assert_eq!(result(Outcome::Response { status: 503 }).error_type(), None);
    }

    #[test]
    fn tcp_and_dns_checks_succeed_as_ok_and_fail_at_their_phase() {
        let reached = result(Outcome::Reached);
        assert!(reached.is_ok());
        assert_eq!(reached.code_label(), "ok");
        assert_eq!((reached.error_event(), reached.error_type()), (None, None));
        assert_eq!(reached.summary(), "ok");

        for (phase, cause, event) in
            [(FailedPhase::Dns, "nxdomain", "dns_done"), (FailedPhase::Connect, "refused", "connect_done")]
        {
            let failed = result(Outcome::Failed { phase, error: "lookup x: NXDOMAIN".into(), cause: Some(cause) });
            assert!(!failed.is_ok());
            assert_eq!(failed.code_label(), "round_trip_error");
            assert_eq!(failed.error_event().as_deref(), Some(event), "the event set stays closed");
            assert_eq!(failed.error_type(), Some(cause));
        }
    }

    #[test]
    fn status_codes_outside_the_http_range_share_one_label() {
        for (status, code, event) in [
            (100, "100", "status_code_100"),
            (599, "599", "status_code_599"),
            (600, "other", "status_code_other"),
            (999, "other", "status_code_other"),
            (42, "other", "status_code_other"),
            (0, "other", "status_code_other"),
        ] {
            let r = result(Outcome::Response { status });
            assert_eq!(r.code_label(), code, "{status}");
            assert_eq!(r.error_event().as_deref(), Some(event), "{status}");
        }
    }

    #[test]
    fn event_labels_are_the_go_names() {
        let labels: Vec<&str> = Event::ALL.iter().map(|e| e.label()).collect();
        assert_eq!(
            labels,
            [
                "dns_start",
                "dns_done",
                "connect_start",
                "connect_done",
                "tls_handshake_start",
                "tls_handshake_done",
                "got_conn",
                "wrote_request",
                "got_first_resp_byte"
            ]
        );
    }
}
