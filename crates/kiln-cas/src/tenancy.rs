//! How organisations share one store: whether a request needs the
//! per-organisation markers ([`Key::membership`]), and when they are made.
//!
//! Blobs are stored once. Which organisations may see one is recorded by a
//! marker per organisation and blob, written when the organisation shows
//! it has the bytes or when they were made for it. Markers separate
//! organisations from each other, so they are needed only once a second
//! organisation uses the store. Until then every blob in the store is the
//! one organisation's, or was stored with open access before keys existed
//! (by the same operator), and markers would cost it lookups and writes
//! for nothing. The phases:
//!
//! - **unclaimed**: no organisation has made a request yet;
//! - **sole(A)**: only A has. A reads and writes without markers;
//! - **marking(A)**: another organisation has made its first request. A
//!   task marks every CAS blob present as A's. Meanwhile A still reads
//!   without markers but writes them, and every other organisation waits;
//! - **shared**: every organisation reads and writes markers.
//!
//! The invariant that makes this safe: a request of an organisation
//! settles its phase ([`Tenancy::enter`]) before it writes anything to
//! the store. So when marking starts, no other organisation has stored a
//! byte, and nothing marked as A's can be another's.
//!
//! Unclaimed, sole and shared are kept in a state file beside the store,
//! so a restart keeps them; a restart during marking is back in sole(A),
//! and the next other organisation starts marking again. A store opened
//! without a state file is shared if it holds any marker (it was made
//! before this file existed), else unclaimed.
//!
//! Markers are acknowledged like any write: a crash before the store's
//! next group commit can lose some. Losing a marker hides a blob from its
//! organisation (it uploads it again); it never shows a blob to another.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kiln_store::{BlobStore, Digest, Key, Namespace};
use tokio::sync::watch;

use crate::error::{CasError, Result};

/// What an organisation's marker holds: its presence is what counts.
pub(crate) const MARKER: &[u8] = b"\x01";

/// The first line of the state file.
const STATE_HEADER: &str = "kiln organisations v1";

/// Markers written per store call while marking.
const MARKING_BATCH: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Unclaimed,
    Sole(Arc<str>),
    Marking(Arc<str>),
    Shared,
}

/// What one request of an organisation does about markers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Markers {
    /// A blob is visible only with the organisation's marker.
    pub check: bool,
    /// What the organisation stores or is given gets its marker.
    pub write: bool,
}

impl Markers {
    const NONE: Markers = Markers {
        check: false,
        write: false,
    };
    const WRITE: Markers = Markers {
        check: false,
        write: true,
    };
    const BOTH: Markers = Markers {
        check: true,
        write: true,
    };
}

/// The organisations' phase of one store (see the module doc).
#[derive(Debug)]
pub struct Tenancy {
    phase: watch::Sender<Phase>,
    /// Held while the phase changes.
    transition: tokio::sync::Mutex<()>,
    /// Where the phase is kept; `None` for a store that does not outlive
    /// the process.
    file: Option<PathBuf>,
    /// Why the last marking failed, for the organisations that waited.
    failure: parking_lot::Mutex<Option<String>>,
}

impl Tenancy {
    /// The phase of a store that starts empty and does not outlive the
    /// process (a memory store): unclaimed, kept nowhere.
    pub fn in_memory() -> Tenancy {
        Tenancy::with(Phase::Unclaimed, None)
    }

