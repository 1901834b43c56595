//! Following the products collection's change stream (CATALOG_CHANGE_STREAM): each
//! insert, update, replace or delete is brought into the index by an incremental pass
//! over the products it names, within about a second, with no full pass. The stream's
//! resume token is kept in MongoDB once its changes are indexed, so after a dropped
//! connection, a server restart or a restart of the service the stream goes on from
//! there and no change goes untold. Where the token can no longer be resumed from, or
//! the stream starts afresh, a full pass is due. Where the server has no change streams
//! (a standalone mongod), searches start passes every CATALOG_SYNC_INTERVAL_SECS, as
//! without this.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, DateTime, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::{Collection, Database};
use serde::Serialize;

use super::Indexer;
use crate::catalog::Catalog;
use crate::store::ProductId;

/// Changes gathered into one incremental pass at most.
const MAX_BATCH: usize = 1000;
/// How often an idle stream's newer resume token is stored: it keeps the stored point
/// within the server's change history (the oplog) while nothing changes.
const IDLE_SAVE: Duration = Duration::from_secs(60);
/// Reconnect delays while the database is unreachable or a pass fails.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long to wait before asking a server without change streams again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(600);

/// For `/api/v1/status`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FollowStatus {
    /// `following`, `starting`, `polling` (the server has no change streams, or it is
    /// unreachable: searches start passes every CATALOG_SYNC_INTERVAL_SECS) or `off`.
    pub state: &'static str,
    /// Why it is not following, when it is not.
    pub reason: Option<String>,
    /// Product changes told by the stream since the service started.
    pub changes: u64,
    /// Seconds since the last change was indexed.
    pub last_change_secs_ago: Option<f64>,
}

pub struct Follower {
    catalog: Catalog,
    indexer: Arc<Indexer>,
    /// Where the resume token is kept: one document per products collection.
    tokens: Collection<Document>,
    token_id: String,
    status: Mutex<(FollowStatus, Option<Instant>)>,
}

impl Follower {
    /// The follower of `catalog`'s stream, keeping its token in `collection` of `db`
    /// (beside the index-pass lease), under `name` (the products collection's).
    pub fn new(
        catalog: Catalog,
        indexer: Arc<Indexer>,
        db: &Database,
        collection: &str,
        name: &str,
    ) -> Arc<Self> {
        Arc::new(Self {
            catalog,
            indexer,
            tokens: db.collection(collection),
            token_id: format!("change-stream {name}"),
            status: Mutex::new((
                FollowStatus {
                    state: "starting",
                    ..Default::default()
                },
                None,
            )),
        })
    }

    /// A follower that does not follow, and says why.
    pub fn status_off(reason: &str) -> FollowStatus {
        FollowStatus {
            state: "off",
            reason: Some(reason.to_string()),
            ..Default::default()
        }
    }

    pub fn status(&self) -> FollowStatus {
        let (mut s, last) = self.lock().clone();
        s.last_change_secs_ago = last.map(|t| t.elapsed().as_secs_f64());
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (FollowStatus, Option<Instant>)> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, state: &'static str, reason: Option<String>) {
        let mut s = self.lock();
        s.0.state = state;
        s.0.reason = reason;
    }

