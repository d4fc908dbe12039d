//! What keeps the webhook up under abuse: every bound on a request and a connection, and the
//! gate that sheds admission reviews beyond them with `429 Too Many Requests` instead of queueing
//! them until the memory limit kills the pod.
//!
//! The webhook's failure policy is `Fail` for GPU pods and policy edits, so a webhook that is down
//! blocks them; anything that can reach its Service (any pod, by default) must not be able to take
//! it down. Memory is bounded by what is in flight: at most `max_in_flight` reviews, whose bodies
//! together are at most `max_in_flight_bytes` (a review's cost is its `Content-Length`, or the
//! largest body when it has none, charged before the body is read), on at most `max_connections`
//! connections, `max_connections_per_peer` of them from one address. Past a bound a review is
//! answered at once with 429 and `Retry-After: 1` (client-go, and so the apiserver's webhook
//! client, waits that long and sends it again within the webhook's timeout) and
//! `gpupilot_webhook_shed_total{reason}` counts it; a connection past a bound is closed at once.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::listener::{PeerSlot, Peers};
use crate::metrics::{Metrics, Shed};

/// The apiserver refuses request bodies over 3 MiB (`MaxRequestBodyBytes`), so no object it
/// admits is larger; a review carries at most two of them (`object` and `oldObject` of an
/// update) and a little envelope.
pub const APISERVER_MAX_OBJECT_BYTES: usize = 3 << 20;

/// Limits on requests and connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest body accepted (413 past it, before it is read).
    pub max_body_bytes: usize,
    /// Time to read the body and answer.
    pub request_timeout: Duration,
    /// Reviews answered at once; more are shed with 429.
    pub max_in_flight: usize,
    /// Reviews from one IP address answered at once, so that one client (a pod holding streams
    /// open with bodies it never sends) cannot take every slot from the apiserver.
    pub max_in_flight_per_peer: usize,
    /// Bytes of review bodies held at once; more are shed with 429.
    pub max_in_flight_bytes: usize,
    /// Open connections; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_connections_per_peer: usize,
    /// Time to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a request's headers (HTTP/1.1), and for a new connection to send its first
    /// request.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY, so the
    /// client opens a new one for its next request).
    pub idle_timeout: Duration,
    /// HTTP/2 streams one connection may have open at once.
    pub max_concurrent_streams: u32,
    /// Bytes of headers in one request (HTTP/2 header list; HTTP/1.1 read buffer).
    pub max_header_bytes: u32,
    /// HTTP/2 PING interval; a peer that does not answer within the same time is dropped.
    pub keep_alive_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 2 * APISERVER_MAX_OBJECT_BYTES + (64 << 10),
            request_timeout: Duration::from_secs(10),
            max_in_flight: 64,
            max_in_flight_per_peer: 16,
            max_in_flight_bytes: 8 << 20,
            max_connections: 64,
            max_connections_per_peer: 16,
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_concurrent_streams: 100,
            max_header_bytes: 16 << 10,
            keep_alive_interval: Duration::from_secs(30),
        }
    }
}

/// Limits that cannot work together.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LimitsError(String);

