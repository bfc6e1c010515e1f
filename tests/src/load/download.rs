//! Data sets and one agent's download: generated sets shaped like the apps' folders (QR
//! codes, many small files, one large file), publishing them as one commit, and a real
//! `SyncClient` timed from `sync_required` to ready, cold and warm.

use super::{Figures, Hub};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use synchub_client::{AgentConfig, HubApi, SyncClient};
use synchub_protocol::{AgentState, DEFAULT_SPACE};

/// What one agent downloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSet {
    /// System 2's QR codes: `folders` range folders, `files` PNG-sized files of ~5 KB.
    QrLike { folders: usize, files: usize },
    /// Many small files (~1 KB) in folders of 100.
    SmallFiles { files: usize },
    /// One large file (plus a small one that the warm run changes).
    Large { bytes: u64 },
}

impl DataSet {
    /// A set shaped like the QR-code app's folder: 54 folders, 508 files, ~2.5 MB.
    pub const QR: DataSet = DataSet::QrLike {
        folders: 54,
        files: 508,
    };

    pub fn name(&self) -> String {
        match self {
            DataSet::QrLike { files, .. } => format!("qr-{files}"),
            DataSet::SmallFiles { files } => format!("small-{files}"),
            DataSet::Large { bytes } => format!("large-{}MiB", bytes >> 20),
        }
    }
}

/// A fast deterministic byte stream: incompressible like PNGs, without a crypto RNG's cost.
pub(super) struct Noise(pub(super) u64);

impl Noise {
    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A QR-like folder name: system 2 names range folders by part code.
fn part_code(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!("{:05}-{:05}-F", 4313 + i * 7, 11100 + i * 13)
    } else {
        format!("Y{:06}-{:05}", 129120 + i * 11, 1780 + i * 3)
    }
}

/// Writes `set` under `dir`; returns (files, bytes) and the path of the file the warm run
/// changes.
pub fn generate_set(set: DataSet, dir: &Path, seed: u64) -> Result<(u64, u64, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let mut noise = Noise(seed | 1);
    let mut files = 0u64;
    let mut bytes = 0u64;
    let mut large = 0u64;
    let mut write = |path: PathBuf, size: usize, noise: &mut Noise| -> Result<PathBuf> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let mut buf = vec![0u8; size];
        noise.fill(&mut buf);
        std::fs::write(&path, &buf)?;
        files += 1;
        bytes += size as u64;
        Ok(path)
    };
    let first = match set {
        DataSet::QrLike {
            folders,
            files: count,
        } => {
            let mut first = None;
            for i in 0..count {
                let folder = part_code(i % folders.max(1));
                // 4.0 to 6.0 KB, ~5 KB on average: 508 files make ~2.5 MB.
                let size = 4000 + (i * 397) % 2000;
                let p = write(
                    dir.join(&folder).join(format!("{folder}_{i:04}.png")),
                    size,
                    &mut noise,
                )?;
                first.get_or_insert(p);
            }
            first.ok_or_else(|| anyhow!("empty set"))?
        }
        DataSet::SmallFiles { files: count } => {
            let mut first = None;
            for i in 0..count {
                let p = write(
                    dir.join(format!("d{:04}", i / 100))
                        .join(format!("f{i:06}.bin")),
                    800 + (i * 131) % 400,
                    &mut noise,
                )?;
                first.get_or_insert(p);
            }
            first.ok_or_else(|| anyhow!("empty set"))?
        }
        DataSet::Large { bytes: size } => {
            let path = dir.join("large.bin");
            let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
            let mut buf = vec![0u8; 1 << 20];
            let mut left = size;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                noise.fill(&mut buf[..n]);
                std::io::Write::write_all(&mut f, &buf[..n])?;
                left -= n as u64;
            }
            std::io::Write::flush(&mut f)?;
            large = size;
            write(dir.join("small.txt"), 1000, &mut noise)?
        }
    };
    let large_files = u64::from(large > 0);
    Ok((files + large_files, bytes + large, first))
}

/// Rewrites one file with new bytes of the same size (the warm run's change).
pub fn change_file(path: &Path, seed: u64) -> Result<()> {
    let len = std::fs::metadata(path)?.len() as usize;
    let mut buf = vec![0u8; len];
    Noise(seed | 1).fill(&mut buf);
    std::fs::write(path, buf)?;
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
pub struct PublishReport {
    pub set: String,
    pub files: u64,
    pub bytes: u64,
    pub secs: f64,
    pub version: u64,
}

impl PublishReport {
    pub fn figures(&self) -> Figures {
        Figures::from([(format!("{}.publish_secs", self.set), self.secs)])
    }
}

impl std::fmt::Display for PublishReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "publish {} ({} files, {:.1} MB) as one commit: {:.3} s -> v{}",
            self.set,
            self.files,
            self.bytes as f64 / 1e6,
            self.secs,
            self.version
        )
    }
}

