//! Certificate files re-read when their content changes, without a restart: the TLS
//! listener's certificate, the probes' trust store and the OTLP client's files.
//!
//! Kubernetes updates a mounted Secret by swapping a `..data` symlink (no inotify event on
//! the file itself), and never updates a `subPath` mount, so the files are polled: every
//! interval each watched set is read, hashed, and on a new digest parsed again. A set that
//! parses replaces the old one for every new handshake (open connections keep theirs); a set
//! that does not is logged once, and the old one stays until a good one arrives.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::TlsError;

/// A value that a reload replaces; readers take the current one.
#[derive(Debug)]
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    /// A value that only a reload replaces (or, unwatched, nothing).
    pub fn fixed(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(value);
    }
}

/// One watched file.
#[derive(Debug, Clone)]
pub struct File {
    pub path: PathBuf,
    /// An absent file is content too (`None`), not an error: the service-account `ca.crt`.
    pub optional: bool,
}

impl File {
    pub fn required(path: &Path) -> Self {
        Self { path: path.to_owned(), optional: false }
    }

    pub fn optional(path: &Path) -> Self {
        Self { path: path.to_owned(), optional: true }
    }
}

/// What the files held: one entry per file, `None` for an absent optional file.
pub type Contents = [Option<Vec<u8>>];

type Apply = Box<dyn Fn(&Contents) -> Result<(), TlsError> + Send>;

struct Entry {
    what: String,
    files: Vec<File>,
    /// Digest of the contents in use.
    current: [u8; 32],
    /// Digest of contents (or of a read error) already reported as bad.
    reported: Option<[u8; 32]>,
    apply: Apply,
}

/// The watched file sets of one agent.
#[derive(Default)]
pub struct Reloader {
    entries: Vec<Entry>,
}

impl Reloader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads `files` through `load` now (its error, or a read error, is returned), and again
    /// whenever their content changes while [`Reloader::run`] runs.
    pub fn watch<T, F>(&mut self, what: impl Into<String>, files: Vec<File>, load: F) -> Result<Arc<Swap<T>>, TlsError>
    where
        T: Send + Sync + 'static,
        F: Fn(&Contents) -> Result<T, TlsError> + Send + 'static,
    {
        let contents = read(&files)?;
        let swap = Arc::new(Swap::fixed(load(&contents)?));
        let mut files = files;
        settle(&mut files, &contents);
        let target = swap.clone();
        self.entries.push(Entry {
            what: what.into(),
            current: digest(&contents),
            files,
            reported: None,
            apply: Box::new(move |contents| {
                target.set(load(contents)?);
                Ok(())
            }),
        });
        Ok(swap)
    }

    /// True when nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Polls every `interval` until `stop` turns true. The files are read on a blocking
    /// thread, one poll at a time, so a hung volume stalls reloading and nothing else.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        if self.entries.is_empty() || interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = crate::shutdown::stopped(&mut stop) => return,
            }
            let polled = tokio::task::spawn_blocking(move || {
                self.poll();
                self
            });
            self = match polled.await {
                Ok(reloader) => reloader,
                Err(e) => {
                    tracing::error!(error = %e, "certificate reloading stopped");
                    return;
                }
            };
        }
    }

    /// Reads every set once and applies those that changed.
    pub fn poll(&mut self) {
        for entry in &mut self.entries {
            let (seen, outcome) = match read(&entry.files) {
                Ok(contents) => {
                    let seen = digest(&contents);
                    if seen == entry.current {
                        entry.reported = None;
                        continue;
                    }
                    if entry.reported == Some(seen) {
                        continue;
                    }
                    let mut outcome = (entry.apply)(&contents);
                    let mut seen = seen;
                    // A Secret's `..data` swap between reading the certificate and the key
                    // gives a mismatched pair once: read the set again before calling it bad.
                    if outcome.is_err() {
                        if let Ok(again) = read(&entry.files) {
                            if digest(&again) != seen {
                                seen = digest(&again);
                                outcome = (entry.apply)(&again);
                                if outcome.is_ok() {
                                    settle(&mut entry.files, &again);
                                }
                            }
                        }
                    } else {
                        settle(&mut entry.files, &contents);
                    }
                    (seen, outcome)
                }
                Err(e) => {
                    let seen: [u8; 32] = Sha256::digest(e.to_string().as_bytes()).into();
                    if entry.reported == Some(seen) {
                        continue;
                    }
                    (seen, Err(e))
                }
            };
            let files: Vec<String> = entry.files.iter().map(|f| f.path.display().to_string()).collect();
            match outcome {
                Ok(()) => {
                    entry.current = seen;
                    entry.reported = None;
                    tracing::info!(what = %entry.what, files = ?files, "reloaded changed certificate files");
                }
                Err(e) => {
                    entry.reported = Some(seen);
                    tracing::warn!(what = %entry.what, files = ?files, error = %e, "changed certificate files are not usable; keeping the previous ones");
                }
            }
        }
    }
}