impl Limits {
    /// Refuses limits under which a review could never be answered.
    pub fn check(&self) -> Result<(), LimitsError> {
        let zero = [
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-in-flight", self.max_in_flight),
            ("--max-in-flight-per-peer", self.max_in_flight_per_peer),
            ("--max-in-flight-bytes", self.max_in_flight_bytes),
            ("--max-connections", self.max_connections),
            ("--max-connections-per-peer", self.max_connections_per_peer),
            (
                "--max-concurrent-streams",
                self.max_concurrent_streams as usize,
            ),
        ];
        if let Some((flag, _)) = zero.iter().find(|(_, v)| *v == 0) {
            return Err(LimitsError(format!(
                "{flag} is 0, so no review could ever be answered; give it a positive value"
            )));
        }
        if self.max_in_flight_per_peer > self.max_in_flight {
            return Err(LimitsError(format!(
                "--max-in-flight-per-peer ({}) is more than --max-in-flight ({}), so one client could hold every slot; lower it",
                self.max_in_flight_per_peer, self.max_in_flight
            )));
        }
        if self.max_in_flight_bytes < self.max_body_bytes {
            return Err(LimitsError(format!(
                "--max-in-flight-bytes ({}) is smaller than --max-body-bytes ({}), so the largest review could never be answered; raise it or lower --max-body-bytes",
                self.max_in_flight_bytes, self.max_body_bytes
            )));
        }
        if u32::try_from(self.max_body_bytes).is_err() {
            return Err(LimitsError(format!(
                "--max-body-bytes ({}) must be below 4 GiB; the apiserver sends at most {} bytes",
                self.max_body_bytes,
                Limits::default().max_body_bytes
            )));
        }
        if self.max_header_bytes < 8192 {
            return Err(LimitsError(format!(
                "--max-header-bytes ({}) must be at least 8192; the apiserver's own headers need a few hundred bytes, HTTP/1.1 reads them in 8 KiB",
                self.max_header_bytes
            )));
        }
        Ok(())
    }
}

/// The gate in front of the admission endpoints.
pub struct Gate {
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    /// Reviews being answered per client address.
    peers: Arc<Peers>,
    limits: Limits,
    metrics: Arc<Metrics>,
}

/// The address a request came from, put in its extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

/// What a review holds while it is answered; dropping it (answered, timed out or cancelled)
/// gives it back.
struct Held {
    _peer: Option<PeerSlot>,
    _request: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    cost: usize,
    metrics: Arc<Metrics>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.in_flight(-1, -(self.cost as i64));
    }
}

impl Gate {
    pub fn new(limits: Limits, metrics: Arc<Metrics>) -> Gate {
        Gate {
            requests: Arc::new(Semaphore::new(limits.max_in_flight)),
            bytes: Arc::new(Semaphore::new(limits.max_in_flight_bytes)),
            peers: Arc::default(),
            limits,
            metrics,
        }
    }

    /// One review from `peer` more, within its client's share, or why not.
    fn take_peer_share(&self, peer: IpAddr) -> Result<PeerSlot, Refused> {
        self.peers
            .take(peer, self.limits.max_in_flight_per_peer)
            .ok_or_else(|| {
                self.metrics.shed(Shed::RequestsPerPeer);
                Refused::Busy(format!(
                    "gpu-pilot-webhook is answering {} reviews from {peer} already (--max-in-flight-per-peer)",
                    self.limits.max_in_flight_per_peer
                ))
            })
    }

    /// The request's cost (its declared length, or the largest body), or why it is refused.
    fn admit(&self, declared: Option<u64>, peer: Option<IpAddr>) -> Result<Held, Refused> {
        let max = self.limits.max_body_bytes;
        if declared.is_some_and(|n| n > max as u64) {
            return Err(Refused::TooLarge);
        }
        let peer = peer.map(|ip| self.take_peer_share(ip)).transpose()?;
        let cost = declared.map_or(max, |n| n as usize).max(1);
        let request = self.requests.clone().try_acquire_owned().map_err(|_| {
            self.metrics.shed(Shed::Requests);
            Refused::Busy(format!(
                "gpu-pilot-webhook is answering {} reviews already (--max-in-flight)",
                self.limits.max_in_flight
            ))
        })?;
        let bytes = self
            .bytes
            .clone()
            .try_acquire_many_owned(cost as u32)
            .map_err(|_| {
                self.metrics.shed(Shed::Bytes);
                Refused::Busy(format!(
                    "gpu-pilot-webhook holds review bodies up to --max-in-flight-bytes ({} bytes) and this one needs {cost} more",
                    self.limits.max_in_flight_bytes
                ))
            })?;
        self.metrics.in_flight(1, cost as i64);
        Ok(Held {
            _peer: peer,
            _request: request,
            _bytes: bytes,
            cost,
            metrics: self.metrics.clone(),
        })
    }
}

enum Refused {
    TooLarge,
    Busy(String),
}

