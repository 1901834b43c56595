//! A lease kept in MongoDB: one holder at a time across every instance on the database,
//! lost after its time to live by a holder that stops renewing it (a crash, a lost
//! connection). Index passes run under one, so two instances never embed the same
//! images at once: the second waits, and its pass then finds the first one's
//! embeddings stored.

use std::future::Future;
use std::time::Duration;

use mongodb::bson::{doc, DateTime, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::{Collection, Database};

pub struct Lease {
    coll: Collection<Document>,
    name: String,
    holder: String,
    ttl: Duration,
}

impl Lease {
    /// The lease `name` in `collection`; this process's holder id is unique to it.
    pub fn new(db: &Database, collection: &str, name: &str, ttl: Duration) -> Self {
        let nonce = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), name);
        Self {
            coll: db.collection(collection),
            name: name.to_string(),
            holder: format!("pid {} #{nonce:016x}", std::process::id()),
            ttl,
        }
    }

    /// Takes or renews the lease if it is free, expired or already ours.
    async fn try_take(&self) -> mongodb::error::Result<bool> {
        let now = DateTime::now();
        let until = DateTime::from_millis(now.timestamp_millis() + self.ttl.as_millis() as i64);
        let filter = doc! {
            "_id": &self.name,
            "$or": [{ "holder": &self.holder }, { "expires": { "$lt": now } }],
        };
        let set = doc! { "$set": { "holder": &self.holder, "expires": until } };
        match self.coll.update_one(filter, set).upsert(true).await {
            Ok(_) => Ok(true),
            // Held by another: the upsert's insert hits its `_id`.
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn release(&self) {
        let mine = doc! { "_id": &self.name, "holder": &self.holder };
        if let Err(e) = self.coll.delete_one(mine).await {
            // It expires by itself.
            tracing::warn!(error = %e, lease = %self.name, "could not release a lease");
        }
    }

    /// Runs `work` holding the lease: waits until it is free, renews it every third of
    /// its time to live while `work` runs, and releases it after.
    pub async fn hold<T>(&self, work: impl Future<Output = T>) -> mongodb::error::Result<T> {
        let poll = (self.ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
        let mut waited = false;
        while !self.try_take().await? {
            if !waited {
                tracing::info!(lease = %self.name, "another instance holds the lease; waiting");
                waited = true;
            }
            tokio::time::sleep(poll).await;
        }
        let renew = async {
            loop {
                tokio::time::sleep(self.ttl / 3).await;
                match self.try_take().await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(lease = %self.name, "lease lost to another instance")
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, lease = %self.name, "could not renew a lease")
                    }
                }
            }
        };
        let out = tokio::select! {
            out = work => out,
            _ = renew => unreachable!("renews until the work ends"),
        };
        self.release().await;
        Ok(out)
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}
