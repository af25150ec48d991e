//! OCI image documents as values: manifests, indexes, image configs, layer media types, and
//! the decisions about them (which manifest of an index is ours, which layers to unpack in
//! which order, what to run). Pure: bytes in, values or a reason out. The bytes given here are
//! already checked against their digest by the caller ([`super::verify`]); these functions
//! check what the digest cannot: shape, sizes, media types and platform.
//!
//! Docker's schema 2 media types are accepted beside OCI's: Docker distribution serves what
//! was pushed, and `docker push` writes schema 2.

use crate::model::workload::Digest;
use serde::Deserialize;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a registry may answer for a manifest request (the HTTP Accept header).
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// The largest manifest, index or image config read (registries cap manifests at 4 MiB).
pub const DOC_MAX: u64 = 4 << 20;
/// The most layers an image may have (Docker's own limit is 127).
pub const LAYERS_MAX: usize = 128;
/// The largest compressed layer, and the most bytes all of an image's layers may hold.
pub const LAYER_MAX: u64 = 8 << 30;
pub const IMAGE_MAX: u64 = 16 << 30;

/// A content descriptor (OCI image spec, descriptor.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDoc {
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A manifest or an index, told apart by media type (or, without one, by shape).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    Manifest(Manifest),
    Index(Vec<Descriptor>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Layer>,
}

/// How a layer's tar stream is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub digest: Digest,
    pub size: u64,
    pub compression: Compression,
}

/// Which compression a layer media type means; None for what is not an unpackable layer
/// (foreign/non-distributable layers, which a site's own registry has no business serving).
pub fn layer_compression(media_type: &str) -> Option<Compression> {
    Some(match media_type {
        "application/vnd.oci.image.layer.v1.tar" => Compression::None,
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
        "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
        _ => return None,
    })
}

/// Parse a manifest or index whose bytes matched `digest`. `content_type` is what the
/// registry said (None for an OCI layout's blobs).
pub fn parse_document(bytes: &[u8], content_type: Option<&str>) -> Result<Document, String> {
    let raw: RawDoc =
        serde_json::from_slice(bytes).map_err(|e| format!("not a manifest or index: {e}"))?;
    if raw.schema_version != Some(2) {
        return Err(format!(
            "schemaVersion {:?}: only schema 2 manifests are read (Docker schema 1 is deprecated and unsigned here)",
            raw.schema_version
        ));
    }
    // The document's own mediaType wins over the transport's Content-Type.
    let declared = raw
        .media_type
        .as_deref()
        .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()));
    let is_index = match declared {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) if other != "application/json" && other != "application/octet-stream" => {
            return Err(format!("media type {other:?} is not an image manifest"))
        }
        _ => raw.manifests.is_some(),
    };
    if is_index {
        if raw.config.is_some() || raw.layers.is_some() {
            return Err("an index that also has config or layers".into());
        }
        let m = raw.manifests.ok_or("an index without manifests")?;
        if m.len() > 1024 {
            return Err(format!("an index of {} manifests (at most 1024)", m.len()));
        }
        return Ok(Document::Index(m));
    }
    if raw.manifests.is_some() {
        return Err("a manifest that also lists manifests".into());
    }
    let config = raw.config.ok_or("a manifest without config")?;
    if config.size > DOC_MAX {
        return Err(format!(
            "image config of {} bytes (at most {DOC_MAX})",
            config.size
        ));
    }
    let descriptors = raw.layers.ok_or("a manifest without layers")?;
    if descriptors.len() > LAYERS_MAX {
        return Err(format!(
            "{} layers (at most {LAYERS_MAX})",
            descriptors.len()
        ));
    }
    let mut total: u64 = 0;
    let mut layers = Vec::with_capacity(descriptors.len());
    for (i, d) in descriptors.into_iter().enumerate() {
        let compression = layer_compression(&d.media_type).ok_or_else(|| {
            format!(
                "layer {i} has media type {:?}, which is not a tar layer",
                d.media_type
            )
        })?;
        if d.size > LAYER_MAX {
            return Err(format!(
                "layer {i} is {} bytes (at most {LAYER_MAX})",
                d.size
            ));
        }
        total = total.saturating_add(d.size);
        layers.push(Layer {
            digest: d.digest,
            size: d.size,
            compression,
        });
    }
    if total > IMAGE_MAX {
        return Err(format!(
            "the layers hold {total} bytes (at most {IMAGE_MAX})"
        ));
    }
    Ok(Document::Manifest(Manifest { config, layers }))
}

