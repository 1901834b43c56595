//! Whether MongoDB answers, for `/api/v1/health`, without the health check ever waiting
//! on MongoDB.
//!
//! A health check that pings the database on every call waits behind whatever the
//! database and the driver's connection pool are busy with: under search load it took
//! several times as long as a route that touches nothing, and against a remote Atlas
//! cluster each check costs a network round trip. Instead, once health has been asked
//! for, a background task pings every second and health answers with the latest result
//! at once. Only the very first call waits for a ping (bounded by MONGO_TIMEOUT_SECS). A
//! database that goes away shows as `disconnected` within about 1.5 s (a ping interval
//! and the selection wait below) when its connections close, or within
//! MONGO_TIMEOUT_SECS when they hang. Searches use the
//! same observation to fail fast while the database is known to be down.
//!
//! The pings go through a client of their own that waits at most `SELECTION_TIMEOUT`
//! (0.5 s) for a server: once the driver's monitor has seen the server go (it notices a closed
//! connection at once), a ping on the service's client waited out the whole
//! MONGO_TIMEOUT_SECS of server selection before failing (5.6 s to show in health). A
//! server the driver knows to be up is selected at once, so the short wait never turns
//! a slow ping into a false "down"; any member answers (nearest), so an election does not
//! count as an outage either.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mongodb::bson::doc;
use mongodb::options::{ClientOptions, ReadPreference, SelectionCriteria};
use mongodb::Database;
use tokio::sync::watch;

/// How often the database is pinged while the watch runs.
pub const PING_INTERVAL: Duration = Duration::from_secs(1);

/// How long a ping waits for the driver to know of a reachable server.
pub const SELECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// The watch's client options: the service's, with the short server selection.
pub fn watch_options(service: &ClientOptions) -> ClientOptions {
    let mut opts = service.clone();
    opts.server_selection_timeout = Some(
        opts.server_selection_timeout
            .map_or(SELECTION_TIMEOUT, |t| t.min(SELECTION_TIMEOUT)),
    );
    opts.app_name = Some(format!(
        "{}-health",
        opts.app_name.as_deref().unwrap_or("search-img")
    ));
    opts
}

/// The outcome of one ping.
#[derive(Clone, Debug)]
pub struct Observation {
    pub result: Result<(), String>,
    /// When the ping finished.
    pub at: Instant,
    /// How long it took.
    pub latency: Duration,
}

pub struct DbWatch {
    db: Database,
    timeout: Duration,
    /// Set (and the pinging task started) on the first call to `status`.
    latest: OnceLock<watch::Receiver<Option<Observation>>>,
}

impl DbWatch {
    /// Does nothing until `status` is first called.
    pub fn new(db: Database, timeout: Duration) -> Self {
        Self {
            db,
            timeout,
            latest: OnceLock::new(),
        }
    }

    /// One ping, bounded by the timeout.
    pub async fn ping(db: &Database, timeout: Duration) -> Result<(), String> {
        let nearest = SelectionCriteria::ReadPreference(ReadPreference::Nearest {
            options: Default::default(),
        });
        let ping = db
            .run_command(doc! { "ping": 1 })
            .selection_criteria(nearest);
        match tokio::time::timeout(timeout, ping).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("ping timed out".into()),
        }
    }

    /// Starts the background pings if they are not running yet (never waits).
    pub fn start(&self) -> watch::Receiver<Option<Observation>> {
        self.latest
            .get_or_init(|| {
                let (tx, rx) = watch::channel(None);
                tokio::spawn(run(tx, self.db.clone(), self.timeout));
                rx
            })
            .clone()
    }

    /// Why the database is unreachable, if the latest ping says so; never waits. Lets a
    /// search answer 503 at once during an outage instead of holding its slot while the
    /// driver waits out its server-selection timeout. Without an observation yet (or
    /// with a good one) the search goes ahead and finds out for itself.
    pub fn known_down(&self) -> Option<String> {
        let rx = self.latest.get()?;
        let latest = rx.borrow();
        match latest.as_ref()?.result {
            Err(ref e) => Some(e.clone()),
            Ok(()) => None,
        }
    }

    /// The latest observation. The first call starts the background pings and waits for
    /// the first one; later calls never wait. An observation older than the pings can
    /// explain (the task is stuck or gone) counts as unreachable.
    pub async fn status(&self) -> Observation {
        let mut rx = self.start();
        let obs = match rx.wait_for(Option::is_some).await {
            Ok(o) => o.clone().expect("waited for Some"),
            Err(_) => {
                return Observation {
                    result: Err("the database watch stopped".into()),
                    at: Instant::now(),
                    latency: Duration::ZERO,
                }
            }
        };
        let limit = PING_INTERVAL + self.timeout + Duration::from_secs(5);
        if obs.at.elapsed() > limit {
            return Observation {
                result: Err(format!(
                    "no answer from the database for {} s",
                    obs.at.elapsed().as_secs()
                )),
                ..obs
            };
        }
        obs
    }
}

/// Pings every PING_INTERVAL until the watch is dropped; logs each change of state.
async fn run(tx: watch::Sender<Option<Observation>>, db: Database, timeout: Duration) {
    let mut was_ok = true;
    loop {
        let t = Instant::now();
        let result = DbWatch::ping(&db, timeout).await;
        match (&result, was_ok) {
            (Err(e), true) => tracing::warn!(error = %e, "MongoDB is unreachable"),
            (Ok(()), false) => tracing::info!("MongoDB is reachable again"),
            _ => {}
        }
        was_ok = result.is_ok();
        tx.send_replace(Some(Observation {
            result,
            at: Instant::now(),
            latency: t.elapsed(),
        }));
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
    }
}
