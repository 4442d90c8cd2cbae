//! A directory laid out as the kubelet mounts a Secret: the files are symlinks through
//! `..data`, itself a symlink to a timestamped directory, and an update swaps `..data` in one
//! rename (the files the agent opened by name never change in place).

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

pub struct SecretDir {
    pub dir: tempfile::TempDir,
    version: usize,
}

impl SecretDir {
    pub fn new(files: &[(&str, &str)]) -> SecretDir {
        let mut secret = SecretDir { dir: tempfile::tempdir().expect("secret dir"), version: 0 };
        secret.update(files);
        for (name, _) in files {
            symlink(Path::new("..data").join(name), secret.dir.path().join(name)).expect("file link");
        }
        secret
    }

    /// The path of a file, as a pod sees it.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Writes a new version of the files and swaps `..data` to it.
    pub fn update(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..2025_01_01_00_00_{:02}.{}", self.version, std::process::id());
        let target: PathBuf = self.dir.path().join(&version);
        std::fs::create_dir(&target).expect("version dir");
        for (name, content) in files {
            std::fs::write(target.join(name), content).expect("write");
        }
        let tmp = self.dir.path().join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&version, &tmp).expect("data link");
        std::fs::rename(&tmp, self.dir.path().join("..data")).expect("swap ..data");
    }
}

/// Replaces `path`'s content in one rename, as a config management tool would.
pub fn replace_file(path: &str, content: &str) {
    let tmp = format!("{path}.new");
    std::fs::write(&tmp, content).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}