/// The manifest of an index that runs here (linux/amd64).
pub fn pick_platform(index: &[Descriptor]) -> Result<&Descriptor, String> {
    index
        .iter()
        .find(|d| {
            matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST)
                && d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
        })
        .ok_or_else(|| {
            let have: Vec<String> = index
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .map(|p| format!("{}/{}", p.os, p.architecture))
                .collect();
            format!(
                "the index has no linux/amd64 image (it has: {})",
                if have.is_empty() {
                    "none with a platform".into()
                } else {
                    have.join(", ")
                }
            )
        })
}

/// What the image's config says about running it (OCI image spec, config.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// `uid[:gid]` numerically (names would need the image's /etc/passwd: refused).
    pub user: Option<(u32, u32)>,
}

#[derive(Deserialize)]
struct RawConfig {
    architecture: Option<String>,
    os: Option<String>,
    #[serde(default)]
    config: Option<RawRun>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawRun {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

pub fn parse_config(bytes: &[u8]) -> Result<RunConfig, String> {
    let raw: RawConfig =
        serde_json::from_slice(bytes).map_err(|e| format!("not an image config: {e}"))?;
    match (raw.os.as_deref(), raw.architecture.as_deref()) {
        (Some("linux"), Some("amd64")) => {}
        (os, arch) => {
            return Err(format!(
                "the image is for {}/{}, this node is linux/amd64",
                os.unwrap_or("?"),
                arch.unwrap_or("?")
            ))
        }
    }
    let r = raw.config.unwrap_or_default();
    let mut env = Vec::new();
    for e in r.env.unwrap_or_default() {
        let (k, v) = e
            .split_once('=')
            .ok_or_else(|| format!("Env entry {e:?} has no '='"))?;
        env.push((k.to_string(), v.to_string()));
    }
    let user = match r.user.as_deref().filter(|u| !u.is_empty()) {
        None => None,
        Some(u) => {
            let (a, b) = u.split_once(':').unwrap_or((u, ""));
            let uid = a.parse::<u32>().map_err(|_| {
                format!("User {u:?}: give the image a numeric uid[:gid] (the node does not read the image's /etc/passwd)")
            })?;
            let gid = if b.is_empty() {
                uid
            } else {
                b.parse::<u32>()
                    .map_err(|_| format!("User {u:?}: the group must be numeric"))?
            };
            Some((uid, gid))
        }
    };
    Ok(RunConfig {
        entrypoint: r.entrypoint.unwrap_or_default(),
        cmd: r.cmd.unwrap_or_default(),
        env,
        working_dir: r.working_dir.filter(|w| !w.is_empty()),
        user,
    })
}

/// What one tar entry of a layer does to the root being built (OCI image spec,
/// layer.md, "Whiteouts").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryAction {
    /// Create (or replace) this path.
    Put(String),
    /// `.wh.NAME`: remove `NAME` (and everything under it) from the lower layers.
    Remove(String),
    /// `.wh..wh..opq` in a directory: remove what the lower layers put in it.
    Opaque(String),
    /// The root itself (`./`): nothing to do.
    Skip,
}

/// Normalise a layer entry's path and say what it does. Refuses any path that climbs out of
/// the root (`..`), NUL bytes and whiteouts of nothing; leading `/` and `./` are dropped as
/// tar tools write them.
pub fn entry_action(raw: &[u8]) -> Result<EntryAction, String> {
    let s = std::str::from_utf8(raw)
        .map_err(|_| format!("entry {:?} is not UTF-8", String::from_utf8_lossy(raw)))?;
    if s.contains('\0') {
        return Err(format!("entry {s:?} holds a NUL byte"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(format!("entry {s:?} climbs out of the root")),
            c => parts.push(c),
        }
    }
    let Some(last) = parts.pop() else {
        return Ok(EntryAction::Skip);
    };
    if parts.len() >= 128 || s.len() > 4096 {
        return Err(format!(
            "entry {:?}… is nested too deep",
            &s[..s.len().min(64)]
        ));
    }
    let dir = parts.join("/");
    let join = |name: &str| {
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    };
    if last == ".wh..wh..opq" {
        return Ok(EntryAction::Opaque(dir));
    }
    if let Some(name) = last.strip_prefix(".wh.") {
        if name.is_empty() || name == "." || name == ".." {
            return Err(format!("entry {s:?} is a whiteout of nothing"));
        }
        return Ok(EntryAction::Remove(join(name)));
    }
    Ok(EntryAction::Put(join(last)))
}

/// A hard link's target, normalised inside the root like an entry path (absolute and `./`
/// forms are the root's own paths).
pub fn link_target(raw: &[u8]) -> Result<String, String> {
    match entry_action(raw)? {
        EntryAction::Put(p) => Ok(p),
        _ => Err(format!(
            "hard link to {:?}, which is not a file of the image",
            String::from_utf8_lossy(raw)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn manifest(layer_type: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":300}},"layers":[{{"mediaType":"{layer_type}","digest":"{D2}","size":1000}}]}}"#
        )
    }

    #[test]
    fn an_oci_manifest_gives_its_config_and_layers_in_order() {
        let Document::Manifest(m) = parse_document(
            manifest("application/vnd.oci.image.layer.v1.tar+zstd").as_bytes(),
            None,
        )
        .unwrap() else {
            panic!("not a manifest")
        };
        assert_eq!(m.config.digest.to_string(), D1);
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].compression, Compression::Zstd);
        assert_eq!(m.layers[0].size, 1000);
    }

    #[test]
    fn foreign_layers_schema_1_and_oversized_documents_are_refused() {
        let e = parse_document(
            manifest("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip").as_bytes(),
            None,
        )
        .unwrap_err();
        assert!(e.contains("not a tar layer"), "{e}");
        let e = parse_document(br#"{"schemaVersion":1,"fsLayers":[]}"#, None).unwrap_err();
        assert!(e.contains("schema 2"), "{e}");
        let big = manifest("application/vnd.oci.image.layer.v1.tar")
            .replace("\"size\":1000", "\"size\":9999999999999");
        assert!(parse_document(big.as_bytes(), None)
            .unwrap_err()
            .contains("at most"));
        let e =
            parse_document(b"{\"schemaVersion\":2,\"mediaType\":\"text/html\"}", None).unwrap_err();
        assert!(e.contains("not an image manifest"), "{e}");
    }

    #[test]
    fn an_index_yields_the_linux_amd64_manifest_or_says_what_it_has() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":10,"platform":{{"architecture":"arm64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":10,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        let Document::Index(m) = parse_document(idx.as_bytes(), None).unwrap() else {
            panic!("not an index")
        };
        assert_eq!(pick_platform(&m).unwrap().digest.to_string(), D2);
        let e = pick_platform(&m[..1]).unwrap_err();
        assert!(e.contains("linux/arm64"), "{e}");
    }

    #[test]
    fn the_config_gives_entrypoint_cmd_env_and_a_numeric_user() {
        let c = parse_config(br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","x"],"Env":["PATH=/bin","A=b=c"],"User":"1000:50","WorkingDir":"/w"}}"#).unwrap();
        assert_eq!(c.entrypoint, ["/bin/sh"]);
        assert_eq!(c.cmd, ["-c", "x"]);
        assert_eq!(c.env[1], ("A".to_string(), "b=c".to_string()));
        assert_eq!(c.user, Some((1000, 50)));
        assert_eq!(c.working_dir.as_deref(), Some("/w"));
        let e = parse_config(br#"{"architecture":"arm64","os":"linux"}"#).unwrap_err();
        assert!(e.contains("linux/arm64"), "{e}");
        let e =
            parse_config(br#"{"architecture":"amd64","os":"linux","config":{"User":"condor"}}"#)
                .unwrap_err();
        assert!(e.contains("numeric"), "{e}");
    }

    #[test]
    fn entry_paths_are_normalised_and_whiteouts_recognised() {
        use EntryAction::*;
        assert_eq!(
            entry_action(b"./etc/passwd").unwrap(),
            Put("etc/passwd".into())
        );
        assert_eq!(entry_action(b"/usr//bin/").unwrap(), Put("usr/bin".into()));
        assert_eq!(entry_action(b"./").unwrap(), Skip);
        assert_eq!(
            entry_action(b"etc/.wh.motd").unwrap(),
            Remove("etc/motd".into())
        );
        assert_eq!(
            entry_action(b"var/cache/.wh..wh..opq").unwrap(),
            Opaque("var/cache".into())
        );
        assert_eq!(
            entry_action(b".wh..wh..opq").unwrap(),
            Opaque(String::new())
        );
    }

    #[test]
    fn entries_that_climb_out_of_the_root_are_refused() {
        for bad in [
            &b"../etc/passwd"[..],
            b"a/../../x",
            b"a/..",
            b"etc/.wh..",
            b"x\0y",
        ] {
            assert!(
                entry_action(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(link_target(b"/bin/busybox").unwrap(), "bin/busybox");
        assert!(link_target(b"../../etc/shadow").is_err());
        assert!(link_target(b"./").is_err());
    }
}
