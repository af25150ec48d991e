//! The workload store against hand-made layers and layouts: whiteouts, opaque directories,
//! hard links, symlinks that point out of the root, paths that climb out, gzip and zstd,
//! digests that do not match. Runs on the host file system in a scratch directory (root is
//! needed for the ownership the workload's user namespace expects; skipped otherwise outside
//! CI).

mod common;

use appliance::model::workload::{Digest, ImageRef};
use appliance::workload::oci::Compression;
use appliance::workload::pull::{Layout, Store};
use appliance::workload::unpack::{apply_layer, ROOT_HOST_ID};
use sha2::Digest as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ap-wl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

enum E<'a> {
    File(&'a str, &'a [u8], u32, u64),
    Dir(&'a str),
    Symlink(&'a str, &'a str),
    Hard(&'a str, &'a str),
    /// A raw name written into the header as is (what a hostile tool can write).
    Raw(&'a [u8], &'a [u8]),
}

fn tar_of(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        match e {
            E::File(p, data, mode, uid) => {
                h.set_path(p).unwrap();
                h.set_size(data.len() as u64);
                h.set_mode(*mode);
                h.set_uid(*uid);
                h.set_gid(*uid);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
            E::Dir(p) => {
                h.set_path(p).unwrap();
                h.set_size(0);
                h.set_mode(0o755);
                h.set_entry_type(tar::EntryType::Directory);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Symlink(p, t) => {
                h.set_path(p).unwrap();
                h.set_size(0);
                h.set_mode(0o777);
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_link_name(t).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Hard(p, t) => {
                h.set_path(p).unwrap();
                h.set_size(0);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Link);
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
            E::Raw(name, data) => {
                h.as_old_mut().name[..name.len()].copy_from_slice(name);
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append(&h, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn apply(root: &Path, entries: &[E]) -> Result<(), String> {
    let t = tar_of(entries);
    apply_layer(root, &t[..], Compression::None)
}

fn ready(test: &str) -> bool {
    common::root_or_skip(test)
}

#[test]
fn whiteouts_and_opaque_directories_remove_what_lower_layers_put() {
    if !ready("whiteouts") {
        return;
    }
    let d = scratch("wh");
    let root = d.join("root");
    std::fs::create_dir(&root).unwrap();
    apply(
        &root,
        &[
            E::Dir("etc"),
            E::File("etc/motd", b"hi", 0o644, 0),
            E::File("etc/keep", b"k", 0o644, 0),
            E::Dir("var/cache"),
            E::File("var/cache/a", b"a", 0o644, 0),
            E::File("var/cache/b", b"b", 0o644, 0),
        ],
    )
    .unwrap();
    apply(
        &root,
        &[
            E::File("etc/.wh.motd", b"", 0o644, 0),
            E::File("var/cache/.wh..wh..opq", b"", 0o644, 0),
            E::File("var/cache/c", b"c", 0o644, 0),
        ],
    )
    .unwrap();
    assert!(!root.join("etc/motd").exists());
    assert!(root.join("etc/keep").exists());
    let mut cache: Vec<String> = std::fs::read_dir(root.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    cache.sort();
    assert_eq!(cache, ["c"]);
    // Root's files belong to the workload's root; other owners keep their ids.
    apply(&root, &[E::File("home/u/f", b"x", 0o4755, 1000)]).unwrap();
    let m = std::fs::metadata(root.join("etc/keep")).unwrap();
    assert_eq!((m.uid(), m.gid()), (ROOT_HOST_ID, ROOT_HOST_ID));
    let m = std::fs::metadata(root.join("home/u/f")).unwrap();
    assert_eq!(m.uid(), 1000);
    assert_eq!(m.mode() & 0o7777, 0o4755, "set-id bits survive the chown");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn links_and_symlinks_never_reach_outside_the_root() {
    if !ready("links") {
        return;
    }
    let d = scratch("links");
    let root = d.join("root");
    std::fs::create_dir(&root).unwrap();
    let outside = d.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"host").unwrap();
    let out_abs = outside.to_str().unwrap().to_string();
    apply(
        &root,
        &[
            E::File("bin/busybox", b"elf", 0o755, 0),
            E::Hard("bin/sh", "bin/busybox"),
            // An absolute symlink and one that climbs: both resolve inside the root.
            E::Symlink("abs", &out_abs),
            E::Symlink("up", "../../../../.."),
        ],
    )
    .unwrap();
    assert_eq!(
        std::fs::metadata(root.join("bin/sh")).unwrap().ino(),
        std::fs::metadata(root.join("bin/busybox")).unwrap().ino()
    );
    apply(
        &root,
        &[
            E::File("abs/secret", b"image", 0o644, 0),
            E::File("up/x", b"image", 0o644, 0),
            E::File("abs/.wh.secret", b"", 0o644, 0),
        ],
    )
    .unwrap();
    // The host's file is untouched; the writes landed under the root.
    assert_eq!(std::fs::read(outside.join("secret")).unwrap(), b"host");
    assert!(root.join(out_abs.trim_start_matches('/')).is_dir());
    assert_eq!(std::fs::read(root.join("x")).unwrap(), b"image");
    assert!(!d.join("x").exists());
    // A hard link to a file outside, or to something that is not there, is refused.
    let e = apply(&root, &[E::Hard("bin/evil", "../../outside/secret")]).unwrap_err();
    assert!(e.contains("climbs out of the root"), "{e}");
    let e = apply(&root, &[E::Hard("bin/evil", "etc/shadow")]).unwrap_err();
    assert!(e.contains("not a file of the image"), "{e}");
    // A path that climbs out is refused with its name.
    let e = apply(&root, &[E::Raw(b"../../escaped", b"x")]).unwrap_err();
    assert!(
        e.contains("\"../../escaped\" climbs out of the root"),
        "{e}"
    );
    assert!(!d.join("escaped").exists() && !std::env::temp_dir().join("escaped").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

fn digest(b: &[u8]) -> Digest {
    Digest::from_sha256(&sha2::Sha256::digest(b))
}

/// An OCI layout in `dir` with one image: `layers` as given (bytes, media type). Returns the
/// manifest digest.
fn layout(dir: &Path, layers: &[(Vec<u8>, &str)]) -> Digest {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let d = digest(b);
        std::fs::write(blobs.join(d.hex()), b).unwrap();
        d
    };
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cd = put(config);
    let ls: Vec<String> = layers
        .iter()
        .map(|(b, mt)| {
            let d = put(b);
            format!(
                r#"{{"mediaType":"{mt}","digest":"{d}","size":{}}}"#,
                b.len()
            )
        })
        .collect();
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
        config.len(),
        ls.join(",")
    );
    put(m.as_bytes())
}

fn image_ref(d: &Digest) -> ImageRef {
    ImageRef::parse(&format!("disk:TEST@{d}")).unwrap()
}

#[test]
fn a_gzip_and_a_zstd_layer_unpack_and_a_tampered_blob_changes_nothing() {
    if !ready("store") {
        return;
    }
    let d = scratch("store");
    let base = tar_of(&[E::File("bin/busybox", b"elf", 0o755, 0)]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &base).unwrap();
    let gz = gz.finish().unwrap();
    let top = tar_of(&[E::File("etc/hostname", b"node", 0o644, 0)]);
    let zst =
        ruzstd::encoding::compress_to_vec(&top[..], ruzstd::encoding::CompressionLevel::Fastest);
    let src = d.join("layout");
    let good = layout(
        &src,
        &[
            (gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
            (zst, "application/vnd.oci.image.layer.v1.tar+zstd"),
        ],
    );
    let store = Store::new(d.join("store")).unwrap();
    let p = store
        .pull(&image_ref(&good), &Layout { dir: src.clone() }, &mut |_| {})
        .unwrap();
    assert_eq!(
        std::fs::read(p.rootfs.join("etc/hostname")).unwrap(),
        b"node"
    );
    assert_eq!(p.config.cmd, ["/bin/sh"]);
    store.set_current(&good).unwrap();

    // A layer whose bytes changed on the drive (same name, other content).
    let src2 = d.join("layout2");
    let layer = tar_of(&[E::File("bin/evil", b"x", 0o755, 0)]);
    let bad = layout(
        &src2,
        &[(layer.clone(), "application/vnd.oci.image.layer.v1.tar")],
    );
    let mut tampered = layer;
    let n = tampered.len();
    tampered[n / 3] ^= 0xff;
    std::fs::write(
        src2.join("blobs/sha256")
            .join(digest(&tar_of(&[E::File("bin/evil", b"x", 0o755, 0)])).hex()),
        &tampered,
    )
    .unwrap();
    let e = store
        .pull(&image_ref(&bad), &Layout { dir: src2.clone() }, &mut |_| {})
        .unwrap_err();
    assert!(e.contains("digest mismatch"), "{e}");
    // A digest nobody has.
    let other = digest(b"nothing");
    let e = store
        .pull(&image_ref(&other), &Layout { dir: src2 }, &mut |_| {})
        .unwrap_err();
    assert!(e.contains("No such file"), "{e}");
    // The last good image is still there and still current; no staging left behind.
    assert_eq!(store.current(), Some(good.clone()));
    assert!(store.ready(&good).is_some());
    let images: Vec<_> = std::fs::read_dir(d.join("store/images")).unwrap().collect();
    assert_eq!(images.len(), 1, "only the good image on state");
    // Collecting with nothing to keep removes it; keeping it keeps its blobs.
    assert_eq!(store.collect(&[&good]), 0);
    assert!(store.ready(&good).is_some());
    std::fs::remove_dir_all(&d).unwrap();
}