/// Publishes the files under `dir` to `space` as one commit, as an agent's `publish` does
/// (hash, ask which blobs are missing, upload them, commit).
pub async fn publish_set(
    hub: &Hub,
    space: &str,
    dir: &Path,
    set: DataSet,
) -> Result<PublishReport> {
    let api = HubApi::new(vec![hub.url.clone()], &hub.admin_token)?;
    let started = Instant::now();
    let out = synchub_client::publish(&api, space, None, &[dir.to_path_buf()], None)
        .await
        .context("publishing")?;
    let secs = started.elapsed().as_secs_f64();
    Ok(PublishReport {
        set: set.name(),
        files: out.files,
        bytes: out.bytes_uploaded,
        secs,
        version: out.head.version,
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct DownloadReport {
    pub set: String,
    pub files: u64,
    pub bytes: u64,
    pub publish_secs: f64,
    /// From the agent leaving `ready` (its `sync_required`) to `ready` at the new version,
    /// with an empty cache.
    pub cold_secs: f64,
    pub cold_mb_per_sec: f64,
    /// The same after one file changed.
    pub warm_secs: f64,
}

impl DownloadReport {
    pub fn figures(&self) -> Figures {
        let s = &self.set;
        Figures::from([
            (format!("{s}.publish_secs"), self.publish_secs),
            (format!("{s}.cold_secs"), self.cold_secs),
            (format!("{s}.cold_mb_per_sec"), self.cold_mb_per_sec),
            (format!("{s}.warm_secs"), self.warm_secs),
        ])
    }
}

impl std::fmt::Display for DownloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "download {} ({} files, {:.1} MB): cold {:.3} s ({:.0} MB/s), warm (one file \
             changed) {:.3} s; publish {:.3} s",
            self.set,
            self.files,
            self.bytes as f64 / 1e6,
            self.cold_secs,
            self.cold_mb_per_sec,
            self.warm_secs,
            self.publish_secs
        )
    }
}

/// Waits for the agent to leave `ready` at `from` and come back ready at `to` or newer; the
/// time between the two.
async fn time_sync(
    rx: &mut tokio::sync::watch::Receiver<AgentState>,
    from: u64,
    to: u64,
    within: Duration,
) -> Result<(Instant, Instant)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut left: Option<Instant> = None;
    loop {
        let state = rx.borrow_and_update().clone();
        match state {
            AgentState::Ready { version } if version >= to => {
                let now = Instant::now();
                return Ok((left.unwrap_or(now), now));
            }
            AgentState::Ready { version } if version == from => {}
            AgentState::Failed { error, .. } => bail!("the agent failed: {error}"),
            _ => {
                left.get_or_insert_with(Instant::now);
            }
        }
        tokio::time::timeout_at(deadline, rx.changed())
            .await
            .map_err(|_| {
                anyhow!(
                    "agent not ready at v{to} within {within:?}: {:?}",
                    rx.borrow()
                )
            })?
            .map_err(|_| anyhow!("agent stopped"))?;
    }
}

/// One agent (`SyncClient`) downloads `set`: published while the agent waits at the empty
/// head (cold cache), then again after one file changed (warm).
pub async fn download(hub: &Hub, set: DataSet, work: &Path) -> Result<DownloadReport> {
    let space = DEFAULT_SPACE;
    let src = work.join("src");
    let (files, bytes, changed) = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || generate_set(set, &src, 7)).await??
    };
    let agent_dir = work.join("agent");
    let config = AgentConfig {
        hubs: vec![hub.url.clone()],
        token: hub.agent_token.clone(),
        spaces: vec![space.to_owned()],
        dir: agent_dir,
        status_listen: None,
        download_jitter_ms: 0,
        ..AgentConfig::default()
    };
    let agent = SyncClient::start(config).await?;
    let result = async {
        let v0 = hub.head(space).await?.version;
        agent
            .wait_ready(None, v0, Duration::from_secs(30))
            .await
            .context("agent ready before the publish")?;
        let mut rx = agent.subscribe(None)?;
        rx.borrow_and_update();
        let limit = Duration::from_secs(600);

        let publish = publish_set(hub, space, &src, set).await?;
        let (a, b) = time_sync(&mut rx, v0, publish.version, limit).await?;
        let cold = b.duration_since(a).as_secs_f64();

        change_file(&changed, 99)?;
        let warm_pub = publish_set(hub, space, &src, set).await?;
        let (a, b) = time_sync(&mut rx, publish.version, warm_pub.version, limit).await?;
        let warm = b.duration_since(a).as_secs_f64();
        Ok::<_, anyhow::Error>(DownloadReport {
            set: set.name(),
            files,
            bytes,
            publish_secs: publish.secs,
            cold_secs: cold,
            cold_mb_per_sec: bytes as f64 / 1e6 / cold.max(1e-9),
            warm_secs: warm,
        })
    }
    .await;
    agent.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qr_set_is_the_size_of_system_2s() {
        let dir = tempfile::tempdir().unwrap();
        let (files, bytes, _) = generate_set(DataSet::QR, dir.path(), 1).unwrap();
        assert_eq!(files, 508);
        assert!((2_400_000..2_700_000).contains(&bytes), "{bytes}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 54);
    }
}