/// The Status body client-go reads a refusal from.
pub fn status_response(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "code": code.as_u16(), "reason": reason, "message": message,
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Middleware: admits a review within the limits or sheds it with 429 before its body is read.
pub async fn gate(State(gate): State<Arc<Gate>>, req: Request, next: Next) -> Response {
    // hyper's body knows the declared length (HTTP/1.1 and HTTP/2 alike); a Content-Length
    // header that claims more counts too.
    let header = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let hint = axum::body::HttpBody::size_hint(req.body()).upper();
    let declared = match (hint, header) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let peer = req.extensions().get::<Peer>().map(|p| p.0);
    match gate.admit(declared, peer) {
        Ok(held) => {
            let response = next.run(req).await;
            drop(held);
            response
        }
        Err(Refused::TooLarge) => crate::server::HttpError::TooLarge.into_response(),
        Err(Refused::Busy(why)) => {
            tracing::debug!("shedding a review: {why}");
            let mut r = status_response(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                &format!("{why}; retry in a second (the apiserver does so by itself)"),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(limits: Limits) -> (Gate, Arc<Metrics>) {
        let m = Arc::new(Metrics::default());
        (Gate::new(limits, m.clone()), m)
    }

    #[test]
    fn reviews_past_either_bound_are_shed_and_counted() {
        let limits = Limits {
            max_in_flight: 2,
            max_in_flight_bytes: 1000,
            max_body_bytes: 600,
            ..Limits::default()
        };
        let (g, m) = gate(limits);
        let a = g.admit(Some(500), None).ok().unwrap();
        // 500 + 600 (no length: the largest body) > 1000.
        assert!(matches!(g.admit(None, None), Err(Refused::Busy(_))));
        assert_eq!(m.shed_count(Shed::Bytes), 1);
        let b = g.admit(Some(100), None).ok().unwrap();
        assert!(matches!(g.admit(Some(1), None), Err(Refused::Busy(_))));
        assert_eq!(m.shed_count(Shed::Requests), 1);
        assert!(matches!(g.admit(Some(601), None), Err(Refused::TooLarge)));
        assert_eq!(m.in_flight_now(), (2, 600));
        drop((a, b));
        assert_eq!(m.in_flight_now(), (0, 0));
        let all = g.admit(Some(600), None).ok().unwrap();
        drop(all);
    }

    #[test]
    fn limits_that_could_never_answer_are_refused() {
        assert!(Limits::default().check().is_ok());
        let e = Limits {
            max_in_flight: 0,
            ..Limits::default()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("--max-in-flight is 0"), "{e}");
        let e = Limits {
            max_in_flight_bytes: 1 << 20,
            ..Limits::default()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("--max-in-flight-bytes"), "{e}");
        let e = Limits {
            max_body_bytes: 5 << 30,
            max_in_flight_bytes: 6 << 30,
            ..Limits::default()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("below 4 GiB"), "{e}");
        let e = Limits {
            max_header_bytes: 4096,
            ..Limits::default()
        }
        .check()
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--max-header-bytes (4096) must be at least 8192"),
            "{e}"
        );
        let e = Limits {
            max_in_flight_per_peer: 65,
            ..Limits::default()
        }
        .check()
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--max-in-flight-per-peer (65) is more than --max-in-flight (64)"),
            "{e}"
        );
        // Every count that could be zero is named when it is.
        type Zero = (&'static str, fn(&mut Limits));
        let zeros: [Zero; 7] = [
            ("--max-body-bytes", |l| l.max_body_bytes = 0),
            ("--max-in-flight", |l| l.max_in_flight = 0),
            ("--max-in-flight-per-peer", |l| l.max_in_flight_per_peer = 0),
            ("--max-in-flight-bytes", |l| l.max_in_flight_bytes = 0),
            ("--max-connections", |l| l.max_connections = 0),
            ("--max-connections-per-peer", |l| {
                l.max_connections_per_peer = 0
            }),
            ("--max-concurrent-streams", |l| l.max_concurrent_streams = 0),
        ];
        for (flag, zero) in zeros {
            let mut l = Limits::default();
            zero(&mut l);
            let e = l.check().unwrap_err().to_string();
            assert!(e.starts_with(&format!("{flag} is 0")), "{flag}: {e}");
        }
    }

    /// One step of a client mix: a review with a declared length (or none), or the oldest
    /// review held so far finishing.
    #[derive(Debug, Clone)]
    enum Step {
        /// A review with a declared length (or none) from one of a few client addresses.
        Arrive(Option<u64>, u8),
        Finish,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            3 => (proptest::option::of(0u64..5_000), 0u8..3).prop_map(|(d, p)| Step::Arrive(d, p)),
            2 => Just(Step::Finish),
        ]
    }

    proptest::proptest! {
        /// Against a model of the two bounds: a review is admitted exactly when its count and its
        /// bytes fit beside the reviews held, refused as too large exactly past the body limit,
        /// every shed is counted under its bound, and what is held goes back to zero.
        #[test]
        fn the_gate_admits_exactly_what_fits_and_gives_everything_back(
            max_in_flight in 1usize..6,
            per_peer in 1usize..6,
            max_body_bytes in 1usize..2_000,
            extra_bytes in 0usize..4_000,
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            let limits = Limits {
                max_in_flight,
                max_in_flight_per_peer: per_peer.min(max_in_flight),
                max_body_bytes,
                max_in_flight_bytes: max_body_bytes + extra_bytes,
                ..Limits::default()
            };
            let (g, m) = gate(limits);
            let mut held: std::collections::VecDeque<(Held, usize, u8)> = Default::default();
            let (mut shed_requests, mut shed_bytes, mut shed_peer) = (0u64, 0u64, 0u64);
            for s in steps {
                match s {
                    Step::Finish => {
                        held.pop_front();
                    }
                    Step::Arrive(declared, p) => {
                        let cost = declared.map_or(max_body_bytes, |n| n as usize).max(1);
                        let bytes_now: usize = held.iter().map(|(_, c, _)| c).sum();
                        let from_peer = held.iter().filter(|(_, _, q)| *q == p).count();
                        let ip = IpAddr::from([10, 0, 0, p]);
                        let result = g.admit(declared, Some(ip));
                        if declared.is_some_and(|n| n > max_body_bytes as u64) {
                            proptest::prop_assert!(matches!(result, Err(Refused::TooLarge)));
                        } else if from_peer >= limits.max_in_flight_per_peer {
                            proptest::prop_assert!(matches!(result, Err(Refused::Busy(_))));
                            shed_peer += 1;
                        } else if held.len() >= max_in_flight {
                            proptest::prop_assert!(matches!(result, Err(Refused::Busy(_))));
                            shed_requests += 1;
                        } else if bytes_now + cost > limits.max_in_flight_bytes {
                            proptest::prop_assert!(matches!(result, Err(Refused::Busy(_))));
                            shed_bytes += 1;
                        } else {
                            let h = result.ok();
                            proptest::prop_assert!(h.is_some(), "a review that fits was refused");
                            held.push_back((h.unwrap(), cost, p));
                        }
                    }
                }
                let bytes_now: usize = held.iter().map(|(_, c, _)| c).sum();
                proptest::prop_assert_eq!(m.in_flight_now(), (held.len() as i64, bytes_now as i64));
                proptest::prop_assert!(held.len() <= max_in_flight);
                proptest::prop_assert!(bytes_now <= limits.max_in_flight_bytes);
            }
            proptest::prop_assert_eq!(m.shed_count(Shed::Requests), shed_requests);
            proptest::prop_assert_eq!(m.shed_count(Shed::Bytes), shed_bytes);
            proptest::prop_assert_eq!(m.shed_count(Shed::RequestsPerPeer), shed_peer);
                        held.clear();
            proptest::prop_assert_eq!(m.in_flight_now(), (0, 0));
            proptest::prop_assert!(g.peers.is_empty(), "a client's share was not given back");
        }
    }
}
