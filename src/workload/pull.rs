//! Pull an image pinned by digest into the store on `state`, from the site's registry (OCI
//! distribution API over plain HTTP: the digest authenticates every byte) or from an OCI image
//! layout on an attached drive. Every blob streams through [`Verifying`]: a layer is kept only
//! once its bytes matched, and an image is unpacked into a staging directory that becomes the
//! image only when every layer went in. What was there before is untouched by a failure.
//!
//! Store layout (`/state/workload`, mode 0700):
//! ```text
//! blobs/sha256/HEX            verified blobs (manifests, configs, compressed layers)
//! images/HEX/rootfs/          an unpacked image, HEX = its manifest digest
//! images/HEX/config.json      its image config (the blob's bytes)
//! current                     HEX of the last image that started (the last good one)
//! ```

use super::oci::{self, Document, Manifest, RunConfig};
use super::verify::{read_document, Verifying};
use crate::model::workload::{Digest, ImageRef, Source};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Marks a pull error as "nothing answered" (retried before the last good image stands in);
/// every other error is an answer that will not change by waiting.
pub const UNREACHABLE: &str = "registry unreachable";

/// What a pull tells its caller as it goes (console lines, status).
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Manifest,
    /// Layer `index` of `count`: `done` of `size` compressed bytes.
    Layer {
        index: usize,
        count: usize,
        done: u64,
        size: u64,
    },
    Unpacking {
        index: usize,
        count: usize,
    },
}

/// Where blobs come from.
pub trait BlobSource {
    /// A blob's bytes, and the media type the transport declared (if any). The caller checks
    /// the digest.
    fn open(
        &self,
        digest: &Digest,
        manifest: bool,
    ) -> Result<(Box<dyn Read>, Option<String>), String>;
    fn describe(&self) -> String;
}

/// The site's registry, plain HTTP.
pub struct Registry {
    base: String,
    repository: String,
    agent: ureq::Agent,
}

impl Registry {
    pub fn new(address: std::net::IpAddr, port: u16, repository: &str) -> Registry {
        let host = match address {
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            std::net::IpAddr::V4(a) => a.to_string(),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(10)))
            .timeout_recv_response(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            // A registry may redirect blobs to its storage; ten hops at most, and never to
            // https (this client has no TLS: the redirect fails with a clear error).
            .max_redirects(10)
            .build()
            .into();
        Registry {
            base: format!("http://{host}:{port}/v2/{repository}"),
            repository: repository.to_string(),
            agent,
        }
    }
}

impl BlobSource for Registry {
    fn open(
        &self,
        digest: &Digest,
        manifest: bool,
    ) -> Result<(Box<dyn Read>, Option<String>), String> {
        let url = if manifest {
            format!("{}/manifests/{digest}", self.base)
        } else {
            format!("{}/blobs/{digest}", self.base)
        };
        let mut req = self.agent.get(&url);
        if manifest {
            req = req.header("Accept", oci::MANIFEST_ACCEPT);
        }
        let resp = req.call().map_err(|e| match e {
            ureq::Error::StatusCode(404) => format!(
                "{url}: not found (is {} pushed to this registry with that digest?)",
                self.repository
            ),
            // Nothing answered: worth waiting for (the tunnels may not be up yet).
            e @ (ureq::Error::Io(_)
            | ureq::Error::Timeout(_)
            | ureq::Error::ConnectionFailed
            | ureq::Error::HostNotFound) => format!("{url}: {UNREACHABLE}: {e}"),
            e => format!("{url}: {e}"),
        })?;
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok((Box::new(resp.into_body().into_reader()), ct))
    }

    fn describe(&self) -> String {
        self.base
            .trim_end_matches(&format!("/v2/{}", self.repository))
            .to_string()
    }
}

/// An OCI image layout in a directory (a drive mounted read-only).
pub struct Layout {
    pub dir: PathBuf,
}

impl BlobSource for Layout {
    fn open(
        &self,
        digest: &Digest,
        _manifest: bool,
    ) -> Result<(Box<dyn Read>, Option<String>), String> {
        let p = self.dir.join("blobs/sha256").join(digest.hex());
        let f = std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok((
            Box::new(std::io::BufReader::with_capacity(1 << 16, f)),
            None,
        ))
    }