    /// Follows the stream until the task is aborted: opens it (from the stored token when
    /// there is one), indexes what it tells, and reopens it after an error.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = BACKOFF_MIN;
        let (mut token, full_pass_at) = loop {
            match self.load_point().await {
                Ok(t) => break t,
                Err(e) => {
                    self.not_following("polling", format!("database unreachable: {e}"));
                    sleep_backoff(&mut backoff).await;
                }
            }
        };
        loop {
            let resumed = token.is_some();
            let stream = match self.catalog.watch(token.clone()).await {
                Ok(s) => s,
                Err(e) if !is_server_answer(&e) => {
                    self.not_following("polling", format!("database unreachable: {e}"));
                    sleep_backoff(&mut backoff).await;
                    continue;
                }
                Err(e) if resumed => {
                    // Too old for the server's change history, or from another collection:
                    // start afresh (a full pass then finds what was missed).
                    tracing::warn!(error = %e, "cannot resume the products change stream; starting it afresh");
                    token = None;
                    continue;
                }
                Err(e) => {
                    tracing::info!(error = %e, "no change stream on the products collection; searches start index passes every CATALOG_SYNC_INTERVAL_SECS");
                    self.not_following("polling", format!("no change stream: {e}"));
                    tokio::time::sleep(UNSUPPORTED_RETRY).await;
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            if resumed {
                // Where the last instance left it: its last full pass counts here.
                if let Some(at) = full_pass_at {
                    self.indexer.restore_full_pass(at);
                }
            } else {
                self.indexer.changes_missed();
                token = stream.resume_token();
                self.save_point(token.as_ref()).await;
            }
            self.indexer.set_following(true);
            self.set_state("following", None);
            tracing::info!(resumed, "following the products change stream");
            match self.follow(stream, &mut token).await {
                Ok(()) => {
                    // The collection was dropped or renamed: the stream ended for good.
                    token = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the products change stream failed; resuming it");
                    self.not_following("polling", format!("stream interrupted: {e}"));
                    sleep_backoff(&mut backoff).await;
                }
            }
        }
    }

    fn not_following(&self, state: &'static str, reason: String) {
        self.indexer.set_following(false);
        self.set_state(state, Some(reason));
    }

    /// Reads `stream` until it ends (Ok: the collection is gone) or fails. `token` is
    /// moved forward, and stored, only past changes that are indexed.
    async fn follow(
        &self,
        mut stream: ChangeStream<ChangeStreamEvent<Document>>,
        token: &mut Option<ResumeToken>,
    ) -> mongodb::error::Result<()> {
        let mut pending: HashSet<ProductId> = HashSet::new();
        let (mut saved, mut saved_full) = (Instant::now(), self.indexer.covering_full_pass());
        loop {
            // One getMore at most (waiting up to a second): an empty answer means the
            // changes so far are all here, and `resume_token` is past them.
            let event = stream.next_if_any().await?;
            let ended = match event {
                Some(e) => match e.operation_type {
                    OperationType::Insert
                    | OperationType::Update
                    | OperationType::Replace
                    | OperationType::Delete => {
                        if let Some(id) = e.document_key.as_ref().and_then(|k| k.get("_id")) {
                            pending.insert(ProductId::from_bson(id.clone()));
                        }
                        if pending.len() < MAX_BATCH {
                            continue;
                        }
                        false
                    }
                    OperationType::Drop
                    | OperationType::Rename
                    | OperationType::DropDatabase
                    | OperationType::Invalidate => true,
                    _ => continue,
                },
                None => false,
            };
            let indexed = !pending.is_empty();
            if indexed {
                let n = pending.len();
                self.index(pending.drain().collect()).await;
                let mut s = self.lock();
                s.0.changes += n as u64;
                s.1 = Some(Instant::now());
            }
            if ended {
                tracing::warn!(
                    "the products collection was dropped or renamed; a full pass is due"
                );
                self.indexer.changes_missed();
                return Ok(());
            }
            let next = stream.resume_token();
            let moved = next.is_some() && next != *token;
            let full_pass = self.indexer.covering_full_pass();
            if (moved && (indexed || saved.elapsed() >= IDLE_SAVE)) || full_pass != saved_full {
                if moved {
                    *token = next;
                }
                self.save_point(token.as_ref()).await;
                (saved, saved_full) = (Instant::now(), full_pass);
            }
        }
    }

    /// An incremental pass over `products`, retried until it succeeds (the database may
    /// be down for a while): the token does not move past changes not indexed.
    async fn index(&self, products: Vec<ProductId>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match self.indexer.pass_products(products.clone()).await {
                Ok(r) => {
                    tracing::info!(
                        products = products.len(),
                        embedded = r.embedded,
                        removed = r.removed,
                        retagged = r.retagged,
                        "catalogue changes indexed"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "indexing catalogue changes failed; retrying");
                    sleep_backoff(&mut backoff).await;
                }
            }
        }
    }

    /// The stored resume token, and when the last full pass before it started.
    async fn load_point(&self) -> mongodb::error::Result<(Option<ResumeToken>, Option<DateTime>)> {
        let found = self
            .tokens
            .find_one(doc! { "_id": &self.token_id })
            .await?
            .unwrap_or_default();
        let token = found
            .get("token")
            .and_then(|t| mongodb::bson::from_bson(t.clone()).ok());
        Ok((token, found.get_datetime("full_pass_at").ok().copied()))
    }

    /// Stores where the stream got to, every change before it indexed, with the start of
    /// the last full pass that saw what the stream did not tell (a failure to store costs
    /// only changes indexed again).
    async fn save_point(&self, token: Option<&ResumeToken>) {
        let Some(token) = token.and_then(|t| mongodb::bson::to_bson(t).ok()) else {
            return;
        };
        let full_pass_at = self.indexer.covering_full_pass();
        let set = doc! { "$set": {
            "token": token, "full_pass_at": full_pass_at, "updated_at": DateTime::now(),
        } };
        let write = self
            .tokens
            .update_one(doc! { "_id": &self.token_id }, set)
            .upsert(true)
            .await;
        if let Err(e) = write {
            tracing::warn!(error = %e, "could not store the change stream's resume token");
        }
    }
}

/// Whether the server answered (a command error) rather than being unreachable.
fn is_server_answer(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Command(_))
}

async fn sleep_backoff(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}