/// An optional file may be absent at start (a standalone agent has no service-account
/// `ca.crt`); once it has been in use, its disappearance is a broken update, not a change.
fn settle(files: &mut [File], contents: &Contents) {
    for (file, content) in files.iter_mut().zip(contents) {
        file.optional &= content.is_none();
    }
}

fn read(files: &[File]) -> Result<Vec<Option<Vec<u8>>>, TlsError> {
    files
        .iter()
        .map(|file| match std::fs::read(&file.path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if file.optional && e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TlsError::Read { path: file.path.clone(), source }),
        })
        .collect()
}

fn digest(contents: &Contents) -> [u8; 32] {
    let mut hash = Sha256::new();
    for content in contents {
        match content {
            Some(bytes) => {
                hash.update([1]);
                hash.update((bytes.len() as u64).to_le_bytes());
                hash.update(bytes);
            }
            None => hash.update([0]),
        }
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(contents: &Contents) -> Result<String, TlsError> {
        let bytes = contents[0].clone().unwrap_or_default();
        let s = String::from_utf8(bytes).unwrap_or_default();
        if s.starts_with("bad") {
            return Err(TlsError::NoCerts { path: PathBuf::from("x") });
        }
        Ok(s)
    }

    #[test]
    fn a_change_is_applied_a_bad_one_kept_out_and_an_absent_optional_file_is_content() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("f");
        std::fs::write(&path, "one").expect("write");
        let mut reloader = Reloader::new();
        let value = reloader.watch("test", vec![File::required(&path)], text).expect("loaded");
        assert_eq!(*value.get(), "one");
        reloader.poll();
        assert_eq!(*value.get(), "one");
        std::fs::write(&path, "two").expect("write");
        reloader.poll();
        assert_eq!(*value.get(), "two");
        std::fs::write(&path, "bad").expect("write");
        reloader.poll();
        assert_eq!(*value.get(), "two", "a bad file keeps the old value");
        assert!(reloader.entries[0].reported.is_some());
        std::fs::remove_file(&path).expect("remove");
        reloader.poll();
        assert_eq!(*value.get(), "two", "a missing required file keeps the old value");
        std::fs::write(&path, "three").expect("write");
        reloader.poll();
        assert_eq!(*value.get(), "three");
        assert!(reloader.entries[0].reported.is_none());

        let optional = dir.path().join("o");
        let value = reloader.watch("optional", vec![File::optional(&optional)], text).expect("absent is fine");
        assert_eq!(*value.get(), "");
        std::fs::write(&optional, "now").expect("write");
        reloader.poll();
        assert_eq!(*value.get(), "now");
        std::fs::remove_file(&optional).expect("remove");
        reloader.poll();
        assert_eq!(*value.get(), "now", "an optional file that was in use and went away is kept");
    }

    #[test]
    fn the_first_load_fails_on_a_bad_or_missing_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("f");
        let mut reloader = Reloader::new();
        assert!(matches!(reloader.watch("t", vec![File::required(&path)], text), Err(TlsError::Read { .. })));
        std::fs::write(&path, "bad").expect("write");
        assert!(reloader.watch("t", vec![File::required(&path)], text).is_err());
        assert!(reloader.is_empty());
    }
}