    fn describe(&self) -> String {
        format!("the OCI layout in {}", self.dir.display())
    }
}

/// A pulled image ready to run.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub manifest: Digest,
    pub rootfs: PathBuf,
    pub config: RunConfig,
    /// Compressed bytes fetched by this pull (0 when the image was already on state).
    pub fetched: u64,
}

pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>) -> std::io::Result<Store> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = dir.into();
        for sub in ["blobs/sha256", "images"] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))?;
        }
        // The store's root is the one directory the workload's files sit under: nobody else
        // on the node may enter it (an image's setuid files keep their bits).
        std::os::unix::fs::chown(&dir, Some(0), Some(0))?;
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(Store { dir })
    }

    fn blob(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs/sha256").join(d.hex())
    }

    fn image(&self, d: &Digest) -> PathBuf {
        self.dir.join("images").join(d.hex())
    }

    /// The last image that started, if it is still complete on state.
    pub fn current(&self) -> Option<Digest> {
        let s = std::fs::read_to_string(self.dir.join("current")).ok()?;
        let d = Digest::parse(&format!("sha256:{}", s.trim())).ok()?;
        self.image(&d).join("complete").exists().then_some(d)
    }

    pub fn set_current(&self, d: &Digest) -> std::io::Result<()> {
        crate::image::write_atomic(
            &self.dir.join("current").to_string_lossy(),
            format!("{}\n", d.hex()).as_bytes(),
            0o600,
        )
    }

    /// An image already unpacked here, by manifest digest.
    pub fn ready(&self, manifest: &Digest) -> Option<Pulled> {
        let dir = self.image(manifest);
        if !dir.join("complete").exists() {
            return None;
        }
        let config = std::fs::read(dir.join("config.json")).ok()?;
        let config = oci::parse_config(&config).ok()?;
        Some(Pulled {
            manifest: manifest.clone(),
            rootfs: dir.join("rootfs"),
            config,
            fetched: 0,
        })
    }

    /// Fetch a blob into the store unless it is there; verified before it gets its name.
    fn fetch_blob(
        &self,
        src: &dyn BlobSource,
        d: &Digest,
        size: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, String> {
        let path = self.blob(d);
        if path.exists() {
            return Ok(0);
        }
        let part = path.with_extension("part");
        let (r, _) = src.open(d, false)?;
        let mut v = Verifying::new(r, d.clone(), Some(size), size);
        let mut out =
            std::fs::File::create(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut last = Instant::now();
        let res: Result<(), String> = (|| {
            loop {
                let n = v.read(&mut buf).map_err(|e| format!("blob {d}: {e}"))?;
                if n == 0 {
                    break;
                }
                std::io::Write::write_all(&mut out, &buf[..n])
                    .map_err(|e| format!("{}: {e}", part.display()))?;
                if last.elapsed() >= Duration::from_secs(2) {
                    progress(v.read_bytes());
                    last = Instant::now();
                }
            }
            out.sync_all()
                .map_err(|e| format!("{}: {e}", part.display()))
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
        progress(v.read_bytes());
        std::fs::rename(&part, &path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(size)
    }

    /// Pull `image` (or find it here), unpack it, and return it. Nothing it does touches
    /// another image.
    pub fn pull(
        &self,
        image: &ImageRef,
        src: &dyn BlobSource,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Pulled, String> {
        if let Some(p) = self.ready(&image.digest) {
            return Ok(p);
        }
        progress(Progress::Manifest);
        let doc = fetch_document(src, &image.digest, None)?;
        let (manifest, manifest_bytes): (Manifest, Vec<u8>) = match doc {
            (Document::Manifest(m), b) => (m, b),
            (Document::Index(idx), _) => {
                let d = oci::pick_platform(&idx)?;
                match fetch_document(src, &d.digest, Some(d.size))? {
                    (Document::Manifest(m), b) => (m, b),
                    (Document::Index(_), _) => {
                        return Err(format!("{}: an index inside an index", d.digest))
                    }
                }
            }
        };
        let (r, _) = src.open(&manifest.config.digest, false)?;
        let config_bytes = read_document(
            r,
            &manifest.config.digest,
            Some(manifest.config.size),
            oci::DOC_MAX,
        )
        .map_err(|e| format!("image config: {e}"))?;
        let config = oci::parse_config(&config_bytes)?;
        let count = manifest.layers.len();
        let mut fetched = 0;
        for (index, l) in manifest.layers.iter().enumerate() {
            let size = l.size;
            fetched += self.fetch_blob(src, &l.digest, l.size, &mut |done| {
                progress(Progress::Layer {
                    index,
                    count,
                    done,
                    size,
                })
            })?;
        }
        let dir = self.image(&image.digest);
        let staging = self
            .dir
            .join("images")
            .join(format!(".{}.staging", image.digest.hex()));
        let _ = std::fs::remove_dir_all(&staging);
        let rootfs = staging.join("rootfs");
        std::fs::create_dir_all(&rootfs).map_err(|e| format!("{}: {e}", rootfs.display()))?;
        let res = (|| {
            for (index, l) in manifest.layers.iter().enumerate() {
                progress(Progress::Unpacking { index, count });
                let f = std::fs::File::open(self.blob(&l.digest))
                    .map_err(|e| format!("layer {}: {e}", l.digest))?;
                super::unpack::apply_layer(
                    &rootfs,
                    std::io::BufReader::with_capacity(1 << 16, f),
                    l.compression,
                )
                .map_err(|e| format!("layer {index} ({}): {e}", l.digest.short()))?;
            }
            super::unpack::shift_root_owner(&rootfs)?;
            std::fs::write(staging.join("config.json"), &config_bytes)
                .map_err(|e| e.to_string())?;
            std::fs::write(staging.join("manifest.json"), &manifest_bytes)
                .map_err(|e| e.to_string())?;
            std::fs::write(staging.join("complete"), b"").map_err(|e| e.to_string())?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&staging, &dir).map_err(|e| format!("{}: {e}", dir.display()))
        })();
        if let Err(e) = res {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        Ok(Pulled {
            manifest: image.digest.clone(),
            rootfs: dir.join("rootfs"),
            config,
            fetched,
        })
    }

    /// Remove every image and blob but those of `keep` (the running image and the last good
    /// one). Returns how many images went.
    pub fn collect(&self, keep: &[&Digest]) -> usize {
        let mut removed = 0;
        let mut keep_blobs: std::collections::HashSet<String> = std::collections::HashSet::new();
        for e in std::fs::read_dir(self.dir.join("images"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.iter().any(|k| k.hex() == name) {
                continue;
            }
            if std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
        // Blobs: keep those the kept images' manifests name (their manifests are kept too).
        for k in keep {
            if let Ok(b) = std::fs::read(self.image(k).join("manifest.json")) {
                if let Ok(Document::Manifest(m)) = oci::parse_document(&b, None) {
                    keep_blobs.insert(m.config.digest.hex().to_string());
                    keep_blobs.extend(m.layers.iter().map(|l| l.digest.hex().to_string()));
                }
            }
        }
        for e in std::fs::read_dir(self.dir.join("blobs/sha256"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep_blobs.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        removed
    }
}

fn fetch_document(
    src: &dyn BlobSource,
    d: &Digest,
    size: Option<u64>,
) -> Result<(Document, Vec<u8>), String> {
    let (r, ct) = src.open(d, true)?;
    let bytes =
        read_document(r, d, size, oci::DOC_MAX).map_err(|e| format!("manifest {d}: {e}"))?;
    let doc =
        oci::parse_document(&bytes, ct.as_deref()).map_err(|e| format!("manifest {d}: {e}"))?;
    Ok((doc, bytes))
}

/// The blob source for an image reference. A `disk:LABEL` drive is mounted read-only at
/// `mount_at` first.
pub fn source_for(image: &ImageRef, mount_at: &Path) -> Result<Box<dyn BlobSource>, String> {
    match &image.source {
        Source::Registry {
            address,
            port,
            repository,
        } => Ok(Box::new(Registry::new(*address, *port, repository))),
        Source::Disk { label } => {
            super::disk::mount_label(label, mount_at)?;
            Ok(Box::new(Layout {
                dir: mount_at.to_path_buf(),
            }))
        }
    }
}