    /// Reads the phase of `store` from `file`, or, when there is no such
    /// file yet, works it out from the store and writes it.
    pub async fn open(file: PathBuf, store: &dyn BlobStore) -> Result<Tenancy> {
        let read = {
            let file = file.clone();
            tokio::task::spawn_blocking(move || std::fs::read_to_string(file))
                .await
                .map_err(|e| CasError::Internal(format!("reading the organisations' state: {e}")))?
        };
        let phase = match read {
            Ok(text) => parse_state(&text).ok_or_else(|| {
                CasError::Internal(format!(
                    "{} is not a state file this version of Kiln understands",
                    file.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let phase = if holds_markers(store).await? {
                    Phase::Shared
                } else {
                    Phase::Unclaimed
                };
                write_state(file.clone(), phase.clone()).await?;
                phase
            }
            Err(e) => {
                return Err(CasError::Internal(format!(
                    "reading {}: {e}",
                    file.display()
                )))
            }
        };
        Ok(Tenancy::with(phase, Some(file)))
    }

    fn with(phase: Phase, file: Option<PathBuf>) -> Tenancy {
        Tenancy {
            phase: watch::Sender::new(phase),
            transition: tokio::sync::Mutex::new(()),
            file,
            failure: parking_lot::Mutex::new(None),
        }
    }

    /// What a request of `org` does about markers, settling the phase
    /// first if this is a new organisation (which may wait for marking).
    /// Called before the request writes anything to the store.
    pub(crate) async fn enter(
        self: &Arc<Self>,
        org: &str,
        store: &Arc<dyn BlobStore>,
    ) -> Result<Markers> {
        if org.is_empty() {
            return Ok(Markers::NONE);
        }
        match &*self.phase.borrow() {
            Phase::Shared => return Ok(Markers::BOTH),
            Phase::Sole(sole) if **sole == *org => return Ok(Markers::NONE),
            Phase::Marking(sole) if **sole == *org => return Ok(Markers::WRITE),
            _ => {}
        }
        self.settle(org, store).await
    }

    async fn settle(self: &Arc<Self>, org: &str, store: &Arc<dyn BlobStore>) -> Result<Markers> {
        {
            let _transition = self.transition.lock().await;
            let phase = self.phase.borrow().clone();
            match phase {
                Phase::Unclaimed => {
                    let sole = Phase::Sole(Arc::from(org));
                    self.persist(sole.clone()).await?;
                    self.phase.send_replace(sole);
                    tracing::info!(
                        organisation = org,
                        "first organisation to use the store: it needs no markers until another \
                         one arrives"
                    );
                    return Ok(Markers::NONE);
                }
                Phase::Sole(sole) if *sole == *org => return Ok(Markers::NONE),
                Phase::Sole(sole) => {
                    self.phase.send_replace(Phase::Marking(sole.clone()));
                    tokio::spawn(Arc::clone(self).mark_all(sole, Arc::clone(store)));
                }
                Phase::Marking(sole) if *sole == *org => return Ok(Markers::WRITE),
                Phase::Marking(_) => {}
                Phase::Shared => return Ok(Markers::BOTH),
            }
        }
        let mut phase = self.phase.subscribe();
        let settled = phase
            .wait_for(|phase| !matches!(phase, Phase::Marking(_)))
            .await
            .map_err(|_| CasError::Unavailable("the store is closing".into()))?
            .clone();
        match settled {
            Phase::Shared => Ok(Markers::BOTH),
            _ => Err(CasError::Unavailable(format!(
                "the store could not be made ready for a second organisation: {}; retry later",
                self.failure
                    .lock()
                    .clone()
                    .unwrap_or_else(|| "marking failed".into())
            ))),
        }
    }

    /// Marks every CAS blob present as `sole`'s, then makes the store
    /// shared; on failure goes back to sole(`sole`), so that the next
    /// other organisation tries again.
    async fn mark_all(self: Arc<Self>, sole: Arc<str>, store: Arc<dyn BlobStore>) {
        let started = Instant::now();
        tracing::info!(
            organisation = %sole,
            "a second organisation uses the store: marking every blob present as {sole}'s; \
             other organisations wait until this is done"
        );
        let outcome = async {
            let mut marked = 0u64;
            for part in 0..=u8::MAX {
                let blobs = store
                    .keys_in_part(part, |key| key.namespace.content_addressed().is_some())
                    .await
                    .map_err(|e| CasError::store("listing the store's blobs", e))?;
                for batch in blobs.chunks(MARKING_BATCH) {
                    let markers = batch
                        .iter()
                        .filter_map(|(key, size)| {
                            let digest = Digest {
                                function: key.namespace.content_addressed()?,
                                hash: key.hash,
                                size: *size,
                            };
                            Some((Key::membership(&sole, &digest), Bytes::from_static(MARKER)))
                        })
                        .collect();
                    for result in store.put_many(markers).await {
                        result.map_err(|e| CasError::store("writing organisation markers", e))?;
                    }
                }
                marked += blobs.len() as u64;
                if part % 64 == 63 {
                    tracing::info!(
                        organisation = %sole,
                        marked,
                        done_percent = (u32::from(part) + 1) * 100 / 256,
                        "marking the store's blobs"
                    );
                }
            }
            self.persist(Phase::Shared).await?;
            Ok::<u64, CasError>(marked)
        }
        .await;
        let _transition = self.transition.lock().await;
        match outcome {
            Ok(marked) => {
                tracing::info!(
                    organisation = %sole,
                    marked,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "the store is shared: every organisation now sees only its own blobs"
                );
                self.phase.send_replace(Phase::Shared);
            }
            Err(e) => {
                tracing::error!(
                    organisation = %sole,
                    "marking the store's blobs failed, other organisations are refused until \
                     it succeeds: {e}"
                );
                *self.failure.lock() = Some(e.to_string());
                self.phase.send_replace(Phase::Sole(sole));
            }
        }
    }

    async fn persist(&self, phase: Phase) -> Result<()> {
        match &self.file {
            Some(file) => write_state(file.clone(), phase).await,
            None => Ok(()),
        }
    }
}

/// Whether `store` holds any organisation's marker.
async fn holds_markers(store: &dyn BlobStore) -> Result<bool> {
    for part in 0..=u8::MAX {
        let markers = store
            .keys_in_part(part, |key| key.namespace == Namespace::Membership)
            .await
            .map_err(|e| CasError::store("looking for organisation markers", e))?;
        if !markers.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn parse_state(text: &str) -> Option<Phase> {
    let mut lines = text.lines();
    if lines.next()? != STATE_HEADER {
        return None;
    }
    let phase = match lines.next()? {
        "unclaimed" => Phase::Unclaimed,
        "shared" => Phase::Shared,
        line => match line.strip_prefix("sole ") {
            Some(org) if !org.is_empty() => Phase::Sole(Arc::from(org)),
            _ => return None,
        },
    };
    lines.next().is_none().then_some(phase)
}

fn state_text(phase: &Phase) -> String {
    let phase = match phase {
        Phase::Unclaimed => "unclaimed".to_string(),
        // Marking is not a state a restart can resume: it starts again.
        Phase::Sole(org) | Phase::Marking(org) => format!("sole {org}"),
        Phase::Shared => "shared".to_string(),
    };
    format!("{STATE_HEADER}\n{phase}\n")
}

/// Replaces `file` with `phase`, durably: written beside it, synced,
/// renamed over it, and the directory synced.
async fn write_state(file: PathBuf, phase: Phase) -> Result<()> {
    tokio::task::spawn_blocking(move || write_state_blocking(&file, &phase))
        .await
        .map_err(|e| CasError::Internal(format!("writing the organisations' state: {e}")))?
}

fn write_state_blocking(file: &Path, phase: &Phase) -> Result<()> {
    use std::io::Write;
    let failed = |e: std::io::Error| CasError::Internal(format!("writing {}: {e}", file.display()));
    let tmp = file.with_extension("tmp");
    let mut out = std::fs::File::create(&tmp).map_err(failed)?;
    out.write_all(state_text(phase).as_bytes())
        .map_err(failed)?;
    out.sync_all().map_err(failed)?;
    std::fs::rename(&tmp, file).map_err(failed)?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use kiln_store::disk::{DiskStore, DiskStoreConfig};
    use kiln_store::{DigestFunction, MemoryStore};

    use super::*;
    use crate::resource::Compressor;
    use crate::storage::{Storage, StorageLimits};

    /// Stores `content` as `org` does: enter, write, admit.
    async fn upload(storage: &Storage, org: &str, content: &str) -> Digest {
        storage.enter(org).await.unwrap();
        let digest = DigestFunction::Sha256.digest_of(content.as_bytes());
        let data = Bytes::copy_from_slice(content.as_bytes());
        storage
            .put(&digest, data, Compressor::Identity)
            .await
            .unwrap();
        storage.admit(org, &[digest]).await.unwrap();
        digest
    }

    async fn sees(storage: &Storage, org: &str, digest: &Digest) -> bool {
        storage.visible_to(org, digest).await.unwrap()
    }

    async fn markers_in(store: &dyn BlobStore) -> usize {
        let mut count = 0;
        for part in 0..=u8::MAX {
            count += store
                .keys_in_part(part, |key| key.namespace == Namespace::Membership)
                .await
                .unwrap()
                .len();
        }
        count
    }

    fn memory_storage() -> (Arc<dyn BlobStore>, Storage) {
        let store: Arc<dyn BlobStore> = Arc::new(MemoryStore::new(64 << 20));
        (store.clone(), Storage::new(store, StorageLimits::default()))
    }

    #[tokio::test]
    async fn the_only_organisation_stores_no_markers() {
        let (store, storage) = memory_storage();
        let blob = upload(&storage, "acme", "acme's").await;
        assert!(sees(&storage, "acme", &blob).await);
        assert_eq!(markers_in(&*store).await, 0);
    }

    #[tokio::test]
    async fn a_second_organisation_sees_none_of_the_first_ones_blobs() {
        let (store, storage) = memory_storage();
        let early = upload(&storage, "acme", "acme's, from before globex").await;
        // globex's first request marks what acme has, before it returns.
        storage.enter("globex").await.unwrap();
        assert_eq!(markers_in(&*store).await, 1);
        assert!(sees(&storage, "acme", &early).await);
        assert!(!sees(&storage, "globex", &early).await);
        let theirs = upload(&storage, "globex", "globex's").await;
        assert!(sees(&storage, "globex", &theirs).await);
        assert!(!sees(&storage, "acme", &theirs).await);
        let late = upload(&storage, "acme", "acme's, from after globex").await;
        assert!(sees(&storage, "acme", &late).await);
        assert!(!sees(&storage, "globex", &late).await);
        // Uploading the bytes is how globex comes to see a blob.
        upload(&storage, "globex", "acme's, from before globex").await;
        assert!(sees(&storage, "globex", &early).await);
        assert_eq!(
            storage
                .find_missing_for("globex", &[early, theirs, late])
                .await
                .unwrap(),
            vec![late]
        );
    }

    fn open_disk(dir: &Path) -> (Arc<dyn BlobStore>, PathBuf) {
        let (disk, _) = DiskStore::open(DiskStoreConfig::new(dir.join("cas"), 64 << 20)).unwrap();
        (Arc::new(disk), dir.join("cas").join("organisations"))
    }

    async fn open_storage(dir: &Path) -> Storage {
        let (store, file) = open_disk(dir);
        let tenancy = Tenancy::open(file, &*store).await.unwrap();
        Storage::new(store, StorageLimits::default()).with_tenancy(tenancy)
    }

    #[tokio::test]
    async fn the_phase_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let storage = open_storage(dir.path()).await;
        let acmes = upload(&storage, "acme", "acme's").await;
        drop(storage);

        // Still acme's alone: globex arriving after the restart must not
        // be taken for the first organisation.
        let storage = open_storage(dir.path()).await;
        assert!(sees(&storage, "acme", &acmes).await);
        assert_eq!(markers_in(&*storage.store).await, 0);
        assert!(!sees(&storage, "globex", &acmes).await);
        drop(storage);

        let storage = open_storage(dir.path()).await;
        assert!(sees(&storage, "acme", &acmes).await);
        assert!(!sees(&storage, "globex", &acmes).await);
        drop(storage);

        // A store with markers but no state file (made before the file
        // existed) is shared.
        std::fs::remove_file(dir.path().join("cas").join("organisations")).unwrap();
        let storage = open_storage(dir.path()).await;
        assert!(sees(&storage, "acme", &acmes).await);
        assert!(!sees(&storage, "globex", &acmes).await);
        assert!(!sees(&storage, "initech", &acmes).await);
    }

    #[tokio::test]
    async fn marking_that_fails_refuses_the_second_organisation_until_it_succeeds() {
        let store = Arc::new(crate::test_store::TestStore::new());
        store.failing_markers.store(true, Ordering::Relaxed);
        let storage = Storage::new(store.clone(), StorageLimits::default());
        let acmes = upload(&storage, "acme", "acme's").await;

        let refused = storage.enter("globex").await.unwrap_err();
        assert!(matches!(refused, CasError::Unavailable(_)), "{refused:?}");
        assert!(
            refused.to_string().contains("writing a marker"),
            "{refused}"
        );
        assert!(storage.visible_to("globex", &acmes).await.is_err());
        // acme carries on as before.
        assert!(sees(&storage, "acme", &acmes).await);

        store.failing_markers.store(false, Ordering::Relaxed);
        assert!(!sees(&storage, "globex", &acmes).await);
        assert!(sees(&storage, "acme", &acmes).await);
    }

    #[test]
    fn the_state_file_reads_back_what_was_written() {
        for phase in [
            Phase::Unclaimed,
            Phase::Sole(Arc::from("acme")),
            Phase::Shared,
        ] {
            assert_eq!(parse_state(&state_text(&phase)), Some(phase));
        }
        assert_eq!(
            parse_state(&state_text(&Phase::Marking(Arc::from("acme")))),
            Some(Phase::Sole(Arc::from("acme")))
        );
        for bad in [
            "",
            "shared\n",
            "kiln organisations v1\n",
            "kiln organisations v1\nsole \n",
            "kiln organisations v1\nowned acme\n",
            "kiln organisations v1\nshared\nsole acme\n",
        ] {
            assert_eq!(parse_state(bad), None, "{bad:?}");
        }
    }
}
